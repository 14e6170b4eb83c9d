"""Anchor-free centre-region assignment (Cascade RPN stage 1), one image, padded ground truth.

mmdetection's ``RegionAssigner`` (``mmdet/models/task_modules/assigners/region_assigner.py``)
with static shapes. Each ground-truth box goes to one pyramid level: the level whose anchor
side is nearest to ``sqrt(w h)`` in log scale. With sides that double from level to level
(mmdetection's ``anchor_scale * strides``) this is mmdetection's
``floor(log2(sqrt(w h) / sides[0]) + 0.5)`` clamped to the levels; other sides (e.g. a first
level with smaller anchors than the rest) move the boundaries with them. On that level,
in feature coordinates (``pixel / stride``), the box's central region of ``center_ratio`` of
its width and height, and the larger region of ``ignore_ratio``, are rounded to whole cells
(half to even, as ``torch.round``) and clamped to ``[0, W] x [0, H]``. An anchor whose centre
(divided by the stride) lies in a region, edges included, is in it.

Labels, in mmdetection's order (later steps overwrite earlier ones; among boxes, the later
box in ``gt_boxes`` wins):

1. every anchor 0 (negative);
2. for each box: anchors in its ignore region on its level -1, then anchors in its centre
   region 1 (matched to that box);
3. anchors in the ignore region of a box whose level is adjacent (one up or down) -1.

The centre region is inside the ignore region, so step 2 amounts to: the last box whose ignore
region holds the anchor decides, positive if its centre region holds it too, else -1.
Padded (``gt_valid`` False), ignored (``gt_ignore``), zero-area and non-finite boxes take no
part. mmdetection's step 5 (anchors outside the image -1) is off in its Cascade RPN configs
(``allowed_border=-1``) and is not implemented. Boxes are ``[x1, y1, x2, y2]`` absolute pixels.
"""

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jax_rpn import boxes as box_ops
from jax_rpn.shape_checks import check_shape


def target_levels(gt_boxes: jax.Array, *, anchor_sizes: Sequence[float]) -> jax.Array:
    """Pyramid level of each xyxy box ``[G, 4]`` -> int32 ``[G]`` in ``[0, L)``, for ``L``
    increasing anchor sides ``anchor_sizes``: the level whose side is nearest to
    ``sqrt(area)`` in log scale, i.e. the number of levels ``l`` with ``area >= sizes[l] *
    sizes[l + 1]`` (ties go up; zero or NaN area -> level 0)."""
    sizes = [float(s) for s in anchor_sizes]
    if not sizes or min(sizes) <= 0 or any(b <= a for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"anchor_sizes must be positive and increasing, got {anchor_sizes}")
    area = box_ops.area(jnp.asarray(gt_boxes, jnp.float32))  # [G]
    bounds = jnp.asarray([a * b for a, b in itertools.pairwise(sizes)], jnp.float32)  # [L - 1]
    return jnp.sum(area[:, None] >= bounds[None, :], axis=1).astype(jnp.int32)


def region(boxes: jax.Array, *, ratio: float, stride: float, feature_hw) -> jax.Array:
    """mmdetection's ``calc_region``: xyxy ``boxes [..., 4]`` shrunk by ``ratio`` of their size
    from every side, in feature coordinates (``/ stride``), rounded half to even and clamped to
    ``[0, W] x [0, H]`` -> ``[..., 4]`` (x1, y1, x2, y2), float32 whole numbers."""
    f = jnp.asarray(boxes, jnp.float32) / stride
    x1 = jnp.round((1 - ratio) * f[..., 0] + ratio * f[..., 2])
    y1 = jnp.round((1 - ratio) * f[..., 1] + ratio * f[..., 3])
    x2 = jnp.round(ratio * f[..., 0] + (1 - ratio) * f[..., 2])
    y2 = jnp.round(ratio * f[..., 1] + (1 - ratio) * f[..., 3])
    h, w = (float(v) for v in feature_hw)
    return jnp.stack(
        [jnp.clip(x1, 0, w), jnp.clip(y1, 0, h), jnp.clip(x2, 0, w), jnp.clip(y2, 0, h)], -1
    )


def _inside(centers, regions):
    """Bool ``[N, G]``: feature-coordinate ``centers [N, 2]`` (x, y) inside ``regions [G, 4]``."""
    x, y = centers[:, 0:1], centers[:, 1:2]
    return (
        (x >= regions[None, :, 0])
        & (x <= regions[None, :, 2])
        & (y >= regions[None, :, 1])
        & (y <= regions[None, :, 3])
    )


