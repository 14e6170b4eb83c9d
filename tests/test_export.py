"""Tests for jax_rpn.export: each export, loaded back and run, gives the proposals of in-process
inference (``predict_proposals``, the reference) on the same normalised images."""

import json

import jax
import numpy as np
import pytest

from configs import tiny
from jax_rpn import export, inference
from jax_rpn.data import augment, shapes
from jax_rpn.models import build_rpn, init_variables

BATCH = 2


@pytest.fixture(scope="module", autouse=True)
def _clear_predict_cache(fast_compile_module):
    yield
    inference.predict_function.cache_clear()  # later tests count their own compiles


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = tiny.get_config()
    variables = init_variables(build_rpn(config), jax.random.key(1), (1, 64, 64, 3))
    images = np.zeros((BATCH, 64, 64, 3), np.float32)  # [B, H, W, 3]
    image_hw = np.array([[64, 64], [48, 64]], np.int32)  # [B, 2]
    for i, (h, w) in enumerate(image_hw):
        rgb = shapes.render_example("validation", i, image_hw=(h, w))["image"]
        images[i, :h, :w] = augment.normalize(rgb)
    ref = jax.device_get(inference.predict_proposals(variables, images, image_hw, config=config))
    out = tmp_path_factory.mktemp("export")
    return {
        "config": config,
        "variables": variables,
        "images": images,
        "image_hw": image_hw,
        "ref": ref,
        "out": out,
    }


def _check_same_proposals(setup, boxes, scores, valid):
    """Same proposals as predict_proposals up to float rounding (a separately compiled
    program): the same valid slots, boxes within 1e-3 px, probabilities within 1e-5."""
    ref = setup["ref"]
    np.testing.assert_array_equal(np.asarray(valid), ref.valid)
    assert ref.valid.sum() > 0
    np.testing.assert_allclose(np.asarray(boxes), ref.boxes, atol=1e-3)
    want = np.where(ref.valid, 1 / (1 + np.exp(-np.where(ref.valid, ref.scores, 0.0))), 0.0)
    np.testing.assert_allclose(np.asarray(scores), want, atol=1e-5)


def test_jax_export_loads_and_runs_with_jax_only(setup):
    config, out = setup["config"], setup["out"]
    exported = export.export_proposals(setup["variables"], config, platforms=("cpu",))
    info = export.sidecar(config, exported, source="test")
    path = export.save_exported(str(out), exported, info)
    # Loading needs jax only: the file holds the program and the weights.
    with open(path, "rb") as f:
        loaded = jax.export.deserialize(bytearray(f.read()))
    assert not isinstance(loaded.in_avals[0].shape[0], int)  # symbolic batch size
    _check_same_proposals(setup, *loaded.call(setup["images"], setup["image_hw"]))
    sidecar = json.loads((out / export.SIDECAR_FILE).read_text())
    assert sidecar["K"] == config.proposals.post_nms_topk_test == 100
    assert sidecar["inputs"]["images"]["shape"] == ["B", 64, 64, 3]
    assert sidecar["preprocess"]["pixel_mean"] == list(config.data.pixel_mean)
    assert sidecar["platforms"] == ["cpu"]


def test_saved_model_loads_and_runs_in_tensorflow(setup):
    import tensorflow as tf  # in the test extra; imported here, where it is needed (slow)

    folder = export.save_saved_model(
        str(setup["out"]), setup["variables"], setup["config"], batch_size=BATCH, platforms=("cpu",)
    )
    serve = tf.saved_model.load(folder).signatures["serving_default"]
    outputs = serve(images=tf.constant(setup["images"]), image_hw=tf.constant(setup["image_hw"]))
    _check_same_proposals(
        setup, outputs["boxes"].numpy(), outputs["scores"].numpy(), outputs["valid"].numpy()
    )
