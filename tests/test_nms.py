"""jax_rpn.nms against an independent plain-numpy greedy NMS (and TensorFlow's kernel).

Expected values come from `_greedy_reference` below: the textbook one-box-at-a-time greedy
loop in float32 numpy, or are hand-computed where stated. Threshold sweeps call the jitted
private `_nms` with a traced threshold (the public functions only validate and call it), so
one compilation serves every threshold.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_rpn import nms

THRESHOLDS = (0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _greedy_reference(boxes, scores, iou_threshold, max_output, groups=None):
    """Plain greedy NMS: visit by descending score (stable), keep a box unless IoU > thr with a
    kept box of its group. Invalid scores/boxes (NaN, -inf, non-finite) are skipped."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    thr = np.float32(iou_threshold)
    valid = np.all(np.isfinite(boxes), axis=1) & (scores > -np.inf)
    order = np.argsort(-np.where(valid, scores, -np.inf), kind="stable")
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    kept = []
    for i in order:
        if len(kept) == max_output:
            break
        if not valid[i]:
            continue
        k = np.asarray(kept, np.int64)
        lt = np.maximum(boxes[k, :2], boxes[i, :2])
        rb = np.minimum(boxes[k, 2:], boxes[i, 2:])
        wh = np.maximum(rb - lt, np.float32(0))
        inter = wh[:, 0] * wh[:, 1]
        union = area[i] + area[k] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0).astype(np.float32)
        over = iou > thr
        if groups is not None:
            over &= groups[k] == groups[i]
        if not np.any(over):
            kept.append(int(i))
    out = np.full(max_output, -1, np.int32)
    out[: len(kept)] = kept
    return out, len(kept)


def _clustered(rng, n, num_objects=20, size=(800, 800)):
    """RPN-like boxes: jittered copies of a few objects, so many pairs overlap."""
    h, w = size
    centre = rng.uniform(0, [w, h], (num_objects, 2))
    extent = rng.uniform(20, 200, (num_objects, 2))
    obj = rng.integers(0, num_objects, n)
    c = centre[obj] + rng.normal(0, 0.15, (n, 2)) * extent[obj]
    e = extent[obj] * np.exp(rng.normal(0, 0.15, (n, 2)))
    boxes = np.concatenate([c - e / 2, c + e / 2], axis=1).astype(np.float32)
    return boxes, rng.uniform(0, 1, n).astype(np.float32)


@functools.cache
def _jitted(max_output, tile_size=nms._TILE, chunk=nms._CHUNK, grouped=False):
    """Jitted private `_nms` with a traced threshold: one compile per (shape, settings)."""

    def run(boxes, scores, groups, thr):
        return nms._nms(
            boxes,
            scores,
            groups if grouped else None,
            iou_threshold=thr,
            max_output=max_output,
            tile_size=tile_size,
            chunk=chunk,
        )

    return jax.jit(run)


def _check(boxes, scores, thr, max_output, groups=None, **tiles):
    fn = _jitted(max_output, grouped=groups is not None, **tiles)
    g = np.zeros(len(scores), np.int32) if groups is None else groups
    idx, num = fn(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(g), jnp.float32(thr))
    want_idx, want_num = _greedy_reference(boxes, scores, thr, max_output, groups)
    assert int(num) == want_num, (thr, int(num), want_num)
    np.testing.assert_array_equal(np.asarray(idx), want_idx, err_msg=f"thr={thr}")
    return np.asarray(idx), int(num)


def test_random_clustered_all_thresholds():
    # N = 600 spans 3 default tiles, the last partial; max_output below and above N.
    rng = np.random.default_rng(0)
    boxes, scores = _clustered(rng, 600)
    for thr in THRESHOLDS:
        _, num = _check(boxes, scores, thr, 100)
        _, num_all = _check(boxes, scores, thr, 700)
        assert num == min(100, num_all)


