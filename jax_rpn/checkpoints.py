"""Model variables on disk: a training workdir's checkpoints, or a folder of converted weights.

Two layouts hold a model, and :func:`load_variables` reads either:

- a training workdir (``train.py``): ``config.json`` (the resolved config) and
  ``checkpoints/<step>/`` (orbax; the train state, whose ``params`` and ``model_state`` are
  the model's variables);
- a variables folder (:func:`save_variables`, e.g. peer weights converted by
  ``python -m jax_rpn.interop``): ``config.json``, ``variables/`` (orbax;
  ``{"params": ..., "batch_stats": ...}``) and ``report.json`` (where they came from).

Configs are stored as JSON and read back onto ``configs/default.py``'s locked config, so a
stored field that no longer exists is an error that names it.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jax_rpn import files

CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"
REPORT_FILE = "report.json"
CHECKPOINTS_DIR = "checkpoints"


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON (tuples become lists)."""
    return json.dumps(json.loads(config.to_json()), indent=1, sort_keys=True)


def config_from_dict(values: dict, *, source: str = "config") -> ml_collections.ConfigDict:
    """``configs/default.py``'s config with ``values`` (nested, from JSON) written over it.

    Lists become tuples where the default holds a tuple. A key the default config does not
    have raises ValueError naming it and ``source``.
    """
    from configs import default

    config = default.get_config()

    def assign(node, updates, prefix):
        for key, value in updates.items():
            name = f"{prefix}{key}"
            if key not in node:
                raise ValueError(
                    f"{source}: field {name!r} is not a field of this version's configs/default.py"
                )
            if isinstance(value, dict):
                assign(node[key], value, name + ".")
            else:
                node[key] = _like(node[key], value)

    assign(config, values, "")
    return config


def _like(default, value):
    """``value`` (from JSON) with lists as tuples where ``default`` is a tuple."""
    if isinstance(value, list) and (default is None or isinstance(default, tuple)):
        return tuple(_like(None, v) for v in value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
    """Write ``{"field.path": value}`` (e.g. ``config_flags.get_override_values``) over
    ``config`` in place."""
    for field, value in overrides.items():
        node = config
        *path, last = field.split(".")
        for part in path:
            node = node[part]
        node[last] = value


def config_of_run(stored: ml_collections.ConfigDict | None, config_flag):
    """The config a command runs with: the ``--config`` file when one is given or nothing is
    stored, else ``stored`` with the ``--config.<field>=...`` overrides written over it.
    ``config_flag``: the ``config_flags.DEFINE_config_file`` flag (``flags.FLAGS["config"]``)."""
    from ml_collections import config_flags

    if stored is None or config_flag.present:
        return config_flag.value
    apply_overrides(stored, config_flags.get_override_values(config_flag))
    return stored


def write_config(directory: str, config: ml_collections.ConfigDict) -> str:
    """Write ``config.json`` into ``directory`` atomically; returns its path."""
    path = os.path.join(directory, CONFIG_FILE)
    files.write_text(path, config_to_json(config) + "\n")
    return path


def read_config(directory: str) -> ml_collections.ConfigDict | None:
    """The config stored in ``directory`` (``config.json``), or None if there is none."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            values = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    return config_from_dict(values, source=path)


def save_variables(
    out_dir: str,
    variables: dict,
    *,
    config: ml_collections.ConfigDict,
    report: dict | None = None,
    overwrite: bool = False,
) -> str:
    """Write a variables folder (``config.json``, ``variables/``, ``report.json``) atomically.

    Everything is written into a temporary sibling folder that replaces ``out_dir`` only when
    complete, so an interrupted save leaves no folder that looks usable. An existing
    ``out_dir`` is an error unless ``overwrite``.
    """
    with files.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tree = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, VARIABLES_DIR), tree)
        checkpointer.wait_until_finished()
        write_config(tmp, config)
        files.write_text(os.path.join(tmp, REPORT_FILE), json.dumps(report or {}, indent=1))
    return os.path.abspath(out_dir)


def load_variables(path: str) -> tuple[dict, ml_collections.ConfigDict | None, int | None]:
    """``(variables, config, step)`` from a workdir (latest checkpoint) or a variables folder.

    ``variables`` is ``{"params": ..., **model_state}`` with numpy arrays; ``config`` the stored
    config (None if the folder has none); ``step`` the checkpoint's training step (None for a
    variables folder). Raises FileNotFoundError naming what was looked for.
    """
    path = os.path.abspath(path)
    config = read_config(path) if os.path.isdir(path) else None
    converted = os.path.join(path, VARIABLES_DIR)
    if os.path.isdir(converted):
        tree = ocp.StandardCheckpointer().restore(converted)
        return _numpy(tree), config, None
    checkpoints = os.path.join(path, CHECKPOINTS_DIR)
    step = _latest_step(checkpoints)
    if step is None:
        raise FileNotFoundError(
            f"{path} holds no model: expected a training workdir ({CHECKPOINTS_DIR}/<step>/) "
            f"or a converted variables folder ({VARIABLES_DIR}/)"
        )
    state = ocp.StandardCheckpointer().restore(os.path.join(checkpoints, str(step), "state"))
    variables = {"params": state["params"], **state["model_state"]}
    return _numpy(variables), config, step


def _latest_step(checkpoints: str) -> int | None:
    if not os.path.isdir(checkpoints):
        return None
    steps = [int(d) for d in os.listdir(checkpoints) if d.isdigit()]
    return max(steps) if steps else None


def _numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)
