"""Anchors against the peers' own published values."""

import numpy as np
import pytest

from jax_rpn import anchors


def test_py_faster_rcnn_generate_anchors():
    # py-faster-rcnn lib/rpn/generate_anchors.py: generate_anchors() with base 16, ratios
    # (0.5, 1, 2), scales (8, 16, 32) prints these 9 rows (its code's output; the Matlab
    # comment in that file differs).
    expected = np.array(
        [
            [-84, -40, 99, 55],
            [-176, -88, 191, 103],
            [-360, -184, 375, 199],
            [-56, -56, 71, 71],
            [-120, -120, 135, 135],
            [-248, -248, 263, 263],
            [-36, -80, 51, 95],
            [-80, -168, 95, 183],
            [-168, -344, 183, 359],
        ],
        np.float32,
    )
    got = anchors.cell_anchors((128, 256, 512), (0.5, 1, 2), convention="py-faster-rcnn")
    np.testing.assert_array_equal(got, expected)


# detectron2 tests/modeling/test_anchor_generator.py: sizes (32, 64), ratios (0.25, 1, 4),
# stride 4, a 1x2 feature map, offset 0.0 and 0.5.
_D2_OFFSET0 = [
    [-32.0, -8.0, 32.0, 8.0],
    [-16.0, -16.0, 16.0, 16.0],
    [-8.0, -32.0, 8.0, 32.0],
    [-64.0, -16.0, 64.0, 16.0],
    [-32.0, -32.0, 32.0, 32.0],
    [-16.0, -64.0, 16.0, 64.0],
    [-28.0, -8.0, 36.0, 8.0],
    [-12.0, -16.0, 20.0, 16.0],
    [-4.0, -32.0, 12.0, 32.0],
    [-60.0, -16.0, 68.0, 16.0],
    [-28.0, -32.0, 36.0, 32.0],
    [-12.0, -64.0, 20.0, 64.0],
]
_D2_OFFSET_HALF = [
    [-30.0, -6.0, 34.0, 10.0],
    [-14.0, -14.0, 18.0, 18.0],
    [-6.0, -30.0, 10.0, 34.0],
    [-62.0, -14.0, 66.0, 18.0],
    [-30.0, -30.0, 34.0, 34.0],
    [-14.0, -62.0, 18.0, 66.0],
    [-26.0, -6.0, 38.0, 10.0],
    [-10.0, -14.0, 22.0, 18.0],
    [-2.0, -30.0, 14.0, 34.0],
    [-58.0, -14.0, 70.0, 18.0],
    [-26.0, -30.0, 38.0, 34.0],
    [-10.0, -62.0, 22.0, 66.0],
]


@pytest.mark.parametrize("offset,expected", [(0.0, _D2_OFFSET0), (0.5, _D2_OFFSET_HALF)])
def test_detectron2_default_anchor_generator(offset, expected):
    cells = anchors.cell_anchors((32, 64), (0.25, 1, 4))
    got = anchors.grid_anchors((1, 2), 4, cells, offset=offset)
    np.testing.assert_allclose(got, np.array(expected, np.float32), atol=1e-5)
    (multi,) = anchors.multilevel_anchors([(1, 2)], [4], [[32, 64]], [0.25, 1, 4], offset=offset)
    np.testing.assert_array_equal(multi, got)


def test_torchvision_rounded_ratio_major():
    # torchvision AnchorGenerator.generate_anchors for sizes (32, 64, 128), ratios (0.5, 1, 2):
    # ratio-major rows; w = size / sqrt(r), h = size * sqrt(r), halved, then rounded.
    got = anchors.cell_anchors((32, 64, 128), (0.5, 1.0, 2.0), convention="torchvision")
    expected = np.array(
        [
            [-23, -11, 23, 11],
            [-45, -23, 45, 23],
            [-91, -45, 91, 45],
            [-16, -16, 16, 16],
            [-32, -32, 32, 32],
            [-64, -64, 64, 64],
            [-11, -23, 11, 23],
            [-23, -45, 23, 45],
            [-45, -91, 45, 91],
        ],
        np.float32,
    )
    np.testing.assert_array_equal(got, expected)


def test_torchvision_grid():
    # torchvision test/test_models_detection_anchor_utils.py::test_anchor_generator: size 10,
    # ratio 1, a 15x15 image with a 3x3 feature map (stride 5).
    cells = anchors.cell_anchors((10,), (1,), convention="torchvision")
    got = anchors.grid_anchors((3, 3), 5, cells)
    expected = [
        [-5.0, -5.0, 5.0, 5.0],
        [0.0, -5.0, 10.0, 5.0],
        [5.0, -5.0, 15.0, 5.0],
        [-5.0, 0.0, 5.0, 10.0],
        [0.0, 0.0, 10.0, 10.0],
        [5.0, 0.0, 15.0, 10.0],
        [-5.0, 5.0, 5.0, 15.0],
        [0.0, 5.0, 10.0, 15.0],
        [5.0, 5.0, 15.0, 15.0],
    ]
    np.testing.assert_array_equal(got, np.array(expected, np.float32))


