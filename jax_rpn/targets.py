"""RPN training targets per image: match anchors to ground truth, subsample, encode.

detectron2's ``RPN.label_and_sample_anchors`` followed by ``Box2BoxTransform.get_deltas``.
All boxes are ``[x1, y1, x2, y2]`` in absolute pixels. For a batch of padded ground truth use
:func:`batch_anchor_targets` (one key per image), or
``jax.vmap(partial(anchor_targets, ...), in_axes=(0, None, 0, 0))``.
"""

import jax
import jax.numpy as jnp

from jax_rpn import boxes as box_ops
from jax_rpn import matching, sampling
from jax_rpn.shape_checks import check_shape


def anchor_targets(
    key: jax.Array,
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    *,
    high: float = 0.7,
    low: float = 0.3,
    allow_low_quality: bool = True,
    low_quality_min_iou: float = 0.0,
    num_samples: int = 256,
    positive_fraction: float = 0.5,
    weights=(1.0, 1.0, 1.0, 1.0),
    gt_ignore: jax.Array | None = None,
    ignore_iof: float | None = None,
    image_hw=None,
    border: float | None = None,
    anchor_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Labels and regression targets of one image's anchors.

    Args:
      key: PRNG key for the balanced sampling.
      anchors: ``[N, 4]`` xyxy anchors (all levels concatenated).
      gt_boxes: ``[G, 4]`` xyxy ground truth padded to G; ``gt_valid`` bool ``[G]``.
      weights: box coder weights ``(wx, wy, ww, wh)`` of :func:`jax_rpn.boxes.encode`.
      The other settings are those of :func:`jax_rpn.matching.match` and
      :func:`jax_rpn.sampling.sample_labels`.

    Returns:
      ``labels`` int32 ``[N]``: 1 sampled positive, 0 sampled negative, -1 not sampled or
      ignored. ``box_targets`` float32 ``[N, 4]``: ``encode(anchor, matched gt)`` for sampled
      positives, 0 elsewhere.
    """
    sampling.check_key(key)
    matched_gt, labels = matching.match(
        anchors,
        gt_boxes,
        gt_valid,
        high=high,
        low=low,
        allow_low_quality=allow_low_quality,
        low_quality_min_iou=low_quality_min_iou,
        gt_ignore=gt_ignore,
        ignore_iof=ignore_iof,
        image_hw=image_hw,
        border=border,
        anchor_chunk=anchor_chunk,
    )
    labels = sampling.sample_labels(
        key, labels, num_samples=num_samples, positive_fraction=positive_fraction
    )
    return labels, _encode_positives(anchors, gt_boxes, matched_gt, labels == 1, weights=weights)


def _encode_positives(references, gt_boxes, matched_gt, positive, *, weights) -> jax.Array:
    """``encode(reference, gt_boxes[matched_gt])`` where ``positive``, 0 elsewhere -> ``[N, 4]``.

    ``references`` ``[N, 4]`` xyxy (anchors, or refined anchors), ``gt_boxes`` ``[G, 4]``,
    ``matched_gt`` int ``[N]``, ``positive`` bool ``[N]``.
    """
    references = jnp.asarray(references, jnp.float32)
    positive = positive[:, None]  # [N, 1]
    # Non-positive references encode against themselves (0 deltas), never against padding.
    matched = jnp.where(positive, jnp.asarray(gt_boxes, jnp.float32)[matched_gt], references)
    return jnp.where(positive, box_ops.encode(references, matched, weights=weights), 0.0)


def batch_anchor_targets(
    key: jax.Array,
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    *,
    gt_ignore: jax.Array | None = None,
    image_hw=None,
    **settings,
) -> tuple[jax.Array, jax.Array]:
    """:func:`anchor_targets` over a batch: ``gt_boxes [B, G, 4]``, ``gt_valid [B, G]``.

    ``anchors [N, 4]`` are shared; ``gt_ignore`` ``[B, G]`` and ``image_hw`` ``[B, 2]`` are
    optional per-image inputs; ``key`` is one key, split into one per image, or ``[B]`` keys
    already (one per image). Returns ``labels`` int32 ``[B, N]`` and ``box_targets`` float32
    ``[B, N, 4]``.
    """
    sizes = matching.check_inputs(anchors, gt_boxes, gt_valid, gt_ignore, image_hw, batched=True)
    keys = _per_image_keys(key, sizes["B"])
    gt_boxes = jnp.asarray(gt_boxes)

    def one(k, boxes, valid, ignore, hw):
        return anchor_targets(k, anchors, boxes, valid, gt_ignore=ignore, image_hw=hw, **settings)

    in_axes = (0, 0, 0, None if gt_ignore is None else 0, None if image_hw is None else 0)
    return jax.vmap(one, in_axes=in_axes)(keys, gt_boxes, gt_valid, gt_ignore, image_hw)


def _per_image_keys(key: jax.Array, batch_size: int) -> jax.Array:
    """``[B]`` keys: ``key`` itself when it holds one key per image already, else split."""
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    if getattr(key, "ndim", None) == (1 if typed else 2):
        check_shape(
            key, "key (one per image)", "[B]" if typed else "[B, K]", sizes={"B": batch_size}
        )
        return key
    sampling.check_key(key, name="key (one key, or one per image)")
    return jax.random.split(key, batch_size)