def test_long_suppression_chain_inside_tiles():
    # Worst case of the in-tile fixed point: each box overlaps its neighbours, so the greedy
    # decisions chain through whole tiles. Boxes [2i, 0, 2i + 10, 10]: IoU at distance 2 is
    # 8/12, at 4 is 6/14, at 6 is 4/16 (hand), so thr 0.5 keeps every 2nd, thr 0.3 every 3rd.
    x = np.arange(600, dtype=np.float32) * 2
    boxes = np.stack([x, np.zeros(600), x + 10, np.full(600, 10)], axis=1).astype(np.float32)
    scores = np.linspace(1, 0, 600, dtype=np.float32)
    idx, num = _check(boxes, scores, 0.5, 700)
    np.testing.assert_array_equal(idx[:num], np.arange(0, 600, 2))
    idx, num = _check(boxes, scores, 0.3, 100)
    np.testing.assert_array_equal(idx, np.arange(0, 300, 3))


def test_small_tiles_many_tiles_and_chunks():
    # Tiles and kept-set chunks of 8 make a 203-box input cross ~26 tiles and many chunks.
    rng = np.random.default_rng(1)
    boxes, scores = _clustered(rng, 203, num_objects=6)
    scores[::5] = scores[0]  # ties in score
    for thr in THRESHOLDS:
        for max_output in (7, 250):  # stops inside a tile; more slots than boxes
            _check(boxes, scores, thr, max_output, tile_size=8, chunk=8)


def test_uniform_and_dense_random():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 1000, (500, 2))
    wh = rng.uniform(5, 150, (500, 2))
    uniform = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    dense = (uniform / 10).astype(np.float32)  # ten times denser: most pairs overlap
    scores = rng.uniform(0, 1, 500).astype(np.float32)
    for thr in (0.3, 0.5, 0.7, 0.9):
        _check(uniform, scores, thr, 200)
        _check(dense, scores, thr, 200)


def _pair(iou_value):
    """[0,0,10,10] and [0,0,10,h]: IoU = 10h / 100 exactly in real arithmetic."""
    return np.array([[0, 0, 10, 10], [0, 0, 10, 10 * iou_value]], np.float32)


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7, 0.9])
def test_pairs_just_above_and_below_threshold(thr):
    scores = np.array([0.9, 0.8], np.float32)
    above, _ = _check(_pair(thr + 1e-4), scores, thr, 4)
    below, _ = _check(_pair(thr - 1e-4), scores, thr, 4)
    np.testing.assert_array_equal(above, [0, -1, -1, -1])  # hand: second box suppressed
    np.testing.assert_array_equal(below, [0, 1, -1, -1])  # hand: both kept


def test_iou_exactly_at_threshold_is_not_suppressed():
    # Hand-computed: inter 50, union 100, IoU exactly 0.5; suppression needs IoU > thr.
    boxes = _pair(0.5)
    scores = np.array([0.9, 0.8], np.float32)
    idx, num = jax.jit(functools.partial(nms.nms, iou_threshold=0.5, max_output=2))(boxes, scores)
    assert int(num) == 2
    np.testing.assert_array_equal(idx, [0, 1])
    idx, num = nms.nms(boxes, scores, iou_threshold=0.4999, max_output=2)
    np.testing.assert_array_equal(idx, [0, -1])


def test_identical_boxes_ties_and_everything_suppressed():
    # 300 copies of one box with equal scores: only the lowest index survives (hand).
    boxes = np.tile(np.array([[5, 5, 50, 60]], np.float32), (300, 1))
    scores = np.full(300, 0.5, np.float32)
    for thr in (0.0, *THRESHOLDS):
        idx, num = _check(boxes, scores, thr, 10)
        assert num == 1 and idx[0] == 0
    idx, num = _check(boxes, scores, 1.0, 10)  # IoU 1 is not > 1: threshold 1 keeps all
    np.testing.assert_array_equal(idx, np.arange(10))
    # Ties in score are visited by index: disjoint boxes come out as 0, 1, 2, ... (hand).
    disjoint = np.array([[20 * i, 0, 20 * i + 10, 10] for i in range(12)], np.float32)
    idx, num = _check(disjoint, np.zeros(12, np.float32), 0.5, 12)
    np.testing.assert_array_equal(idx, np.arange(12))
    # -0.0 and 0.0 tie: the lower index wins.
    idx, _ = _check(boxes[:2], np.array([-0.0, 0.0], np.float32), 0.5, 2)
    np.testing.assert_array_equal(idx, [0, -1])


