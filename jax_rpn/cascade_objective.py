"""The Cascade RPN training objective: targets of both stages and their losses, for a batch.

mmdetection's ``CascadeRPNHead.loss`` (``mmdet/models/dense_heads/cascade_rpn_head.py``) with
static shapes:

- Stage 1 (regression only): anchors assigned by the centre-region rule
  (:func:`jax_rpn.region_assign.region_assign`), no sampling; the box loss (mmdetection:
  ``1 - IoU`` of the decoded box and its ground truth) over the positives, divided by
  ``B * N / 200`` (N anchors per image: mmdetection's hard-coded average factor without
  sampling, from guided anchoring). With A > 1 anchors per cell (an extension), a centre-region
  cell keeps only the anchor of its box's shape positive, the others ignored.
- Stage 2: the refined anchors matched by IoU (:func:`jax_rpn.matching.match`; mmdetection's
  ``MaxIoUAssigner`` 0.7 / 0.7 with ``min_pos_iou`` 0.3), balanced sampling
  (:func:`jax_rpn.sampling.sample_labels`), sigmoid cross-entropy on the sampled anchors and
  the box loss on the sampled positives, both divided by ``B * num_samples`` (mmdetection
  divides by the sampled count, the same whenever an image has enough candidates).

Differences from mmdetection, deliberate: a low-quality positive of stage 2 keeps its best
ground truth (detectron2's rule) where mmdetection gives it to the last box whose best anchor
it is; ignored boxes (crowd / difficult) are left out of stage 1 (mmdetection raises).
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_rpn import boxes as box_ops
from jax_rpn import losses, region_assign
from jax_rpn.models.cascade_head import CascadeRPNOutput
from jax_rpn.settings import CascadeSettings, LossSettings, TargetSettings
from jax_rpn.shape_checks import check_shape
from jax_rpn.targets import _encode_positives, _per_image_keys, anchor_targets

# mmdetection's average factor of a stage without sampling: anchors / 200.
_UNSAMPLED_FACTOR = 200.0


class CascadeTargets(NamedTuple):
    """Targets of one image's N anchors (add a leading ``[B]`` under ``vmap``).

    Attributes:
      stage1_labels: int32 ``[N]``, the centre-region labels: 1 positive, 0 negative, -1 ignored.
      stage1_targets: float32 ``[N, 4]``, ``encode(anchor, its box)`` for positives, 0 elsewhere.
      stage2_labels: int32 ``[N]``: 1 sampled positive, 0 sampled negative, -1 not sampled.
      stage2_targets: float32 ``[N, 4]``, ``encode(refined anchor, its box)`` for sampled
        positives, 0 elsewhere.
    """

    stage1_labels: jax.Array
    stage1_targets: jax.Array
    stage2_labels: jax.Array
    stage2_targets: jax.Array


def cascade_targets(
    key: jax.Array,
    anchors: Sequence[jax.Array],
    refined_anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    *,
    strides: Sequence[float],
    feature_hws: Sequence[tuple[int, int]],
    anchor_sizes: Sequence[float],
    center_ratio: float = 0.2,
    ignore_ratio: float = 0.5,
    stage1_weights=(10.0, 10.0, 2.0, 2.0),
    high: float = 0.7,
    low: float = 0.7,
    allow_low_quality: bool = True,
    low_quality_min_iou: float = 0.3,
    num_samples: int = 256,
    positive_fraction: float = 0.5,
    stage2_weights=(20.0, 20.0, 10.0, 10.0),
    gt_ignore: jax.Array | None = None,
    ignore_iof: float | None = None,
    image_hw=None,
    border: float | None = None,
) -> CascadeTargets:
    """Both stages' targets for one image (defaults: mmdetection's Cascade RPN).

    Args:
      key: PRNG key for stage 2's sampling.
      anchors: L arrays of grid anchors ``[Hl * Wl * A, 4]`` xyxy, cell-major (stage 1's
        references).
      refined_anchors: ``[N, 4]`` xyxy, stage 1's boxes, levels concatenated (stage 2's
        references).
      gt_boxes: ``[G, 4]`` xyxy ground truth padded to G; ``gt_valid`` bool ``[G]``;
        ``gt_ignore`` optional bool ``[G]`` (crowd / difficult: left out).
      strides, feature_hws, anchor_sizes, center_ratio, ignore_ratio: stage 1's assignment,
        :func:`jax_rpn.region_assign.region_assign`.
      stage1_weights, stage2_weights: box coder weights of each stage (1 / target stds).
      high, low, allow_low_quality, low_quality_min_iou, ignore_iof, image_hw, border:
        stage 2's :func:`jax_rpn.matching.match` (mmdetection: no ignore IoF, no border);
        num_samples, positive_fraction: its sampling.
    """
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    grid = jnp.concatenate([jnp.asarray(a, jnp.float32) for a in anchors])  # [N, 4]
    check_shape(refined_anchors, "refined_anchors", "[N, 4]", sizes={"N": grid.shape[0]})
    refined_anchors = jnp.asarray(refined_anchors, jnp.float32)
    matched1, labels1 = region_assign.region_assign(
        anchors,
        gt_boxes,
        gt_valid,
        strides=strides,
        feature_hws=feature_hws,
        anchor_sizes=anchor_sizes,
        center_ratio=center_ratio,
        ignore_ratio=ignore_ratio,
        gt_ignore=gt_ignore,
    )
    num_a = grid.shape[0] // sum(h * w for h, w in feature_hws)  # A, anchors per cell
    labels1 = _best_shape_per_cell(grid, num_a, gt_boxes, matched1, labels1)
    labels2, targets2 = anchor_targets(
        key,
        refined_anchors,
        gt_boxes,
        gt_valid,
        high=high,
        low=low,
        allow_low_quality=allow_low_quality,
        low_quality_min_iou=low_quality_min_iou,
        num_samples=num_samples,
        positive_fraction=positive_fraction,
        weights=stage2_weights,
        gt_ignore=gt_ignore,
        ignore_iof=ignore_iof,
        image_hw=image_hw,
        border=border,
    )
    return CascadeTargets(
        stage1_labels=labels1,
        stage1_targets=_encode_positives(
            grid, gt_boxes, matched1, labels1 == 1, weights=stage1_weights
        ),
        stage2_labels=labels2,
        stage2_targets=targets2,
    )


def _best_shape_per_cell(grid, num_a, gt_boxes, matched, labels):
    """With A > 1 anchors per cell, of a positive cell's A anchors only the one whose shape
    overlaps its box best (both centred: the nearest aspect ratio) stays positive, the others
    become -1 (ignored): each anchor shape learns the boxes of its own shape. ``grid [N, 4]``
    (every level cell-major, A fastest, so ``[N / A, A]`` are the cells), labels ``[N]``."""
    if num_a == 1:
        return labels

    def centred(boxes):  # [..., 4] -> the same shapes centred on the origin
        half = (boxes[..., 2:] - boxes[..., :2]) / 2
        return jnp.concatenate([-half, half], -1)

    shape_iou = box_ops.aligned_iou(centred(grid), centred(gt_boxes[matched]))  # [N]
    shape_iou = jnp.where(labels == 1, shape_iou, -1.0).reshape(-1, num_a)  # [N / A, A]
    best = jnp.arange(num_a)[None, :] == jnp.argmax(shape_iou, axis=1)[:, None]
    return jnp.where((labels == 1) & ~best.reshape(-1), -1, labels)


def _flat(levels, batch_size, *trailing):
    """L per-level arrays of B images -> ``[B, N, *trailing]``, levels in anchor order."""
    return jnp.concatenate([x.reshape(batch_size, -1, *trailing) for x in levels], axis=1)


def stage2_sample(
    refined_anchors: jax.Array,
    batch: dict,
    key: jax.Array,
    *,
    targets_settings: TargetSettings,
    cascade_settings: CascadeSettings,
) -> jax.Array:
    """The anchors stage 2's loss reads: of ``refined_anchors [B, N, 4]`` (xyxy, levels
    concatenated), the ones :func:`cascade_objective` samples with the same ``batch`` and
    ``key`` -> int32 ``[B, num_samples]``, ascending, ``N`` where an image has fewer.

    For ``CascadeHead(..., stage2_at=...)``: stage 2 then runs at these anchors only."""
    b, n = refined_anchors.shape[:2]
    settings = {
        **targets_settings.kwargs(),
        "low_quality_min_iou": cascade_settings.low_quality_min_iou,
    }

    def one(k, refined, boxes, valid, ignore, hw):
        labels, _ = anchor_targets(
            k, refined, boxes, valid, gt_ignore=ignore, image_hw=hw, **settings
        )
        size = targets_settings.num_samples  # the sampler keeps at most this many
        return jnp.nonzero(labels >= 0, size=size, fill_value=n)[0].astype(jnp.int32)

    return jax.vmap(one)(
        _per_image_keys(key, b),
        jax.lax.stop_gradient(refined_anchors),
        batch["boxes"],
        batch["valid"],
        batch["ignore"],
        batch["image_hw"],
    )


def cascade_objective(
    outputs: CascadeRPNOutput,
    batch: dict,
    key: jax.Array,
    *,
    targets_settings: TargetSettings,
    loss_settings: LossSettings,
    cascade_settings: CascadeSettings,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cascade RPN loss of a batch and its metrics.

    Args:
      outputs: the :class:`jax_rpn.models.cascade_head.CascadeRPNOutput` of ``B`` images.
      batch: ``boxes [B, G, 4]`` xyxy ground truth, ``valid [B, G]`` and ``ignore [B, G]``
        bool masks, ``image_hw [B, 2]`` int.
      key: one PRNG key (split per image) or ``[B]`` per-image keys, for stage 2's sampling.
      targets_settings: stage 2's matcher, sampler and box coder.
      loss_settings: both stages' box loss (``box``: mmdetection's ``iou``; ``beta``) and
        stage 2's ``box_weight``.
      cascade_settings: stage 1 (assignment, coder, loss weight) and stage 2's minimum IoU of
        a best-anchor positive.

    Returns:
      ``loss = stage1_box_weight * stage1 + objectness + box_weight * box``; metrics:
      ``loss``, ``stage1_box_loss``, ``objectness_loss``, ``box_loss``, ``stage1_positive``
      (per image), ``num_positive`` and ``num_negative`` (stage 2, sampled, per image),
      ``fg_accuracy``, ``bg_accuracy``, ``stage1_iou`` and ``refined_iou`` (mean IoU with their
      box of stage 1's positives, before and after refinement), and ``nonfinite_outputs``
      (anchors with an inf/NaN output, per image).
    """
    c, t = cascade_settings, targets_settings
    b = outputs.deltas[0].shape[0]
    anchors = [jnp.asarray(a, jnp.float32) for a in outputs.anchors]
    refined = _flat(outputs.refined_anchors, b, 4)  # [B, N, 4]
    feature_hws = [tuple(x.shape[1:3]) for x in outputs.objectness]
    targets = jax.vmap(
        lambda k, r, boxes, valid, ignore, hw: cascade_targets(
            k,
            anchors,
            r,
            boxes,
            valid,
            strides=outputs.strides,
            feature_hws=feature_hws,
            anchor_sizes=c.anchor_sizes,
            center_ratio=c.center_ratio,
            ignore_ratio=c.ignore_ratio,
            stage1_weights=c.stage1_weights,
            high=t.high,
            low=t.low,
            allow_low_quality=t.allow_low_quality,
            low_quality_min_iou=c.low_quality_min_iou,
            num_samples=t.num_samples,
            positive_fraction=t.positive_fraction,
            stage2_weights=t.weights,
            gt_ignore=ignore,
            ignore_iof=t.ignore_iof,
            image_hw=hw,
            border=t.border,
        )
    )(
        _per_image_keys(key, b),
        refined,
        batch["boxes"],
        batch["valid"],
        batch["ignore"],
        batch["image_hw"],
    )
    targets = jax.lax.stop_gradient(targets)
    grid = jnp.concatenate(anchors)  # [N, 4]
    n = grid.shape[0]
    s1_deltas = _flat(outputs.stage1_deltas, b, 4)  # [B, N, 4]
    logits = _flat(outputs.objectness, b)  # [B, N]
    deltas = _flat(outputs.deltas, b, 4)  # [B, N, 4]

    box_kind = {"kind": loss_settings.box, "beta": loss_settings.beta}
    stage1 = losses.box_loss(
        s1_deltas,
        targets.stage1_targets,
        targets.stage1_labels,
        anchors=grid,
        weights=c.stage1_weights,
        **box_kind,
    ) / (b * n / _UNSAMPLED_FACTOR)
    normalizer = b * t.num_samples
    objectness = losses.objectness_loss(logits, targets.stage2_labels) / normalizer
    box = (
        losses.box_loss(
            deltas,
            targets.stage2_targets,
            targets.stage2_labels,
            anchors=refined,
            weights=t.weights,
            **box_kind,
        )
        / normalizer
    )
    loss = c.stage1_box_weight * stage1 + objectness + loss_settings.box_weight * box

    pos1 = targets.stage1_labels == 1  # [B, N]
    gt1 = box_ops.decode(grid, targets.stage1_targets, weights=c.stage1_weights)
    num_pos1 = jnp.maximum(pos1.sum(), 1)
    pos, neg = targets.stage2_labels == 1, targets.stage2_labels == 0
    num_pos = pos.sum().astype(jnp.float32)
    num_neg = neg.sum().astype(jnp.float32)
    finite = (
        jnp.isfinite(logits)
        & jnp.all(jnp.isfinite(deltas), axis=-1)
        & jnp.all(jnp.isfinite(s1_deltas), axis=-1)
    )
    metrics = {
        "loss": loss,
        "stage1_box_loss": stage1,
        "objectness_loss": objectness,
        "box_loss": box,
        "stage1_positive": pos1.sum().astype(jnp.float32) / b,
        "num_positive": num_pos / b,
        "num_negative": num_neg / b,
        "fg_accuracy": jnp.sum(pos & (logits > 0)) / jnp.maximum(num_pos, 1.0),
        "bg_accuracy": jnp.sum(neg & (logits <= 0)) / jnp.maximum(num_neg, 1.0),
        "stage1_iou": jnp.sum(jnp.where(pos1, box_ops.aligned_iou(grid, gt1), 0.0)) / num_pos1,
        "refined_iou": jnp.sum(jnp.where(pos1, box_ops.aligned_iou(refined, gt1), 0.0)) / num_pos1,
        "nonfinite_outputs": jnp.sum(~finite).astype(jnp.float32) / b,
    }
    return loss, metrics
