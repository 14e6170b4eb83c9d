"""The key mapping every format shares: a peer's arrays -> jax_rpn's variables, and back.

A format is a :class:`Layout`: rules that name each jax_rpn module in the peer's terms (a
regular expression over jax_rpn's module path, e.g. ``body/layer1_0/conv2``, and the peer's
module name, e.g. ``backbone.body.layer1.0.conv2``) and the suffix of each leaf (``kernel`` ->
``.weight``, a norm's ``mean`` -> ``.running_mean``). The model's own variable tree (from
``jax.eval_shape`` of its ``init``, no compute) says which leaves must be filled, so the one
walk here serves every format and every config:

- convolution kernels go from PyTorch's ``[out, in, kh, kw]`` to Flax's ``[kh, kw, in, out]``;
  vectors (biases, norm scale/bias/mean/var) stay as they are;
- every key of the file is used, or matches one of the format's ignore rules (each with its
  reason: the ImageNet classifier, a second stage, BN's step counter), or is an error;
- every leaf of the model is filled, except that the FPN (``neck``) or the head may be absent
  altogether (a backbone checkpoint: a documented partial load, left at their random
  initialisation and listed in the report). Anything else missing is an error;
- shapes must agree. All problems are reported together in one :class:`CheckpointMismatchError`
  that names the file, each key, and the expected vs found shape in the file's layout.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_rpn.interop.safe_load import CheckpointError

PARTS = {"body": "backbone", "neck": "FPN", "head": "RPN head"}
OPTIONAL_PARTS = ("neck", "head")  # may be absent together or alone: left at random init
MAX_LISTED = 8  # keys listed per kind of problem in an error


class CheckpointMismatchError(CheckpointError):
    """Keys missing, unexpected or of the wrong shape for the config; the message lists them."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one checkpoint format names jax_rpn's modules and their leaves.

    Attributes:
      name: the format, for messages (``torchvision``, ``detectron2 (Caffe2 names)``, ...).
      rules: ``(pattern, replacement)`` pairs tried in order; ``pattern`` must match a whole
        jax_rpn module path, ``replacement`` is a ``re`` template or a function of the match.
      leaves: jax_rpn leaf name -> the suffix the format appends to the module name.
      fills: leaves the format does not store, with the constant they take (Caffe2 folds BN
        statistics into scale and bias: mean 0, var 1, as detectron2 loads them).
      ignore: ``(pattern, reason)``: keys of the file searched by ``pattern`` are not weights of
        this model; they are skipped and counted in the report under ``reason``.
    """

    name: str
    rules: tuple[tuple[str, str | Callable[[re.Match], str]], ...]
    leaves: Mapping[str, str]
    fills: Mapping[str, float] = dataclasses.field(default_factory=dict)
    ignore: tuple[tuple[str, str], ...] = ()

    def module_name(self, module: str) -> str | None:
        """The peer's name of jax_rpn module ``module`` (e.g. ``neck/lateral3``), or None if
        the format has none (a classifier has no FPN)."""
        for pattern, replacement in self.rules:
            match = re.fullmatch(pattern, module)
            if match:
                return replacement(match) if callable(replacement) else match.expand(replacement)
        return None

    def ignored(self, key: str) -> str | None:
        """Why ``key`` is skipped, or None if it should be a weight of the model."""
        for pattern, reason in self.ignore:
            if re.search(pattern, key):
                return reason
        return None


@dataclasses.dataclass
class LoadReport:
    """What a conversion or initialisation loaded, left at random and skipped."""

    source: str
    format: str
    loaded: int = 0  # arrays written into the model
    loaded_parts: tuple[str, ...] = ()  # of body, neck, head
    left_random: tuple[str, ...] = ()  # parts absent from the file: random initialisation
    filled: dict[str, int] = dataclasses.field(default_factory=dict)  # leaf -> count, constants
    ignored: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> key count
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """True when every variable of the model came from the file."""
        return not self.left_random

    def summary(self) -> str:
        """A few lines for the console."""
        parts = ", ".join(PARTS[p] for p in self.loaded_parts)
        lines = [
            f"Loaded {self.loaded} arrays ({parts}) in {self.seconds:.1f} s from {self.format}: "
            f"{self.source}"
        ]
        if self.left_random:
            random = ", ".join(PARTS[p] for p in self.left_random)
            lines.append(f"  partial load: {random} not in the file, left at random init")
        for leaf, n in self.filled.items():
            lines.append(f"  {n} norm {leaf} not stored in the file: set as the peer does")
        for reason, n in self.ignored.items():
            lines.append(f"  skipped {n} keys: {reason}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the model's variable tree ------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _template(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)
    return {
        tuple(k.key for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
    }


def template(config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{(collection, *module path, leaf): shape}`` of the config's model (no compute)."""
    from jax_rpn.models import build_rpn

    return _template(build_rpn(config))


def unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
    """``{(a, b, c): x}`` -> ``{a: {b: {c: x}}}``."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
    """Inverse of :func:`unflatten` (leaves as they are)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, (*prefix, str(key))))
        else:
            flat[(*prefix, str(key))] = value
    return flat


