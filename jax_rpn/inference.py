"""Proposals from images: the RPN forward pass followed by :mod:`jax_rpn.proposals`."""

import functools

import jax
import ml_collections

from jax_rpn import proposals
from jax_rpn.models import RPNOutput, build_rpn, flatten_outputs
from jax_rpn.models.cascade_head import CascadeRPNOutput


def proposals_from_outputs(
    outputs: RPNOutput | CascadeRPNOutput, image_hw: jax.Array, *, config, train: bool = False
) -> proposals.Proposals:
    """Fixed-size proposals of a batch from RPN outputs -> :class:`proposals.Proposals` ``[B]``.

    ``image_hw [B, 2]`` are the true (unpadded) image sizes; settings from ``config.proposals``
    (the ``_train`` or ``_test`` top-k), with the softmax form scored by fg - bg logit. Cascade
    RPN outputs are decoded against each image's refined anchors.
    """
    p = config.proposals
    if isinstance(outputs, CascadeRPNOutput):
        b = image_hw.shape[0]
        generate = functools.partial(
            proposals.generate,
            pre_nms_topk=p.pre_nms_topk_train if train else p.pre_nms_topk_test,
            post_nms_topk=p.post_nms_topk_train if train else p.post_nms_topk_test,
            nms_threshold=p.nms_threshold,
            min_size=p.min_size,
            weights=tuple(config.targets.weights),
        )
        return jax.vmap(generate)(
            list(outputs.refined_anchors),  # L x [B, Nl, 4]
            [o.reshape(b, -1) for o in outputs.objectness],  # L x [B, Nl]
            [d.reshape(b, -1, 4) for d in outputs.deltas],  # L x [B, Nl, 4]
            image_hw,
        )
    flat = flatten_outputs(outputs)
    objectness = flat.objectness_per_level
    if config.model.objectness == "softmax":
        objectness = tuple(o[..., 1] - o[..., 0] for o in objectness)  # [B, Nl]
    return proposals.generate_batch(
        flat.anchors_per_level,
        objectness,
        flat.deltas_per_level,
        image_hw,
        pre_nms_topk=p.pre_nms_topk_train if train else p.pre_nms_topk_test,
        post_nms_topk=p.post_nms_topk_train if train else p.post_nms_topk_test,
        nms_threshold=p.nms_threshold,
        min_size=p.min_size,
        weights=tuple(config.targets.weights),
    )


def proposals_from_images(model, variables, images, image_hw, *, config) -> proposals.Proposals:
    """Run ``model`` (an :class:`jax_rpn.models.RPN`) in inference mode and make proposals."""
    outputs = model.apply(variables, images, train=False, image_hw=image_hw)
    return proposals_from_outputs(outputs, image_hw, config=config)


@functools.lru_cache(maxsize=8)
def _predict_fn(config: ml_collections.FrozenConfigDict):
    model = build_rpn(config)
    return jax.jit(functools.partial(proposals_from_images, model, config=config))


def predict_proposals(variables, images, image_hw, *, config) -> proposals.Proposals:
    """Proposals for ``images [B, H, W, 3]`` (H, W divisible by the largest stride).

    Args:
      variables: the model's variables, ``{"params": ..., "batch_stats": ...}`` (a
        checkpoint's ``state.params`` with ``state.model_state`` merged in).
      images: float ``[B, H, W, 3]``, normalised as the input pipeline does.
      image_hw: int ``[B, 2]``, each image's true size inside the padding.
      config: the training config (``model``, ``anchors``, ``proposals``, ``targets``).

    Returns:
      :class:`jax_rpn.proposals.Proposals` with ``boxes [B, K, 4]`` xyxy, ``scores [B, K]``,
      ``valid [B, K]`` and ``num_nonfinite [B]``, K = ``proposals.post_nms_topk_test``.
      Compiled once per config and input shape.
    """
    return _predict_fn(ml_collections.FrozenConfigDict(config))(variables, images, image_hw)
