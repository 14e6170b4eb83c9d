"""IoU matcher: hand-computed cases and a plain-numpy re-implementation of detectron2's Matcher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_rpn import anchors as anchor_ops
from jax_rpn import matching

match_jit = jax.jit(
    matching.match,
    static_argnames=("high", "low", "allow_low_quality", "ignore_iof", "border", "anchor_chunk"),
)


def _np_iou(a, g):
    """float32 IoU [N, G]; on integer coordinates every step is exact but the division."""
    lt = np.maximum(a[:, None, :2], g[None, :, :2])
    rb = np.minimum(a[:, None, 2:], g[None, :, 2:])
    wh = np.maximum(rb - lt, np.float32(0))
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_g = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    union = area_a[:, None] + area_g[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, np.float32(1)), np.float32(0))


def _d2_matcher(quality, high, low, allow_low_quality, skip_zero_gt):
    """detectron2 ``Matcher([low, high], [0, -1, 1])`` on a [G, N] matrix, in numpy.

    ``skip_zero_gt`` applies our one deliberate change: a ground truth whose best quality is 0
    makes no low-quality match (detectron2 would mark every zero-IoU anchor positive).
    """
    num_gt, n = quality.shape
    if num_gt == 0:
        return np.zeros(n, np.int64), np.zeros(n, np.int64)
    vals = quality.max(axis=0)
    matches = quality.argmax(axis=0)
    high, low = np.float32(high), np.float32(low)  # torch compares in float32 too
    labels = np.ones(n, np.int64)
    labels[vals < low] = 0
    labels[(vals >= low) & (vals < high)] = -1
    if allow_low_quality:
        highest = quality.max(axis=1)
        rows = highest > 0 if skip_zero_gt else np.ones(num_gt, bool)
        _, preds = np.nonzero((quality == highest[:, None]) & rows[:, None])
        labels[preds] = 1
    return matches, labels


def _reference(anchors, gt, valid, high=0.7, low=0.3, allow_low_quality=True, skip_zero_gt=True):
    """Our semantics from detectron2's: keep only valid, positive-area ground truth."""
    keep = np.nonzero(valid & (gt[:, 2] > gt[:, 0]) & (gt[:, 3] > gt[:, 1]))[0]
    quality = _np_iou(anchors, gt[keep]).T  # [G', N]
    matches, labels = _d2_matcher(quality, high, low, allow_low_quality, skip_zero_gt)
    matched = keep[matches] if len(keep) else np.zeros(len(anchors), np.int64)
    return matched, labels


