"""The RPN module: backbone (+ FPN) -> shared head -> per-level objectness, deltas and anchors.

Feature levels by configuration:

| ``backbone``      | ``fpn`` | levels (strides)                                 |
|-------------------|---------|--------------------------------------------------|
| ``resnet18..101`` | True    | P2..P6 (4, 8, 16, 32, 64), detectron2's R*-FPN   |
| ``resnet18..101`` | False   | C4 (16), detectron2's R50-C4 RPN (no res5 built) |
| ``vgg16``         | False   | conv5_3 (16), the Faster R-CNN paper             |

Images must be divisible by :func:`size_divisibility`: 32 with FPN (P6 is then
``ceil(H / 64)`` rows, as in torchvision, detectron2 and mmdet, whose batches are padded to a
multiple of 32), else the feature stride.

``anchors.strides`` must equal the feature strides, ``anchors.sizes`` / ``aspect_ratios`` give
one entry per level (or one shared by all), and every level has the same A anchors per cell.
A mismatch raises ValueError at ``init`` naming both numbers.

Outputs (:class:`RPNOutput`): per level ``objectness`` ``[B, Hl, Wl, A]`` (sigmoid) or
``[B, Hl, Wl, A, 2]`` (softmax, (background, foreground)), ``deltas`` ``[B, Hl, Wl, A, 4]``
(float32 whatever the compute dtype), and ``anchors`` ``[Hl * Wl * A, 4]`` (numpy constants
of the input shape, xyxy absolute pixels). :func:`flatten_outputs` concatenates the levels in
anchor order (``[B, Hl, Wl, A] -> [B, Hl * Wl * A]``, level after level).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_rpn.models import resnet, vgg
from jax_rpn.models.cascade_head import CascadeHead, CascadeRPNOutput
from jax_rpn.models.fpn import FPN
from jax_rpn.models.head import RPNHead
from jax_rpn.models.resnet import STAGES, ResNet
from jax_rpn.models.vgg import VGG16
from jax_rpn.settings import AnchorSettings

BACKBONES = tuple(f"resnet{d}" for d in STAGES) + ("vgg16",)
HEADS = ("standard", "cascade")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MAX_FREEZE_AT = 5  # ResNet: stem + 4 stages; VGG-16: 5 blocks


def size_divisibility(*, fpn: bool, strides: Sequence[int]) -> int:
    """What the padded image size must be divisible by: 32 with FPN (C5's stride: the top-down
    pathway doubles sizes exactly, P6 takes the ceiling), else the largest feature stride."""
    return 32 if fpn else int(max(strides))


def frozen_parameters(backbone: str, freeze_at: int) -> Callable[[tuple[str, ...]], bool] | None:
    """Predicate on a parameter's path under ``params`` (e.g. ``("body", "layer1_0", "conv1",
    "kernel")``): True for the backbone stages that fine-tuning keeps fixed; None when
    ``freeze_at`` is 0 (nothing frozen).

    ResNet: detectron2's ``FREEZE_AT`` (1 the stem, 2 the stem and res2, ..., 5 everything;
    torchvision's ``trainable_backbone_layers = 5 - freeze_at``, mmdet's ``frozen_stages =
    freeze_at - 1``). VGG-16: the first ``freeze_at`` blocks (py-faster-rcnn: 2). 0 freezes
    nothing.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if not 0 <= freeze_at <= MAX_FREEZE_AT:
        raise ValueError(f"freeze_at must be in [0, {MAX_FREEZE_AT}], got {freeze_at}")
    if freeze_at == 0:
        return None
    stage_of = vgg.stage_of if backbone == "vgg16" else resnet.stage_of

    def frozen(path: tuple[str, ...]) -> bool:
        return len(path) > 1 and path[0] == "body" and stage_of(path[1]) <= freeze_at

    return frozen


