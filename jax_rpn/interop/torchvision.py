"""torchvision checkpoints: ImageNet classifiers (backbone only) and Faster R-CNN detectors.

- ``resnet18/34/50/101`` (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ...,
  ``fc.*``) and ``vgg16`` / ``vgg16_bn`` (``features.<i>.*``, ``classifier.*``): the backbone;
  the FPN and head stay at their random initialisation (a partial load, reported). Expect RGB
  input normalised with ImageNet's mean and std (``configs/default.py``'s ``data.pixel_*``).
- ``fasterrcnn_resnet50_fpn`` (``backbone.body.*``, ``backbone.fpn.inner_blocks.<i>.0.*`` /
  ``layer_blocks``, ``rpn.head.conv.0.0.*``, ``rpn.head.cls_logits.*``, ``rpn.head.bbox_pred.*``)
  and ``fasterrcnn_resnet50_fpn_v2`` (BN in the FPN: ``inner_blocks.<i>.1.*``; two head
  convolutions ``rpn.head.conv.{0,1}.0.*``): backbone, FPN and RPN head. The published v1
  weights use torchvision's older names (``rpn.head.conv.weight``, ``inner_blocks.<i>.weight``),
  read as torchvision itself reads them. ``roi_heads.*`` (the second stage) are skipped.

BatchNorm2d and FrozenBatchNorm2d both become the config's norm: ``frozen_bn`` (statistics and
affine in ``batch_stats``) or ``batch_norm`` (affine in ``params``); ``num_batches_tracked`` is
skipped. Configs that mean these models exactly: ``configs/torchvision_fasterrcnn_r50_fpn.py``
and ``configs/torchvision_fasterrcnn_r50_fpn_v2.py``.
"""

from __future__ import annotations

import re

from jax_rpn.interop import keymap
from jax_rpn.interop.safe_load import read_state_dict

LEAVES = {
    "kernel": ".weight",
    "bias": ".bias",
    "scale": ".weight",
    "mean": ".running_mean",
    "var": ".running_var",
}
# vgg16 / vgg16_bn: index in ``features`` of each convolution (conv1_1 .. conv5_3).
_VGG_CONVS = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)]
_VGG_CONVS += [(4, 1), (4, 2), (4, 3), (5, 1), (5, 2), (5, 3)]


def _vgg_indices(batch_norm: bool) -> dict[tuple[int, int], int]:
    """torchvision's ``vgg16(_bn).features`` indices: conv (+ BN) + ReLU per layer, a max-pool
    after each block."""
    indices, i = {}, 0
    for block, layer in _VGG_CONVS:
        if layer == 1 and block > 1:
            i += 1  # max-pool
        indices[(block, layer)] = i
        i += 3 if batch_norm else 2
    return indices


def _resnet_rules(prefix: str) -> tuple:
    return (
        (r"body/conv1", f"{prefix}conv1"),
        (r"body/norm1", f"{prefix}bn1"),
        (r"body/layer(\d)_(\d+)/conv(\d)", prefix + r"layer\1.\2.conv\3"),
        (r"body/layer(\d)_(\d+)/norm(\d)", prefix + r"layer\1.\2.bn\3"),
        (r"body/layer(\d)_(\d+)/downsample_conv", prefix + r"layer\1.\2.downsample.0"),
        (r"body/layer(\d)_(\d+)/downsample_norm", prefix + r"layer\1.\2.downsample.1"),
    )


def _fpn_block(kind: str, index: int):
    return lambda m: f"backbone.fpn.{kind}.{int(m[1]) - 2}.{index}"


DETECTOR_RULES = _resnet_rules("backbone.body.") + (
    (r"neck/lateral(\d)", _fpn_block("inner_blocks", 0)),
    (r"neck/lateral(\d)_norm", _fpn_block("inner_blocks", 1)),
    (r"neck/output(\d)", _fpn_block("layer_blocks", 0)),
    (r"neck/output(\d)_norm", _fpn_block("layer_blocks", 1)),
    (r"head/conv(\d+)", r"rpn.head.conv.\1.0"),
    (r"head/objectness", "rpn.head.cls_logits"),
    (r"head/deltas", "rpn.head.bbox_pred"),
)
IGNORE = (
    (r"num_batches_tracked$", "BatchNorm step counters (not used by a forward pass)"),
    (r"^roi_heads\.", "Faster R-CNN's second stage (jax_rpn is its first stage)"),
    (r"^(fc|classifier)\.", "the ImageNet classifier"),
)


