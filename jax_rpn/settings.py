"""A config turned into plain, frozen settings once, at the glue boundary.

As detectron2's ``from_config``: the objective, inference and the tools read ``configs/*.py``
through these types and nowhere else, and the ops below them take the settings' fields as
plain keyword arguments (``targets.anchor_targets(..., **settings.targets.kwargs())``). Each
type is a frozen (hashable) dataclass, so it can be a ``jit`` static argument or a Flax module
field.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jax_rpn import anchors as anchor_ops

CHANNEL_ORDERS = ("rgb", "bgr")


class _Kwargs:
    def kwargs(self) -> dict:
        """The fields as keyword arguments of the op they configure."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class AnchorSettings(_Kwargs):
    """The anchors of every pyramid level (``jax_rpn.anchors.multilevel_anchors``' arguments).

    ``sizes`` and ``aspect_ratios`` hold one tuple per level. The model and the coverage tool
    both take their anchors from :meth:`for_image`, so they agree by construction.
    """

    strides: tuple[int, ...]
    sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    offset: float = 0.0
    convention: str = "detectron2"

    def __post_init__(self):
        strides = tuple(self.strides)
        n = len(strides)
        object.__setattr__(self, "strides", strides)
        for name in ("sizes", "aspect_ratios"):
            levels = anchor_ops.per_level(name, getattr(self, name), n)
            object.__setattr__(self, name, tuple(tuple(float(v) for v in lv) for lv in levels))
        self.cell_anchors()  # validates sizes, ratios, convention and equal A per level

    @classmethod
    def from_config(cls, config) -> AnchorSettings:
        """From ``config.anchors``."""
        a = config.anchors
        return cls(
            strides=tuple(int(s) for s in a.strides),
            sizes=_nested(a.sizes),
            aspect_ratios=_nested(a.aspect_ratios),
            offset=float(a.offset),
            convention=a.convention,
        )

    def cell_anchors(self) -> list[np.ndarray]:
        """The cell anchors ``[A, 4]`` of each level."""
        return anchor_ops.level_cell_anchors(
            self.strides, self.sizes, self.aspect_ratios, convention=self.convention
        )

    @property
    def num_cell_anchors(self) -> int:
        """A, anchors per cell (the head's outputs per cell)."""
        return int(self.cell_anchors()[0].shape[0])

    def feature_hws(self, image_hw) -> list[tuple[int, int]]:
        """Feature map size of each level for a (padded) image ``(H, W)``: ``ceil(H / stride)``,
        as strided convolutions and pooling with padding give it."""
        h, w = (int(v) for v in image_hw)
        return [(math.ceil(h / s), math.ceil(w / s)) for s in self.strides]

    def for_image(self, image_hw) -> list[np.ndarray]:
        """The anchors of a (padded) image ``(H, W)``: L float32 arrays ``[Hl * Wl * A, 4]``
        (the ``torchvision`` convention steps ``(H // Hl, W // Wl)`` per level, as torchvision)."""
        return anchor_ops.multilevel_anchors(
            self.feature_hws(image_hw),
            self.strides,
            self.sizes,
            self.aspect_ratios,
            offset=self.offset,
            convention=self.convention,
            image_hw=tuple(int(v) for v in image_hw),
        )


@dataclasses.dataclass(frozen=True)
class TargetSettings(_Kwargs):
    """The keyword settings of ``jax_rpn.targets.anchor_targets`` (matcher, sampler, coder)."""

    high: float = 0.7
    low: float = 0.3
    allow_low_quality: bool = True
    num_samples: int = 256
    positive_fraction: float = 0.5
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    border: float | None = None
    ignore_iof: float | None = None

    @classmethod
    def from_config(cls, config) -> TargetSettings:
        """From ``config.targets``."""
        t = config.targets
        return cls(
            high=float(t.high),
            low=float(t.low),
            allow_low_quality=bool(t.allow_low_quality),
            num_samples=int(t.num_samples),
            positive_fraction=float(t.positive_fraction),
            weights=tuple(float(w) for w in t.weights),
            border=None if t.border is None else float(t.border),
            ignore_iof=None if t.ignore_iof is None else float(t.ignore_iof),
        )


