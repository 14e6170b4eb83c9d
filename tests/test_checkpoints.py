"""Model variables on disk: variables folders and workdir checkpoints, configs as JSON."""

import json
import os

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


def test_load_variables_names_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints/<step>/.*variables/"):
        checkpoints.load_variables(str(tmp_path))