def layout(config, *, detector: bool) -> keymap.Layout:
    """The torchvision names of ``config``'s model: a Faster R-CNN (``detector``) or an
    ImageNet classifier (backbone only)."""
    ignore = IGNORE
    if not config.model.fpn:
        ignore += ((r"^layer4\.", "res5, which an R-C4 RPN does not build"),)
    if config.model.backbone == "vgg16":
        indices = _vgg_indices(batch_norm=config.model.norm != "none")
        rules = (
            (r"body/conv(\d)_(\d)", lambda m: f"features.{indices[(int(m[1]), int(m[2]))]}"),
            (r"body/norm(\d)_(\d)", lambda m: f"features.{indices[(int(m[1]), int(m[2]))] + 1}"),
        )
    else:
        rules = DETECTOR_RULES if detector else _resnet_rules("")
    return keymap.Layout(name="torchvision", rules=rules, leaves=LEAVES, ignore=ignore)


def upgrade_legacy_keys(state: dict) -> dict:
    """Rename torchvision's pre-0.13 keys as its ``_load_from_state_dict`` hooks do:
    ``rpn.head.conv.{weight,bias}`` -> ``rpn.head.conv.0.0.*`` and
    ``backbone.fpn.{inner,layer}_blocks.<i>.{weight,bias}`` -> ``...<i>.0.*``."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1", key)
        key = re.sub(
            r"^(backbone\.fpn\.(inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\3", key
        )
        out[key] = value
    return out


def is_detector(state) -> bool:
    """Faster R-CNN keys (``backbone.body.*``) rather than a classifier's."""
    return any(k.startswith(("backbone.body.", "rpn.head.")) for k in state)


def from_torchvision(source, config) -> tuple[dict, keymap.LoadReport]:
    """torchvision weights -> ``(variables, report)`` for ``config``'s model.

    Args:
      source: a ``.pth`` path (read with ``torch.load(weights_only=True)``) or a state dict
        (numpy arrays or torch tensors), e.g. ``torchvision.models.resnet50(weights=...)
        .state_dict()``.
      config: the config whose model receives the weights (``configs/*.py``).

    Returns:
      ``variables``: ``{"params": ..., "batch_stats": ...}`` numpy trees of what the file holds
      (a classifier gives the backbone only; merge it into initialised variables, as the
      trainer does with ``init.checkpoint``), and a :class:`keymap.LoadReport`.

    Raises:
      CheckpointError (``CheckpointMismatchError``) naming every missing, unexpected or
      wrongly shaped key; ``UnsafeCheckpointError`` for files that would run code.
    """
    return keymap.convert_timed(source, config, read=read_state_dict, convert=convert_state)


def convert_state(state: dict, config, *, source: str, tmpl=None) -> tuple[dict, keymap.LoadReport]:
    """:func:`from_torchvision` of a state dict already read (``source`` names it)."""
    state = upgrade_legacy_keys(state)
    detector = is_detector(state)
    report = keymap.LoadReport(
        source=source, format="torchvision " + ("Faster R-CNN" if detector else "classifier")
    )
    variables = keymap.convert(
        state, layout(config, detector=detector), config, source=source, report=report, tmpl=tmpl
    )
    return variables, report


def to_torchvision(variables, config, *, backbone_only: bool = False) -> dict:
    """jax_rpn variables -> torchvision state dict (numpy arrays, PyTorch layout).

    The keys are ``fasterrcnn_resnet50_fpn`` / ``_v2``'s (current names) for an FPN ResNet
    config, or a classifier's (``conv1.weight``, ``layer1.0.*``; VGG-16 ``features.<i>.*``)
    with ``backbone_only``. Load them with ``model.load_state_dict({k: torch.from_numpy(v)
    ...}, strict=False)``: ``roi_heads.*`` and ``num_batches_tracked`` are not written.
    ``from_torchvision`` of the result gives ``variables`` back exactly.
    """
    if not backbone_only and config.model.head == "cascade":
        raise ValueError(
            "torchvision has no Cascade RPN head (config.model.head='cascade'); pass "
            "backbone_only=True to write the backbone"
        )
    if not backbone_only and not config.model.fpn:
        raise ValueError(
            "torchvision has no RPN without FPN; pass backbone_only=True to write the backbone"
        )
    parts = ("body",) if backbone_only else tuple(keymap.PARTS)
    return keymap.export(variables, layout(config, detector=not backbone_only), config, parts=parts)
