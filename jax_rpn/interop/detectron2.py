"""detectron2 checkpoints: its ImageNet backbones and its RPN / Faster R-CNN models.

Three kinds of file, told apart by their keys (as detectron2's ``DetectionCheckpointer``):

- Caffe2 ImageNet ResNets, ``R-50.pkl`` / ``R-101.pkl`` (MSRA): ``conv1_w``, ``res_conv1_bn_s``
  / ``_b``, ``res2_0_branch2a_w``, ``res2_0_branch2a_bn_s``, ``res2_0_branch1_w`` (shortcut),
  ``fc1000_*``. Caffe2 folds BN into a scale and a bias, so running mean 0 and var 1 are set,
  as detectron2 loads them (``x * s / sqrt(1 + 1e-5) + b``). These weights need the MSRA
  model and input: stride in the 1x1 convolution (``model.stride_in_1x1=True``) and BGR pixels
  in 0-255 with mean (103.53, 116.28, 123.675) subtracted and std 1 (``data.channel_order``,
  ``pixel_mean``, ``pixel_std``); a config without them is refused. Backbone only.
- detectron2 backbones in its own names, e.g. torchvision's R-50 converted by its
  ``convert-torchvision-to-d2.py``: ``stem.conv1.weight``, ``res2.0.conv1.norm.*``.
- Model-zoo and training checkpoints (``model_final_*.pkl`` or ``.pth``, under ``"model"``):
  ``backbone.bottom_up.stem.conv1.*``, ``backbone.bottom_up.res2.0.conv1.norm.*``,
  ``backbone.fpn_lateral2.*``, ``backbone.fpn_output2.*``,
  ``proposal_generator.rpn_head.{conv,objectness_logits,anchor_deltas}.*`` (R-FPN); R-C4
  models have ``backbone.stem.*`` / ``backbone.res4.*``. ``roi_heads.*`` are skipped; stored
  ``pixel_mean`` / ``pixel_std`` must equal the config's.

``configs/coco_r50_fpn.py`` and ``configs/coco_r50_c4.py`` mean detectron2's RPN R50-FPN and
R50-C4 exactly.
"""

from __future__ import annotations

import numpy as np

from jax_rpn.interop import keymap
from jax_rpn.interop.safe_load import CheckpointError, read_state_dict

LEAVES = {
    "kernel": ".weight",
    "bias": ".bias",
    "scale": ".weight",
    "mean": ".running_mean",
    "var": ".running_var",
}
CAFFE2_LEAVES = {"kernel": "_w", "bias": "_b", "scale": "_s"}
CAFFE2_FILLS = {"mean": 0.0, "var": 1.0}
CAFFE2_PIXELS = dict(channel_order="bgr", std=(1.0, 1.0, 1.0))
IGNORE = (
    (r"^roi_heads\.", "Faster R-CNN's second stage (jax_rpn is its first stage)"),
    (r"anchor_generator\.cell_anchors", "stored anchors of old checkpoints (made from the config)"),
    (r"^(pixel_mean|pixel_std)$", "input normalisation (checked against config.data)"),
    (r"num_batches_tracked$", "BatchNorm step counters (not used by a forward pass)"),
    (r"^(fc1000_|linear\.|fc\.)", "the ImageNet classifier"),
)


def _block(prefix: str, suffix: str):
    """jax_rpn ``layer<s>_<b>`` -> detectron2 ``res<s + 1>.<b>`` + ``suffix`` (res2 = layer1)."""
    return lambda m: f"{prefix}res{int(m[1]) + 1}.{m[2]}{suffix.format(*m.groups())}"


def _block_rules(prefix: str) -> tuple:
    return (
        (r"body/conv1", f"{prefix}stem.conv1"),
        (r"body/norm1", f"{prefix}stem.conv1.norm"),
        (r"body/layer(\d)_(\d+)/conv(\d)", _block(prefix, ".conv{2}")),
        (r"body/layer(\d)_(\d+)/norm(\d)", _block(prefix, ".conv{2}.norm")),
        (r"body/layer(\d)_(\d+)/downsample_conv", _block(prefix, ".shortcut")),
        (r"body/layer(\d)_(\d+)/downsample_norm", _block(prefix, ".shortcut.norm")),
    )


def _head_rules(num_convs: int) -> tuple:
    head = "proposal_generator.rpn_head."
    # One hidden conv is ``rpn_head.conv``; several are ``rpn_head.conv.conv<k>`` (CONV_DIMS).
    if num_convs == 1:
        conv = (r"head/conv0", f"{head}conv")
    else:
        conv = (r"head/conv(\d+)", head + r"conv.conv\1")
    return (
        conv,
        (r"head/objectness", f"{head}objectness_logits"),
        (r"head/deltas", f"{head}anchor_deltas"),
    )


FPN_RULES = (
    (r"neck/lateral(\d)", r"backbone.fpn_lateral\1"),
    (r"neck/lateral(\d)_norm", r"backbone.fpn_lateral\1.norm"),
    (r"neck/output(\d)", r"backbone.fpn_output\1"),
    (r"neck/output(\d)_norm", r"backbone.fpn_output\1.norm"),
)


def _caffe2(suffix: str):
    """jax_rpn ``layer<s>_<b>/conv<k>`` -> Caffe2 ``res<s + 1>_<b>_branch2{a,b,c}`` + suffix."""
    return lambda m: f"res{int(m[1]) + 1}_{m[2]}_branch2{'abc'[int(m[3]) - 1]}{suffix}"


