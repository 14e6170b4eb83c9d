"""Proposals from images: the RPN forward pass followed by :mod:`jax_rpn.proposals`."""

import functools

import jax
import ml_collections

from jax_rpn import proposals
from jax_rpn.models import RPNOutput, build_rpn, flatten_outputs, foreground_logit
from jax_rpn.settings import ProposalSettings


def proposals_from_outputs(
    outputs: RPNOutput, image_hw: jax.Array, *, settings: ProposalSettings, objectness: str
) -> proposals.Proposals:
    """Fixed-size proposals of a batch from RPN outputs -> :class:`proposals.Proposals` ``[B]``.

    ``image_hw [B, 2]`` are the true (unpadded) image sizes; ``objectness`` is the head's form
    (``sigmoid``, or ``softmax`` scored by its foreground - background logit).
    """
    flat = flatten_outputs(outputs)
    logits = tuple(foreground_logit(o, objectness) for o in flat.objectness_per_level)  # [B, Nl]
    return proposals.generate_batch(
        flat.anchors_per_level, logits, flat.deltas_per_level, image_hw, **settings.kwargs()
    )


def proposals_from_images(
    model, variables, images, image_hw, *, settings: ProposalSettings
) -> proposals.Proposals:
    """Run ``model`` (an :class:`jax_rpn.models.RPN`) in inference mode and make proposals."""
    outputs = model.apply(variables, images, train=False)
    return proposals_from_outputs(outputs, image_hw, settings=settings, objectness=model.objectness)


@functools.lru_cache(maxsize=8)
def _predict_fn(config: ml_collections.FrozenConfigDict):
    settings = ProposalSettings.from_config(config, train=False)
    return jax.jit(functools.partial(proposals_from_images, build_rpn(config), settings=settings))


def predict_proposals(variables, images, image_hw, *, config) -> proposals.Proposals:
    """Proposals for ``images [B, H, W, 3]`` (H, W divisible by the largest stride).

    Args:
      variables: the model's variables, ``{"params": ..., "batch_stats": ...}`` (a
        checkpoint's ``state.params`` with ``state.model_state`` merged in).
      images: float ``[B, H, W, 3]``, normalised as the input pipeline does
        (``jax_rpn.data.augment.normalize``: RGB, ``(pixel - mean) / std`` with ImageNet's
        mean and std in 0-255 units), zero-padded at the bottom and right.
      image_hw: int ``[B, 2]``, each image's true size inside the padding.
      config: the training config (``model``, ``anchors``, ``proposals``, ``targets``).

    Returns:
      :class:`jax_rpn.proposals.Proposals` with ``boxes [B, K, 4]`` xyxy, ``scores [B, K]``,
      ``valid [B, K]`` and ``num_nonfinite [B]``, K = ``proposals.post_nms_topk_test``.
      Compiled once per config and input shape.
    """
    return _predict_fn(ml_collections.FrozenConfigDict(config))(variables, images, image_hw)