def _int_boxes(rng, n, lo=-8, hi=72, max_wh=40):
    xy = rng.integers(lo, hi, (n, 2))
    wh = rng.integers(1, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _grid_anchors():
    """Integer anchors (torchvision's rounded cells) on an 8x8 grid of stride 8: many IoU ties."""
    cells = anchor_ops.cell_anchors((8, 16, 32), (0.5, 1.0, 2.0), convention="torchvision")
    return np.asarray(anchor_ops.grid_anchors((8, 8), 8, cells))


def _float_boxes(rng, n, scale=64.0):
    xy = rng.uniform(-4, scale, (n, 2))
    wh = rng.uniform(1, scale / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# Hand-computed IoUs against A = [0, 0, 10, 10] (area 100) and B = [100, 100, 120, 120] (400).
GT = np.array([[0, 0, 10, 10], [100, 100, 120, 120]], np.float32)
ANCHORS = np.array(
    [
        [0, 0, 10, 10],  # IoU(A) = 1
        [0, 0, 10, 7],  # IoU(A) = 70 / 100 = 0.7 exactly: >= high -> 1
        [0, 0, 10, 3],  # IoU(A) = 0.3 exactly: in [low, high) -> -1
        [0, 0, 10, 2],  # IoU(A) = 0.2 -> 0
        [100, 100, 110, 110],  # IoU(B) = 100 / 400 = 0.25, one of B's four tied best anchors
        [110, 110, 120, 120],  # IoU(B) = 0.25, tie
        [100, 110, 110, 120],  # IoU(B) = 0.25, tie
        [200, 200, 210, 210],  # overlaps nothing -> 0
        [100, 100, 105, 105],  # IoU(B) = 25 / 400, below B's best -> 0
    ],
    np.float32,
)


def test_hand_computed_thresholds_and_low_quality_ties():
    matched, labels = match_jit(ANCHORS, GT, np.array([True, True]))
    np.testing.assert_array_equal(labels, [1, 1, -1, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(matched[:7], [0, 0, 0, 0, 1, 1, 1])
    _, labels = match_jit(ANCHORS, GT, np.array([True, True]), allow_low_quality=False)
    np.testing.assert_array_equal(labels, [1, 1, -1, 0, 0, 0, 0, 0, 0])


def test_low_quality_match_keeps_argmax_index():
    # X = [0, 0, 10, 10], Y = [0, 0, 20, 20]. p = X has IoU 1 with X and 0.25 with Y (tied best
    # of Y with q); like detectron2 and torchvision p stays matched to X (its argmax).
    gt = np.array([[0, 0, 20, 20], [0, 0, 10, 10]], np.float32)  # Y first, X second
    anchors = np.array([[0, 0, 10, 10], [10, 10, 20, 20], [50, 50, 60, 60]], np.float32)
    matched, labels = match_jit(anchors, gt, np.array([True, True]))
    np.testing.assert_array_equal(labels, [1, 1, 0])
    np.testing.assert_array_equal(matched[:2], [1, 0])


def test_argmax_ties_between_gt_pick_first_also_across_chunks():
    # The anchor has IoU 0.5 with both ground-truth boxes: matched to the first, like argmax.
    anchors = np.array([[0, 0, 10, 10]], np.float32)
    gt = np.array([[0, 0, 10, 5], [0, 5, 10, 10], [0, 0, 10, 5]], np.float32)
    for chunk in (1, 2, 3):
        matched, labels = match_jit(anchors, gt, np.ones(3, bool), anchor_chunk=chunk)
        # IoU 0.5 is in [low, high) but it is each box's best anchor: low-quality positive.
        assert int(matched[0]) == 0 and int(labels[0]) == 1


def test_padded_zero_area_and_non_finite_gt_never_match():
    anchors = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [30, 30, 40, 40]], np.float32)
    gt = np.array(
        [
            [0, 0, 10, 10],  # would be IoU 1 but is padding
            [5, 5, 5, 15],  # zero width
            [np.nan, 0, 10, 10],  # non-finite
            [30, 30, 40, 40],  # the only real box
        ],
        np.float32,
    )
    valid = np.array([False, True, True, True])
    matched, labels = match_jit(anchors, gt, valid)
    np.testing.assert_array_equal(labels, [0, 0, 1])
    assert int(matched[2]) == 3
    assert np.all(np.isin(np.asarray(matched), [3]))  # every anchor's best valid box


def test_gt_overlapping_no_anchor_makes_no_low_quality_match():
    anchors = _grid_anchors()
    gt = np.array([[500, 500, 520, 520]], np.float32)
    _, labels = match_jit(anchors, gt, np.array([True]))
    assert np.all(np.asarray(labels) == 0)
    # Documented deviation: detectron2's Matcher would make every anchor positive here.
    _, d2_labels = _reference(anchors, gt, np.array([True]), skip_zero_gt=False)
    assert np.all(d2_labels == 1)


def test_no_valid_gt_all_background():
    anchors = _grid_anchors()
    for gt, valid in [
        (np.zeros((0, 4), np.float32), np.zeros((0,), bool)),
        (np.array([[0, 0, 10, 10], [3, 3, 9, 9]], np.float32), np.zeros(2, bool)),
    ]:
        matched, labels = match_jit(anchors, gt, valid)
        assert matched.dtype == jnp.int32 and labels.dtype == jnp.int32
        np.testing.assert_array_equal(labels, np.zeros(len(anchors)))
        np.testing.assert_array_equal(matched, np.zeros(len(anchors)))


def test_border_rule_excludes_straddling_anchors_before_matching():
    image_hw = (100, 100)
    anchors = np.array(
        [
            [-1, 0, 10, 10],  # x1 < 0: out at border 0, in at border 1
            [0, 0, 100, 50],  # x2 = w is out (detectron2 / py-faster-rcnn: x2 < w + border)
            [0, 0, 99, 50],  # inside, IoU 100 / 4960 -> 0
            [0, 0, 10, 20],  # inside, IoU 100 / 210 = 0.476
            [80, 80, 90, 90],  # inside, no overlap -> 0
        ],
        np.float32,
    )
    gt = np.array([[-1, 0, 10, 10]], np.float32)  # identical to the out-of-image anchor
    matched, labels = match_jit(anchors, gt, np.array([True]), image_hw=image_hw, border=0)
    # Anchor 0 is excluded (-1), so the gt's best inside anchor (anchor 3) becomes its
    # low-quality match, as in py-faster-rcnn where outside anchors are removed before matching.
    np.testing.assert_array_equal(labels, [-1, -1, 0, 1, 0])
    _, labels = match_jit(anchors, gt, np.array([True]), image_hw=image_hw, border=1)
    np.testing.assert_array_equal(labels, [1, 0, 0, -1, 0])
    _, labels = match_jit(anchors, gt, np.array([True]))
    np.testing.assert_array_equal(labels, [1, 0, 0, -1, 0])
    # Traced image size, per image under vmap.
    hws = jnp.array([[100, 100], [100, 200]])
    _, labels = jax.jit(
        jax.vmap(lambda hw: matching.match(anchors, gt, jnp.array([True]), image_hw=hw, border=0))
    )(hws)
    np.testing.assert_array_equal(labels, [[-1, -1, 0, 1, 0], [-1, 0, 0, 1, 0]])


def test_ignored_gt_dropped_and_iof_rule():
    anchors = np.array(
        [
            [0, 0, 10, 10],  # inside the crowd box (IoF 1), IoU 100 / 1600
            [20, 20, 30, 30],  # inside the crowd box (IoF 1), IoU 100 / 1600
            [35, 35, 45, 45],  # 25% inside the crowd box
            [100, 100, 110, 110],  # identical to the normal box
            [0, 0, 40, 40],  # identical to the crowd box
        ],
        np.float32,
    )
    gt = np.array([[0, 0, 40, 40], [100, 100, 110, 110]], np.float32)
    crowd = np.array([True, False])
    valid = np.array([True, True])
    _, labels = match_jit(anchors, gt, valid, gt_ignore=crowd)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 0])
    _, labels = match_jit(anchors, gt, valid, gt_ignore=crowd, ignore_iof=0.5)
    np.testing.assert_array_equal(labels, [-1, -1, 0, 1, -1])
    # Without gt_ignore the crowd box is an ordinary ground truth.
    _, labels = match_jit(anchors, gt, valid)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1])
    # A positive anchor inside a crowd box stays positive.
    gt2 = np.array([[0, 0, 40, 40], [20, 20, 30, 30]], np.float32)
    _, labels = match_jit(anchors, gt2, valid, gt_ignore=crowd, ignore_iof=0.5)
    np.testing.assert_array_equal(labels[:2], [-1, 1])


