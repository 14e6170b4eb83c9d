"""RPN losses against hand-computed values and numpy formulas; masked inputs give no NaN."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_rpn import losses

LABELS = np.array([[1, 0, -1, 1, 0, -1], [0, 0, 1, -1, -1, -1]])  # [B=2, N=6]


def _np_bce(x, y):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0) - x * y


def _np_smooth_l1(d, beta):
    """detectron2 smooth_l1_loss elementwise (beta < 1e-5 is L1)."""
    n = np.abs(d)
    return n if beta < 1e-5 else np.where(n < beta, 0.5 * n**2 / beta, n - 0.5 * beta)


def _np_decode(a, d):
    w, h = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
    cx, cy = a[..., 0] + 0.5 * w + d[..., 0] * w, a[..., 1] + 0.5 * h + d[..., 1] * h
    pw, ph = w * np.exp(d[..., 2]), h * np.exp(d[..., 3])
    return np.stack([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], -1)


def _np_giou(p, t):
    """GIoU of aligned boxes (Rezatofighi et al. 2019), float64."""
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    wh = np.clip(np.minimum(p[..., 2:], t[..., 2:]) - np.maximum(p[..., :2], t[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area(p) + area(t) - inter
    hull_wh = np.maximum(p[..., 2:], t[..., 2:]) - np.minimum(p[..., :2], t[..., :2])
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return inter / union - (hull - union) / hull


def test_sigmoid_hand_computed():
    # logit 0, label 1: log 2; logit 2, label 0: log(1 + e^2); ignored labels do not count.
    logits = jnp.array([0.0, 2.0, 100.0, -3.0])
    labels = jnp.array([1, 0, -1, 1])
    want = math.log(2) + math.log1p(math.exp(2)) + math.log1p(math.exp(3))
    got = jax.jit(losses.objectness_loss)(logits, labels)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_softmax_equals_sigmoid_on_logit_difference():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, LABELS.shape).astype(np.float32)
    bg = rng.normal(0, 3, LABELS.shape).astype(np.float32)
    two = np.stack([bg, bg + x], -1)  # (background, foreground): fg - bg = x
    soft = losses.objectness_loss(two, LABELS, kind="softmax")
    sig = losses.objectness_loss(x, LABELS, kind="sigmoid")
    np.testing.assert_allclose(soft, sig, rtol=1e-5)
    counted = LABELS >= 0
    np.testing.assert_allclose(sig, _np_bce(x, LABELS == 1)[counted].sum(), rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9])
def test_smooth_l1_against_numpy(beta):
    rng = np.random.default_rng(1)
    pred = rng.normal(0, 0.3, (*LABELS.shape, 4)).astype(np.float32)
    target = rng.normal(0, 0.3, (*LABELS.shape, 4)).astype(np.float32)
    got = jax.jit(functools.partial(losses.box_loss, beta=beta))(pred, target, LABELS)
    want = _np_smooth_l1(pred - target, beta)[LABELS == 1].sum()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_smooth_l1_hand_computed():
    # beta 0.5: |d| = 0.25 < beta -> 0.5 * 0.0625 / 0.5 = 0.0625; |d| = 2 -> 2 - 0.25 = 1.75.
    pred = jnp.array([[0.25, -2.0, 0.0, 0.0]])
    got = losses.box_loss(pred, jnp.zeros((1, 4)), jnp.array([1]), beta=0.5)
    np.testing.assert_allclose(got, 0.0625 + 1.75, rtol=1e-6)


def test_giou_hand_computed_and_against_numpy():
    anchors = jnp.array([[0.0, 0.0, 10.0, 10.0]] * 3)
    targets = jnp.zeros((3, 4))  # the ground truth is the anchor itself
    # dx = 1 -> [10, 0, 20, 10]: IoU 0, hull 200 = union: GIoU 0, loss 1.
    # dx = 0.5 -> [5, 0, 15, 10]: inter 50, union 150 = hull: GIoU 1/3, loss 2/3.
    pred = jnp.array([[1.0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0, 0, 0]])
    giou_loss = jax.jit(functools.partial(losses.box_loss, kind="giou"))
    got = giou_loss(pred, targets, jnp.array([1, 1, 1]), anchors=anchors)
    np.testing.assert_allclose(got, 1.0 + 2.0 / 3.0, rtol=1e-6)

    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 100, (6, 2))
    anc = np.concatenate([xy, xy + rng.uniform(5, 50, (6, 2))], 1)
    pred = rng.normal(0, 0.3, (*LABELS.shape, 4))
    tgt = rng.normal(0, 0.3, (*LABELS.shape, 4))
    got = giou_loss(
        jnp.asarray(pred, jnp.float32),
        jnp.asarray(tgt, jnp.float32),
        LABELS,
        anchors=jnp.asarray(anc, jnp.float32),
    )
    want = (1 - _np_giou(_np_decode(anc, pred), _np_decode(anc, tgt)))[LABELS == 1].sum()
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize(("obj_kind", "box_kind"), [("sigmoid", "smooth_l1"), ("softmax", "giou")])
def test_rpn_losses_normalised_like_detectron2(obj_kind, box_kind):
    # detectron2 RPN.losses: sum over the batch / (batch_size_per_image * num_images).
    rng = np.random.default_rng(3)
    b, n = LABELS.shape
    logits = rng.normal(0, 2, (b, n) if obj_kind == "sigmoid" else (b, n, 2))
    deltas = rng.normal(0, 0.3, (b, n, 4))
    targets = rng.normal(0, 0.3, (b, n, 4))
    xy = rng.uniform(0, 100, (n, 2))
    anchors = np.concatenate([xy, xy + rng.uniform(5, 50, (n, 2))], 1)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    fn = jax.jit(
        functools.partial(
            losses.rpn_losses, num_samples=4, objectness_kind=obj_kind, box_kind=box_kind
        )
    )
    out = fn(f32(logits), f32(deltas), LABELS, f32(targets), anchors=f32(anchors))
    counted, pos = LABELS >= 0, LABELS == 1
    x = logits if obj_kind == "sigmoid" else logits[..., 1] - logits[..., 0]
    want_obj = _np_bce(x, pos)[counted].sum() / (b * 4)
    if box_kind == "smooth_l1":
        want_box = _np_smooth_l1(deltas - targets, 0.0)[pos].sum() / (b * 4)
    else:
        giou = _np_giou(_np_decode(anchors, deltas), _np_decode(anchors, targets))
        want_box = (1 - giou)[pos].sum() / (b * 4)
    np.testing.assert_allclose(out["objectness"], want_obj, rtol=1e-5)
    np.testing.assert_allclose(out["box"], want_box, rtol=1e-5)


@pytest.mark.parametrize(("obj_kind", "box_kind"), [("sigmoid", "smooth_l1"), ("softmax", "giou")])
def test_masked_nan_inputs_give_finite_value_and_gradient(obj_kind, box_kind):
    # Ignored anchors carry NaN / inf predictions and targets (e.g. encoded against a zero-area
    # padded box); a degenerate anchor sits at an ignored position too.
    b, n = LABELS.shape
    ignored = LABELS < 0
    not_pos = LABELS != 1
    logits = np.where(ignored, np.nan, 0.5)
    if obj_kind == "softmax":
        logits = np.stack([logits, -np.asarray(logits)], -1)
    deltas = np.where(not_pos[..., None], np.inf, 0.1) * np.ones((b, n, 4))
    deltas[0, 1] = np.nan
    targets = np.where(not_pos[..., None], np.nan, 0.2) * np.ones((b, n, 4))
    anchors = np.tile([[0.0, 0.0, 16.0, 16.0]], (n, 1))
    anchors[2] = [5.0, 5.0, 5.0, 5.0]  # zero-area, only at ignored positions
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)

    def total(logits, deltas):
        out = losses.rpn_losses(
            logits,
            deltas,
            LABELS,
            f32(targets),
            num_samples=4,
            objectness_kind=obj_kind,
            box_kind=box_kind,
            anchors=f32(anchors),
        )
        return out["objectness"] + out["box"]

    value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(f32(logits), f32(deltas))
    assert np.isfinite(value) and value > 0
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(np.asarray(grads[1])[not_pos] == 0)  # no box gradient off the positives
    assert np.any(np.asarray(grads[1])[~not_pos] != 0)


def test_bad_settings_raise():
    logits, labels = jnp.zeros((2, 6)), jnp.asarray(LABELS)
    with pytest.raises(ValueError, match="kind"):
        losses.objectness_loss(logits, labels, kind="focal")
    with pytest.raises(ValueError, match="softmax logits"):
        losses.objectness_loss(logits, labels, kind="softmax")
    with pytest.raises(ValueError, match="sigmoid logits"):
        losses.objectness_loss(jnp.zeros((2, 6, 2)), labels)
    deltas = jnp.zeros((2, 6, 4))
    with pytest.raises(ValueError, match="anchors"):
        losses.box_loss(deltas, deltas, labels, kind="giou")
    with pytest.raises(ValueError, match="kind"):
        losses.box_loss(deltas, deltas, labels, kind="l2")
    with pytest.raises(ValueError, match="beta"):
        losses.box_loss(deltas, deltas, labels, beta=-1.0)
    with pytest.raises(ValueError, match="labels"):
        losses.box_loss(deltas, deltas, labels[:, :3])
    with pytest.raises(ValueError, match="num_samples"):
        losses.rpn_losses(logits, deltas, labels, deltas, num_samples=0)
    with pytest.raises(ValueError, match="labels"):
        losses.rpn_losses(logits[0], deltas[0], labels[0], deltas[0], num_samples=4)
