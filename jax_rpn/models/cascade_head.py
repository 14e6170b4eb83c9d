"""The Cascade RPN head (Vu et al., NeurIPS 2019): two stages on one anchor per location, or
on A anchors per location (one size, several aspect ratios: an extension, not in the paper).

mmdetection's ``CascadeRPNHead`` with two ``StageCascadeRPNHead`` stages
(``mmdet/models/dense_heads/cascade_rpn_head.py``), one set of weights shared by all levels:

- Stage 1: a 3x3 convolution (``AdaptiveConv`` ``type='dilation'``) of dilation
  ``stage1_dilation`` (mmdetection's 3, for its anchors of 8 x stride; ``configs/cascade.py``
  has 4 x stride anchors and dilation 1) + ReLU,
  then a 1x1 convolution to box deltas. Its features are *bridged*: stage 2 convolves them.
  The deltas refine the anchors; the refined anchors (no gradient, clipped to the image) are
  stage 2's references.
- Stage 2: an adaptive 3x3 convolution whose taps sit on each cell's refined anchor
  (:func:`jax_rpn.models.adaptive_conv.anchor_points`) + ReLU, then 1x1 convolutions to an
  objectness logit and box deltas against the refined anchor. Proposals come from stage 2.

With A anchors per cell, stage 1 predicts 4 A deltas per cell and stage 2 samples once per
refined anchor (A adaptive convolutions per cell, one kernel), so each anchor keeps its own
aligned features; the 1x1 predictors are shared by the A anchors.

In training, stage 2's loss reads only the anchors its sampler picks (256 per image of the
5456 of a 256x256 image), so the trainer runs stage 2 at those only (``stage2_at``): the same
loss and gradients, without the adaptive convolution's gathers and scatters at every cell.
mmdetection runs its deformable convolution everywhere.

All convolutions are initialised normal(0.01) with zero bias, as mmdetection; the adaptive
convolution has no bias (mmcv's ``DeformConv2d(bias=False)``). Shapes follow
:class:`jax_rpn.models.RPNOutput`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_rpn import boxes as box_ops
from jax_rpn.models.adaptive_conv import AdaptiveConv, anchor_points
from jax_rpn.models.head import Conv1x1Params


@struct.dataclass
class CascadeRPNOutput:
    """Per-level Cascade RPN outputs for a batch (a pytree; L levels, B images, A anchors per
    cell: 1 in Cascade RPN).

    Attributes:
      objectness: L float32 arrays ``[B, Hl, Wl, A]``, stage-2 sigmoid logits.
      deltas: L float32 arrays ``[B, Hl, Wl, A, 4]``, stage-2 deltas against ``refined_anchors``.
      anchors: L arrays ``[Hl * Wl * A, 4]``, the grid anchors (stage 1's references), xyxy.
      stage1_deltas: L float32 arrays ``[B, Hl, Wl, A, 4]``, stage-1 deltas against ``anchors``.
      refined_anchors: L float32 arrays ``[B, Hl * Wl * A, 4]``, xyxy: stage 1's boxes, clipped to
        the image, without gradient (stage 2's references).
      features: the L feature maps ``[B, Hl, Wl, C]`` the head saw.
      strides: L ints (static).
    """

    objectness: tuple[jax.Array, ...]
    deltas: tuple[jax.Array, ...]
    anchors: tuple[jax.Array, ...]
    stage1_deltas: tuple[jax.Array, ...]
    refined_anchors: tuple[jax.Array, ...]
    features: tuple[jax.Array, ...]
    strides: tuple[int, ...] = struct.field(pytree_node=False)


def refine_anchors(anchors, deltas, image_hw, *, weights) -> jax.Array:
    """Stage-1 boxes of one image: ``decode(anchors [N, 4], deltas [N, 4])`` clipped to
    ``image_hw = (h, w)`` (mmdetection's ``refine_bboxes``); non-finite boxes fall back to their
    anchor, so stage 2 never sees NaN. Returns float32 ``[N, 4]`` xyxy, no gradient."""
    anchors = jnp.asarray(anchors, jnp.float32)
    boxes = box_ops.clip(box_ops.decode(anchors, deltas, weights=weights), image_hw)
    finite = jnp.all(jnp.isfinite(boxes), axis=-1, keepdims=True)
    return jax.lax.stop_gradient(jnp.where(finite, boxes, anchors))


class CascadeHead(nn.Module):
    """Two-stage Cascade RPN head shared by all levels (module doc).

    Attributes:
      conv_dim: channels of both stages' 3x3 convolutions; None = the input channels.
      stage1_dilation: dilation of stage 1's convolution (mmdetection: 3).
      stage1_weights: stage 1's box coder weights ``(wx, wy, ww, wh)`` (1 / mmdetection's
        ``target_stds``: (10, 10, 2, 2)).
      dtype: compute dtype; parameters and outputs are float32.
    """

    conv_dim: int | None = None
    stage1_dilation: int = 3
    stage1_weights: tuple[float, ...] = (10.0, 10.0, 2.0, 2.0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        features: Sequence[jax.Array],
        anchors: Sequence[jax.Array],
        strides: Sequence[int],
        image_hw: jax.Array,
        *,
        stage2_at: Callable[[jax.Array], jax.Array] | None = None,
    ) -> tuple[tuple[jax.Array, ...], ...]:
        """L maps ``[B, Hl, Wl, C]``, their grid anchors ``[Hl * Wl, 4]`` and strides, and the
        true image sizes ``image_hw [B, 2]`` -> ``(stage1_deltas, refined_anchors, objectness,
        deltas)``, tuples of L arrays shaped as in :class:`CascadeRPNOutput`.

        ``stage2_at``: None, or a function of the refined anchors ``[B, N, 4]`` (levels
        concatenated) returning int32 ``[B, S]``: distinct anchor indices, ``N`` for none. Stage
        2 then runs at those anchors only (a training step whose loss reads only sampled
        anchors: the same loss and gradients at a fraction of the cost); its outputs are 0
        elsewhere.
        """
        shapes = [tuple(f.shape) for f in features]
        if any(len(s) != 4 for s in shapes) or len({s[-1] for s in shapes}) != 1:
            raise ValueError(
                f"features must be [B, H, W, C] with the same C on every level (one shared "
                f"head), got shapes {shapes}"
            )
        if not (len(anchors) == len(strides) == len(features)):
            raise ValueError(
                f"need one anchors array and stride per level, got {len(anchors)} and "
                f"{len(strides)} for {len(features)} levels"
            )
        cells = [f.shape[1] * f.shape[2] for f in features]
        num_a = anchors[0].shape[0] // cells[0]  # A, anchors per cell
        if num_a < 1 or any(
            tuple(a.shape) != (n * num_a, 4) for a, n in zip(anchors, cells, strict=True)
        ):
            raise ValueError(
                f"anchors must be [Hl * Wl * A, 4] with the same A >= 1 on every level, got "
                f"{[tuple(a.shape) for a in anchors]} for levels of {cells} cells"
            )
        if self.conv_dim is not None and self.conv_dim <= 0:
            raise ValueError(f"conv_dim must be > 0 or None, got {self.conv_dim}")
        dim = shapes[0][-1] if self.conv_dim is None else self.conv_dim
        image_hw = jnp.asarray(image_hw)

        stage1_conv = AdaptiveConv(
            dim, dilation=self.stage1_dilation, dtype=self.dtype, name="stage1_conv"
        )
        stage2_conv = AdaptiveConv(dim, dtype=self.dtype, name="stage2_conv")
        s1_kernel, s1_bias = Conv1x1Params(4 * num_a, name="stage1_deltas")(dim)
        s1_kernel, s1_bias = s1_kernel[0, 0].astype(self.dtype), s1_bias.astype(self.dtype)
        cls_kernel, cls_bias = Conv1x1Params(1, name="objectness")(dim)
        box_kernel, box_bias = Conv1x1Params(4, name="deltas")(dim)
        kernel = jnp.concatenate([cls_kernel, box_kernel], -1)[0, 0].astype(self.dtype)
        bias = jnp.concatenate([cls_bias, box_bias]).astype(self.dtype)  # [5]

        refine = jax.vmap(
            lambda a, d, hw: refine_anchors(a, d, hw, weights=self.stage1_weights),
            in_axes=(None, 0, 0),
        )
        bridged = [nn.relu(x) for x in stage1_conv(features)]  # L x [B, H, W, dim]
        stage1_deltas, refined, points = [], [], []
        for x, level_anchors, stride in zip(bridged, anchors, strides, strict=True):
            b, h, w = x.shape[:3]
            d1 = (x @ s1_kernel + s1_bias).astype(jnp.float32).reshape(b, h, w, num_a, 4)
            boxes = refine(level_anchors, d1.reshape(b, -1, 4), image_hw)  # [B, H * W * A, 4]
            stage1_deltas.append(d1)
            refined.append(boxes)
            points.append(anchor_points(boxes.reshape(b, h, w, num_a, 4), stride=stride))
        if stage2_at is None:  # taps on the refined anchors [B, H, W, A, 9, 2]
            outs = [nn.relu(x) @ kernel + bias for x in stage2_conv(bridged, points)]
        else:
            outs = _scattered(
                stage2_at(jnp.concatenate(refined, axis=1)),
                points,
                lambda pts, lvl: nn.relu(stage2_conv(bridged, pts, lvl)) @ kernel + bias,
            )
        objectness = tuple(o[..., 0].astype(jnp.float32) for o in outs)  # L x [B, H, W, A]
        deltas = tuple(o[..., 1:].astype(jnp.float32) for o in outs)  # L x [B, H, W, A, 4]
        return tuple(stage1_deltas), tuple(refined), objectness, deltas


def _scattered(indices, points, fn):
    """``fn(points [B, S, 9, 2], levels [B, S]) -> [B, S, K]`` at the anchors ``indices [B, S]``
    (``N`` = none) of the per-level ``points`` (L arrays ``[B, Hl, Wl, A, 9, 2]``), scattered
    into L arrays ``[B, Hl, Wl, A, K]``, 0 at the anchors not chosen."""
    shapes = [p.shape[:-2] for p in points]  # L x (B, Hl, Wl, A)
    flat = [p.reshape(p.shape[0], -1, 9, 2) for p in points]  # L x [B, Nl, 9, 2]
    counts = [p.shape[1] for p in flat]
    n = sum(counts)
    level_of = np.repeat(np.arange(len(flat), dtype=np.int32), counts)  # [N]
    chosen = jnp.clip(indices, 0, n - 1)  # [B, S]
    picked = jnp.take_along_axis(jnp.concatenate(flat, axis=1), chosen[..., None, None], axis=1)
    levels = jnp.where(indices < n, jnp.asarray(level_of)[chosen], -1)  # [B, S]
    out = fn(picked, levels)  # [B, S, K]
    rows = jnp.arange(indices.shape[0])[:, None]
    dense = jnp.zeros((indices.shape[0], n + 1, out.shape[-1]), out.dtype)
    dense = dense.at[rows, indices].set(out)[:, :n]  # [B, N, K]; row N took the "none"s
    parts = jnp.split(dense, np.cumsum(counts)[:-1], axis=1)
    return [x.reshape(*shape, -1) for x, shape in zip(parts, shapes, strict=True)]