def test_torchvision_steps_image_size_over_feature_size_per_axis():
    # torchvision's AnchorGenerator on an 800x1216 batch: P6 is 13x19, so its strides are
    # (800 // 13, 1216 // 19) = (61, 64), not 64; the detectron2 convention keeps 64.
    kw = dict(image_hw=(800, 1216))
    (tv,) = anchors.multilevel_anchors(
        [(13, 19)], [64], [[512]], [1.0], convention="torchvision", **kw
    )
    (d2,) = anchors.multilevel_anchors([(13, 19)], [64], [[512]], [1.0], **kw)
    tv_centres = (tv[:, :2] + tv[:, 2:]).reshape(13, 19, 2) / 2  # [H, W, (x, y)]
    np.testing.assert_array_equal(tv_centres[:, 0, 1], 61 * np.arange(13))
    np.testing.assert_array_equal(tv_centres[0, :, 0], 64 * np.arange(19))
    d2_centres = (d2[:, :2] + d2[:, 2:]).reshape(13, 19, 2) / 2
    np.testing.assert_array_equal(d2_centres[:, 0, 1], 64 * np.arange(13))
    # Sizes divisible by the stride agree in both conventions (512 // 8 = 64).
    (tv512,) = anchors.multilevel_anchors(
        [(8, 8)], [64], [[512]], [1.0], convention="torchvision", image_hw=(512, 512)
    )
    cell = anchors.cell_anchors((512,), (1.0,), convention="torchvision")
    np.testing.assert_array_equal(tv512, anchors.grid_anchors((8, 8), 64, cell))


def test_grid_anchors_takes_a_stride_per_axis():
    cells = np.array([[-1.0, -1.0, 1.0, 1.0]], np.float32)
    got = anchors.grid_anchors((2, 2), (3, 5), cells)  # (stride_y, stride_x)
    np.testing.assert_array_equal(got, [[-1, -1, 1, 1], [4, -1, 6, 1], [-1, 2, 1, 4], [4, 2, 6, 4]])


@pytest.mark.parametrize("convention", anchors.CONVENTIONS)
def test_areas_and_ratios(convention):
    sizes, ratios = (32.0, 128.0), (0.5, 1.0, 2.0)
    cells = anchors.cell_anchors(sizes, ratios, convention=convention)
    extra = 1.0 if convention == "py-faster-rcnn" else 0.0  # its +1 width convention
    w = cells[:, 2] - cells[:, 0] + extra
    h = cells[:, 3] - cells[:, 1] + extra
    order = (
        [(s, r) for s in sizes for r in ratios]
        if convention == "detectron2"
        else [(s, r) for r in ratios for s in sizes]
    )
    exp_area = np.array([s * s for s, _ in order])
    exp_ratio = np.array([r for _, r in order])
    # Rounding (torchvision, py-faster-rcnn) moves each side by at most one pixel.
    tol = 0.0 if convention == "detectron2" else 0.1
    np.testing.assert_allclose(w * h, exp_area, rtol=1e-5 + tol)
    np.testing.assert_allclose(h / w, exp_ratio, rtol=1e-5 + tol)


def test_grid_order_is_cell_major():
    cells = anchors.cell_anchors((8, 16), (1.0,))
    grid = anchors.grid_anchors((2, 3), 8, cells).reshape(2, 3, 2, 4)  # [H, W, A, 4]
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(grid[i, j], cells + np.float32([8 * j, 8 * i] * 2))


def test_num_cell_anchors_matches_generation():
    assert anchors.num_cell_anchors((32, 64, 128), (0.5, 1, 2)) == 9
    cells = anchors.level_cell_anchors((4, 8), [[32], [64]], (0.5, 1, 2))
    assert [c.shape for c in cells] == [(3, 4), (3, 4)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sizes=(32, 0), aspect_ratios=(1,)), "sizes"),
        (dict(sizes=(32,), aspect_ratios=(1, -0.5)), "aspect_ratios"),
        (dict(sizes=(32,), aspect_ratios=()), "aspect_ratios"),
        (dict(sizes=(32,), aspect_ratios=(1,), convention="mmdet"), "convention"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        anchors.cell_anchors(**kwargs)


def test_bad_levels():
    with pytest.raises(ValueError, match="sizes has 2 levels but strides has 3"):
        anchors.level_cell_anchors((4, 8, 16), [[32], [64]], (1.0,))
    with pytest.raises(ValueError, match="same number of anchors per cell"):
        anchors.level_cell_anchors((4, 8), [[32], [64, 128]], (1.0,))
    with pytest.raises(ValueError, match="stride"):
        anchors.grid_anchors((2, 2), 0, np.zeros((1, 4)))
