"""Anchor targets: match + sample + encode, checked against the parts and a numpy box coder."""

import functools

import jax
import numpy as np

from jax_rpn import anchors as anchor_ops
from jax_rpn import matching, targets

ANCHORS = np.asarray(
    anchor_ops.grid_anchors(
        (8, 8), 8, anchor_ops.cell_anchors((8, 16, 32), (0.5, 1.0, 2.0), convention="torchvision")
    )
)  # [576, 4]
WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # Fast R-CNN's box-head weights, to exercise the scaling


def _np_encode(ref, tgt, weights):
    """detectron2 Box2BoxTransform.get_deltas, in numpy float64."""
    rw, rh = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    tw, th = tgt[:, 2] - tgt[:, 0], tgt[:, 3] - tgt[:, 1]
    rx, ry = ref[:, 0] + 0.5 * rw, ref[:, 1] + 0.5 * rh
    tx, ty = tgt[:, 0] + 0.5 * tw, tgt[:, 1] + 0.5 * th
    wx, wy, ww, wh = weights
    return np.stack(
        [wx * (tx - rx) / rw, wy * (ty - ry) / rh, ww * np.log(tw / rw), wh * np.log(th / rh)], 1
    )


def _gt(rng, num_valid=4, g=6):
    xy = rng.uniform(0, 50, (g, 2))
    wh = rng.uniform(6, 30, (g, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    valid = np.arange(g) < num_valid
    boxes[~valid] = np.nan  # padding may hold anything
    return boxes, valid


@functools.partial(jax.jit, static_argnames=("num_samples", "weights"))
def _targets(key, gt, valid, *, num_samples=32, weights=(1.0, 1.0, 1.0, 1.0)):
    return targets.anchor_targets(key, ANCHORS, gt, valid, num_samples=num_samples, weights=weights)


def test_sampled_subset_of_matches_with_encoded_targets():
    rng = np.random.default_rng(0)
    gt, valid = _gt(rng)
    labels, box_targets = _targets(jax.random.key(3), gt, valid, weights=WEIGHTS)
    labels, box_targets = np.asarray(labels), np.asarray(box_targets)
    matched, match_labels = (np.asarray(x) for x in matching.match(ANCHORS, gt, valid))
    # Sampled labels come from the matcher's, with detectron2's counts for 32 samples.
    assert np.all(match_labels[labels == 1] == 1) and np.all(match_labels[labels == 0] == 0)
    want_pos = min((match_labels == 1).sum(), 16)
    assert (labels == 1).sum() == want_pos and (labels == 0).sum() == 32 - want_pos
    pos = labels == 1
    want = _np_encode(ANCHORS[pos].astype(np.float64), gt[matched[pos]].astype(np.float64), WEIGHTS)
    np.testing.assert_allclose(box_targets[pos], want, rtol=1e-5, atol=1e-5)
    assert np.all(box_targets[~pos] == 0)
    assert np.all(np.isfinite(box_targets))


def test_everything_kept_when_num_samples_exceeds_anchors():
    rng = np.random.default_rng(1)
    gt, valid = _gt(rng)
    labels, box_targets = _targets(jax.random.key(0), gt, valid, num_samples=10 * len(ANCHORS))
    matched, match_labels = matching.match(ANCHORS, gt, valid)
    np.testing.assert_array_equal(labels, match_labels)
    pos = np.asarray(labels) == 1
    want = _np_encode(ANCHORS[pos], gt[np.asarray(matched)[pos]], (1, 1, 1, 1))
    np.testing.assert_allclose(np.asarray(box_targets)[pos], want, rtol=1e-5, atol=1e-5)


def test_no_valid_gt_gives_background_and_zero_targets():
    gt = np.full((3, 4), np.nan, np.float32)
    labels, box_targets = _targets(jax.random.key(0), gt, np.zeros(3, bool), weights=WEIGHTS)
    assert (np.asarray(labels) == 0).sum() == 32 and not np.any(np.asarray(labels) == 1)
    assert np.all(np.asarray(box_targets) == 0)


def test_batch_equals_per_image_with_split_keys():
    rng = np.random.default_rng(2)
    gts, valids = zip(*[_gt(rng, num_valid=n) for n in (0, 2, 6)], strict=True)
    gt, valid = np.stack(gts), np.stack(valids)
    ignore = np.zeros_like(valid)
    ignore[2, 0] = True
    hw = np.array([[64, 64], [40, 64], [64, 30]], np.float32)
    settings = {"num_samples": 32, "border": 0.0, "ignore_iof": 0.7}
    key = jax.random.key(9)
    labels, box_targets = jax.jit(functools.partial(targets.batch_anchor_targets, **settings))(
        key, ANCHORS, gt, valid, gt_ignore=ignore, image_hw=hw
    )
    assert labels.shape == (3, len(ANCHORS)) and box_targets.shape == (3, len(ANCHORS), 4)
    single = jax.jit(functools.partial(targets.anchor_targets, **settings))
    for i, k in enumerate(jax.random.split(key, 3)):
        want = single(k, ANCHORS, gt[i], valid[i], gt_ignore=ignore[i], image_hw=hw[i])
        np.testing.assert_array_equal(labels[i], want[0])
        np.testing.assert_allclose(box_targets[i], want[1], rtol=1e-6, atol=1e-6)
    assert np.any(np.asarray(labels[1:]) == 1)
