"""Box operations: area, IoU, GIoU, clipping, validity and the box coder.

``pairwise_*`` functions compare every box of one set with every box of another (torchvision's
``box_iou``); ``aligned_*`` functions compare boxes at the same index (scenic's
``all_pairs=False``).

Every box is ``[x1, y1, x2, y2]`` in absolute pixels, float32, with ``x1 <= x2`` and
``y1 <= y2``. Shapes: ``[..., 4]`` means any leading batch dimensions.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# detectron2's default clamp on dw, dh before exp(): log(1000 / 16).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)

# Widths and heights are floored at this in the coder so degenerate boxes give finite deltas.
_MIN_EXTENT = 1e-6


def area(boxes: jax.Array) -> jax.Array:
    """Area of ``[..., 4]`` xyxy boxes -> ``[...]``; a box with x2 < x1 or y2 < y1 has area 0."""
    w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return w * h


def _intersection_union(boxes1, boxes2):
    """Intersection and union of xyxy boxes broadcast against each other."""
    # Coordinate by coordinate, with no [..., 2] intermediates: XLA CPU vectorises this form
    # about 4x better inside the matcher's scan (benchmarks/targets.py); same values.
    iw = jnp.minimum(boxes1[..., 2], boxes2[..., 2]) - jnp.maximum(boxes1[..., 0], boxes2[..., 0])
    ih = jnp.minimum(boxes1[..., 3], boxes2[..., 3]) - jnp.maximum(boxes1[..., 1], boxes2[..., 1])
    inter = jnp.maximum(iw, 0.0) * jnp.maximum(ih, 0.0)
    union = area(boxes1) + area(boxes2) - inter
    return inter, union


def _ratio(part, whole):
    """``part / whole``, 0 where ``whole`` is 0 (with a finite gradient there)."""
    return jnp.where(whole > 0, part / jnp.where(whole > 0, whole, 1.0), 0.0)


def pairwise_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """IoU of every pair of xyxy ``boxes1 [N, 4]`` and ``boxes2 [M, 4]`` -> ``[N, M]``.

    A pair whose union is 0 (two empty boxes) has IoU 0, never NaN.
    """
    return _ratio(*_intersection_union(boxes1[:, None, :], boxes2[None, :, :]))  # [N, M]


def aligned_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """IoU of aligned xyxy boxes: ``boxes1[i]`` with ``boxes2[i]``, ``[..., 4]`` and ``[..., 4]``
    -> ``[...]``. A pair whose union is 0 has IoU 0."""
    return _ratio(*_intersection_union(boxes1, boxes2))


def aligned_giou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Generalized IoU of aligned xyxy boxes: ``boxes1[i]`` with ``boxes2[i]``, ``[..., 4]`` and
    ``[..., 4]`` -> ``[...]``.

    In [-1, 1]; pairs of empty boxes give 0 (their IoU) instead of NaN.
    """
    inter, union = _intersection_union(boxes1, boxes2)
    lt = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
    rb = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    hull = wh[..., 0] * wh[..., 1]
    return _ratio(inter, union) - _ratio(hull - union, hull)


def clip(boxes: jax.Array, image_hw) -> jax.Array:
    """Clip xyxy ``boxes [..., 4]`` to an image of size ``image_hw = (height, width)``.

    ``image_hw`` may be a traced ``[2]`` array (true image size inside a padded batch).
    """
    h = jnp.asarray(image_hw[0], boxes.dtype)
    w = jnp.asarray(image_hw[1], boxes.dtype)
    x = jnp.clip(boxes[..., 0::2], 0.0, w)
    y = jnp.clip(boxes[..., 1::2], 0.0, h)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def is_valid(boxes: jax.Array) -> jax.Array:
    """``[..., 4]`` -> bool ``[...]``: finite coordinates and positive width and height."""
    finite = jnp.all(jnp.isfinite(boxes), axis=-1)
    positive = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return finite & positive


def check_boxes(boxes, *, name: str = "boxes") -> None:
    """Raise ValueError if concrete ``boxes [..., 4]`` are malformed; no-op under tracing.

    Checks the trailing dimension, finiteness and ``x1 <= x2``, ``y1 <= y2``. Traced values
    cannot be checked without a host round-trip; the ops give them defined behaviour instead.
    """
    if isinstance(boxes, jax.core.Tracer):
        return
    b = np.asarray(boxes)
    if b.ndim < 1 or b.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4] (x1, y1, x2, y2), got {b.shape}")
    if not np.all(np.isfinite(b)):
        bad = tuple(int(i) for i in np.argwhere(~np.all(np.isfinite(b), axis=-1))[0])
        raise ValueError(f"{name} has non-finite coordinates at index {bad}")
    flipped = (b[..., 2] < b[..., 0]) | (b[..., 3] < b[..., 1])
    if np.any(flipped):
        bad = tuple(int(i) for i in np.argwhere(flipped)[0])
        raise ValueError(
            f"{name} must satisfy x1 <= x2 and y1 <= y2 ([x1, y1, x2, y2] format); "
            f"box at index {bad} is {b[bad].tolist()}"
        )


def _check_weights(weights):
    if len(weights) != 4 or any(w <= 0 for w in weights):
        raise ValueError(f"weights must be 4 positive numbers (wx, wy, ww, wh), got {weights}")


def _centers_sizes(boxes):
    w = jnp.maximum(boxes[..., 2] - boxes[..., 0], _MIN_EXTENT)
    h = jnp.maximum(boxes[..., 3] - boxes[..., 1], _MIN_EXTENT)
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(reference: jax.Array, target: jax.Array, *, weights=(1.0, 1.0, 1.0, 1.0)) -> jax.Array:
    """Deltas ``[..., 4]`` = (dx, dy, dw, dh) that turn xyxy ``reference`` boxes into ``target``.

    detectron2 / torchvision ``BoxCoder`` (no ``+1``): ``dx = wx * (tx - rx) / rw``,
    ``dw = ww * log(tw / rw)``. Widths and heights are floored at 1e-6, so degenerate
    boxes give large but finite deltas instead of inf/NaN.
    """
    _check_weights(weights)
    wx, wy, ww, wh = weights
    rx, ry, rw, rh = _centers_sizes(reference)
    tx, ty, tw, th = _centers_sizes(target)
    return jnp.stack(
        [
            wx * (tx - rx) / rw,
            wy * (ty - ry) / rh,
            ww * jnp.log(tw / rw),
            wh * jnp.log(th / rh),
        ],
        axis=-1,
    )


def decode(
    reference: jax.Array,
    deltas: jax.Array,
    *,
    weights=(1.0, 1.0, 1.0, 1.0),
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> jax.Array:
    """Apply ``deltas [..., 4]`` to xyxy ``reference [..., 4]`` boxes -> xyxy boxes ``[..., 4]``.

    Inverse of :func:`encode`; ``dw`` and ``dh`` are clamped above at ``scale_clamp`` (as in
    detectron2 and torchvision) so ``exp`` cannot overflow. Non-finite deltas give non-finite
    boxes, which :mod:`jax_rpn.proposals` masks out.
    """
    _check_weights(weights)
    wx, wy, ww, wh = weights
    deltas = deltas.astype(jnp.float32)
    rx, ry, rw, rh = _centers_sizes(reference.astype(jnp.float32))
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
    dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
    cx = dx * rw + rx
    cy = dy * rh + ry
    w = jnp.exp(dw) * rw
    h = jnp.exp(dh) * rh
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