@struct.dataclass
class RPNOutput:
    """Per-level RPN outputs for a batch (a pytree; L levels, B images).

    Attributes:
      objectness: L float32 arrays ``[B, Hl, Wl, A]`` (sigmoid logits) or ``[B, Hl, Wl, A, 2]``
        (softmax logits, last axis (background, foreground)).
      deltas: L float32 arrays ``[B, Hl, Wl, A, 4]``, ``(dx, dy, dw, dh)`` per anchor.
      anchors: L arrays ``[Hl * Wl * A, 4]``, xyxy absolute pixels, in the order of the
        outputs reshaped ``[Hl, Wl, A] -> [Hl * Wl * A]`` (numpy constants from the module).
      features: the L feature maps ``[B, Hl, Wl, C]`` the head saw (FPN P2..P6, C4 or conv5_3),
        in the compute dtype, for a second stage to reuse (e.g. with RoIAlign).
      strides: L ints (static), the stride of each level.
    """

    objectness: tuple[jax.Array, ...]
    deltas: tuple[jax.Array, ...]
    anchors: tuple[jax.Array, ...]
    features: tuple[jax.Array, ...]
    strides: tuple[int, ...] = struct.field(pytree_node=False)


@struct.dataclass
class FlatOutputs:
    """RPN outputs with the levels concatenated in anchor order (N = sum of Nl = Hl * Wl * A).

    Attributes:
      objectness: ``[B, N]`` (sigmoid) or ``[B, N, 2]`` (softmax) float32 logits.
      deltas: ``[B, N, 4]`` float32.
      anchors: ``[N, 4]`` xyxy absolute pixels (numpy when the inputs were numpy).
      level_ids: ``[N]`` int32, the level of each anchor (for level-aware NMS); a numpy
        constant until it passes out of a ``jit``.
      objectness_per_level: L arrays ``[B, Nl]`` or ``[B, Nl, 2]`` (for per-level top-k).
      deltas_per_level: L arrays ``[B, Nl, 4]``.
      anchors_per_level: L arrays ``[Nl, 4]``.
      level_sizes: L ints (static), Nl; ``level_ids`` and the concatenations follow them.
    """

    objectness: jax.Array
    deltas: jax.Array
    anchors: jax.Array
    level_ids: np.ndarray
    objectness_per_level: tuple[jax.Array, ...]
    deltas_per_level: tuple[jax.Array, ...]
    anchors_per_level: tuple[jax.Array, ...]
    level_sizes: tuple[int, ...] = struct.field(pytree_node=False)


def flatten_outputs(outputs: RPNOutput) -> FlatOutputs:
    """Concatenate the levels of ``outputs`` in anchor order; see :class:`FlatOutputs`."""
    b = outputs.deltas[0].shape[0]
    objectness = tuple(o.reshape(b, -1, *o.shape[4:]) for o in outputs.objectness)  # [B, Nl]
    deltas = tuple(d.reshape(b, -1, 4) for d in outputs.deltas)  # [B, Nl, 4]
    level_anchors = tuple(outputs.anchors)
    level_sizes = tuple(int(a.shape[0]) for a in level_anchors)
    predicted = tuple(int(o.shape[1]) for o in objectness)
    if predicted != level_sizes:
        raise ValueError(f"anchors per level {level_sizes} != predictions per level {predicted}")
    xp = np if all(isinstance(a, np.ndarray) for a in level_anchors) else jnp
    return FlatOutputs(
        objectness=jnp.concatenate(objectness, axis=1),
        deltas=jnp.concatenate(deltas, axis=1),  # [B, N, 4]
        anchors=xp.concatenate(level_anchors, axis=0),  # [N, 4]
        level_ids=np.repeat(np.arange(len(level_sizes), dtype=np.int32), level_sizes),  # [N]
        objectness_per_level=objectness,
        deltas_per_level=deltas,
        anchors_per_level=level_anchors,
        level_sizes=level_sizes,
    )


def init_variables(model: nn.Module, key: jax.Array, image_shape: Sequence[int]) -> dict:
    """``model.init(key, zeros(image_shape), train=False)``, compiled without XLA optimisation.

    Initialisers draw one threefry stream per parameter, which XLA's CPU backend compiles very
    slowly at the default optimisation level (minutes for a ResNet on 2 cores); the values are
    the same. ``image_shape`` is ``[B, H, W, 3]``; returns the variables dict.
    """
    init = jax.jit(
        functools.partial(model.init, train=False),
        compiler_options={"xla_backend_optimization_level": 0},
    )
    return init(key, jnp.zeros(tuple(image_shape), jnp.float32))


def _nested_len(values) -> int | None:
    """Number of per-level entries of ``sizes``/``aspect_ratios``, or None if one is shared."""
    values = list(values)
    if values and isinstance(values[0], (list, tuple)) and len(values) > 1:
        return len(values)
    return None


class RPN(nn.Module):
    """Region Proposal Network: images ``[B, H, W, 3]`` -> :class:`RPNOutput`.

    Defaults are detectron2's R50-FPN RPN. Attributes mirror ``config.model`` and
    ``config.anchors`` (see :func:`build_rpn`):

    Attributes:
      backbone: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` or ``vgg16``.
      width: first-stage channels of the backbone (64 standard).
      norm: ``frozen_bn``, ``batch_norm``, ``group_norm`` or ``none`` (``jax_rpn.models.norm``).
      stride_in_1x1: ResNet bottlenecks stride in their first 1x1 convolution (MSRA / Caffe2
        weights, detectron2's default) instead of the 3x3 (torchvision).
      fpn: FPN levels P2..P6 (ResNet only); else C4 (ResNet) or conv5_3 (VGG-16).
      fpn_dim: FPN channels.
      fpn_norm: norm after each FPN convolution (``none``: convolutions with bias).
      fpn_p6: ``maxpool``, ``conv_p5`` or ``conv_c5`` (``jax_rpn.models.fpn``).
      head_convs, head_dim: shared 3x3 convolutions of the head and their channels (None =
        the feature channels).
      objectness: ``sigmoid`` or ``softmax``.
      head_type: ``standard`` (:class:`jax_rpn.models.head.RPNHead`) or ``cascade``
        (:class:`jax_rpn.models.cascade_head.CascadeHead`: one size per level, sigmoid objectness,
        ``head_dim`` channels, ``cascade_dilation`` and ``cascade_weights`` for stage 1; the
        module then returns a :class:`jax_rpn.models.cascade_head.CascadeRPNOutput`).
      strides, sizes, aspect_ratios, offset, convention: the anchors, as
        ``jax_rpn.anchors.multilevel_anchors`` takes them (see :attr:`anchor_settings`).
      pixel_mean, pixel_std: optional per-channel normalisation ``(x - mean) / std`` applied
        to the images first; None = images used as given.
      axis_name: device axis for ``batch_norm`` statistics (e.g. ``'data'`` inside
        ``shard_map``/``pmap``), None on one device. With an axis name, call ``init`` with
        ``train=False`` outside the mapped function.
      dtype: compute dtype (float32 or bfloat16); parameters and outputs are float32.
    """

    backbone: str = "resnet50"
    width: int = 64
    norm: str = "frozen_bn"
    stride_in_1x1: bool = False
    fpn: bool = True
    fpn_dim: int = 256
    fpn_norm: str = "none"
    fpn_p6: str = "maxpool"
    head_convs: int = 1
    head_dim: int | None = None
    objectness: str = "sigmoid"
    head_type: str = "standard"
    cascade_dilation: int = 3
    cascade_weights: tuple[float, ...] = (10.0, 10.0, 2.0, 2.0)
    strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    sizes: tuple = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    offset: float = 0.0
    convention: str = "detectron2"
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    axis_name: str | None = None
    dtype: Any = jnp.float32

    def setup(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone == "vgg16":
            if self.fpn:
                raise ValueError("fpn=True needs a ResNet backbone (C2..C5); vgg16 gives conv5_3")
            self.body = VGG16(
                width=self.width, norm=self.norm, axis_name=self.axis_name, dtype=self.dtype
            )
        else:
            self.body = ResNet(
                depth=int(self.backbone[len("resnet") :]),
                width=self.width,
                norm=self.norm,
                out_features=("C2", "C3", "C4", "C5") if self.fpn else ("C4",),
                stride_in_1x1=self.stride_in_1x1,
                axis_name=self.axis_name,
                dtype=self.dtype,
            )
        self.neck = None
        if self.fpn:
            self.neck = FPN(
                dim=self.fpn_dim,
                norm=self.fpn_norm,
                p6=self.fpn_p6,
                axis_name=self.axis_name,
                dtype=self.dtype,
            )
        features = self.neck if self.fpn else self.body
        self.levels = tuple(features.strides)
        self.feature_strides = tuple(features.strides.values())
        self._check_levels()
        a = self.anchor_settings.num_cell_anchors
        if self.head_type not in HEADS:
            raise ValueError(f"head_type must be one of {HEADS}, got {self.head_type!r}")
        if self.head_type == "cascade":
            if any(len(s) != 1 for s in self.sizes) or self.objectness != "sigmoid":
                raise ValueError(
                    f"the cascade head takes one anchor size per level (anchors.sizes, got "
                    f"{self.sizes}) and sigmoid objectness (got {self.objectness!r})"
                )
            self.head = CascadeHead(
                conv_dim=self.head_dim,
                stage1_dilation=self.cascade_dilation,
                stage1_weights=self.cascade_weights,
                dtype=self.dtype,
            )
        else:
            self.head = RPNHead(
                num_anchors=a,
                num_convs=self.head_convs,
                conv_dim=self.head_dim,
                objectness=self.objectness,
                dtype=self.dtype,
            )

    @property
    def anchor_settings(self) -> AnchorSettings:
        """The anchors as :class:`jax_rpn.settings.AnchorSettings` (what the coverage tool and
        the objective use for the same config)."""
        return AnchorSettings(
            strides=self.strides,
            sizes=self.sizes,
            aspect_ratios=self.aspect_ratios,
            offset=self.offset,
            convention=self.convention,
        )

    def _check_levels(self):
        """Feature levels vs the anchor configuration (strides, sizes, aspect_ratios)."""
        where = f"backbone {self.backbone}" + (" with FPN" if self.fpn else "")
        num = len(self.feature_strides)
        if len(self.strides) != num:
            raise ValueError(
                f"{where} gives {num} feature levels {self.levels} with strides "
                f"{self.feature_strides}, but anchors.strides has {len(self.strides)} entries "
                f"{tuple(self.strides)}"
            )
        if tuple(float(s) for s in self.strides) != tuple(float(s) for s in self.feature_strides):
            raise ValueError(
                f"{where} gives feature strides {self.feature_strides}, but anchors.strides is "
                f"{tuple(self.strides)}"
            )
        for name in ("sizes", "aspect_ratios"):
            n = _nested_len(getattr(self, name))
            if n is not None and n != num:
                raise ValueError(
                    f"anchors.{name} has {n} levels but {where} gives {num} feature levels "
                    f"{self.levels}; give one entry per level or one shared by all"
                )

    def _check_images(self, images: jax.Array) -> tuple[int, int]:
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"images must have shape [B, H, W, 3], got {shape}")
        h, w = shape[1:3]
        d = size_divisibility(fpn=self.fpn, strides=self.feature_strides)
        if h % d or w % d:
            what = "32 (FPN)" if self.fpn else f"the feature stride {d}"
            raise ValueError(
                f"image size (H, W) = {(h, w)} must be divisible by {what}; pad the images "
                f"(e.g. to {(-(-h // d) * d, -(-w // d) * d)})"
            )
        return h, w

    def features(self, images: jax.Array, *, train: bool) -> list[jax.Array]:
        """Backbone (+ FPN) maps the head runs on, ``[B, Hl, Wl, C]`` in the order of
        ``strides`` (call with ``model.apply(..., method="features")``)."""
        x = images.astype(jnp.float32)
        if self.pixel_mean is not None:
            x = x - jnp.asarray(self.pixel_mean, jnp.float32)
        if self.pixel_std is not None:
            x = x / jnp.asarray(self.pixel_std, jnp.float32)
        features = self.body(x.astype(self.dtype), train=train)
        if self.neck is not None:
            features = self.neck(features, train=train)
        return [features[name] for name in self.levels]

    def __call__(
        self,
        images: jax.Array,
        *,
        train: bool,
        image_hw: jax.Array | None = None,
        stage2_at: Callable[[jax.Array], jax.Array] | None = None,
    ) -> RPNOutput | CascadeRPNOutput:
        """``images`` ``[B, H, W, 3]`` (H, W divisible by :func:`size_divisibility`) -> RPNOutput
        (``head_type="cascade"``: CascadeRPNOutput).

        ``train`` selects batch statistics for ``batch_norm`` (then apply with
        ``mutable=["batch_stats"]``); other norms ignore it. ``image_hw [B, 2]``: the true
        image sizes inside the padding, to which the cascade head clips its refined anchors
        (None: the padded size); the standard head does not use it. ``stage2_at``: the cascade
        head's (:class:`jax_rpn.models.cascade_head.CascadeHead`), e.g.
        :func:`jax_rpn.cascade_objective.stage2_sample` in training.
        """
        if stage2_at is not None and self.head_type != "cascade":
            raise ValueError(
                f"stage2_at is for the cascade head (head_type='cascade'), got {self.head_type!r}"
            )
        h, w = self._check_images(images)
        maps = self.features(images, train=train)
        hws = [tuple(f.shape[1:3]) for f in maps]
        anchors = self.anchor_settings
        if hws != anchors.feature_hws((h, w)):
            raise ValueError(
                f"feature sizes {hws} != ceil(image size / strides) {anchors.feature_hws((h, w))}"
            )
        level_anchors = tuple(anchors.for_image((h, w)))
        strides = tuple(int(s) for s in self.feature_strides)
        if self.head_type == "cascade":
            if image_hw is None:
                image_hw = jnp.tile(jnp.array([h, w], jnp.int32), (images.shape[0], 1))
            stage1_deltas, refined, objectness, deltas = self.head(
                maps, level_anchors, strides, image_hw, stage2_at=stage2_at
            )
            return CascadeRPNOutput(
                objectness=objectness,
                deltas=deltas,
                anchors=level_anchors,
                stage1_deltas=stage1_deltas,
                refined_anchors=refined,
                features=tuple(maps),
                strides=strides,
            )
        objectness, deltas = self.head(maps)
        return RPNOutput(
            objectness=objectness,
            deltas=deltas,
            anchors=level_anchors,
            features=tuple(maps),
            strides=strides,
        )

    @classmethod
    def from_config(cls, config, *, axis_name: str | None = None) -> "RPN":
        """Same as :func:`build_rpn`."""
        return build_rpn(config, axis_name=axis_name)


def build_rpn(config, *, axis_name: str | None = None) -> RPN:
    """An :class:`RPN` from ``config.model`` and ``config.anchors`` (see ``configs/default.py``).

    ``axis_name``: the device axis for ``batch_norm`` statistics, given by the trainer when the
    model runs inside ``shard_map``/``pmap``; None on one device.
    """
    m, a = config.model, AnchorSettings.from_config(config)
    if m.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {m.dtype!r}")
    return RPN(
        backbone=m.backbone,
        width=m.width,
        norm=m.norm,
        stride_in_1x1=m.stride_in_1x1,
        fpn=m.fpn,
        fpn_dim=m.fpn_dim,
        fpn_norm=m.fpn_norm,
        fpn_p6=m.fpn_p6,
        head_convs=m.head_convs,
        head_dim=m.head_dim,
        objectness=m.objectness,
        head_type=m.head,
        cascade_dilation=int(config.cascade.stage1_dilation),
        cascade_weights=tuple(float(w) for w in config.cascade.stage1_weights),
        strides=a.strides,
        sizes=a.sizes,
        aspect_ratios=a.aspect_ratios,
        offset=a.offset,
        convention=a.convention,
        axis_name=axis_name,
        dtype=DTYPES[m.dtype],
    )