@pytest.mark.parametrize(
    ("seed", "high", "low", "allow"),
    [(0, 0.7, 0.3, True), (1, 0.7, 0.3, True), (2, 0.5, 0.5, True), (3, 0.6, 0.4, False)],
)
def test_against_numpy_detectron2_matcher(seed, high, low, allow):
    rng = np.random.default_rng(seed)
    anchors = _grid_anchors()
    gt = _int_boxes(rng, 12)
    gt[0, 2] = gt[0, 0]  # a zero-area box
    valid = rng.random(12) < 0.7
    want_matched, want_labels = _reference(anchors, gt, valid, high, low, allow)
    matched, labels = match_jit(
        anchors, gt, valid, high=high, low=low, allow_low_quality=allow, anchor_chunk=5
    )
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(matched, want_matched)
    assert np.any(want_labels == 1)  # the case is not trivial


@pytest.mark.parametrize("seed", range(3))
def test_chunked_equals_direct(seed, monkeypatch):
    rng = np.random.default_rng(100 + seed)
    anchors = np.concatenate([_grid_anchors(), _float_boxes(rng, 300)])
    gt = np.concatenate([_float_boxes(rng, 37), _int_boxes(rng, 8)])
    gt[5] = anchors[10]  # exact IoU 1
    gt[6] = gt[7]  # duplicate ground truth: argmax ties across chunks
    valid = rng.random(len(gt)) < 0.9
    direct = match_jit(anchors, gt, valid, anchor_chunk=len(anchors))
    for chunk in (1, 7, 44):
        chunked = match_jit(anchors, gt, valid, anchor_chunk=chunk)
        np.testing.assert_array_equal(chunked[0], direct[0], err_msg=f"chunk {chunk}")
        np.testing.assert_array_equal(chunked[1], direct[1], err_msg=f"chunk {chunk}")
    # The automatic choice: a power of two near the budget over G rounded up to 32 (64 here).
    monkeypatch.setattr(matching, "_CHUNK_ELEMENTS", 64 * 16)
    monkeypatch.setattr(matching, "_MIN_CHUNK", 8)
    assert matching.auto_anchor_chunk(len(anchors), len(gt)) == 16
    auto = jax.jit(matching.match)(anchors, gt, valid)
    np.testing.assert_array_equal(auto[1], direct[1])
    np.testing.assert_array_equal(auto[0], direct[0])