@pytest.mark.parametrize("packed", [True, False])
def test_descending_order_both_sort_paths(monkeypatch, packed):
    # Both the packed two-sort path and the (key, index) sort used above 46340 boxes must give
    # numpy's stable descending order, invalid entries last.
    if not packed:
        monkeypatch.setattr(nms, "_PACKED_SORT_MAX_N", 0)
    rng = np.random.default_rng(7)
    values = np.array([-1e30, -2.5, -0.0, 0.0, 1e-30, 0.5, 3e8, np.inf], np.float32)
    scores = rng.choice(values, 500)  # many ties
    valid = rng.uniform(size=500) > 0.1
    order = jax.jit(nms._descending_order)(jnp.asarray(scores), jnp.asarray(valid))
    want = np.argsort(-np.where(valid, scores, -np.inf), kind="stable")
    np.testing.assert_array_equal(order, want)


def test_zero_area_and_flipped_boxes_are_never_suppressed():
    boxes = np.array(
        [[0, 0, 10, 10], [3, 3, 3, 8], [2, 2, 2, 2], [2, 2, 2, 2], [9, 9, 1, 1], [0, 0, 10, 10]],
        np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], np.float32)
    idx, num = _check(boxes, scores, 0.5, 6)
    np.testing.assert_array_equal(idx, [0, 1, 2, 3, 4, -1])  # hand: only the duplicate goes
    idx, num = _check(boxes, scores, 0.0, 6)  # threshold 0: any overlap suppresses
    np.testing.assert_array_equal(idx, [0, 1, 2, 3, 4, -1])


def test_invalid_scores_and_boxes_are_never_kept():
    boxes = np.array(
        [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, np.inf, 10], [np.nan, 0, 5, 5], [20, 20, 30, 30]]
        + [[40, 40, 50, 50]] * 2,
        np.float32,
    )
    scores = np.array([np.nan, -np.inf, 0.9, 0.9, np.inf, 0.1, 0.2], np.float32)
    idx, num = _check(boxes, scores, 0.5, 7)
    # Hand: the +inf score comes first; box 6 suppresses its duplicate 5; 0-3 are invalid.
    np.testing.assert_array_equal(idx, [4, 6, -1, -1, -1, -1, -1])
    idx, num = nms.nms(boxes[:4], scores[:4], iou_threshold=0.5, max_output=3)
    assert int(num) == 0
    np.testing.assert_array_equal(idx, [-1, -1, -1])


def test_sizes_fewer_boxes_than_max_output_and_empty():
    boxes = np.array([[0, 0, 10, 10]], np.float32)
    idx, num = nms.nms(boxes, np.array([0.3], np.float32), iou_threshold=0.7, max_output=5)
    np.testing.assert_array_equal(idx, [0, -1, -1, -1, -1])
    assert idx.dtype == jnp.int32 and num.dtype == jnp.int32 and int(num) == 1
    idx, num = nms.nms(np.zeros((0, 4), np.float32), np.zeros(0), iou_threshold=0.7, max_output=3)
    np.testing.assert_array_equal(idx, [-1, -1, -1])
    assert int(num) == 0


def test_batched_nms_groups_never_suppress_each_other():
    rng = np.random.default_rng(3)
    boxes, scores = _clustered(rng, 400, num_objects=8)
    groups = rng.integers(0, 5, 400).astype(np.int32)
    for thr in (0.3, 0.5, 0.7, 0.9):
        _check(boxes, scores, thr, 150, groups=groups)
        _check(boxes, scores, thr, 150, groups=groups, tile_size=16, chunk=16)
    # Hand: identical boxes in different groups are all kept; same group suppresses.
    same = np.tile(np.array([[0, 0, 1e5, 1e5]], np.float32), (4, 1))
    idx, num = nms.batched_nms(
        same,
        np.array([0.1, 0.4, 0.3, 0.2]),
        np.array([7, 0, 7, 2]),
        iou_threshold=0.5,
        max_output=4,
    )
    np.testing.assert_array_equal(idx, [1, 2, 3, -1])