# --- layouts ---------------------------------------------------------------------------------


def _to_peer(value: np.ndarray) -> np.ndarray:
    """Flax ``[kh, kw, in, out]`` -> PyTorch ``[out, in, kh, kw]``; vectors unchanged."""
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value


def _from_peer(value: np.ndarray) -> np.ndarray:
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value


def _peer_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def peer_keys(layout: Layout, tmpl) -> dict[tuple[str, ...], str | float | None]:
    """Each leaf of the model -> the peer's key holding it, the constant it is filled with, or
    None where the format has no such module."""
    keys = {}
    for path in tmpl:
        module, leaf = "/".join(path[1:-1]), path[-1]
        name = layout.module_name(module)
        if name is None:
            keys[path] = None
        elif leaf in layout.fills:
            keys[path] = float(layout.fills[leaf])
        else:
            keys[path] = name + layout.leaves[leaf]
    return keys


def _hint(path: tuple[str, ...], expected, found) -> str:
    """For the head's predictors (shapes in jax_rpn's layout, outputs last): anchors per cell."""
    if path[1] == "head" and path[2] in ("objectness", "deltas") and found:
        per = 4 if path[2] == "deltas" else 1
        return (
            f" (the config gives {expected[-1] // per} anchors per cell: anchors.sizes x "
            f"aspect_ratios; the file {found[-1] // per})"
        )
    return ""


def _natural(text: str) -> list:
    """Sort key that orders ``layer3.6`` before ``layer3.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _listing(title: str, items: list[str]) -> str:
    items = sorted(items, key=_natural)
    shown = "\n    ".join(items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


# A residual block's convolution in torchvision / mmdet (layer1.0.conv2), detectron2 (res2.0.conv2)
# or Caffe2 (res2_0_branch2b) names: stage, block, conv.
_BLOCK_CONV = re.compile(r"(?:layer(\d)|res(\d))[._](\d+)[._](?:conv(\d)|branch2([abc]))")


def resnet_in_keys(keys) -> str | None:
    """The ResNet a checkpoint's keys describe (``resnet50``, ...), from its blocks per stage and
    whether they have a third convolution; None if the keys name no ResNet blocks."""
    from jax_rpn.models.resnet import STAGES

    blocks, third = {}, False
    for key in keys:
        m = _BLOCK_CONV.search(key)
        if m:
            stage = int(m[1]) if m[1] else int(m[2]) - 1
            blocks[stage] = max(blocks.get(stage, 0), int(m[3]) + 1)
            third = third or m[4] == "3" or m[5] == "c"
    if not blocks:
        return None
    counts = tuple(blocks.get(s, 0) for s in range(1, max(blocks) + 1))
    for depth, (kind, stages) in STAGES.items():
        if (kind == "bottleneck") == third and stages[: len(counts)] == counts:
            return f"resnet{depth}"
    kind = "bottleneck" if third else "basic"
    return f"a ResNet with {counts} {kind} blocks per stage"


def describe(config) -> str:
    """The config's model in a few words, for messages."""
    m = config.model
    neck = f"FPN {m.fpn_dim}" if m.fpn else "no FPN"
    return f"model.backbone={m.backbone}, width {m.width}, {neck}, norm {m.norm}"


def place(
    found: Mapping[tuple[str, ...], np.ndarray],
    tmpl: Mapping[tuple[str, ...], tuple[int, ...]],
    *,
    names: Mapping[tuple[str, ...], str],
    unexpected: list[str],
    source: str,
    config,
    report: LoadReport,
    file_shape: Callable[[tuple[int, ...]], tuple[int, ...]] = _peer_shape,
    backbone: str | None = None,
) -> dict:
    """Check ``found`` (leaf path -> array in jax_rpn's layout) against the model and return the
    variables (a nested dict holding only what was found).

    ``names`` gives each leaf's name in the file and ``file_shape`` turns a shape into the
    file's layout (for messages); ``unexpected`` lists the file's keys that fit nowhere;
    ``backbone`` is what the file holds, if known. Raises :class:`CheckpointMismatchError`
    listing every problem.
    """
    wrong = []
    for path, value in found.items():
        expected = tmpl[path]
        if value.shape != expected:
            exp, got = file_shape(expected), file_shape(value.shape)
            hint = _hint(path, expected, value.shape)
            wrong.append(f"{names[path]}: expected {list(exp)}, found {list(got)}{hint}")
    missing_by_part: dict[str, list[tuple[str, ...]]] = {}
    for path in tmpl:
        if path not in found:
            missing_by_part.setdefault(path[1], []).append(path)
    present = {p[1] for p in found}
    missing = []
    left_random = []
    for part, paths in missing_by_part.items():
        if part in OPTIONAL_PARTS and part not in present:
            left_random.append(part)
        else:
            missing += [f"{names[p]} {list(file_shape(tmpl[p]))}" for p in paths]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(
                _listing("missing: the model needs these, the file lacks them", missing)
            )
        if unexpected:
            problems.append(_listing("unexpected: in the file, no place in the model", unexpected))
        if wrong:
            problems.append(_listing("wrong shape", wrong))
        holds = ""
        if backbone is not None and backbone != config.model.backbone:
            holds = (
                f" The file holds {backbone}, the config model.backbone={config.model.backbone}."
            )
        raise CheckpointMismatchError(
            f"{source} ({report.format}) does not fit the config ({describe(config)}):{holds}\n"
            + "\n".join(problems)
        )
    report.loaded = len(found)
    report.loaded_parts = tuple(p for p in PARTS if p in present)
    report.left_random = tuple(p for p in PARTS if p in left_random)
    # One contiguous float32 copy of each array (kernels arrive as transposed views).
    return unflatten({p: np.ascontiguousarray(v, np.float32) for p, v in found.items()})


