"""A training workdir: the config it was made with, what a later run may change, its metrics.

The first run writes its resolved config to ``<workdir>/config.json``
(:mod:`jax_rpn.checkpoints`). A later run in the same workdir is compared with it: fields in
:data:`RESUMABLE` (the loop's length, evaluation and logging) may change and the run says so;
any other change (the model, anchors, targets, losses, optimizer, data stream) would make the
checkpoint mean something else, so it is refused before anything is built, unless the run
starts over in place (``restart``).
"""

from __future__ import annotations

import json
import os
import shutil

import ml_collections

from jax_rpn import checkpoints, files

# Fields a run may change and still resume the workdir's checkpoint. Everything else shapes the
# parameters, the optimizer's trajectory or the data stream. The trainer's own objective does
# not use `proposals` (only evaluation does), so they may change too.
RESUMABLE = (
    "num_train_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "num_vis_images",
    "parallelism",
    "data.data_dir",
    "data.eval_split",
    "data.eval_annotations",
    "data.eval_images",
    "data.num_eval_images",
    "data.num_workers",
    "proposals.",
)
# What a run leaves in its workdir (start over in place removes these; the compilation cache
# stays).
RUN_FILES = ("config.json", "checkpoints", "metrics.jsonl", "tensorboard", "eval")


class ConfigChanged(ValueError):
    """A run's config differs from the workdir's in fields that cannot change on resume."""


def _flatten(config: ml_collections.ConfigDict) -> dict:
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(json.loads(checkpoints.config_to_json(config)), "")
    return out


def config_changes(
    stored: ml_collections.ConfigDict, new: ml_collections.ConfigDict
) -> list[tuple[str, object, object]]:
    """``(field, stored value, new value)`` for every field that differs, sorted by field."""
    a, b = _flatten(stored), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def resumable(field: str) -> bool:
    """Whether ``field`` may change between runs of one workdir (see :data:`RESUMABLE`)."""
    return any(field == r or (r.endswith(".") and field.startswith(r)) for r in RESUMABLE)


def prepare(
    config: ml_collections.ConfigDict, workdir: str, *, restart: bool = False
) -> list[tuple[str, object, object]]:
    """Check ``config`` against the one stored in ``workdir``; returns the resumable changes.

    Raises :class:`ConfigChanged` listing the other changes (and the two ways out) unless
    ``restart``, which removes the previous run's files (:data:`RUN_FILES`) instead. Creates
    nothing: the caller writes the config once everything else has been checked too.
    """
    stored = checkpoints.read_config(workdir) if os.path.isdir(workdir) else None
    if stored is None:
        return []
    changes = config_changes(stored, config)
    fixed = [c for c in changes if not resumable(c[0])]
    if fixed and not restart:
        lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in fixed)
        raise ConfigChanged(
            f"{workdir} holds a run made with another config; these fields differ and cannot "
            f"change on resume:\n{lines}\nUse a new --workdir, or pass --restart to start over "
            "in this one (its checkpoints and metrics are deleted)."
        )
    if restart:
        return []
    return [c for c in changes if resumable(c[0])]


def clear(workdir: str) -> list[str]:
    """Remove the previous run's files (:data:`RUN_FILES`) from ``workdir``; returns them."""
    removed = []
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


class MetricsLog:
    """``metrics.jsonl``: one JSON row per (step, split), never two.

    Rows are ``{"step": ..., "split": "train" | "eval", ...metrics}``. Writing a row for a
    (step, split) that is already there replaces it, and a run resumed from a checkpoint first
    drops the rows logged after that checkpoint by the interrupted run (:meth:`truncate`).
    """

    def __init__(self, path: str):
        self.path = path
        self.rows: list[dict] = []
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().splitlines()
            for number, line in enumerate(lines, start=1):
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if number < len(lines):
                        raise ValueError(f"{path}:{number} is not a JSON row") from None
                    self._rewrite()  # the last line was cut short by a kill: dropped

    def truncate(self, step: int) -> None:
        """Drop rows of steps after ``step`` (logged by a run interrupted after its last
        checkpoint) and rewrite the file."""
        kept = [r for r in self.rows if r["step"] <= step]
        if len(kept) != len(self.rows):
            self.rows = kept
            self._rewrite()

    def write(self, step: int, split: str, metrics: dict) -> None:
        row = {"step": int(step), "split": split, **metrics}
        for i, r in enumerate(self.rows):
            if (r["step"], r["split"]) == (row["step"], split):
                self.rows[i] = row
                self._rewrite()
                return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def find(self, step: int, split: str) -> dict | None:
        """The row of (``step``, ``split``), or None."""
        return next((r for r in self.rows if (r["step"], r["split"]) == (step, split)), None)

    def _rewrite(self) -> None:
        files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