def test_matches_tensorflow_on_continuous_inputs():
    # TF suppresses at IoU >= thr, we at > thr: equal unless some IoU equals thr exactly,
    # which continuous random boxes avoid. TF takes [y1, x1, y2, x2]; IoU is symmetric in
    # the axes, so passing xyxy is the same problem.
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(4)
    boxes, scores = _clustered(rng, 700, num_objects=30)
    fn = _jitted(300)
    for thr in (0.3, 0.5, 0.7):
        want = tf.image.non_max_suppression(boxes, scores, 300, iou_threshold=thr).numpy()
        idx, num = fn(boxes, scores, np.zeros(700, np.int32), np.float32(thr))
        np.testing.assert_array_equal(np.asarray(idx)[: int(num)], want)


def test_vmap_jit_and_traced_once():
    rng = np.random.default_rng(5)
    batch = [_clustered(rng, 300, num_objects=10) for _ in range(3)]
    boxes = np.stack([b for b, _ in batch])
    scores = np.stack([s for _, s in batch])
    scores[1, 100:] = np.nan  # one image with fewer candidates: its loop ends earlier

    @jax.jit
    @chex.assert_max_traces(n=1)
    def batched(boxes, scores):
        return jax.vmap(functools.partial(nms.nms, iou_threshold=0.6, max_output=64))(boxes, scores)

    for trial in range(3):
        b = boxes + trial  # new data, same shape: no retrace
        idx, num = batched(b, scores)
        for i in range(3):
            want_idx, want_num = _greedy_reference(b[i], scores[i], 0.6, 64)
            np.testing.assert_array_equal(idx[i], want_idx)
            assert int(num[i]) == want_num


def test_shard_map_over_a_batch():
    # conftest forces 4 CPU devices; one image per device, vmap inside (default check_vma).
    devices = jax.devices()[:4]
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    rng = np.random.default_rng(6)
    batch = [_clustered(rng, 200, num_objects=5) for _ in range(4)]
    boxes = np.stack([b for b, _ in batch])
    scores = np.stack([s for _, s in batch])
    groups = rng.integers(0, 3, (4, 200)).astype(np.int32)

    def per_device(boxes, scores, groups):
        single = jax.vmap(functools.partial(nms.nms, iou_threshold=0.5, max_output=32))
        multi = jax.vmap(functools.partial(nms.batched_nms, iou_threshold=0.5, max_output=32))
        return single(boxes, scores), multi(boxes, scores, groups)

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    (idx, num), (gidx, gnum) = fn(boxes, scores, groups)
    for i in range(4):
        want_idx, want_num = _greedy_reference(boxes[i], scores[i], 0.5, 32)
        np.testing.assert_array_equal(idx[i], want_idx)
        assert int(num[i]) == want_num
        want_idx, want_num = _greedy_reference(boxes[i], scores[i], 0.5, 32, groups[i])
        np.testing.assert_array_equal(gidx[i], want_idx)
        assert int(gnum[i]) == want_num


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(boxes=np.zeros((5, 3))), "boxes"),
        (dict(boxes=np.zeros((2, 5, 4))), "boxes"),
        (dict(scores=np.zeros(4)), "scores"),
        (dict(groups=np.zeros(4, np.int32)), "groups"),
        (dict(groups=np.zeros(5, np.float32)), "groups"),
        (dict(iou_threshold=1.5), "iou_threshold"),
        (dict(iou_threshold=-0.1), "iou_threshold"),
        (dict(iou_threshold=float("nan")), "iou_threshold"),
        (dict(max_output=0), "max_output"),
        (dict(max_output=2.5), "max_output"),
    ],
)
def test_bad_static_input_names_the_argument(kwargs, name):
    args = dict(
        boxes=np.zeros((5, 4), np.float32),
        scores=np.zeros(5, np.float32),
        groups=np.zeros(5, np.int32),
        iou_threshold=0.5,
        max_output=3,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        nms.batched_nms(**args)
    if name != "groups":
        args.pop("groups")
        with pytest.raises(ValueError, match=name):
            nms.nms(**args)
