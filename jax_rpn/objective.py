"""The RPN training objective: model outputs + a padded batch -> scalar loss and metrics."""

import jax
import jax.numpy as jnp

from jax_rpn import losses, targets
from jax_rpn.models import RPNOutput, flatten_outputs, foreground_logit
from jax_rpn.settings import LossSettings, TargetSettings


def rpn_objective(
    outputs: RPNOutput,
    batch: dict,
    key: jax.Array,
    *,
    targets_settings: TargetSettings,
    loss_settings: LossSettings,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """detectron2-normalised RPN loss of a batch and its metrics.

    Args:
      outputs: the :class:`jax_rpn.models.RPNOutput` of ``B`` images.
      batch: ``boxes [B, G, 4]`` xyxy ground truth, ``valid [B, G]`` and ``ignore [B, G]``
        (difficult / crowd: left out of the targets) bool masks, ``image_hw [B, 2]`` int.
      key: one PRNG key (split per image) or ``[B]`` per-image keys, for sampling.
      targets_settings: matcher, sampler and box coder (``jax_rpn.targets.anchor_targets``).
      loss_settings: objectness form, box loss and weights.

    Returns:
      ``loss`` = objectness + ``box_weight`` x box, both summed over sampled anchors and
      divided by ``B * num_samples``; metrics: ``loss``, ``objectness_loss``, ``box_loss``,
      ``num_positive`` and ``num_negative`` (sampled, per image), ``fg_accuracy`` and
      ``bg_accuracy`` (sampled anchors classified right), and ``nonfinite_outputs`` (anchors
      whose logits or deltas are inf/NaN, per image).
    """
    flat = flatten_outputs(outputs)
    b = flat.deltas.shape[0]
    t = targets_settings
    labels, box_targets = targets.batch_anchor_targets(
        key,
        flat.anchors,
        batch["boxes"],
        batch["valid"],
        gt_ignore=batch["ignore"],
        image_hw=batch["image_hw"],
        **t.kwargs(),
    )
    labels = jax.lax.stop_gradient(labels)  # [B, N]
    box_targets = jax.lax.stop_gradient(box_targets)  # [B, N, 4]
    parts = losses.rpn_losses(
        flat.objectness,
        flat.deltas,
        labels,
        box_targets,
        num_samples=t.num_samples,
        objectness_kind=loss_settings.objectness,
        box_kind=loss_settings.box,
        beta=loss_settings.beta,
        anchors=flat.anchors,
        weights=t.weights,
    )
    loss = parts["objectness"] + loss_settings.box_weight * parts["box"]

    logit = foreground_logit(flat.objectness, loss_settings.objectness)  # [B, N]
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
