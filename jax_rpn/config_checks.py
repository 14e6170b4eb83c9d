"""Validate a config before anything is built, naming the field that is wrong.

:func:`validate` checks a whole training config; :func:`validate_data` only what the input
pipeline reads (``data``, ``seed``, ``batch_size``), for tools that use the data alone. The
allowed values come from the modules that define them.
"""

import itertools

import jax
import ml_collections

from jax_rpn import interop, losses, optim, parallel
from jax_rpn.models.fpn import P6_MODES
from jax_rpn.models.norm import NORMS
from jax_rpn.models.rpn import BACKBONES, DTYPES, HEADS, MAX_FREEZE_AT, size_divisibility
from jax_rpn.settings import AnchorSettings, CascadeSettings, PixelSettings


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
    from jax_rpn.data import user_datasets
    from jax_rpn.data.pipeline import FAMILIES  # the pipeline validates with this module

    d = config.data
    _require(
        d.name.split("/")[0] in FAMILIES,
        "data.name",
        f"a dataset of one of the families {tuple(FAMILIES)} (e.g. rpn_shapes, voc/2007, "
        "coco/2017, coco_json)",
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
    if d.aspect_buckets:  # landscape images go to pad_to's wide bucket, portrait to its tall one
        _require(
            d.short_side <= min(pad) and d.max_size <= max(pad),
            "data.short_side/max_size",
            f"<= the short and long side of data.pad_to {pad} (with aspect_buckets)",
            (d.short_side, d.max_size),
        )
    else:
        _require(
            d.max_size <= min(pad),
            "data.max_size",
            f"<= both sides of data.pad_to {pad} (images of either orientation must fit; or "
            "set data.aspect_buckets)",
            d.max_size,
        )
    _require(
        isinstance(d.num_workers, int) and d.num_workers >= 0,
        "data.num_workers",
        "an int >= 0",
        d.num_workers,
    )
    div = size_divisibility(fpn=config.model.fpn, strides=config.anchors.strides)
    _require(
        pad[0] % div == 0 and pad[1] % div == 0,
        "data.pad_to",
        f"divisible by {div} ({'32 with FPN' if config.model.fpn else 'the feature stride'})",
        pad,
    )
    _optional(config, "data.num_eval_images", lambda v: v >= 1, ">= 1")
    try:
        PixelSettings.from_config(config)
    except ValueError as e:
        raise ValueError(f"config.data (pixel_mean, pixel_std, channel_order): {e}") from None
    _require(0 <= config.seed < 2**32, "seed", "in [0, 2**32)", config.seed)
    user_datasets.check_config(d)  # coco_json / voc_folder: their fields, files and splits


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
    _one_of(config, "model.fpn_norm", NORMS)
    _one_of(config, "model.fpn_p6", P6_MODES)
    _one_of(config, "model.stride_in_1x1", (False, True))
    f = config.model.freeze_at
    _require(
        isinstance(f, int) and 0 <= f <= MAX_FREEZE_AT,
        "model.freeze_at",
        f"an int in [0, {MAX_FREEZE_AT}]",
        f,
    )
    _one_of(config, "init.format", interop.FORMATS)
    _check_frozen_bn_has_weights(config)
    _one_of(config, "model.objectness", losses.OBJECTNESS_KINDS)
    _one_of(config, "model.dtype", DTYPES)
    _one_of(config, "loss.box", losses.BOX_KINDS)
    _one_of(config, "model.head", HEADS)
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
        anchors = AnchorSettings.from_config(config)
    except ValueError as e:
        raise ValueError(f"config.anchors: {e}") from None
    if config.model.head == "cascade":
        _require(
            all(len(sizes) == 1 for sizes in anchors.sizes),
            "anchors.sizes",
            'one size per level with model.head = "cascade"',
            config.anchors.sizes,
        )
        _one_of(config, "model.objectness", ("sigmoid",))
        c = CascadeSettings.from_config(config)
        _require(
            all(a < b for a, b in itertools.pairwise(c.anchor_sizes)),
            "anchors.sizes",
            'sizes increasing from level to level with model.head = "cascade"',
            config.anchors.sizes,
        )
        _require(
            0 < c.center_ratio <= c.ignore_ratio <= 1,
            "cascade.center_ratio/ignore_ratio",
            "0 < center_ratio <= ignore_ratio <= 1",
            (c.center_ratio, c.ignore_ratio),
        )
        _require(
            len(c.stage1_weights) == 4 and min(c.stage1_weights) > 0,
            "cascade.stage1_weights",
            "4 positive numbers (wx, wy, ww, wh)",
            c.stage1_weights,
        )
        _require(
            0 <= c.low_quality_min_iou <= 1,
            "cascade.low_quality_min_iou",
            "in [0, 1]",
            c.low_quality_min_iou,
        )
        _require(
            isinstance(config.cascade.stage1_dilation, int) and config.cascade.stage1_dilation > 0,
            "cascade.stage1_dilation",
            "a positive integer",
            config.cascade.stage1_dilation,
        )
    n = jax.device_count()
    _require(
        config.batch_size % n == 0,
        "batch_size",
        f"a multiple of the device count ({n})",
        config.batch_size,
    )


def _check_frozen_bn_has_weights(config) -> None:
    """Frozen BN over random weights is the identity: refuse it unless asked for."""
    m = config.model
    used = ("norm", "fpn_norm") if m.fpn else ("norm",)
    frozen = [f"model.{k}" for k in used if m[k] == "frozen_bn"]
    if not frozen or config.init.checkpoint or config.init.allow_random_frozen_bn:
        return
    raise ValueError(
        f"config.{frozen[0]} is 'frozen_bn' (fixed BN statistics, the setting for pretrained "
        "weights) but config.init.checkpoint is None: over random weights frozen BN is the "
        "identity, and training a deep ResNet that way diverges. Set config.init.checkpoint to "
        "pretrained weights (docs/pretrained_weights.md: `python -m jax_rpn.interop` converts "
        "torchvision, detectron2 and mmdet checkpoints), train from scratch with "
        "model.norm='batch_norm' or 'group_norm', or set "
        "config.init.allow_random_frozen_bn=True to do it anyway."
    )
