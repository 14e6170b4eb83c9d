"""Validate a training config before anything is built, naming the field that is wrong."""

import jax
import ml_collections

from jax_rpn import anchors, optim, parallel
from jax_rpn.models.norm import NORMS
from jax_rpn.models.rpn import BACKBONES


def _require(ok: bool, field: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"config.{field} must be {expected}, got {value!r}")


def _one_of(config, field: str, choices) -> None:
    value = config
    for part in field.split("."):
        value = value[part]
    _require(value in choices, field, f"one of {tuple(choices)}", value)


def _positive_int(config, field: str) -> None:
    value = config
    for part in field.split("."):
        value = value[part]
    _require(isinstance(value, int) and value > 0, field, "a positive integer", value)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first invalid field of a training config."""
    for field in (
        "batch_size",
        "num_train_steps",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "data.max_boxes",
        "targets.num_samples",
        "proposals.pre_nms_topk_train",
        "proposals.post_nms_topk_train",
        "proposals.pre_nms_topk_test",
        "proposals.post_nms_topk_test",
    ):
        _positive_int(config, field)
    _one_of(config, "parallelism", parallel.MODES)
    _one_of(config, "model.backbone", BACKBONES)
    _one_of(config, "model.norm", NORMS)
    _one_of(config, "model.objectness", ("sigmoid", "softmax"))
    _one_of(config, "model.dtype", ("float32", "bfloat16"))
    _one_of(config, "loss.box", ("smooth_l1", "giou", "iou"))
    _one_of(config, "model.head", ("standard", "cascade"))
    _one_of(config, "optim.name", optim.OPTIMIZERS)
    _one_of(config, "optim.schedule", optim.SCHEDULES)
    _require(
        config.optim.learning_rate > 0, "optim.learning_rate", "> 0", config.optim.learning_rate
    )
    _require(
        config.optim.warmup_steps >= 0, "optim.warmup_steps", ">= 0", config.optim.warmup_steps
    )

    t = config.targets
    _require(
        0.0 <= t.low <= t.high <= 1.0, "targets.low/high", "0 <= low <= high <= 1", (t.low, t.high)
    )
    _require(
        0.0 < t.positive_fraction <= 1.0,
        "targets.positive_fraction",
        "in (0, 1]",
        t.positive_fraction,
    )
    _require(
        0.0 < config.proposals.nms_threshold <= 1.0,
        "proposals.nms_threshold",
        "in (0, 1]",
        config.proposals.nms_threshold,
    )
    _require(
        config.proposals.min_size >= 0, "proposals.min_size", ">= 0", config.proposals.min_size
    )

    a = config.anchors
    try:
        anchors.level_cell_anchors(a.strides, a.sizes, a.aspect_ratios, convention=a.convention)
    except ValueError as e:
        raise ValueError(f"config.anchors: {e}") from None

    h, w = config.data.pad_to
    top = max(a.strides)
    _require(
        h % top == 0 and w % top == 0,
        "data.pad_to",
        f"divisible by the largest stride {top}",
        tuple(config.data.pad_to),
    )
    _require(
        config.data.max_size <= min(h, w),
        "data.max_size",
        f"<= both sides of data.pad_to {tuple(config.data.pad_to)} (images of either "
        "orientation must fit)",
        config.data.max_size,
    )
    n = jax.device_count()
    _require(
        config.batch_size % n == 0,
        "batch_size",
        f"a multiple of the device count ({n})",
        config.batch_size,
    )
