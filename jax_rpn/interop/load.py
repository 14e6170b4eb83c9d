"""Any source of weights for a config: format detection, loading, and the trainer's start.

Formats (``config.init.format``; ``auto`` detects them from the keys):

- ``jax_rpn``: a folder written by ``python -m jax_rpn.interop``, or a training workdir (its
  latest checkpoint); detected as a directory.
- ``torchvision``: classifiers (``conv1.weight`` + ``layer1.*``, or ``features.*``) and
  Faster R-CNN (``backbone.body.*``) ``.pth`` files.
- ``detectron2``: Caffe2 ``R-50.pkl`` (``res2_0_branch2a_w``), its own backbones (``stem.*``),
  ``model_final_*.pkl`` and training ``.pth`` (``backbone.bottom_up.*``,
  ``proposal_generator.*``).
- ``mmdet``: ``rpn_r50_fpn_1x_coco_*.pth`` and detectors (``backbone.layer1.*``, ``neck.*``,
  ``rpn_head.*``).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from jax_rpn import checkpoints
from jax_rpn.interop import detectron2, keymap, mmdet, torchvision
from jax_rpn.interop.safe_load import CheckpointError, read_state_dict

FORMATS = ("auto", "torchvision", "detectron2", "mmdet", "jax_rpn")
CONVERTERS = {
    "torchvision": torchvision.convert_state,
    "detectron2": detectron2.convert_state,
    "mmdet": mmdet.convert_state,
}
# Config fields that give weights their meaning without changing any shape: a jax_rpn folder's
# stored config must agree with the one that loads it.
MEANING_FIELDS = ("model.stride_in_1x1", "data.channel_order", "data.pixel_mean", "data.pixel_std")


def detect_format(state: dict) -> str | None:
    """The format whose names ``state``'s keys use, or None."""
    if detectron2.kind_of(state):
        return "detectron2"
    if torchvision.is_detector(state) or "features.0.weight" in state:
        return "torchvision"
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "torchvision"
    if mmdet.is_mmdet(state):
        return "mmdet"
    return None


def load_checkpoint(
    path: str, config, *, format: str = "auto", template=None
) -> tuple[dict, keymap.LoadReport]:
    """``(variables, report)`` for ``config``'s model from any checkpoint ``path``.

    ``variables`` holds what the file has (``{"params": ..., "batch_stats": ...}`` numpy
    trees); a backbone checkpoint gives only the backbone (the report says what is left).
    ``template``: ``{leaf path: shape}`` of the model when known (saves tracing it).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    start = time.perf_counter()
    path = os.fspath(path)
    if os.path.isdir(path):
        if format not in ("auto", "jax_rpn"):
            raise CheckpointError(f"{path} is a folder, not a {format} checkpoint file")
        variables, report = from_jax_rpn(path, config, template=template)
    else:
        if format == "jax_rpn":
            raise CheckpointError(f"{path}: a jax_rpn checkpoint is a folder, this is a file")
        state = read_state_dict(path, path=path)
        found = detect_format(state)
        if format == "auto":
            if found is None:
                raise CheckpointError(
                    f"{path}: its keys are none of torchvision's, detectron2's or mmdet's (e.g. "
                    f"{sorted(state)[:4]}); set config.init.format if you know the format"
                )
            format = found
        variables, report = CONVERTERS[format](state, config, source=path, tmpl=template)
    report.seconds = time.perf_counter() - start
    return variables, report


def from_jax_rpn(path: str, config, *, template=None) -> tuple[dict, keymap.LoadReport]:
    """Variables from a converted folder or a training workdir, checked against ``config``."""
    variables, stored, step = checkpoints.load_variables(path)
    if stored is not None:
        differ = []
        for field in MEANING_FIELDS:
            section, name = field.split(".")
            a, b = stored[section][name], config[section][name]
            if np.asarray(a).tolist() != np.asarray(b).tolist():
                differ.append(f"{field}: stored {a!r}, config {b!r}")
        if differ:
            raise CheckpointError(
                f"{path} holds weights for another input or backbone convention than the "
                "config's:\n  " + "\n  ".join(differ)
            )
    notes = []
    report_file = os.path.join(path, checkpoints.REPORT_FILE)
    if os.path.exists(report_file):
        with open(report_file) as f:
            stored_report = json.load(f)
        if stored_report.get("format"):
            notes.append(f"converted from {stored_report['format']}: {stored_report['source']}")
    kind = "variables folder" if step is None else f"workdir, step {step}"
    report = keymap.LoadReport(source=path, format=f"jax_rpn {kind}", notes=tuple(notes))
    tmpl = keymap.template(config) if template is None else template
    flat = keymap.flatten({k: v for k, v in variables.items() if k in ("params", "batch_stats")})
    found = {p: v for p, v in flat.items() if p in tmpl}
    unexpected = [f"{'/'.join(p)} {list(v.shape)}" for p, v in flat.items() if p not in tmpl]
    variables = keymap.place(
        found,
        tmpl,
        names={p: "/".join(p) for p in tmpl},
        unexpected=unexpected,
        source=path,
        config=config,
        report=report,
        file_shape=tuple,
    )
    return variables, report


def initialize(variables: dict, config) -> tuple[dict, keymap.LoadReport]:
    """``variables`` (freshly initialised for ``config``) with ``config.init.checkpoint``'s
    arrays written over them; parts the checkpoint lacks (a backbone checkpoint's FPN and head)
    keep their initialisation, and the report says so."""
    fresh = keymap.flatten(variables)
    loaded, report = load_checkpoint(
        config.init.checkpoint,
        config,
        format=config.init.format,
        template={path: value.shape for path, value in fresh.items()},
    )
    return keymap.unflatten({**fresh, **keymap.flatten(loaded)}), report


def convert(checkpoint: str, config, out: str, *, format: str = "auto", overwrite: bool = False):
    """``python -m jax_rpn.interop``: read ``checkpoint`` for ``config``'s model and write the
    variables folder ``out`` (``jax_rpn.checkpoints.save_variables``, atomic).

    Returns ``(out, report, (read_seconds, write_seconds))``. Nothing is written unless the
    conversion succeeded.
    """
    start = time.perf_counter()
    variables, report = load_checkpoint(checkpoint, config, format=format)
    read = time.perf_counter()
    out = checkpoints.save_variables(
        out, variables, config=config, report=report.to_dict(), overwrite=overwrite
    )
    return out, report, (read - start, time.perf_counter() - read)