def convert_timed(source, config, *, read, convert) -> tuple[dict, LoadReport]:
    """``convert(read(source, path=...), config, source=...)``, the time taken written into the
    report: the body of every ``from_*`` (``source`` a path or a state dict already read)."""
    start = time.perf_counter()
    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "state dict"
    variables, report = convert(read(source, path=path), config, source=path)
    report.seconds = time.perf_counter() - start
    return variables, report


def convert(
    state: Mapping[str, np.ndarray],
    layout: Layout,
    config,
    *,
    source: str,
    report: LoadReport,
    tmpl: Mapping[tuple[str, ...], tuple[int, ...]] | None = None,
) -> dict:
    """The variables of ``config``'s model from ``state`` (the file's arrays) in ``layout``.

    Returns the nested ``{"params": ..., "batch_stats": ...}`` of what the file holds (a
    backbone checkpoint gives only ``body``); see the module docstring for the rules. ``tmpl``:
    the model's leaf shapes if known (:func:`template` otherwise).
    """
    if config.model.objectness != "sigmoid":
        raise CheckpointError(
            f"{source}: {layout.name} RPN heads predict one sigmoid logit per anchor; set "
            f"config.model.objectness='sigmoid' (got {config.model.objectness!r})"
        )
    tmpl = template(config) if tmpl is None else tmpl
    keys = peer_keys(layout, tmpl)
    found, names, used, filled = {}, {}, set(), {}
    for path, key in keys.items():
        module = "/".join(path[1:-1])
        if key is None:
            names[path] = f"(none: {layout.name} has no jax_rpn {module})"
        elif isinstance(key, float):
            names[path] = f"{layout.module_name(module)}.{path[-1]} = {key:g}"
        else:
            names[path] = key
            if key in state:
                found[path] = _from_peer(np.asarray(state[key]))
                used.add(key)
    stored = {path[1:-1] for path in found}  # modules (any collection) the file holds
    for path, value in keys.items():  # constants only where their module was loaded
        if isinstance(value, float) and path[1:-1] in stored:
            found[path] = np.full(tmpl[path], value, np.float32)
            filled[path[-1]] = filled.get(path[-1], 0) + 1
    unexpected = []
    for key in state:
        if key in used:
            continue
        reason = layout.ignored(key)
        if reason is None:
            unexpected.append(f"{key} {list(np.shape(state[key]))}")
        else:
            report.ignored[reason] = report.ignored.get(reason, 0) + 1
    report.filled = filled
    variables = place(
        found,
        tmpl,
        names=names,
        unexpected=unexpected,
        source=source,
        config=config,
        report=report,
        backbone=resnet_in_keys(state),
    )
    report.loaded -= sum(filled.values())
    return variables


def export(
    variables: Mapping, layout: Layout, config, *, parts=tuple(PARTS)
) -> dict[str, np.ndarray]:
    """Inverse of :func:`convert`: the peer's state dict (numpy, PyTorch layout) of the
    ``parts`` of ``variables``; each of their leaves must be there. Formats with ``fills``
    cannot be written (their constants would be lost)."""
    if layout.fills:
        raise ValueError(f"{layout.name} stores no BN statistics; it cannot hold these variables")
    tmpl = {p: s for p, s in template(config).items() if p[1] in parts}
    flat = {
        p: v
        for p, v in flatten(
            {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
        ).items()
        if p[1] in parts
    }
    missing = [p for p in tmpl if p not in flat]
    extra = [p for p in flat if p not in tmpl]
    if missing or extra:
        raise ValueError(
            f"variables do not match the config ({describe(config)}): missing "
            f"{['/'.join(p) for p in missing[:MAX_LISTED]]}, extra "
            f"{['/'.join(p) for p in extra[:MAX_LISTED]]}"
        )
    keys = peer_keys(layout, tmpl)
    nameless = ["/".join(p[1:-1]) for p in tmpl if keys[p] is None]
    if nameless:
        raise ValueError(f"{layout.name} has no counterpart of jax_rpn's {sorted(set(nameless))}")
    return {keys[p]: _to_peer(np.asarray(flat[p], np.float32)) for p in tmpl}
