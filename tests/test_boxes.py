"""Box ops against hand-computed values and plain-numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_rpn import boxes


def _random_boxes(rng, n, scale=100.0):
    xy = rng.uniform(0, scale, (n, 2))
    wh = rng.uniform(1, scale / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _np_iou(a, b):
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def test_iou_hand_computed():
    a = jnp.array([[0.0, 0.0, 10.0, 10.0]])
    b = jnp.array([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    # Overlap 5x5 = 25, union 100 + 100 - 25 = 175.
    np.testing.assert_allclose(jax.jit(boxes.pairwise_iou)(a, b), [[25 / 175, 1.0, 0.0]], rtol=1e-6)


def test_iou_zero_union_is_zero_not_nan():
    empty = jnp.array([[3.0, 3.0, 3.0, 3.0]])
    out = boxes.pairwise_iou(empty, empty)
    np.testing.assert_array_equal(out, [[0.0]])
    grad = jax.grad(lambda b: boxes.pairwise_iou(b, empty).sum())(empty)
    assert np.all(np.isfinite(grad))


def test_iou_properties_against_numpy():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 50), _random_boxes(rng, 30)
    got = np.asarray(jax.jit(boxes.pairwise_iou)(a, b))
    np.testing.assert_allclose(got, _np_iou(a, b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, np.asarray(boxes.pairwise_iou(b, a)).T, rtol=1e-6)
    assert got.min() >= 0.0 and got.max() <= 1.0
    np.testing.assert_allclose(np.diag(np.asarray(boxes.pairwise_iou(a, a))), 1.0, rtol=1e-6)


def test_aligned_iou_is_the_diagonal_of_pairwise_iou():
    rng = np.random.default_rng(1)
    a, b = _random_boxes(rng, 40), _random_boxes(rng, 40)
    got = np.asarray(jax.jit(boxes.aligned_iou)(a, b))  # [40]
    np.testing.assert_allclose(got, np.diag(_np_iou(a, b)), rtol=1e-5, atol=1e-6)
    assert float(boxes.aligned_iou(jnp.zeros(4), jnp.zeros(4))) == 0.0  # empty pair: 0, not NaN


def test_area_and_clip():
    b = jnp.array([[-5.0, 2.0, 30.0, 50.0], [4.0, 4.0, 2.0, 8.0]])
    np.testing.assert_allclose(boxes.area(b), [35 * 48, 0.0])
    clipped = jax.jit(boxes.clip)(b, jnp.array([40, 20]))  # height 40, width 20
    np.testing.assert_allclose(clipped, [[0, 2, 20, 40], [4, 4, 2, 8]])


def test_giou_hand_computed():
    a = jnp.array([0.0, 0.0, 2.0, 2.0])
    b = jnp.array([3.0, 0.0, 4.0, 2.0])
    # No overlap: IoU 0, hull 4x2 = 8, union 4 + 2 = 6 -> GIoU = 0 - (8 - 6) / 8.
    np.testing.assert_allclose(boxes.aligned_giou(a, b), -0.25, rtol=1e-6)
    np.testing.assert_allclose(boxes.aligned_giou(a, a), 1.0)
    empty = jnp.zeros(4)
    assert float(boxes.aligned_giou(empty, empty)) == 0.0


def test_encode_hand_computed():
    ref = jnp.array([0.0, 0.0, 10.0, 20.0])  # centre (5, 10), size (10, 20)
    tgt = jnp.array([2.0, 4.0, 22.0, 24.0])  # centre (12, 14), size (20, 20)
    expected = [0.7, 0.2, np.log(2.0), 0.0]
    np.testing.assert_allclose(boxes.encode(ref, tgt), expected, rtol=1e-6, atol=1e-7)
    w = (10.0, 10.0, 5.0, 5.0)  # detectron2's Fast R-CNN weights
    np.testing.assert_allclose(
        boxes.encode(ref, tgt, weights=w), [7.0, 2.0, 5 * np.log(2.0), 0.0], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip(weights):
    rng = np.random.default_rng(1)
    ref, tgt = _random_boxes(rng, 100), _random_boxes(rng, 100)
    deltas = jax.jit(lambda r, t: boxes.encode(r, t, weights=weights))(ref, tgt)
    back = jax.jit(lambda r, d: boxes.decode(r, d, weights=weights))(ref, deltas)
    np.testing.assert_allclose(back, tgt, rtol=1e-4, atol=1e-3)


def test_decode_clamps_scale():
    ref = jnp.array([[0.0, 0.0, 16.0, 16.0]])
    out = boxes.decode(ref, jnp.array([[0.0, 0.0, 100.0, 100.0]]))
    # dw clamped at log(1000 / 16): width = 16 * 1000 / 16 = 1000, centred on 8.
    np.testing.assert_allclose(out, [[8 - 500, 8 - 500, 8 + 500, 8 + 500]], rtol=1e-5)


def test_encode_degenerate_target_is_finite():
    ref = jnp.array([[0.0, 0.0, 10.0, 10.0]])
    tgt = jnp.array([[5.0, 5.0, 5.0, 5.0]])
    assert np.all(np.isfinite(boxes.encode(ref, tgt)))


def test_is_valid_and_check_boxes():
    b = np.array([[0, 0, 1, 1], [0, 0, 0, 1], [2, 0, 1, 1], [0, 0, np.nan, 1]], np.float32)
    np.testing.assert_array_equal(boxes.is_valid(b), [True, False, False, False])
    boxes.check_boxes(b[:2], name="gt_boxes")
    with pytest.raises(ValueError, match=r"gt_boxes must satisfy x1 <= x2.*index \(2,\)"):
        boxes.check_boxes(b[:3], name="gt_boxes")
    with pytest.raises(ValueError, match="gt_boxes has non-finite"):
        boxes.check_boxes(b, name="gt_boxes")
    with pytest.raises(ValueError, match=r"shape \[..., 4\]"):
        boxes.check_boxes(np.zeros((3, 5)), name="gt_boxes")
    # Under tracing the check is a no-op (data gets defined behaviour instead).
    jax.jit(lambda x: boxes.check_boxes(x) or x)(b)


def test_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        boxes.encode(jnp.zeros(4), jnp.zeros(4), weights=(1.0, 1.0, 0.0, 1.0))
