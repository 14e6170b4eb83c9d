"""The training loop: multi-device equivalence, one compile, checkpoints, resume, failures."""

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from jax_rpn import checkpoints, config_checks, inference, parallel, training
from jax_rpn.models import build_rpn, frozen_parameters
from jax_rpn.optim import create_optimizer
from jax_rpn.settings import ProposalSettings

pytestmark = pytest.mark.slow  # end-to-end runs: first in the queue (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    c = tiny.get_config()
    c.optim.learning_rate = 0.05
    checkpoints.apply_overrides(c, overrides)
    return c


def _random_batch(rng, config, batch_size):
    h, w = config.data.pad_to
    g = config.data.max_boxes
    xy = rng.uniform(0, 40, (batch_size, g, 2))
    wh = rng.uniform(6, 24, (batch_size, g, 2))
    return {
        "image": rng.normal(size=(batch_size, h, w, 3)).astype(np.float32),
        "boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
        "valid": rng.uniform(size=(batch_size, g)) < 0.6,
        "ignore": np.zeros((batch_size, g), bool),
        "image_hw": np.tile(np.array([[h, w]], np.int32), (batch_size, 1)),
        "example_valid": np.ones((batch_size,), bool),
    }


def _run_steps(config, mesh, mode, batches, *, trace_limit=None):
    model = build_rpn(config, axis_name=parallel.AXIS)
    tx, schedule = create_optimizer(config.optim, config.num_train_steps)
    state = training.create_train_state(
        config, build_rpn(config), tx, jax.random.PRNGKey(config.seed)
    )
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step_fn = training.make_train_step(config, model, tx, schedule)
    if trace_limit is not None:
        step_fn = chex.assert_max_traces(step_fn, n=trace_limit)
    p_step = parallel.parallelize(step_fn, mode=mode, mesh=mesh)
    metrics = []
    for batch in batches:
        state, m = p_step(state, parallel.shard_batch(batch, mode=mode, mesh=mesh))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


