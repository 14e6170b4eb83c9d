"""The RPN head: shared 3x3 convolution(s) + ReLU, then 1x1 objectness and box-delta convolutions.

One set of weights is applied to every pyramid level (detectron2's ``StandardRPNHead``;
``num_convs=0`` puts the predictors directly on the features). All convolutions are
initialised normal(stddev=0.01) with zero bias, as in the paper. The two 1x1 predictors keep
``nn.Conv``'s parameter layout but run as one matmul per level.

Output channel layout, per cell, for A anchors per cell:
- objectness ``sigmoid``: A channels, channel ``a`` -> ``[B, H, W, A]``;
- objectness ``softmax``: 2A channels, channel ``a * 2 + k`` -> ``[B, H, W, A, 2]`` with
  ``k = 0`` background and ``k = 1`` foreground (py-faster-rcnn instead used ``k * A + a``);
- deltas: 4A channels, channel ``a * 4 + k`` -> ``[B, H, W, A, 4]`` with ``k`` indexing
  ``(dx, dy, dw, dh)`` (detectron2's reshape of 4A into ``(A, 4)``).
``[B, H, W, A, ...]`` reshaped to ``[B, H * W * A, ...]`` is the anchor order of
``jax_rpn.anchors.grid_anchors``.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_rpn.losses import OBJECTNESS_KINDS

NORMAL_001 = nn.initializers.normal(stddev=0.01)


def foreground_logit(objectness: jax.Array, kind: str) -> jax.Array:
    """One foreground logit per anchor: ``sigmoid`` logits ``[...]`` as they are, ``softmax``
    logits ``[..., 2]`` (background, foreground) as foreground minus background (the logit of
    the softmax's foreground probability)."""
    if kind not in OBJECTNESS_KINDS:
        raise ValueError(f"kind must be one of {OBJECTNESS_KINDS}, got {kind!r}")
    if kind == "softmax":
        if objectness.shape[-1:] != (2,):
            raise ValueError(f"softmax objectness must be [..., 2], got {objectness.shape}")
        return objectness[..., 1] - objectness[..., 0]
    return objectness


class RPNHead(nn.Module):
    """RPN head shared by all levels.

    Attributes:
      num_anchors: A, anchors per cell.
      num_convs: shared 3x3 convolutions (each followed by ReLU) before the 1x1 predictors.
      conv_dim: channels of those convolutions; None = the input channels.
      objectness: ``sigmoid`` (A logits per cell) or ``softmax`` (2A: background, foreground).
      dtype: compute dtype; parameters and outputs are float32.
    """

    num_anchors: int
    num_convs: int = 1
    conv_dim: int | None = None
    objectness: str = "sigmoid"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, features: Sequence[jax.Array]
    ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """L feature maps ``[B, Hl, Wl, C]`` -> (objectness, deltas), tuples of L float32 arrays.

        Objectness is ``[B, Hl, Wl, A]`` (sigmoid) or ``[B, Hl, Wl, A, 2]`` (softmax, last axis
        (background, foreground)); deltas are ``[B, Hl, Wl, A, 4]``.
        """
        if self.num_anchors <= 0:
            raise ValueError(f"num_anchors must be > 0, got {self.num_anchors}")
        if self.num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {self.num_convs}")
        if self.objectness not in OBJECTNESS_KINDS:
            raise ValueError(
                f"objectness must be one of {OBJECTNESS_KINDS}, got {self.objectness!r}"
            )
        if not features:
            raise ValueError("features must hold at least one level")
        shapes = [tuple(f.shape) for f in features]
        if any(len(s) != 4 for s in shapes) or len({s[-1] for s in shapes}) != 1:
            raise ValueError(
                f"features must be [B, H, W, C] with the same C on every level (one shared "
                f"head), got shapes {shapes}"
            )
        if self.conv_dim is not None and self.conv_dim <= 0:
            raise ValueError(f"conv_dim must be > 0 or None, got {self.conv_dim}")
        dim = shapes[0][-1] if self.conv_dim is None else self.conv_dim
        a = self.num_anchors
        per_anchor = 1 if self.objectness == "sigmoid" else 2

        convs = [
            nn.Conv(
                dim,
                (3, 3),
                padding=((1, 1), (1, 1)),
                kernel_init=NORMAL_001,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"conv{i}",
            )
            for i in range(self.num_convs)
        ]
        in_dim = dim if self.num_convs else shapes[0][-1]
        cls_kernel, cls_bias = Conv1x1Params(per_anchor * a, name="objectness")(in_dim)
        box_kernel, box_bias = Conv1x1Params(4 * a, name="deltas")(in_dim)
        # Both 1x1 predictors as one matmul per level: one pass over the features, and a dot
        # is faster than a 1x1 convolution on XLA CPU.
        kernel = jnp.concatenate([cls_kernel, box_kernel], -1)[0, 0].astype(self.dtype)
        bias = jnp.concatenate([cls_bias, box_bias]).astype(self.dtype)  # [(per_anchor + 4) A]
        n_cls = per_anchor * a
        objectness, deltas = [], []
        for x in features:
            x = x.astype(self.dtype)
            for c in convs:
                x = nn.relu(c(x))
            b, h, w = x.shape[:3]
            out = (x @ kernel + bias).astype(jnp.float32)  # [B, H, W, (per_anchor + 4) A]
            logits = out[..., :n_cls]  # [B, H, W, A * per_anchor]
            if per_anchor == 2:
                logits = logits.reshape(b, h, w, a, 2)  # channel a * 2 + k
            objectness.append(logits)
            deltas.append(out[..., n_cls:].reshape(b, h, w, a, 4))
        return tuple(objectness), tuple(deltas)


class Conv1x1Params(nn.Module):
    """The parameters of a 1x1 convolution to ``features`` channels, in ``nn.Conv``'s layout:
    ``kernel [1, 1, C, features]`` normal(0.01) and ``bias [features]`` zero."""

    features: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", NORMAL_001, (1, 1, in_features, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return kernel, bias