def test_vmap_over_batch_of_padded_gt():
    rng = np.random.default_rng(7)
    anchors = _grid_anchors()
    gt = np.stack([_int_boxes(rng, 6) for _ in range(3)])
    valid = rng.random((3, 6)) < 0.7
    batched = jax.jit(jax.vmap(lambda g, v: matching.match(anchors, g, v, anchor_chunk=7)))(
        gt, valid
    )
    for i in range(3):
        want_matched, want_labels = _reference(anchors, gt[i], valid[i])
        np.testing.assert_array_equal(batched[1][i], want_labels)
        np.testing.assert_array_equal(batched[0][i], want_matched)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"high": 0.3, "low": 0.7}, "low"),
        ({"high": 1.5}, "high"),
        ({"low": -0.1}, "low"),
        ({"border": -1.0, "image_hw": (10, 10)}, "border"),
        ({"border": 0.0}, "image_hw"),
        ({"anchor_chunk": 0}, "anchor_chunk"),
        ({"ignore_iof": 0.0}, "ignore_iof"),
    ],
)
def test_bad_settings_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        matching.match(ANCHORS, GT, np.array([True, True]), **kwargs)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="anchors"):
        matching.match(ANCHORS[:, :3], GT, np.array([True, True]))
    with pytest.raises(ValueError, match="gt_boxes"):
        matching.match(ANCHORS, GT[None], np.array([True, True]))
    with pytest.raises(ValueError, match="gt_valid"):
        matching.match(ANCHORS, GT, np.array([True]))
    with pytest.raises(ValueError, match="gt_ignore"):
        matching.match(ANCHORS, GT, np.array([True, True]), gt_ignore=np.array([True]))
    with pytest.raises(ValueError, match="anchors"):
        matching.match(ANCHORS[:, [2, 1, 0, 3]], GT, np.array([True, True]))  # x2 < x1


def test_low_quality_ties_between_translated_anchors_on_float_boxes():
    # Every 8x8 anchor lying inside the ground truth has IoU exactly 64 / area(gt) (the same
    # float in IEEE arithmetic, as numpy and PyTorch give); all of them tie for the box's best
    # IoU, so all are low-quality positives, whatever rounding XLA's fused IoU could introduce.
    cells = np.array([[-4.0, -4.0, 4.0, 4.0]], np.float32)
    from jax_rpn import anchors as anchor_ops

    grid = anchor_ops.grid_anchors((16, 16), 4, cells, offset=0.5)  # [256, 4], centres 2, 6, ..
    gt = np.array([[10.3, 7.7, 50.9, 41.1]], np.float32)
    inside = (
        (grid[:, 0] >= gt[0, 0])
        & (grid[:, 1] >= gt[0, 1])
        & (grid[:, 2] <= gt[0, 2])
        & (grid[:, 3] <= gt[0, 3])
    )
    assert inside.sum() > 20
    for chunk in (None, 7):
        _, labels = match_jit(grid, gt, np.ones(1, bool), anchor_chunk=chunk)
        np.testing.assert_array_equal(np.asarray(labels) == 1, inside)
