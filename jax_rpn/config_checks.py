"""Validate a config before anything is built, naming the field that is wrong.

:func:`validate` checks a whole training config; :func:`validate_data` only what the input
pipeline reads (``data``, ``seed``, ``batch_size``), for tools that use the data alone. The
allowed values come from the modules that define them.
"""

import jax
import ml_collections

from jax_rpn import losses, optim, parallel
from jax_rpn.models.norm import NORMS
from jax_rpn.models.rpn import BACKBONES, DTYPES
from jax_rpn.settings import AnchorSettings, PixelSettings


def _require(ok: bool, field: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"config.{field} must be {expected}, got {value!r}")


def _get(config, field: str):
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def _one_of(config, field: str, choices) -> None:
    value = _get(config, field)
    _require(value in choices, field, f"one of {tuple(choices)}", value)


def _positive_int(config, field: str) -> None:
    value = _get(config, field)
    _require(isinstance(value, int) and value > 0, field, "a positive integer", value)


def _optional(config, field: str, ok, expected: str) -> None:
    value = _get(config, field)
    _require(value is None or ok(value), field, f"None or {expected}", value)


def validate_data(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first invalid field the input pipeline reads."""
    from jax_rpn.data.pipeline import FAMILIES  # the pipeline validates with this module

    d = config.data
    _require(
        d.name.split("/")[0] in FAMILIES,
        "data.name",
        f"a dataset of one of the families {tuple(FAMILIES)} (e.g. rpn_shapes, voc/2007, "
        "coco/2017)",
        d.name,
    )
    for field in ("batch_size", "data.max_boxes"):
        _positive_int(config, field)
    pad = tuple(d.pad_to)
    _require(
        len(pad) == 2 and all(isinstance(s, int) and s > 0 for s in pad),
        "data.pad_to",
        "two positive ints (H, W)",
        pad,
    )
    _require(
        isinstance(d.short_side, int) and 0 < d.short_side <= d.max_size,
        "data.short_side",
        f"a positive int at most config.data.max_size ({d.max_size})",
        d.short_side,
    )
    _require(
        d.max_size <= min(pad),
        "data.max_size",
        f"<= both sides of data.pad_to {pad} (images of either orientation must fit)",
        d.max_size,
    )
    _require(
        isinstance(d.num_workers, int) and d.num_workers >= 0,
        "data.num_workers",
        "an int >= 0",
        d.num_workers,
    )
    top = max(config.anchors.strides)
    _require(
        pad[0] % top == 0 and pad[1] % top == 0,
        "data.pad_to",
        f"divisible by the largest anchor stride {top}",
        pad,
    )
    _optional(config, "data.num_eval_images", lambda v: v >= 1, ">= 1")
    try:
        PixelSettings.from_config(config)
    except ValueError as e:
        raise ValueError(f"config.data (pixel_mean, pixel_std, channel_order): {e}") from None
    _require(0 <= config.seed < 2**32, "seed", "in [0, 2**32)", config.seed)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first invalid field of a training config."""
    validate_data(config)
    for field in (
        "num_train_steps",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
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
    _one_of(config, "model.objectness", losses.OBJECTNESS_KINDS)
    _one_of(config, "model.dtype", DTYPES)
    _one_of(config, "loss.box", losses.BOX_KINDS)
    _one_of(config, "optim.name", optim.OPTIMIZERS)
    _one_of(config, "optim.schedule", optim.SCHEDULES)
    o = config.optim
    _require(o.learning_rate > 0, "optim.learning_rate", "> 0", o.learning_rate)
    _require(o.warmup_steps >= 0, "optim.warmup_steps", ">= 0", o.warmup_steps)

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
        len(t.weights) == 4 and all(w > 0 for w in t.weights),
        "targets.weights",
        "4 positive numbers (wx, wy, ww, wh)",
        tuple(t.weights),
    )
    _optional(config, "targets.border", lambda v: v >= 0, ">= 0 pixels")
    _optional(config, "targets.ignore_iof", lambda v: 0 < v <= 1, "in (0, 1]")
    p = config.proposals
    _require(0.0 < p.nms_threshold <= 1.0, "proposals.nms_threshold", "in (0, 1]", p.nms_threshold)
    _require(p.min_size >= 0, "proposals.min_size", ">= 0", p.min_size)

    try:
        AnchorSettings.from_config(config)
    except ValueError as e:
        raise ValueError(f"config.anchors: {e}") from None
    n = jax.device_count()
    _require(
        config.batch_size % n == 0,
        "batch_size",
        f"a multiple of the device count ({n})",
        config.batch_size,
    )
