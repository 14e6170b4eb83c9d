"""mmdetection checkpoints: ``rpn_r50_fpn_1x_coco`` and the backbone/FPN/RPN of its detectors.

An mmdet ``.pth`` is ``{"meta": ..., "state_dict": ...}`` (read with
``torch.load(weights_only=True)``) with
- the ResNet of mmcv/mmdet: ``backbone.conv1.weight``, ``backbone.bn1.*``,
  ``backbone.layer1.0.conv1.weight``, ``backbone.layer1.0.bn1.*``,
  ``backbone.layer1.0.downsample.{0,1}.*`` (``style='pytorch'`` strides in the 3x3, as
  torchvision; ``style='caffe'`` in the 1x1: set ``model.stride_in_1x1=True``);
- its FPN of ``ConvModule`` layers: ``neck.lateral_convs.<i>.conv.*`` and
  ``neck.fpn_convs.<i>.conv.*`` (``.bn.*`` with a norm), ``i = 0..3`` for P2..P5; with
  ``add_extra_convs`` P6 is ``neck.fpn_convs.4.conv.*`` (``model.fpn_p6='conv_c5'`` for
  ``'on_input'``, ``'conv_p5'`` for ``'on_output'``), else a max-pool (``maxpool``, the RPN's
  default);
- ``RPNHead``: ``rpn_head.rpn_conv.*``, ``rpn_head.rpn_cls.*`` (A sigmoid logits),
  ``rpn_head.rpn_reg.*`` (4A deltas, ``a * 4 + k`` as jax_rpn).
``roi_head.*`` (the second stage of a Faster R-CNN) and ``num_batches_tracked`` are skipped.
mmdet's ImageNet backbones are torchvision's (``torchvision://resnet50``): convert those with
:func:`jax_rpn.interop.from_torchvision`. ``configs/mmdet_rpn_r50_fpn.py`` means
``rpn_r50_fpn_1x_coco`` exactly.
"""

from __future__ import annotations

from jax_rpn.interop import keymap
from jax_rpn.interop.safe_load import CheckpointError, read_state_dict

LEAVES = {
    "kernel": ".weight",
    "bias": ".bias",
    "scale": ".weight",
    "mean": ".running_mean",
    "var": ".running_var",
}
IGNORE = (
    (r"num_batches_tracked$", "BatchNorm step counters (not used by a forward pass)"),
    (r"^roi_head\.", "Faster R-CNN's second stage (jax_rpn is its first stage)"),
)


def _level(conv: str, norm: bool):
    suffix = "bn" if norm else "conv"
    return lambda m: f"neck.{conv}.{int(m[1]) - 2}.{suffix}"


RULES = (
    (r"body/conv1", "backbone.conv1"),
    (r"body/norm1", "backbone.bn1"),
    (r"body/layer(\d)_(\d+)/conv(\d)", r"backbone.layer\1.\2.conv\3"),
    (r"body/layer(\d)_(\d+)/norm(\d)", r"backbone.layer\1.\2.bn\3"),
    (r"body/layer(\d)_(\d+)/downsample_conv", r"backbone.layer\1.\2.downsample.0"),
    (r"body/layer(\d)_(\d+)/downsample_norm", r"backbone.layer\1.\2.downsample.1"),
    (r"neck/lateral(\d)", _level("lateral_convs", norm=False)),
    (r"neck/lateral(\d)_norm", _level("lateral_convs", norm=True)),
    (r"neck/output(\d)", _level("fpn_convs", norm=False)),
    (r"neck/output(\d)_norm", _level("fpn_convs", norm=True)),
    (r"neck/p6", "neck.fpn_convs.4.conv"),
    (r"neck/p6_norm", "neck.fpn_convs.4.bn"),
    (r"head/objectness", "rpn_head.rpn_cls"),
    (r"head/deltas", "rpn_head.rpn_reg"),
)


def is_mmdet(state) -> bool:
    """mmdet keys: ``neck.*``, ``rpn_head.*`` or its ResNet's ``backbone.layer1.*``."""
    return any(k.startswith(("neck.", "rpn_head.", "backbone.layer1.")) for k in state)


def layout(config) -> keymap.Layout:
    """mmdet's names for ``config``'s model."""
    if config.model.backbone == "vgg16":
        raise CheckpointError("mmdet's RPN configs have no VGG-16 backbone; use a ResNet config")
    if config.model.head_convs != 1:
        raise CheckpointError(
            f"mmdet's RPNHead has one 3x3 conv (rpn_conv); config.model.head_convs is "
            f"{config.model.head_convs}"
        )
    rules = RULES + ((r"head/conv0", "rpn_head.rpn_conv"),)
    return keymap.Layout(name="mmdet", rules=rules, leaves=LEAVES, ignore=IGNORE)


def from_mmdet(source, config) -> tuple[dict, keymap.LoadReport]:
    """mmdet weights (a ``.pth`` path or a state dict) -> ``(variables, report)``; the return
    value and errors are those of :func:`jax_rpn.interop.torchvision.from_torchvision`."""
    return keymap.convert_timed(source, config, read=read_state_dict, convert=convert_state)


def convert_state(state: dict, config, *, source: str, tmpl=None) -> tuple[dict, keymap.LoadReport]:
    """:func:`from_mmdet` of a state dict already read (``source`` names it)."""
    if not is_mmdet(state):
        raise CheckpointError(
            f"{source}: no mmdet keys (backbone.layer1.*, neck.*, rpn_head.*); found e.g. "
            f"{sorted(state)[:3]}"
        )
    report = keymap.LoadReport(source=source, format="mmdet")
    variables = keymap.convert(
        state, layout(config), config, source=source, report=report, tmpl=tmpl
    )
    return variables, report
