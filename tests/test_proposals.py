"""Tests for jax_rpn.proposals against a numpy re-implementation of detectron2's procedure.

The reference below follows detectron2's ``find_top_rpn_proposals``
(detectron2/modeling/proposal_generator/proposal_utils.py), ``Box2BoxTransform.apply_deltas``,
``Boxes.clip``, ``Boxes.nonempty`` and torchvision's greedy ``batched_nms``, one image at a time
(the per-image post-NMS top-k rule), in float32 like PyTorch.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_rpn import anchors as anchor_ops
from jax_rpn import proposals

FEATURE_HWS = [(8, 10), (4, 5), (2, 3)]  # padded input 64 x 80, strides 8, 16, 32
ANCHORS = anchor_ops.multilevel_anchors(FEATURE_HWS, [8, 16, 32], [[32], [64], [128]], [0.5, 1, 2])
SCALE_CLAMP = math.log(1000.0 / 16)  # detectron2's _DEFAULT_SCALE_CLAMP
SETTINGS = dict(pre_nms_topk=50, post_nms_topk=40, nms_threshold=0.6, min_size=2.0)


# ---------------------------------------------------------------- numpy reference (detectron2)
def _np_decode(anchors, deltas, scale_clamp=SCALE_CLAMP):
    """detectron2 Box2BoxTransform.apply_deltas with weights (1, 1, 1, 1)."""
    anchors = anchors.astype(np.float32)
    deltas = deltas.astype(np.float32)
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    ctr_x = anchors[:, 0] + np.float32(0.5) * widths
    ctr_y = anchors[:, 1] + np.float32(0.5) * heights
    dw = np.minimum(deltas[:, 2], np.float32(scale_clamp))
    dh = np.minimum(deltas[:, 3], np.float32(scale_clamp))
    with np.errstate(all="ignore"):
        cx = deltas[:, 0] * widths + ctr_x
        cy = deltas[:, 1] * heights + ctr_y
        w = np.exp(dw) * widths
        h = np.exp(dh) * heights
        half = np.float32(0.5)
        return np.stack([cx - half * w, cy - half * h, cx + half * w, cy + half * h], axis=1)


def _np_area(b):
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def _np_iou_one(box, boxes):
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[:, 0] * wh[:, 1]
    union = _np_area(box) + _np_area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def _np_nms(boxes, scores, thr):
    """torchvision nms: greedy in descending score, suppress IoU > thr."""
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(scores), bool)
    keep = []
    for i in order:
        if not suppressed[i]:
            keep.append(i)
            suppressed |= _np_iou_one(boxes[i], boxes) > thr
    return np.array(keep, dtype=np.int64)


def _np_batched_nms(boxes, scores, groups, thr):
    """torchvision _batched_nms_vanilla: NMS per group, then sort the union by score."""
    keep = np.concatenate(
        [
            np.nonzero(groups == g)[0][_np_nms(boxes[groups == g], scores[groups == g], thr)]
            for g in np.unique(groups)
        ]
    )
    return keep[np.argsort(-scores[keep], kind="stable")]


def reference(
    anchors, logits, deltas, image_hw, *, pre_nms_topk, post_nms_topk, nms_threshold, min_size
):
    """detectron2 find_top_rpn_proposals (inference mode) for one image -> boxes, scores."""
    boxes_all, scores_all, lvl_all = [], [], []
    for level, (a, lg, d) in enumerate(zip(anchors, logits, deltas, strict=True)):
        k = min(len(lg), pre_nms_topk)
        idx = np.argsort(-lg, kind="stable")[:k]
        boxes_all.append(_np_decode(a, d)[idx])
        scores_all.append(lg[idx].astype(np.float32))
        lvl_all.append(np.full(k, level))
    boxes, scores, lvl = map(np.concatenate, (boxes_all, scores_all, lvl_all))
    valid = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
    h, w = image_hw
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    keep = (boxes[:, 2] - boxes[:, 0] > min_size) & (boxes[:, 3] - boxes[:, 1] > min_size)
    boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
    keep = _np_batched_nms(boxes, scores, lvl, nms_threshold)[:post_nms_topk]
    return boxes[keep], scores[keep]


# ---------------------------------------------------------------- helpers
def _random_outputs(rng, batch, delta_scale=0.3):
    logits = [rng.normal(size=(batch, len(a))).astype(np.float32) for a in ANCHORS]
    deltas = [
        (delta_scale * rng.normal(size=(batch, len(a), 4))).astype(np.float32) for a in ANCHORS
    ]
    return logits, deltas


def _generate(anchors, logits, deltas, image_hw, **settings):
    """Jitted :func:`proposals.generate` (the settings are static)."""
    run = jax.jit(lambda o, d, hw: proposals.generate(anchors, o, d, hw, **settings))
    return run(logits, deltas, jnp.asarray(image_hw))


def _assert_matches(out, ref_boxes, ref_scores):
    n = len(ref_scores)
    valid = np.asarray(out.valid)
    assert n > 0
    np.testing.assert_array_equal(valid, np.arange(len(valid)) < n)
    np.testing.assert_allclose(np.asarray(out.boxes)[:n], ref_boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(out.scores)[:n], ref_scores, rtol=1e-6)
    # Invalid slots: boxes 0, scores -inf (documented).
    assert np.all(np.asarray(out.boxes)[n:] == 0)
    assert np.all(np.asarray(out.scores)[n:] == -np.inf)
    assert not np.any(np.isnan(np.asarray(out.boxes)))


# ---------------------------------------------------------------- tests
def test_batch_of_different_true_sizes_matches_detectron2_and_compiles_once():
    traces = []

    @jax.jit
    def run(logits, deltas, image_hw):
        traces.append(1)
        return proposals.generate_batch(ANCHORS, logits, deltas, image_hw, **SETTINGS)

    rng = np.random.default_rng(0)
    for image_hw in ([[64, 80], [50, 70], [33, 41]], [[30, 80], [64, 20], [64, 80]]):
        image_hw = np.array(image_hw, np.int32)
        logits, deltas = _random_outputs(rng, len(image_hw))
        out = run(logits, deltas, image_hw)
        assert out.boxes.shape == (3, 40, 4) and out.valid.shape == (3, 40)
        assert out.num_nonfinite.shape == (3,)
        np.testing.assert_array_equal(out.num_nonfinite, 0)
        for i, hw in enumerate(image_hw):
            ref_boxes, ref_scores = reference(
                ANCHORS, [lg[i] for lg in logits], [d[i] for d in deltas], hw, **SETTINGS
            )
            _assert_matches(jax.tree.map(lambda x, i=i: x[i], out), ref_boxes, ref_scores)
            assert np.all(np.asarray(out.boxes)[i, :, 2] <= hw[1])  # clipped to the TRUE size
            assert np.all(np.asarray(out.boxes)[i, :, 3] <= hw[0])
    assert len(traces) == 1  # new data and new true sizes reuse the compiled program


@pytest.mark.parametrize(
    "pre_nms_topk, post_nms_topk, nms_threshold", [(20, 15, 0.5), (1000, 300, 0.9), (7, 8, 1.0)]
)
def test_single_image_settings_match_detectron2(pre_nms_topk, post_nms_topk, nms_threshold):
    # (1000, 300): pre_nms_topk above every level's size; (7, 8): fewer candidates (21) than
    # post-NMS slots is possible after NMS; threshold 1.0 suppresses nothing.
    rng = np.random.default_rng(pre_nms_topk)
    logits, deltas = _random_outputs(rng, 1)
    logits, deltas = [x[0] for x in logits], [x[0] for x in deltas]
    settings = dict(
        pre_nms_topk=pre_nms_topk,
        post_nms_topk=post_nms_topk,
        nms_threshold=nms_threshold,
        min_size=0.0,
    )
    out = _generate(ANCHORS, logits, deltas, (60, 75), **settings)
    _assert_matches(out, *reference(ANCHORS, logits, deltas, (60, 75), **settings))


def test_min_size_masks_small_boxes():
    rng = np.random.default_rng(1)
    logits, deltas = _random_outputs(rng, 1, delta_scale=1.5)  # many tiny and huge boxes
    logits, deltas = [x[0] for x in logits], [x[0] for x in deltas]
    settings = dict(SETTINGS, min_size=12.0)
    out = _generate(ANCHORS, logits, deltas, (64, 80), **settings)
    ref_boxes, ref_scores = reference(ANCHORS, logits, deltas, (64, 80), **settings)
    no_min, _ = reference(ANCHORS, logits, deltas, (64, 80), **dict(settings, min_size=0.0))
    small = (no_min[:, 2] - no_min[:, 0] <= 12) | (no_min[:, 3] - no_min[:, 1] <= 12)
    assert small.any()  # the setting really removes boxes here
    _assert_matches(out, ref_boxes, ref_scores)
    b = np.asarray(out.boxes)[np.asarray(out.valid)]
    assert np.all(b[:, 2] - b[:, 0] > 12) and np.all(b[:, 3] - b[:, 1] > 12)


def test_nms_is_per_level_hand_example():
    # The same box on two levels survives twice; a copy on the same level is suppressed.
    box = np.array([[10.0, 10.0, 30.0, 40.0]], np.float32)
    anchors = [np.concatenate([box, box]), box]
    logits = [np.array([1.0, 0.5], np.float32), np.array([2.0], np.float32)]
    deltas = [np.zeros((2, 4), np.float32), np.zeros((1, 4), np.float32)]
    out = _generate(
        anchors,
        logits,
        deltas,
        (50, 50),
        pre_nms_topk=5,
        post_nms_topk=4,
        nms_threshold=0.7,
        min_size=0.0,
    )
    np.testing.assert_array_equal(out.valid, [True, True, False, False])
    np.testing.assert_array_equal(out.scores[:2], [2.0, 1.0])
    np.testing.assert_array_equal(out.boxes[:2], np.concatenate([box, box]))


def test_nms_across_levels_hand_example():
    # nms_across_levels: the level-1 box (score 2) suppresses its level-0 copies (IoU 1) and
    # a level-0 box shifted by 2 px (IoU 18 * 30 / (22 * 30) = 0.82 > 0.7); a box shifted by
    # 8 px (IoU 12 / 28 = 0.43) survives. Per level, the level-0 box with score 1 survives too.
    box = np.array([10.0, 10.0, 30.0, 40.0], np.float32)
    anchors = [np.stack([box, box + [2, 0, 2, 0], box + [8, 0, 8, 0]]), box[None]]
    logits = [np.array([1.0, 0.5, 0.2], np.float32), np.array([2.0], np.float32)]
    deltas = [np.zeros((3, 4), np.float32), np.zeros((1, 4), np.float32)]
    settings = dict(pre_nms_topk=5, post_nms_topk=4, nms_threshold=0.7, min_size=0.0)
    across = _generate(anchors, logits, deltas, (50, 50), **settings, nms_across_levels=True)
    np.testing.assert_array_equal(across.valid, [True, True, False, False])
    np.testing.assert_array_equal(across.scores[:2], np.float32([2.0, 0.2]))
    np.testing.assert_array_equal(across.boxes[:2], np.stack([box, box + [8, 0, 8, 0]]))
    per_level = _generate(anchors, logits, deltas, (50, 50), **settings)
    np.testing.assert_array_equal(per_level.scores[:3], np.float32([2.0, 1.0, 0.2]))


def test_nonfinite_inputs_are_masked_and_counted():
    rng = np.random.default_rng(2)
    logits, deltas = _random_outputs(rng, 1)
    logits, deltas = [x[0].copy() for x in logits], [x[0].copy() for x in deltas]
    # Level 0: NaN logit on the best anchors, +inf logit, -inf logit; inf / NaN deltas.
    top = np.argsort(-logits[0])[:3]
    logits[0][top[0]] = np.nan
    logits[0][top[1]] = np.inf
    logits[0][5] = -np.inf
    deltas[0][top[2], 0] = np.inf  # finite logit, infinite box
    deltas[1][3, 3] = np.nan
    deltas[1][4, 2] = np.inf  # dw = +inf is clamped by scale_clamp: a finite box, not counted
    bad = [np.array(sorted({top[0], top[1], 5, top[2]})), np.array([3]), np.array([], int)]
    # detectron2 inference (filter after top-k) when top-k keeps every anchor:
    settings = dict(SETTINGS, pre_nms_topk=1000)
    out = _generate(ANCHORS, logits, deltas, (64, 80), **settings)
    assert int(out.num_nonfinite) == 5
    _assert_matches(out, *reference(ANCHORS, logits, deltas, (64, 80), **settings))
    # With a real pre-NMS top-k, non-finite anchors take no slot: same as deleting them.
    kept = [np.setdiff1d(np.arange(len(a)), b) for a, b in zip(ANCHORS, bad, strict=True)]
    ref = reference(
        [a[k] for a, k in zip(ANCHORS, kept, strict=True)],
        [lg[k] for lg, k in zip(logits, kept, strict=True)],
        [d[k] for d, k in zip(deltas, kept, strict=True)],
        (64, 80),
        **SETTINGS,
    )
    out = _generate(ANCHORS, logits, deltas, (64, 80), **SETTINGS)
    assert int(out.num_nonfinite) == 5
    _assert_matches(out, *ref)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(pre_nms_topk=0), "pre_nms_topk"),
        (dict(post_nms_topk=-1), "post_nms_topk"),
        (dict(nms_threshold=0.0), "nms_threshold"),
        (dict(nms_threshold=1.5), "nms_threshold"),
        (dict(min_size=-1.0), "min_size"),
    ],
)
def test_bad_settings_raise(change, match):
    logits, deltas = _random_outputs(np.random.default_rng(4), 1)
    with pytest.raises(ValueError, match=match):
        proposals.generate(
            ANCHORS,
            [x[0] for x in logits],
            [x[0] for x in deltas],
            (64, 80),
            **dict(SETTINGS, **change),
        )


def test_mismatched_levels_raise():
    logits, deltas = _random_outputs(np.random.default_rng(5), 1)
    logits, deltas = [x[0] for x in logits], [x[0] for x in deltas]
    with pytest.raises(ValueError, match="one entry per level"):
        proposals.generate(ANCHORS[:2], logits, deltas, (64, 80), **SETTINGS)
    with pytest.raises(ValueError, match=r"objectness\[1\] must have shape \[Nl\]"):
        proposals.generate(ANCHORS, [logits[0], logits[0], logits[2]], deltas, (64, 80), **SETTINGS)
