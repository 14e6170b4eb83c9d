"""rpn_objective and predict_proposals: the model-level objective and inference on a tiny RPN."""

import functools

import jax
import ml_collections
import numpy as np
import pytest

from configs import tiny
from jax_rpn import inference, losses, targets
from jax_rpn.models import build_rpn, flatten_outputs, init_variables
from jax_rpn.objective import rpn_objective
from jax_rpn.settings import LossSettings, TargetSettings


@pytest.fixture(scope="module", autouse=True)
def _fast_compile(fast_compile_module):
    """Every test here compiles a model or a train step: XLA's optimisations off (conftest)."""


def _batch(batch_size=2):
    boxes = np.zeros((batch_size, 8, 4), np.float32)
    boxes[:, 0] = [4, 6, 30, 22]
    boxes[:, 1] = [20, 20, 60, 40]
    boxes[1, 2] = [40, 2, 48, 30]
    valid = np.zeros((batch_size, 8), bool)
    valid[:, :2] = True
    valid[1, 2] = True
    ignore = np.zeros_like(valid)
    ignore[1, 2] = True  # a crowd box: left out of the targets
    return {
        "image": np.random.default_rng(0).normal(size=(batch_size, 64, 64, 3)).astype(np.float32),
        "boxes": boxes,
        "valid": valid,
        "ignore": ignore,
        "image_hw": np.array([[64, 64], [48, 64]], np.int32)[:batch_size],
    }


def _objective(outputs, batch, key, config):
    return rpn_objective(
        outputs,
        batch,
        key,
        targets_settings=TargetSettings.from_config(config),
        loss_settings=LossSettings.from_config(config),
    )


@pytest.fixture(scope="module", params=["sigmoid", "softmax"])
def setup(request):
    config = tiny.get_config()
    config.model.objectness = request.param
    model = build_rpn(config)
    variables = init_variables(model, jax.random.key(0), (1, 64, 64, 3))
    return config, model, variables


def test_loss_matches_targets_and_losses(setup):
    config, model, variables = setup
    batch = _batch()
    keys = jax.random.split(jax.random.key(3), 2)
    outputs = jax.jit(functools.partial(model.apply, train=False))(variables, batch["image"])
    loss, metrics = jax.jit(lambda o, b, k: _objective(o, b, k, config))(outputs, batch, keys)

    # The same pieces composed by hand: targets per image, then the normalised losses.
    t = config.targets

    @jax.jit
    def by_hand(outputs, batch, keys):
        flat = flatten_outputs(outputs)
        labels, box_targets = jax.vmap(
            lambda k, b, v: targets.anchor_targets(
                k,
                flat.anchors,
                b,
                v,
                high=t.high,
                low=t.low,
                num_samples=t.num_samples,
                positive_fraction=t.positive_fraction,
            )
        )(keys, batch["boxes"], batch["valid"] & ~batch["ignore"])
        parts = losses.rpn_losses(
            flat.objectness,
            flat.deltas,
            labels,
            box_targets,
            num_samples=t.num_samples,
            objectness_kind=config.model.objectness,
        )
        return labels, parts

    labels, parts = by_hand(outputs, batch, keys)
    expected = parts["objectness"] + config.loss.box_weight * parts["box"]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["num_positive"], (labels == 1).sum() / 2)
    np.testing.assert_allclose(metrics["num_negative"], (labels == 0).sum() / 2)
    assert metrics["num_positive"] > 0 and metrics["nonfinite_outputs"] == 0
    assert 0.0 <= metrics["fg_accuracy"] <= 1.0


def test_gradients_flow(setup):
    config, model, variables = setup
    batch = _batch()

    def loss_fn(params):
        outputs = model.apply({**variables, "params": params}, batch["image"], train=False)
        return _objective(outputs, batch, jax.random.key(1), config)[0]

    grads = jax.jit(jax.grad(loss_fn))(variables["params"])
    norms = {
        "/".join(str(getattr(p, "key", p)) for p in path): float(np.linalg.norm(g))
        for path, g in jax.tree_util.tree_leaves_with_path(jax.device_get(grads))
    }
    assert all(np.isfinite(v) for v in norms.values())
    for part in ("head", "body", "neck"):
        assert any(v > 0 for k, v in norms.items() if part in k), part


def test_predict_proposals_compiles_once_per_shape(setup):
    config, _, variables = setup
    batch = _batch()
    props = inference.predict_proposals(variables, batch["image"], batch["image_hw"], config=config)
    k = config.proposals.post_nms_topk_test
    assert props.boxes.shape == (2, k, 4) and props.valid.shape == (2, k)
    for i, (h, w) in enumerate(batch["image_hw"]):
        b = np.asarray(props.boxes[i])[np.asarray(props.valid[i])]
        assert len(b) > 0 and b.min() >= 0 and b[:, 2].max() <= w and b[:, 3].max() <= h
    fn = inference.predict_function(ml_collections.FrozenConfigDict(config))
    inference.predict_proposals(variables, batch["image"] + 1.0, batch["image_hw"], config=config)
    assert fn._cache_size() == 1
    inference.predict_proposals(
        variables, np.zeros((1, 64, 128, 3), np.float32), np.array([[64, 128]]), config=config
    )
    assert fn._cache_size() == 2