@dataclasses.dataclass(frozen=True)
class ProposalSettings(_Kwargs):
    """The keyword settings of ``jax_rpn.proposals.generate``."""

    pre_nms_topk: int = 1000
    post_nms_topk: int = 1000
    nms_threshold: float = 0.7
    min_size: float = 0.0
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    nms_across_levels: bool = False

    @classmethod
    def from_config(cls, config, *, train: bool) -> ProposalSettings:
        """From ``config.proposals`` (the ``_train`` or ``_test`` top-k); the box coder weights
        are ``config.targets.weights``, the ones the targets were encoded with."""
        p = config.proposals
        return cls(
            pre_nms_topk=int(p.pre_nms_topk_train if train else p.pre_nms_topk_test),
            post_nms_topk=int(p.post_nms_topk_train if train else p.post_nms_topk_test),
            nms_threshold=float(p.nms_threshold),
            min_size=float(p.min_size),
            weights=tuple(float(w) for w in config.targets.weights),
            nms_across_levels=bool(p.nms_across_levels),
        )


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """How the objective weighs and shapes the losses (``jax_rpn.losses.rpn_losses``)."""

    objectness: str = "sigmoid"  # the head's objectness form: sigmoid or softmax
    box: str = "smooth_l1"  # smooth_l1, giou or iou
    beta: float = 0.0  # smooth-L1 beta (0 = L1)
    box_weight: float = 1.0  # loss = objectness + box_weight * box

    @classmethod
    def from_config(cls, config) -> LossSettings:
        """From ``config.loss`` and ``config.model.objectness``."""
        return cls(
            objectness=config.model.objectness,
            box=config.loss.box,
            beta=float(config.loss.beta),
            box_weight=float(config.loss.box_weight),
        )


@dataclasses.dataclass(frozen=True)
class CascadeSettings:
    """Cascade RPN's stage 1 and its stage-2 extra (``jax_rpn.cascade_objective``); stage 2
    otherwise uses :class:`TargetSettings` and :class:`LossSettings`."""

    # Each level's anchor side: stage 1 puts a box on the level of the nearest (in log scale).
    anchor_sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    center_ratio: float = 0.2
    ignore_ratio: float = 0.5
    stage1_weights: tuple[float, float, float, float] = (10.0, 10.0, 2.0, 2.0)
    stage1_box_weight: float = 10.0
    low_quality_min_iou: float = 0.3

    @classmethod
    def from_config(cls, config) -> CascadeSettings:
        """From ``config.cascade`` and ``config.anchors.sizes`` (one size per level)."""
        c = config.cascade
        return cls(
            anchor_sizes=tuple(float(s[0]) for s in AnchorSettings.from_config(config).sizes),
            center_ratio=float(c.center_ratio),
            ignore_ratio=float(c.ignore_ratio),
            stage1_weights=tuple(float(w) for w in c.stage1_weights),
            stage1_box_weight=float(c.stage1_box_weight),
            low_quality_min_iou=float(c.low_quality_min_iou),
        )


@dataclasses.dataclass(frozen=True)
class PixelSettings:
    """How uint8 RGB images become the model's input (``jax_rpn.data.augment.normalize``).

    ``channel_order`` is the order the model sees (``rgb``: torchvision's ImageNet weights;
    ``bgr``: Caffe2 / detectron2 MSRA weights); ``mean`` and ``std`` are per channel in that
    order, in 0-255 units (Caffe2 weights: std 1).
    """

    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    channel_order: str = "rgb"

    def __post_init__(self):
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(
                f"channel_order must be one of {CHANNEL_ORDERS}, got {self.channel_order!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"mean and std must be 3 numbers each, std > 0, got {self.mean}, {self.std}"
            )

    @classmethod
    def from_config(cls, config) -> PixelSettings:
        """From ``config.data.pixel_mean``, ``pixel_std`` and ``channel_order``."""
        d = config.data
        return cls(
            mean=tuple(float(v) for v in d.pixel_mean),
            std=tuple(float(v) for v in d.pixel_std),
            channel_order=d.channel_order,
        )


@dataclasses.dataclass(frozen=True)
class RPNSettings:
    """Everything the objective and inference need from a config, built once."""

    anchors: AnchorSettings
    targets: TargetSettings
    loss: LossSettings
    train_proposals: ProposalSettings
    test_proposals: ProposalSettings

    @classmethod
    def from_config(cls, config) -> RPNSettings:
        return cls(
            anchors=AnchorSettings.from_config(config),
            targets=TargetSettings.from_config(config),
            loss=LossSettings.from_config(config),
            train_proposals=ProposalSettings.from_config(config, train=True),
            test_proposals=ProposalSettings.from_config(config, train=False),
        )


def _nested(values) -> tuple:
    """Config lists -> tuples (hashable), one level or per level."""
    values = tuple(values)
    if values and isinstance(values[0], (list, tuple)):
        return tuple(tuple(v) for v in values)
    return values