def region_assign(
    anchors: Sequence[jax.Array],
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    *,
    strides: Sequence[float],
    feature_hws: Sequence[tuple[int, int]],
    anchor_sizes: Sequence[float],
    center_ratio: float = 0.2,
    ignore_ratio: float = 0.5,
    gt_ignore: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Assign one image's anchors by the centre-region rule (module doc).

    Args:
      anchors: L arrays of xyxy anchors ``[Nl, 4]``, one per level (only their centres count).
      gt_boxes: ``[G, 4]`` xyxy ground truth padded to G; ``gt_valid`` bool ``[G]``.
      strides: L strides; ``feature_hws``: L ``(H, W)`` feature sizes (the clamp of the regions).
      anchor_sizes: L increasing anchor sides, one per level (mmdetection: ``anchor_scale *
        strides``): the boxes' levels (:func:`target_levels`).
      center_ratio, ignore_ratio: the regions' share of the box side, ``0 < center_ratio <=
        ignore_ratio <= 1``.
      gt_ignore: optional bool ``[G]``: boxes left out (mmdetection does not support them).

    Returns:
      ``matched_gt`` int32 ``[N]`` (N = sum of Nl, levels in order): the box of each positive,
      0 elsewhere; ``labels`` int32 ``[N]``: 1 positive, 0 negative, -1 ignored.
    """
    num_levels = len(anchors)
    if not (len(strides) == len(feature_hws) == num_levels) or num_levels == 0:
        raise ValueError(
            f"anchors, strides and feature_hws need one entry per level, got lengths "
            f"{num_levels}, {len(strides)}, {len(feature_hws)}"
        )
    if not 0.0 < center_ratio <= ignore_ratio <= 1.0:
        raise ValueError(
            f"need 0 < center_ratio <= ignore_ratio <= 1, got {center_ratio}, {ignore_ratio}"
        )
    if len(anchor_sizes) != num_levels:
        raise ValueError(
            f"anchor_sizes needs one entry per level ({num_levels}), got {len(anchor_sizes)}"
        )
    for level, a in enumerate(anchors):
        check_shape(a, f"anchors[{level}]", "[Nl, 4]")
    sizes = check_shape(gt_boxes, "gt_boxes", "[G, 4]")
    check_shape(gt_valid, "gt_valid", "[G]", dtype="mask", sizes=sizes)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    num_gt = gt_boxes.shape[0]
    use = jnp.asarray(gt_valid).astype(bool) & box_ops.is_valid(gt_boxes)  # [G]
    if gt_ignore is not None:
        check_shape(gt_ignore, "gt_ignore", "[G]", dtype="mask", sizes=sizes)
        use = use & ~jnp.asarray(gt_ignore).astype(bool)
    level = target_levels(gt_boxes, anchor_sizes=anchor_sizes)  # [G]
    r_center = (1.0 - center_ratio) / 2  # distance of the region's edges from the box's
    r_ignore = (1.0 - ignore_ratio) / 2
    gt_index = jnp.arange(num_gt, dtype=jnp.int32)

    matched, labels = [], []
    for lvl, (a, stride, hw) in enumerate(zip(anchors, strides, feature_hws, strict=True)):
        a = jnp.asarray(a, jnp.float32)
        centers = jnp.stack([a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]], -1) * (0.5 / stride)
        in_ignore = _inside(centers, region(gt_boxes, ratio=r_ignore, stride=stride, feature_hw=hw))
        in_center = _inside(centers, region(gt_boxes, ratio=r_center, stride=stride, feature_hw=hw))
        here = use & (level == lvl)  # [G]
        adjacent = use & (jnp.abs(level - lvl) == 1)
        # The last box (largest index) whose ignore region holds the anchor decides.
        claims = in_ignore & here[None, :]  # [Nl, G]
        last = jnp.max(jnp.where(claims, gt_index[None, :], -1), axis=1)  # [Nl]
        safe = jnp.maximum(last, 0)
        center_hit = jnp.take_along_axis(in_center, safe[:, None], axis=1)[:, 0]
        label = jnp.where(last < 0, 0, jnp.where(center_hit, 1, -1))
        label = jnp.where(jnp.any(in_ignore & adjacent[None, :], axis=1), -1, label)
        matched.append(jnp.where(label == 1, safe, 0))
        labels.append(label)
    return (
        jnp.concatenate(matched).astype(jnp.int32),
        jnp.concatenate(labels).astype(jnp.int32),
    )
