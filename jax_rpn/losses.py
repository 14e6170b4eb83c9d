"""RPN losses: objectness (sigmoid or 2-class softmax) and box regression (smooth-L1 or GIoU).

Labels follow :func:`jax_rpn.targets.anchor_targets`: 1 sampled positive, 0 sampled negative,
anything else ignored. :func:`objectness_loss` and :func:`box_loss` return sums over every
counted element of any leading shape (``[N]`` or ``[B, N]``); :func:`rpn_losses` divides by
``B * num_samples`` as detectron2's RPN does. Masked elements are replaced before each op, so
ignored anchors give no NaN in value or gradient whatever their predictions.
"""

import math

import jax
import jax.numpy as jnp
import optax

from jax_rpn import boxes as box_ops

OBJECTNESS_KINDS = ("sigmoid", "softmax")
BOX_KINDS = ("smooth_l1", "giou")


def objectness_loss(logits: jax.Array, labels: jax.Array, *, kind: str = "sigmoid") -> jax.Array:
    """Summed cross-entropy over anchors labelled 0 or 1 -> float32 scalar.

    ``kind="sigmoid"``: ``logits [...]``, one logit per anchor, binary cross-entropy (detectron2
    and torchvision). ``kind="softmax"``: ``logits [..., 2]`` = (background, foreground)
    scores, 2-class cross-entropy (the original Faster R-CNN). ``labels [...]`` int.
    """
    labels = jnp.asarray(labels)
    logits = jnp.asarray(logits, jnp.float32)
    counted = (labels == 0) | (labels == 1)  # [...]
    target = jnp.where(labels == 1, 1, 0)
    if kind == "sigmoid":
        if logits.shape != labels.shape:
            raise ValueError(
                f"sigmoid logits must have labels' shape {labels.shape}, got {logits.shape}"
            )
        safe = jnp.where(counted, logits, 0.0)
        loss = optax.sigmoid_binary_cross_entropy(safe, target.astype(jnp.float32))
    elif kind == "softmax":
        if logits.shape != (*labels.shape, 2):
            raise ValueError(
                f"softmax logits must have shape labels.shape + (2,) = {(*labels.shape, 2)}, "
                f"got {logits.shape}"
            )
        safe = jnp.where(counted[..., None], logits, 0.0)
        loss = optax.softmax_cross_entropy_with_integer_labels(safe, target)
    else:
        raise ValueError(f"kind must be one of {OBJECTNESS_KINDS}, got {kind!r}")
    return jnp.sum(jnp.where(counted, loss, 0.0))


def smooth_l1(x: jax.Array, *, beta: float) -> jax.Array:
    """Elementwise detectron2 ``smooth_l1_loss`` of a difference ``x``; ``beta < 1e-5`` is L1."""
    n = jnp.abs(x)
    if beta < 1e-5:
        return n
    return jnp.where(n < beta, 0.5 * n * n / beta, n - 0.5 * beta)


def box_loss(
    pred_deltas: jax.Array,
    box_targets: jax.Array,
    labels: jax.Array,
    *,
    kind: str = "smooth_l1",
    beta: float = 0.0,
    anchors: jax.Array | None = None,
    weights=(1.0, 1.0, 1.0, 1.0),
) -> jax.Array:
    """Summed box regression loss over positive anchors (``labels == 1``) -> float32 scalar.

    Args:
      pred_deltas, box_targets: ``[..., 4]`` encoded (dx, dy, dw, dh) deltas.
      labels: int ``[...]``.
      kind: ``"smooth_l1"`` on the deltas, summed over the 4 coordinates (``beta=0`` is L1,
        detectron2's RPN default); or ``"giou"``: ``1 - GIoU`` of the xyxy boxes decoded from
        both against ``anchors`` (as detectron2's ``giou_loss``; predictions get the decoder's
        ``dw, dh`` clamp, targets are decoded exactly).
      anchors: xyxy ``[..., 4]`` broadcastable to ``pred_deltas`` (``[N, 4]``); needed for giou.
      weights: box coder weights used to encode the targets.
    """
    labels = jnp.asarray(labels)
    if pred_deltas.shape[-1:] != (4,) or pred_deltas.shape != box_targets.shape:
        raise ValueError(
            f"pred_deltas and box_targets must share a shape [..., 4], got {pred_deltas.shape} "
            f"and {box_targets.shape}"
        )
    if labels.shape != pred_deltas.shape[:-1]:
        raise ValueError(f"labels must have shape {pred_deltas.shape[:-1]}, got {labels.shape}")
    positive = labels == 1  # [...]
    pred = jnp.where(positive[..., None], jnp.asarray(pred_deltas, jnp.float32), 0.0)  # [..., 4]
    target = jnp.where(positive[..., None], jnp.asarray(box_targets, jnp.float32), 0.0)
    if kind == "smooth_l1":
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        loss = jnp.sum(smooth_l1(pred - target, beta=beta), axis=-1)  # [...]
    elif kind == "giou":
        if anchors is None:
            raise ValueError('anchors [N, 4] are needed for kind="giou"')
        anchors = jnp.asarray(anchors, jnp.float32)
        pred_boxes = box_ops.decode(anchors, pred, weights=weights)  # [..., 4]
        target_boxes = box_ops.decode(anchors, target, weights=weights, scale_clamp=math.inf)
        loss = 1.0 - box_ops.aligned_giou(pred_boxes, target_boxes)  # [...]
    else:
        raise ValueError(f"kind must be one of {BOX_KINDS}, got {kind!r}")
    return jnp.sum(jnp.where(positive, loss, 0.0))


def rpn_losses(
    objectness: jax.Array,
    deltas: jax.Array,
    labels: jax.Array,
    box_targets: jax.Array,
    *,
    num_samples: int,
    objectness_kind: str = "sigmoid",
    box_kind: str = "smooth_l1",
    beta: float = 0.0,
    anchors: jax.Array | None = None,
    weights=(1.0, 1.0, 1.0, 1.0),
) -> dict[str, jax.Array]:
    """detectron2-normalised RPN losses of a batch -> ``{"objectness": .., "box": ..}``.

    ``objectness`` ``[B, N]`` (sigmoid) or ``[B, N, 2]`` (softmax), ``deltas [B, N, 4]``,
    ``labels [B, N]``, ``box_targets [B, N, 4]``, ``anchors [N, 4]`` xyxy (giou only). Both sums
    are divided by ``B * num_samples`` (sampled anchors per image), as detectron2.
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must have shape [B, N], got {labels.shape}")
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    normalizer = labels.shape[0] * int(num_samples)
    obj = objectness_loss(objectness, labels, kind=objectness_kind)
    box = box_loss(
        deltas, box_targets, labels, kind=box_kind, beta=beta, anchors=anchors, weights=weights
    )
    return {"objectness": obj / normalizer, "box": box / normalizer}
