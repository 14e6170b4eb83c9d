"""The examples run: examples/two_stage_detector.py trains a few steps on rpn_shapes/small."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from jax_rpn.data import shapes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fast_compile():
    """The example compiles two large programs; XLA's optimisations only cost time here."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def test_two_stage_detector_trains(tmp_path, monkeypatch, fast_compile):
    data_dir = str(tmp_path / "tfds")
    shapes.ensure_prepared("rpn_shapes/small", data_dir=data_dir)
    example = _load("two_stage_detector")
    batches = []  # the batches the example trains on (the same dict objects)
    create = example.pipeline.create_train_iterator

    def recording_iterator(*args, **kwargs):
        for batch in create(*args, **kwargs):
            batches.append(batch)
            yield batch

    monkeypatch.setattr(example.pipeline, "create_train_iterator", recording_iterator)
    result = example.main(
        ["--steps", "3", "--batch-size", "2", "--data-name", "rpn_shapes/small"]
        + ["--data-dir", data_dir]
    )
    history = result["history"]
    assert len(history) == 3 and len(batches) == 3
    # The second stage trains on the real shape classes (0..3), not a zero fill.
    labels = np.concatenate([b["labels"][b["valid"]] for b in batches])
    assert labels.max() > 0 and labels.max() < len(shapes.CLASS_NAMES)
    for metrics in history:
        assert set(metrics) == {"loss", "rpn", "cls", "box"}
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        assert metrics["loss"] == pytest.approx(metrics["rpn"] + metrics["cls"] + metrics["box"])
        assert metrics["rpn"] > 0 and metrics["cls"] > 0
    # The second-stage head and the shared backbone both learn from the composed loss.
    for part in ("box_head", "rpn"):
        before, after = result["initial_params"][part], result["params"][part]
        changed = jax.tree.map(
            lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, after
        )
        assert all(jax.tree.leaves(changed)), part
