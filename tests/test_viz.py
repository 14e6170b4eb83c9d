"""Tests for jax_rpn.viz: every picture is written as a PNG that loads back and is not blank."""

import matplotlib.image
import numpy as np
import pytest

from jax_rpn import anchors, recall, viz


def _check_png(path, fig, *, min_hw=(200, 200), max_hw=(2000, 3000)):
    """The PNG exists, loads back, has a sane size and is not one flat colour."""
    assert path.stat().st_size > 1000
    img = matplotlib.image.imread(path)  # [H, W, 4] float in [0, 1]
    h, w = img.shape[:2]
    assert min_hw[0] <= h <= max_hw[0] and min_hw[1] <= w <= max_hw[1], img.shape
    assert img[..., :3].std() > 0.01
    # The returned figure is the one that was saved.
    assert (h, w) == tuple(int(round(v)) for v in fig.get_size_inches()[::-1] * fig.dpi)


@pytest.fixture
def scene():
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (96, 128, 3)).astype(np.float32)  # normalized float image
    gt = np.array([[10, 10, 50, 40], [60, 20, 120, 90], [0, 0, 0, 0]], np.float32)
    gt_valid = np.array([True, True, False])
    return image, gt, gt_valid


def test_plot_cell_anchors(tmp_path):
    cells = anchors.cell_anchors((32, 64, 128), (0.5, 1.0, 2.0))
    path = tmp_path / "cell.png"
    fig = viz.plot_cell_anchors(cells, path, stride=16)
    _check_png(path, fig)
    with pytest.raises(ValueError, match="cell_anchors"):
        viz.plot_cell_anchors(np.zeros((3, 3)))


def test_plot_anchor_centers(tmp_path, scene):
    image, _, _ = scene
    path = tmp_path / "centers.png"
    fig = viz.plot_anchor_centers(image, path, feature_hw=(6, 8), stride=16, offset=0.5)
    _check_png(path, fig)
    # From explicit anchors: 2 cell anchors share each centre, so 6 * 8 centres are drawn.
    grid = anchors.grid_anchors((6, 8), 16, anchors.cell_anchors((16, 32), (1.0,)))
    fig = viz.plot_anchor_centers(image, tmp_path / "centers2.png", anchors=grid)
    assert fig.axes[0].get_title() == "48 anchor centres"
    with pytest.raises(ValueError, match="feature_hw and stride"):
        viz.plot_anchor_centers(image)


def test_plot_sampled_anchors(tmp_path, scene):
    image, gt, gt_valid = scene
    grid = anchors.grid_anchors((6, 8), 16, anchors.cell_anchors((32,), (0.5, 1.0, 2.0)))
    labels = np.random.default_rng(1).choice([1, 0, -1], len(grid), p=[0.1, 0.3, 0.6])
    path = tmp_path / "sampled.png"
    fig = viz.plot_sampled_anchors(image, grid, labels, gt, gt_valid, path, mean=0.5, std=0.2)
    _check_png(path, fig)


def test_plot_proposals_and_grid(tmp_path, scene):
    image, gt, gt_valid = scene
    rng = np.random.default_rng(2)
    props = np.concatenate([gt[:2] + rng.normal(0, 3, (2, 4)), [[5, 5, 30, 30]] * 3])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32)
    valid = np.array([True, True, True, False, False])
    path = tmp_path / "proposals.png"
    fig = viz.plot_proposals(image, gt, gt_valid, props, scores, valid, path, top=10)
    _check_png(path, fig)
    assert fig.axes[0].get_title() == "2 GT (cyan), top 3 proposals"  # invalid ones left out

    b = 3
    uint8_images = rng.integers(0, 256, (b, 96, 128, 3), dtype=np.uint8)
    grid_path = tmp_path / "grid.png"
    args = [np.stack([x] * b) for x in (gt, gt_valid, props, scores, valid)]
    fig = viz.plot_proposal_grid(uint8_images, *args, grid_path, ncols=2)
    _check_png(grid_path, fig)
    rgb = viz.figure_to_array(fig)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[-1] == 3 and rgb.std() > 0
    # 2 x 2 panels, each 4 in wide and 4 * 96 / 128 + 0.4 (title) = 3.4 in high, at 100 dpi.
    assert rgb.shape[:2] == (680, 800)


def test_plot_recall_curves(tmp_path):
    # A made-up record (no JAX needed): 4 GT found at ranks 0, 2, 9 and 40, fewer at high IoU.
    matches = np.zeros((4, 10, 50), np.int32)
    for t in range(10):
        matches[0, t, [0, 2, 9, 40][: 4 - t // 3]] = 1
    stats = recall.RecallStats(matches, np.array([4, 0, 0, 4]), np.array(50), np.array(1))
    acc = recall.RecallAccumulator()
    acc.update(stats)
    path = tmp_path / "recall.png"
    fig = viz.plot_recall_curves(acc.curves(), path)
    _check_png(path, fig, min_hw=(300, 800))


def test_display_image():
    img = np.linspace(-2, 3, 12, dtype=np.float32).reshape(2, 2, 3)
    shown = viz.display_image(img)
    assert shown.min() == 0.0 and shown.max() == 1.0  # min/max rescaled
    gray = viz.display_image(np.full((2, 2, 1), 0.25, np.float32))
    assert gray.shape == (2, 2, 3) and np.all(gray == 0.25)  # already in [0, 1]: unchanged
    denorm = viz.display_image(np.zeros((2, 2, 3), np.float32), mean=[0.1, 0.2, 0.3], std=0.5)
    np.testing.assert_allclose(denorm[0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="image"):
        viz.display_image(np.zeros((4, 4)))