CAFFE2_RULES = (
    (r"body/conv1", "conv1"),
    (r"body/norm1", "res_conv1_bn"),
    (r"body/layer(\d)_(\d+)/conv(\d)", _caffe2("")),
    (r"body/layer(\d)_(\d+)/norm(\d)", _caffe2("_bn")),
    (r"body/layer(\d)_(\d+)/downsample_conv", lambda m: f"res{int(m[1]) + 1}_{m[2]}_branch1"),
    (r"body/layer(\d)_(\d+)/downsample_norm", lambda m: f"res{int(m[1]) + 1}_{m[2]}_branch1_bn"),
)


def kind_of(state) -> str | None:
    """``caffe2``, ``backbone`` (detectron2 names, no model prefix), ``model`` (a detectron2
    model) or None if the keys are not detectron2's."""
    keys = list(state)
    if any(k in ("conv1_w", "res_conv1_bn_s") or k.startswith("res2_0_branch") for k in keys):
        return "caffe2"
    if any(
        k.startswith(("backbone.bottom_up.", "proposal_generator.", "backbone.stem.")) for k in keys
    ):
        return "model"
    if any(k.startswith(("stem.conv1.", "res2.0.")) for k in keys):
        return "backbone"
    return None


def layout(config, kind: str) -> keymap.Layout:
    """detectron2's names for ``config``'s model in a file of ``kind`` (see :func:`kind_of`)."""
    if config.model.backbone == "vgg16":
        raise CheckpointError("detectron2 has no VGG-16 backbone; use a ResNet config")
    ignore = IGNORE
    if not config.model.fpn:
        ignore += ((r"^(backbone\.)?res5[._]", "res5, which an R-C4 RPN does not build"),)
    if kind == "caffe2":
        return keymap.Layout(
            name="detectron2 (Caffe2 names)",
            rules=CAFFE2_RULES,
            leaves=CAFFE2_LEAVES,
            fills=CAFFE2_FILLS,
            ignore=ignore,
        )
    if kind == "backbone":
        rules = _block_rules("")
    else:
        prefix = "backbone.bottom_up." if config.model.fpn else "backbone."
        rules = _block_rules(prefix) + FPN_RULES + _head_rules(config.model.head_convs)
    return keymap.Layout(name="detectron2", rules=rules, leaves=LEAVES, ignore=ignore)


def _check_caffe2_config(config, path: str) -> None:
    m, d = config.model, config.data
    wrong = []
    if not m.stride_in_1x1:
        wrong.append("model.stride_in_1x1=True (MSRA ResNets stride in the 1x1 convolution)")
    if d.channel_order != CAFFE2_PIXELS["channel_order"]:
        wrong.append("data.channel_order='bgr'")
    if tuple(float(s) for s in d.pixel_std) != CAFFE2_PIXELS["std"]:
        wrong.append("data.pixel_std=(1.0, 1.0, 1.0) (0-255 input, mean subtracted only)")
    if wrong:
        raise CheckpointError(
            f"{path} holds Caffe2 (MSRA) ImageNet weights, which need "
            + ", ".join(wrong)
            + "; data.pixel_mean (103.53, 116.28, 123.675) as detectron2. "
            "configs/coco_r50_fpn.py sets all of these."
        )


def _check_pixels(state, config, path: str) -> list[str]:
    notes = []
    for name, value in (
        ("pixel_mean", config.data.pixel_mean),
        ("pixel_std", config.data.pixel_std),
    ):
        if name in state:
            stored = np.asarray(state[name], np.float64).reshape(-1)
            if stored.shape != (3,) or not np.allclose(stored, value, atol=1e-3):
                raise CheckpointError(
                    f"{path} was trained with {name} {stored.tolist()} (in "
                    f"detectron2's channel order, BGR unless its INPUT.FORMAT was RGB); "
                    f"config.data.{name} is {tuple(value)}: set it to the stored values"
                )
            notes.append(f"{name} {stored.tolist()} agrees with config.data.{name}")
    return notes


def from_detectron2(source, config) -> tuple[dict, keymap.LoadReport]:
    """detectron2 weights (a ``.pkl`` read by a plain-data unpickler, a ``.pth`` read with
    ``torch.load(weights_only=True)``, or a state dict) -> ``(variables, report)``.

    See the module docstring for the three kinds of file and what each needs from the config;
    the return value and errors are those of
    :func:`jax_rpn.interop.torchvision.from_torchvision`.
    """
    return keymap.convert_timed(source, config, read=read_state_dict, convert=convert_state)


def convert_state(state: dict, config, *, source: str, tmpl=None) -> tuple[dict, keymap.LoadReport]:
    """:func:`from_detectron2` of a state dict already read (``source`` names it)."""
    kind = kind_of(state)
    if kind is None:
        raise CheckpointError(
            f"{source}: no detectron2 keys (backbone.bottom_up.*, proposal_generator.*, "
            f"stem.*, res2_0_branch2a_w, ...); found e.g. {sorted(state)[:3]}"
        )
    if kind == "caffe2":
        _check_caffe2_config(config, source)
    notes = _check_pixels(state, config, source)
    report = keymap.LoadReport(source=source, format=f"detectron2 {kind}", notes=tuple(notes))
    variables = keymap.convert(
        state, layout(config, kind), config, source=source, report=report, tmpl=tmpl
    )
    return variables, report
