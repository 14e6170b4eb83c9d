"""The RPN training objective: model outputs + a padded batch -> scalar loss and metrics."""

import jax
import jax.numpy as jnp

from jax_rpn import losses, targets
from jax_rpn.models import RPNOutput, flatten_outputs


def _per_image_keys(key, batch_size):
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (1 if typed else 2):
        return key
    return jax.random.split(key, batch_size)


def rpn_loss(
    outputs: RPNOutput, batch: dict, key: jax.Array, *, config
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """detectron2-normalised RPN loss of a batch and its metrics.

    Args:
      outputs: the :class:`jax_rpn.models.RPNOutput` of ``B`` images.
      batch: ``boxes [B, G, 4]`` xyxy ground truth, ``valid [B, G]`` and ``ignore [B, G]``
        (difficult / crowd: left out of the targets) bool masks, ``image_hw [B, 2]`` int.
      key: one PRNG key (split per image) or ``[B]`` per-image keys, for sampling.
      config: ``targets``, ``loss`` and ``model.objectness`` settings (``configs/default.py``).

    Returns:
      ``loss`` = objectness + ``loss.box_weight`` x box, both summed over sampled anchors and
      divided by ``B * targets.num_samples``; metrics: ``loss``, ``objectness_loss``,
      ``box_loss``, ``num_positive`` and ``num_negative`` (sampled, per image),
      ``fg_accuracy`` and ``bg_accuracy`` (sampled anchors classified right), and
      ``nonfinite_outputs`` (anchors whose logits or deltas are inf/NaN, per image).
    """
    flat = flatten_outputs(outputs)
    b = flat.deltas.shape[0]
    t = config.targets
    border = t.get("border", -1.0)
    labels, box_targets = jax.vmap(
        lambda k, boxes, valid, ignore, hw: targets.anchor_targets(
            k,
            flat.anchors,
            boxes,
            valid,
            high=t.high,
            low=t.low,
            allow_low_quality=t.allow_low_quality,
            num_samples=t.num_samples,
            positive_fraction=t.positive_fraction,
            weights=tuple(t.weights),
            gt_ignore=ignore,
            image_hw=hw,
            border=None if border is None or border < 0 else border,
        )
    )(_per_image_keys(key, b), batch["boxes"], batch["valid"], batch["ignore"], batch["image_hw"])
    labels = jax.lax.stop_gradient(labels)  # [B, N]
    box_targets = jax.lax.stop_gradient(box_targets)  # [B, N, 4]
    parts = losses.rpn_losses(
        flat.objectness,
        flat.deltas,
        labels,
        box_targets,
        num_samples=t.num_samples,
        objectness_kind=config.model.objectness,
        box_kind=config.loss.box,
        beta=config.loss.beta,
        anchors=flat.anchors,
        weights=tuple(t.weights),
    )
    loss = parts["objectness"] + config.loss.box_weight * parts["box"]

    logit = flat.objectness
    if config.model.objectness == "softmax":
        logit = logit[..., 1] - logit[..., 0]  # [B, N] foreground minus background
    pos, neg = labels == 1, labels == 0
    num_pos = pos.sum().astype(jnp.float32)
    num_neg = neg.sum().astype(jnp.float32)
    finite = jnp.isfinite(logit) & jnp.all(jnp.isfinite(flat.deltas), axis=-1)
    metrics = {
        "loss": loss,
        "objectness_loss": parts["objectness"],
        "box_loss": parts["box"],
        "num_positive": num_pos / b,
        "num_negative": num_neg / b,
        "fg_accuracy": jnp.sum(pos & (logit > 0)) / jnp.maximum(num_pos, 1.0),
        "bg_accuracy": jnp.sum(neg & (logit <= 0)) / jnp.maximum(num_neg, 1.0),
        "nonfinite_outputs": jnp.sum(~finite).astype(jnp.float32) / b,
    }
    return loss, metrics
