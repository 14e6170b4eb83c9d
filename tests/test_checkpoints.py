"""Model variables on disk: variables folders and workdir checkpoints, configs as JSON."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import coco_r50_fpn, tiny
from jax_rpn import checkpoints


def _variables():
    rng = np.random.default_rng(0)
    return {
        "params": {"conv": {"kernel": rng.normal(size=(3, 3, 3, 8)).astype(np.float32)}},
        "batch_stats": {"bn": {"mean": rng.normal(size=(8,)).astype(np.float32)}},
    }


def test_variables_folder_round_trip(tmp_path):
    config = tiny.get_config()
    config.model.width = 12
    out = checkpoints.save_variables(
        str(tmp_path / "conv"), _variables(), config=config, report={"source": "test"}
    )
    variables, stored, step = checkpoints.load_variables(out)
    assert step is None
    jax.tree.map(np.testing.assert_array_equal, variables, _variables())
    assert stored.model.width == 12 and stored.data.pad_to == (64, 64)  # lists back to tuples
    assert json.load(open(os.path.join(out, "report.json"))) == {"source": "test"}
    with pytest.raises(FileExistsError, match="conv exists"):
        checkpoints.save_variables(out, _variables(), config=config)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "write_config", fail)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_variables(str(tmp_path / "out"), _variables(), config=tiny.get_config())
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary sibling


def test_config_json_round_trip_and_unknown_fields(tmp_path):
    config = coco_r50_fpn.get_config()
    checkpoints.write_config(str(tmp_path), config)
    assert checkpoints.config_to_json(checkpoints.read_config(str(tmp_path))) == (
        checkpoints.config_to_json(config)
    )
    with pytest.raises(ValueError, match=r"'model\.widht' is not a field"):
        checkpoints.config_from_dict({"model": {"widht": 3}}, source="x.json")


def test_stored_config_loads_outside_the_repository(tmp_path):
    # A workdir's config is read over configs/default.py, which the install provides: a
    # script or `python -m jax_rpn.predict --model ...` run from another folder (no
    # repository root on sys.path) reads the same config.
    folder = checkpoints.save_variables(
        str(tmp_path / "conv"), _variables(), config=tiny.get_config()
    )
    script = (
        "import sys; from jax_rpn import checkpoints; "
        "_, config, _ = checkpoints.load_variables(sys.argv[1]); print(config.data.pad_to)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script, folder],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(64, 64)"


def test_load_variables_names_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints/<step>/.*variables/"):
        checkpoints.load_variables(str(tmp_path))


def test_atomic_writes_leave_the_old_file_or_nothing(tmp_path):
    from jax_rpn import files

    path = str(tmp_path / "report.txt")
    files.write_text(path, "first\n")
    with pytest.raises(KeyboardInterrupt), files.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt
    assert open(path).read() == "first\n"
    assert os.listdir(tmp_path) == ["report.txt"]  # no temporary file left
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