@pytest.mark.parametrize(
    "mode,norm", [("shard_map", "frozen_bn"), ("pmap", "frozen_bn"), ("shard_map", "batch_norm")]
)
def test_four_devices_match_one_device(mode, norm, fast_compile):
    """3 steps on 4 devices (2 images each) == 3 steps on 1 device with the same 8 images."""
    config = _config(**{"model.norm": norm})
    rng = np.random.default_rng(0)
    batches = [_random_batch(rng, config, 8) for _ in range(3)]
    one, m1 = _run_steps(config, parallel.data_mesh(jax.devices()[:1]), mode, batches)
    four, m4 = _run_steps(config, parallel.data_mesh(jax.devices()[:4]), mode, batches)
    assert m1[0]["num_positive"] > 0
    assert m1[-1]["loss"] != m1[0]["loss"]  # the parameters did move
    for a, b in zip(m1, m4, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
    chex.assert_trees_all_close(one.model_state, four.model_state, rtol=1e-4, atol=1e-6)
    if norm != "batch_norm":
        chex.assert_trees_all_close(one.params, four.params, rtol=1e-4, atol=1e-6)
        return
    # Cross-device BN sums its statistics in another order. Over 3 steps the float32 rounding
    # reaches about 2% of a parameter's update where gradients nearly cancel; BN with
    # per-device statistics would already fail the loss check above.
    init, _ = _run_steps(config, parallel.data_mesh(jax.devices()[:1]), mode, [])
    flat_init = jax.tree_util.tree_leaves_with_path(init.params)
    for (path, p0), p1, p4 in zip(
        flat_init, jax.tree.leaves(one.params), jax.tree.leaves(four.params), strict=True
    ):
        update = np.abs(p1 - p0).max()
        np.testing.assert_allclose(p4, p1, atol=0.1 * update + 1e-7, err_msg=str(path))


def test_train_step_compiles_once(fast_compile):
    config = _config()
    rng = np.random.default_rng(1)
    batches = [_random_batch(rng, config, 8) for _ in range(3)]
    chex.clear_trace_counter()
    _, metrics = _run_steps(config, parallel.data_mesh(), "shard_map", batches, trace_limit=1)
    assert all(np.isfinite(m["loss"]) for m in metrics)


def test_train_step_with_proposals_is_the_step_plus_its_proposals(fast_compile):
    """``with_proposals=True``: the same new state and metrics as the trainer's step, and the
    proposals of the pre-update model (inference, frozen BN: train and eval outputs agree) at
    the training top-k; frozen stages still get no update; one compile."""
    config = _config(
        **{
            "model.norm": "frozen_bn",
            "init.allow_random_frozen_bn": True,
            "model.freeze_at": 2,
            "proposals.post_nms_topk_train": 50,  # the test's top-k is 100
        }
    )
    mesh = parallel.data_mesh(jax.devices()[:2])
    model = build_rpn(config, axis_name=parallel.AXIS)
    tx, schedule = create_optimizer(config.optim, config.num_train_steps)
    state = training.create_train_state(
        config, build_rpn(config), tx, jax.random.PRNGKey(config.seed)
    )
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    batch = _random_batch(np.random.default_rng(3), config, 8)
    sharded = parallel.shard_batch(batch, mode="shard_map", mesh=mesh)
    plain = parallel.parallelize(
        training.make_train_step(config, model, tx, schedule), mode="shard_map", mesh=mesh
    )
    chex.clear_trace_counter()
    with_props = parallel.parallelize(
        chex.assert_max_traces(
            training.make_train_step(config, model, tx, schedule, with_proposals=True), n=1
        ),
        mode="shard_map",
        mesh=mesh,
        replicated_out=(True, True, False),
    )
    want_state, want_metrics = jax.device_get(plain(state, sharded))
    got_state, got_metrics, props = jax.device_get(with_props(state, sharded))
    with_props(state, sharded)  # no second compile
    chex.assert_trees_all_close(got_state, want_state, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(got_metrics, want_metrics, rtol=1e-6, atol=1e-7)
    frozen = frozen_parameters(config.model.backbone, config.model.freeze_at)
    before = jax.device_get(state.params)
    for path, p in jax.tree_util.tree_leaves_with_path(got_state.params):
        if frozen(tuple(k.key for k in path)):
            np.testing.assert_array_equal(p, _leaf(before, path), err_msg=str(path))

    settings = ProposalSettings.from_config(config, train=True)
    want = jax.jit(
        functools.partial(inference.proposals_from_images, build_rpn(config), settings=settings)
    )({"params": before, **jax.device_get(state.model_state)}, batch["image"], batch["image_hw"])
    assert props.boxes.shape == (8, config.proposals.post_nms_topk_train, 4)
    np.testing.assert_array_equal(props.valid, want.valid)
    np.testing.assert_allclose(props.boxes, want.boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(props.scores, want.scores, rtol=1e-5, atol=1e-5)


def _leaf(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_nonfinite_loss_keeps_parameters(fast_compile):
    config = _config()
    rng = np.random.default_rng(2)
    bad = _random_batch(rng, config, 8)
    bad["image"][3, 5, 5, 0] = np.nan
    good, _ = _run_steps(config, parallel.data_mesh(), "shard_map", [])
    after, (m,) = _run_steps(config, parallel.data_mesh(), "shard_map", [bad])
    assert m["finite"] == 0
    chex.assert_trees_all_equal(good.params, after.params)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("targets.low", 0.9, "targets.low/high"),
        ("parallelism", "dp", "parallelism"),
        ("data.pad_to", (60, 64), "data.pad_to"),
        ("batch_size", 6, "batch_size"),
        ("anchors.aspect_ratios", (1.0, -2.0), "aspect_ratios"),
        ("model.backbone", "resnet9", "model.backbone"),
    ],
)
def test_invalid_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        config_checks.validate(_config(**{field: value}))


@pytest.mark.parametrize(
    "batch, cores, expected", [(8, 2, 2), (8, 3, 2), (8, 16, 8), (6, 4, 3), (7, 2, 1), (8, 1, 1)]
)
def test_cpu_devices_for_is_the_largest_divisor_up_to_the_cores(batch, cores, expected):
    # Hand-computed: the largest d <= cores with batch % d == 0.
    assert parallel.cpu_devices_for(batch, cpu_count=cores) == expected


def test_cpu_devices_for_rejects_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        parallel.cpu_devices_for(0, cpu_count=2)
    with pytest.raises(ValueError, match="cpu_count"):
        parallel.cpu_devices_for(8, cpu_count=0)


# End to end: train.py in subprocesses on the embedded data ------------------------------


def _train_cmd(workdir, data_dir, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, "configs", "tiny.py"),
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        "--config.data.name=rpn_shapes/small",
        "--config.num_train_steps=12",
        "--config.checkpoint_every=4",
        "--config.log_every=2",
        "--config.data.num_eval_images=8",
        "--cpu_devices=2",
        *extra,
    ]


def _env(cache_dir):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's 4 devices; train.py splits the CPU (--cpu_devices)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = ROOT
    return env


def _final_params(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored["state"]["params"]


def _last_eval(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [line for line in lines if line["split"] == "eval"][-1]


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, shapes_dir):
    cache = tmp_path / "cache"
    env = _env(cache)
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = subprocess.run(
        _train_cmd(full, shapes_dir), env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AR@100" in done.stdout  # the final recall table
    assert "Training on 2 cpu device(s)" in done.stdout  # --cpu_devices took effect
    for name in ("metrics.jsonl", "tensorboard", "eval"):
        assert os.path.exists(full / name), name
    assert any(f.startswith("proposals_") for f in os.listdir(full / "eval"))

    proc = subprocess.Popen(
        _train_cmd(killed, shapes_dir),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not os.path.exists(killed / "checkpoints" / "4") and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step, _ = _final_params(killed)
    assert step is not None and step < 12, "the run was not interrupted"
    resumed = subprocess.run(
        _train_cmd(killed, shapes_dir), env=env, capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from checkpoint at step" in resumed.stdout

    step_a, params_a = _final_params(full)
    step_b, params_b = _final_params(killed)
    assert step_a == step_b == 12
    chex.assert_trees_all_close(params_a, params_b, rtol=1e-5, atol=1e-6)
    eval_a, eval_b = _last_eval(full), _last_eval(killed)
    assert eval_a["AR@100"] == pytest.approx(eval_b["AR@100"], abs=1e-6)

    evaluated = subprocess.run(
        _train_cmd(full, shapes_dir, "--mode=eval"),
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"{eval_a['AR@100']:8.4f}" in evaluated.stdout


def test_event_writer_leaves_torch_unimported(tmp_path):
    """tensorboardX imports torch whenever it is installed (3 s of every run's start-up); the
    trainer's writer loads it without, and still writes TensorBoard events."""
    # Installed (the test extras have it), so the check means something; not imported here.
    assert importlib.util.find_spec("torch") is not None

    code = (
        "import sys; from jax_rpn import training; w = training._summary_writer(sys.argv[1]); "
        "w.add_scalar('loss', 0.5, 1); w.close(); print('torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_nan_stops_training_and_keeps_last_checkpoint(
    tmp_path, shapes_dir, monkeypatch, fast_compile
):
    monkeypatch.setattr(training, "set_up_compilation_cache", lambda workdir: None)
    config = _config(
        **{
            "data.data_dir": str(shapes_dir),
            "data.name": "rpn_shapes/small",
            "num_train_steps": 6,
            "checkpoint_every": 2,
            "log_every": 1,
        }
    )
    trainer = training.Trainer(config, str(tmp_path))
    shard_batch, calls = parallel.shard_batch, []

    def poisoned(batch, **kwargs):
        """Batches from the real pipeline; the 4th training batch has a NaN pixel."""
        calls.append(1)
        if len(calls) == 4:
            batch["image"][0, 0, 0, 0] = np.nan
        return shard_batch(batch, **kwargs)

    monkeypatch.setattr(parallel, "shard_batch", poisoned)
    with pytest.raises(FloatingPointError, match="step 4"):
        trainer.train()
    assert trainer.checkpoints.latest_step() == 2
    _, params = _final_params(str(tmp_path))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


# The workdir remembers its config; finished runs; rejected runs ----------------------------


def test_changed_fields_are_refused_or_applied(tmp_path):
    from jax_rpn import checkpoints, workdir

    stored = _config()
    checkpoints.write_config(str(tmp_path), stored)
    shape = _config(**{"anchors.sizes": ((12,), (16,), (32,), (64,), (128,)), "targets.high": 0.5})
    with pytest.raises(workdir.ConfigChanged) as info:
        workdir.prepare(shape, str(tmp_path))
    message = str(info.value)
    assert "anchors.sizes" in message and "targets.high: 0.6 -> 0.5" in message
    assert "--workdir" in message and "--restart" in message
    longer = _config(**{"num_train_steps": 50, "proposals.nms_threshold": 0.5})
    assert workdir.prepare(longer, str(tmp_path)) == [
        ("num_train_steps", 6, 50),
        ("proposals.nms_threshold", 0.65, 0.5),
    ]
    assert workdir.prepare(shape, str(tmp_path), restart=True) == []


def test_metrics_log_never_holds_two_rows_for_a_step(tmp_path):
    from jax_rpn.workdir import MetricsLog

    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write(step, "train", {"loss": float(step)})
    log.write(3, "eval", {"AR@100": 0.1})
    log.write(3, "eval", {"AR@100": 0.2})  # evaluated again: replaces
    with open(path, "a") as f:
        f.write('{"step": 4, "spl')  # a line cut short by a kill
    log = MetricsLog(path)
    log.truncate(2)  # resumed from the checkpoint at step 2: steps 3.. are logged again
    log.write(3, "train", {"loss": 3.5})
    rows = [json.loads(line) for line in open(path)]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (3, "train")]
    assert rows[-1]["loss"] == 3.5


def test_rejected_runs_leave_no_workdir(tmp_path):
    bad = _config(**{"targets.low": 0.9})
    with pytest.raises(ValueError, match="targets.low/high"):
        training.setup_training(bad, str(tmp_path / "bad"))
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first"):
        training.setup_evaluation(_config(), str(tmp_path / "empty"))
    missing = _config(**{"data.name": "voc/2007", "data.data_dir": str(tmp_path / "tfds")})
    with pytest.raises(FileNotFoundError, match="not prepared"):
        training.setup_training(missing, str(tmp_path / "nodata"))
    assert sorted(os.listdir(tmp_path)) == []


def test_more_steps_train_on_and_a_finished_run_appends_nothing(
    tmp_path, shapes_dir, monkeypatch, capsys, fast_compile
):
    monkeypatch.setattr(training, "set_up_compilation_cache", lambda workdir: None)
    overrides = {
        "data.data_dir": str(shapes_dir),
        "data.name": "rpn_shapes/small",
        "num_train_steps": 2,
        "log_every": 1,
        "checkpoint_every": 1,
        "data.num_eval_images": 8,
    }
    workdir = str(tmp_path / "run")
    training.train_and_evaluate(_config(**overrides), workdir)
    rows = open(os.path.join(workdir, "metrics.jsonl")).read()
    assert json.load(open(os.path.join(workdir, "config.json")))["num_train_steps"] == 2

    result = training.train_and_evaluate(_config(**overrides), workdir)  # finished: no eval
    assert "is complete (step 2 of 2)" in capsys.readouterr().out
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == rows
    assert result["AR@100"] == json.loads(rows.splitlines()[-1])["AR@100"]

    training.train_and_evaluate(_config(**{**overrides, "num_train_steps": 3}), workdir)
    out = capsys.readouterr().out
    assert "Changed on resume: num_train_steps 2 -> 3" in out
    assert "Resumed from checkpoint at step 2" in out
    steps = [(r["step"], r["split"]) for r in map(json.loads, open(workdir + "/metrics.jsonl"))]
    assert steps == [(1, "train"), (2, "train"), (2, "eval"), (3, "train"), (3, "eval")]


def test_frozen_stages_get_no_gradient_and_the_rest_the_same(fast_compile):
    """freeze_at=2 (stem + res2) vs 0 on one batch: trainable parameters move exactly as
    without freezing (their gradients do not depend on it), the frozen ones not at all, and
    the logged gradient norm counts only the trainable ones."""
    overrides = {"optim.weight_decay": 0.0, "optim.grad_clip_norm": None}
    batch = _random_batch(np.random.default_rng(5), _config(), 8)
    mesh = parallel.data_mesh(jax.devices()[:1])
    free, (m_free,) = _run_steps(_config(**overrides), mesh, "shard_map", [batch])
    held, (m_held,) = _run_steps(_config(**overrides, **{"model.freeze_at": 2}), mesh,
                                 "shard_map", [batch])  # fmt: skip
    start, _ = _run_steps(_config(**overrides), mesh, "shard_map", [])
    frozen = frozen_parameters("resnet18", 2)
    for path, before in jax.tree_util.tree_leaves_with_path(start.params):
        keys = tuple(k.key for k in path)
        after_held = _at(held.params, keys)
        if frozen(keys):
            np.testing.assert_array_equal(after_held, before)
        else:
            np.testing.assert_allclose(after_held, _at(free.params, keys), rtol=1e-5, atol=1e-7)
    assert m_held["grad_norm"] < m_free["grad_norm"]


def _at(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree
