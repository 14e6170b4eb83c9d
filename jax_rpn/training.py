"""Train and evaluate an RPN: train state, per-device steps, the loop, checkpoints, recall.

The per-device ``train_step`` and ``eval_step`` are wrapped for all devices in one place,
:func:`jax_rpn.parallel.parallelize` (``config.parallelism``: ``shard_map`` or ``pmap``).
"""

import contextlib
import functools
import os
import shutil
import sys
import time
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jax_rpn import checkpoints as checkpoints_lib
from jax_rpn import config_checks, inference, interop, parallel, recall, viz
from jax_rpn import workdir as workdir_lib
from jax_rpn.cascade_objective import cascade_objective, stage2_sample
from jax_rpn.data import pipeline
from jax_rpn.data.augment import denormalize
from jax_rpn.models import build_rpn, frozen_parameters, init_variables
from jax_rpn.objective import rpn_objective
from jax_rpn.optim import create_optimizer
from jax_rpn.settings import (
    CascadeSettings,
    LossSettings,
    PixelSettings,
    ProposalSettings,
    TargetSettings,
)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; checkpointed as one pytree."""

    step: jax.Array  # int32 scalar
    params: Any
    model_state: Any  # non-trainable variables (norm statistics)
    opt_state: Any
    key: jax.Array  # base PRNG key; step and image keys are folded in from it


def create_train_state(config, model, tx, key, *, load_init: bool = True) -> TrainState:
    """Initialise parameters at the configured padded image size, then (``load_init``) load
    ``config.init.checkpoint`` over them, printing what was loaded and what was not."""
    init_key, state_key = jax.random.split(key)
    h, w = config.data.pad_to
    variables = init_variables(model, init_key, (1, h, w, 3))
    if load_init and config.init.checkpoint:
        variables, report = interop.initialize(variables, config)
        if jax.process_index() == 0:
            print(report.summary(), flush=True)
    params = variables.pop("params")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=dict(variables),
        opt_state=tx.init(params),
        key=state_key,
    )


def _summary_writer(logdir: str):
    """tensorboardX's ``SummaryWriter`` for ``logdir``, imported without torch.

    tensorboardX imports torch whenever it is installed (3 s of every run's start-up) only to
    accept torch tensors, and the trainer writes numpy values; a torch already imported is
    left as it is.
    """
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


def _image_keys(key, step, batch_size):
    """One key per image from its global index in the batch, so sampling does not depend on
    how the batch is split over devices."""
    step_key = jax.random.fold_in(key, step)
    first = jax.lax.axis_index(parallel.AXIS) * batch_size
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first + jnp.arange(batch_size))


def apply_gradients(state, grads, metrics, new_model_state, *, tx, schedule):
    """The per-device end of a train step: gradients and metrics averaged over the devices,
    the optimizer update, and the step counted -> ``(state, metrics)``. A step whose loss or
    gradient norm is not finite keeps the old parameters, optimizer and model state and
    reports ``finite = 0``; ``grad_norm`` and ``learning_rate`` are added to the metrics."""
    grads = jax.lax.pmean(grads, parallel.AXIS)
    metrics = jax.lax.pmean(metrics, parallel.AXIS)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        model_state={**state.model_state, **new_model_state},
    )
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {
        **metrics,
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "finite": finite.astype(jnp.float32),
    }
    return new.replace(step=state.step + 1), metrics


def make_train_step(config, model, tx, schedule, *, with_proposals: bool = False):
    """Per-device ``train_step(state, batch) -> (state, metrics)``; metrics are pmean-ed.

    A step whose loss or gradients are not finite leaves parameters and optimizer state
    unchanged and reports ``finite = 0`` (the loop then stops with a message). Frozen backbone
    stages (``model.freeze_at``) get no gradient: their backward pass is not computed.

    ``with_proposals``: the step returns ``(state, metrics, proposals)``, the batch's
    proposals from the step's own outputs (before the update) with the training top-k
    (``proposals.*_train``), as the RPN of a two-stage detector hands them to its second
    stage in training (torchvision's ``RegionProposalNetwork`` in train mode). No gradient
    flows through them.

    The cascade head's stage 2 runs only at the anchors its loss samples
    (:func:`jax_rpn.cascade_objective.stage2_sample`), or at every anchor ``with_proposals``.
    """
    mutable = list(model_state_collections(config))
    frozen = frozen_parameters(config.model.backbone, config.model.freeze_at)
    settings = {
        "targets_settings": TargetSettings.from_config(config),
        "loss_settings": LossSettings.from_config(config),
    }
    stage2_at = None  # the cascade's stage 2 only where its loss reads (not for proposals)
    if config.model.head == "cascade":
        settings["cascade_settings"] = CascadeSettings.from_config(config)
        objective = functools.partial(cascade_objective, **settings)
        if not with_proposals:
            stage2_at = functools.partial(
                stage2_sample,
                targets_settings=settings["targets_settings"],
                cascade_settings=settings["cascade_settings"],
            )
    else:
        objective = functools.partial(rpn_objective, **settings)
    proposal_settings = ProposalSettings.from_config(config, train=True)

    def train_step(state, batch):
        keys = _image_keys(state.key, state.step, batch["image"].shape[0])

        def loss_fn(params):
            if frozen is not None:
                params = jax.tree_util.tree_map_with_path(
                    lambda path, p: (
                        jax.lax.stop_gradient(p) if frozen(tuple(k.key for k in path)) else p
                    ),
                    params,
                )
            variables = {"params": params, **state.model_state}
            at = None if stage2_at is None else functools.partial(stage2_at, batch=batch, key=keys)
            outputs, new_model_state = model.apply(
                variables,
                batch["image"],
                train=True,
                image_hw=batch["image_hw"],
                stage2_at=at,
                mutable=mutable,
            )
            loss, metrics = objective(outputs, batch, keys)
            return loss, (metrics, new_model_state, outputs)

        (_, (metrics, new_model_state, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        new_state, metrics = apply_gradients(
            state, grads, metrics, new_model_state, tx=tx, schedule=schedule
        )
        if not with_proposals:
            return new_state, metrics
        props = inference.proposals_from_outputs(
            jax.lax.stop_gradient(outputs),
            batch["image_hw"],
            settings=proposal_settings,
            objectness=model.objectness,
        )
        return new_state, metrics, props

    return train_step


def make_eval_step(config, model):
    """Per-device ``eval_step(state, batch) -> (proposals [b], (recall record, nonfinite))``.

    The recall record is summed over the whole global batch on device (``psum``), so one
    small record per batch comes back, the same on every host.
    """
    settings = ProposalSettings.from_config(config, train=False)

    def eval_step(state, batch):
        variables = {"params": state.params, **state.model_state}
        props = inference.proposals_from_images(
            model, variables, batch["image"], batch["image_hw"], settings=settings
        )
        valid = props.valid & batch["example_valid"][:, None]  # [b, K]
        stats = jax.vmap(recall.recall_stats)(
            props.boxes, props.scores, valid, batch["boxes"], batch["valid"], batch["ignore"]
        )
        stats = stats._replace(num_images=batch["example_valid"].astype(jnp.int32))
        stats = jax.lax.psum(jax.tree.map(lambda x: x.sum(0), stats), parallel.AXIS)
        nonfinite = jax.lax.psum(props.num_nonfinite.sum(), parallel.AXIS)
        return props, (stats, nonfinite)

    return eval_step


def model_state_collections(config) -> tuple[str, ...]:
    """Variable collections updated by the forward pass in training."""
    return ("batch_stats",) if config.model.norm == "batch_norm" else ()


class Trainer:
    """Builds the model, optimizer, steps, data and checkpoints for one config and workdir.

    Building touches no file: the workdir is created (and the config stored) when
    :meth:`train` starts, so a run rejected while building leaves nothing behind.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.lead = jax.process_index() == 0
        self.mode = config.parallelism
        self.mesh = parallel.data_mesh()
        self.model = build_rpn(config, axis_name=parallel.AXIS)
        self.tx, self.schedule = create_optimizer(
            config.optim,
            config.num_train_steps,
            frozen=frozen_parameters(config.model.backbone, config.model.freeze_at),
        )
        self.train_iter = pipeline.create_train_iterator(config)
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self._checkpoints = None
        resuming = self.latest_step() is not None  # then the workdir's weights replace init's
        self.state = jax.device_put(
            create_train_state(
                config,
                build_rpn(config),
                self.tx,
                jax.random.PRNGKey(config.seed),
                load_init=not resuming,
            ),
            self.replicated,
        )
        train_step = make_train_step(config, self.model, self.tx, self.schedule)
        eval_step = make_eval_step(config, self.model)
        self.p_train_step = parallel.parallelize(
            train_step, mode=self.mode, mesh=self.mesh, donate_state=True
        )
        self.p_eval_step = parallel.parallelize(
            eval_step, mode=self.mode, mesh=self.mesh, replicated_out=(False, True)
        )

    # Checkpoints -------------------------------------------------------------------------

    @property
    def checkpoints(self) -> ocp.CheckpointManager:
        if self._checkpoints is None:
            self._checkpoints = ocp.CheckpointManager(
                os.path.join(self.workdir, checkpoints_lib.CHECKPOINTS_DIR),
                item_names=("state", "data"),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=self.config.keep_checkpoints,
                    create=True,
                    enable_async_checkpointing=False,
                ),
            )
        return self._checkpoints

    def latest_step(self) -> int | None:
        """The step of the workdir's latest checkpoint, or None (reads without creating)."""
        path = os.path.join(self.workdir, checkpoints_lib.CHECKPOINTS_DIR)
        return self.checkpoints.latest_step() if os.path.isdir(path) else None

    def restore(self) -> bool:
        """Resume from the latest checkpoint in the workdir; False if there is none."""
        step = self.latest_step()
        if step is None:
            return False
        restored = self.checkpoints.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(jax.device_get(self.state)),
                data=grain.checkpoint.CheckpointRestore(self.train_iter),
            ),
        )
        self.state = jax.device_put(restored["state"], self.replicated)
        return True

    def save(self) -> None:
        step = int(self.state.step)
        self.checkpoints.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(jax.device_get(self.state)),
                data=grain.checkpoint.CheckpointSave(self.train_iter),
            ),
            force=True,
        )
        self.checkpoints.wait_until_finished()

    # Evaluation --------------------------------------------------------------------------

    def evaluate(self, *, writer=None, step: int | None = None) -> dict[str, float]:
        """Proposal recall on the eval split; writes pictures and curves into the workdir."""
        config = self.config
        acc = recall.RecallAccumulator()
        vis, nonfinite = None, 0
        batches = tqdm(
            pipeline.create_eval_iterator(config),
            total=pipeline.dataset_info(config).num_eval_batches,
            desc="eval",
            unit="batch",
            leave=False,
            disable=not (self.lead and _interactive()),
        )
        for batch in batches:
            props, (stats, bad) = self.p_eval_step(
                self.state, parallel.shard_batch(batch, mode=self.mode, mesh=self.mesh)
            )
            acc.update(jax.device_get(stats))
            nonfinite += int(bad)
            if vis is None and config.num_vis_images:
                unshard = functools.partial(parallel.unshard, mode=self.mode)
                vis = (batch, jax.tree.map(unshard, props))
        result = acc.result()
        result["nonfinite_proposals"] = nonfinite
        step = int(self.state.step) if step is None else step
        if self.lead:
            self._write_eval_pictures(acc, vis, step, writer)
            if nonfinite:
                num = result["num_images"] * config.proposals.post_nms_topk_test
                _warn(
                    f"step {step}: {nonfinite} anchors of {result['num_images']} eval images "
                    f"gave non-finite scores or boxes ({num} proposal slots): the model is "
                    f"diverging. {_LIKELY_CAUSES(config)}"
                )
        return result

    def evaluate_and_record(self) -> dict[str, float]:
        """Evaluate the current state, print the recall table and record it in
        ``metrics.jsonl`` (replacing an earlier evaluation of the same step)."""
        step = int(self.state.step)
        result = self.evaluate(step=step)
        if self.lead:
            log = workdir_lib.MetricsLog(os.path.join(self.workdir, "metrics.jsonl"))
            log.write(step, "eval", result)
            print(recall.format_recall_table(result, title=f"Recall at step {step}"))
        return result

    def _write_eval_pictures(self, acc, vis, step, writer):
        out = os.path.join(self.workdir, "eval")
        os.makedirs(out, exist_ok=True)
        figures = [
            (
                "recall_curves",
                viz.plot_recall_curves(acc.curves(), os.path.join(out, f"recall_{step}.png")),
            )
        ]
        if vis is not None:
            batch, props = vis
            n = min(self.config.num_vis_images, len(batch["image"]))
            pixels = PixelSettings.from_config(self.config)
            grid = viz.plot_proposal_grid(
                denormalize(batch["image"][:n], pixels),
                batch["boxes"][:n],
                batch["valid"][:n],
                props.boxes[:n],
                props.scores[:n],
                props.valid[:n],
                os.path.join(out, f"proposals_{step}.png"),
            )
            figures.append(("proposals", grid))
        if writer is not None:
            for tag, fig in figures:
                writer.add_image(f"eval/{tag}", viz.figure_to_array(fig), step, dataformats="HWC")

    # Training ----------------------------------------------------------------------------

    def train(self, *, restart: bool = False, changes=()) -> dict[str, float]:
        """Train to ``config.num_train_steps`` (resuming if possible); returns final recall.

        ``restart`` first removes a previous run's files from the workdir; ``changes`` (from
        :func:`jax_rpn.workdir.prepare`) are announced. A finished run prints its stored final
        recall and returns it without evaluating again.
        """
        config = self.config
        if restart and self.lead:
            removed = workdir_lib.clear(self.workdir)
            if removed:
                print(f"Starting over in {self.workdir}: removed {', '.join(removed)}", flush=True)
        if self.lead:
            os.makedirs(self.workdir, exist_ok=True)
            checkpoints_lib.write_config(self.workdir, config)
        log = workdir_lib.MetricsLog(os.path.join(self.workdir, "metrics.jsonl"))
        resumed = self.restore()
        start = int(self.state.step)
        log.truncate(start)
        if start > config.num_train_steps:
            raise ValueError(
                f"{self.workdir} has a checkpoint at step {start}, past "
                f"config.num_train_steps={config.num_train_steps}: evaluate it with --mode eval, "
                "or train longer"
            )
        final = log.find(start, "eval")
        if start == config.num_train_steps and final is not None:
            result = {k: v for k, v in final.items() if k not in ("step", "split")}
            if self.lead:
                print(
                    f"The run in {self.workdir} is complete (step {start} of {start}); its final "
                    "recall, from metrics.jsonl (--mode eval evaluates again; a larger "
                    "--config.num_train_steps trains on):"
                )
                print(recall.format_recall_table(result, title=f"Recall at step {start}"))
            return result
        if self.lead:
            for field, old, new in changes:
                print(f"Changed on resume: {field} {old!r} -> {new!r}", flush=True)
            if resumed:
                print(f"Resumed from checkpoint at step {start} in {self.workdir}", flush=True)
            devices = jax.devices()
            print(
                f"Training on {len(devices)} {devices[0].platform} device(s) in "
                f"{jax.process_count()} process(es), "
                f"{config.batch_size // len(devices)} images per device",
                flush=True,
            )
        with contextlib.ExitStack() as stack:
            writer = None
            if self.lead:
                writer = stack.enter_context(
                    _summary_writer(os.path.join(self.workdir, "tensorboard"))
                )
            bar = stack.enter_context(
                tqdm(
                    total=config.num_train_steps,
                    initial=start,
                    disable=not (self.lead and _interactive()),
                    desc="train",
                    unit="step",
                    dynamic_ncols=True,
                )
            )
            monitor = _DivergenceMonitor(config)
            pending = None  # the previous step's metrics, read one step late (device busy)
            history = []
            t0, steps_timed = time.perf_counter(), 0
            for step in range(start + 1, config.num_train_steps + 1):
                batch = parallel.shard_batch(next(self.train_iter), mode=self.mode, mesh=self.mesh)
                if step == start + 1:
                    self.state, metrics = self._first_step(batch, bar)
                    t0 = time.perf_counter()
                else:
                    self.state, metrics = self.p_train_step(self.state, batch)
                    steps_timed += 1
                if pending is not None:
                    history.append(self._check(*pending))
                pending = (step, metrics)
                bar.update(1)
                last = step == config.num_train_steps
                if step % config.log_every == 0 or last:
                    history.append(self._check(*pending))
                    pending = None
                    summary = _mean_metrics(history)
                    if steps_timed:
                        summary["steps_per_sec"] = steps_timed / (time.perf_counter() - t0)
                    history, t0, steps_timed = [], time.perf_counter(), 0
                    if self.lead:
                        monitor.update(step, summary)
                        _log_train(bar, step, config.num_train_steps, summary)
                        _write_metrics(writer, log, step, summary, prefix="train")
                if step % config.checkpoint_every == 0 or last:
                    if pending is not None:
                        history.append(self._check(*pending))
                        pending = None
                    self.save()
                if step % config.eval_every == 0 and not last:
                    result = self.evaluate(writer=writer, step=step)
                    if self.lead:
                        _write_metrics(writer, log, step, result, prefix="eval")
                        bar.write(f"step {step}: " + recall.short_recall(result))
            bar.close()
            result = self.evaluate(writer=writer)
            if self.lead:
                step = int(self.state.step)
                _write_metrics(writer, log, step, result, prefix="eval")
                print(recall.format_recall_table(result, title=f"Recall at step {step}"))
            return result

    def _first_step(self, batch, bar):
        """The first step of a run, which compiles the train step: timed and announced."""
        message = "Compiling the train step ..."
        if self.lead:
            bar.write(message) if _interactive() else print(message, flush=True)
        t = time.perf_counter()
        state, metrics = self.p_train_step(self.state, batch)
        jax.block_until_ready(metrics)
        if self.lead:
            done = f"Compiled and ran the first step in {time.perf_counter() - t:.1f} s"
            bar.write(done) if _interactive() else print(done, flush=True)
        return state, metrics

    def _check(self, step, metrics):
        metrics = jax.device_get(metrics)
        if not metrics.pop("finite"):
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}); "
                f"training stopped, the last good checkpoint in {self.workdir} is kept. "
                f"{_LIKELY_CAUSES(self.config)}"
            )
        return {k: float(v) for k, v in metrics.items()}


def _interactive() -> bool:
    """Progress bars only on a terminal (tqdm writes to stderr); plain lines otherwise."""
    return sys.stderr.isatty()


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _LIKELY_CAUSES(config) -> str:  # noqa: N802 (reads as a phrase)
    causes = [f"the learning rate (optim.learning_rate={config.optim.learning_rate})"]
    if config.model.norm == "frozen_bn":
        causes.append("frozen BN without pretrained weights (model.norm=frozen_bn)")
    if config.model.dtype != "float32":
        causes.append(f"a {config.model.dtype} overflow (model.dtype)")
    return "Likely causes: " + "; ".join(causes) + "."


class _DivergenceMonitor:
    """Warns once when the logged loss or gradient norm grows 100x over its lowest value."""

    FACTOR = 100.0

    def __init__(self, config):
        self.config = config
        self.lowest: dict[str, float] = {}
        self.warned = False

    def update(self, step: int, summary: dict) -> None:
        for key in ("loss", "grad_norm"):
            value = summary.get(key)
            if value is None:
                continue
            low = self.lowest.get(key)
            if low is not None and value > self.FACTOR * max(low, 1e-8) and not self.warned:
                self.warned = True
                _warn(
                    f"step {step}: {key} {value:.4g} is over {self.FACTOR:g}x its lowest logged "
                    f"value {low:.4g}: the run is diverging. {_LIKELY_CAUSES(self.config)}"
                )
            self.lowest[key] = value if low is None else min(low, value)


def _log_train(bar, step, total, summary):
    """The logged training metrics: on the bar on a terminal, as a plain line otherwise."""
    rate = summary.get("steps_per_sec")
    if _interactive():
        postfix = {"loss": f"{summary['loss']:.4f}"}
        if rate:
            postfix["steps_s"] = f"{rate:.2f}"
        bar.set_postfix(postfix)
    else:
        speed = f", {rate:.2f} steps/s" if rate else ""
        print(f"step {step}/{total}: loss {summary['loss']:.4f}{speed}", flush=True)


def _mean_metrics(history):
    return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def _write_metrics(writer, log, step, metrics, *, prefix):
    for k, v in metrics.items():
        writer.add_scalar(f"{prefix}/{k.replace('@', '_')}", v, step)
    writer.flush()
    log.write(step, prefix, metrics)


def set_up_compilation_cache(workdir: str) -> None:
    """Persistent XLA compilation cache in the workdir (fast restarts and re-runs), unless one
    is set already (``JAX_COMPILATION_CACHE_DIR``)."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, restart: bool = False
) -> dict[str, float]:
    """Train (resuming from ``workdir`` if it holds a checkpoint), then report recall.

    ``restart`` starts over in a workdir whose config differs in fields that cannot change on
    resume (:mod:`jax_rpn.workdir`). See :func:`setup_training` for what is checked first.
    """
    trainer, changes = setup_training(config, workdir, restart=restart)
    return trainer.train(restart=restart, changes=changes)


def setup_training(config, workdir: str, *, restart: bool = False):
    """Check ``config`` and the workdir and build the :class:`Trainer` -> ``(trainer,
    resumable changes)``. Raises ValueError / FileNotFoundError with a readable message (bad
    config, config changed, dataset not prepared) and then leaves no new workdir behind."""
    config_checks.validate(config)
    changes = workdir_lib.prepare(config, workdir, restart=restart)
    existed = os.path.isdir(workdir)
    try:
        set_up_compilation_cache(workdir)
        return Trainer(config, workdir), changes
    except BaseException:
        if not existed:
            shutil.rmtree(workdir, ignore_errors=True)  # e.g. the compilation cache
        raise


def setup_evaluation(config: ml_collections.ConfigDict, workdir: str) -> Trainer:
    """A :class:`Trainer` restored from ``workdir``'s latest checkpoint, for evaluation.

    Raises FileNotFoundError (no checkpoint; nothing is created) or the errors of
    :func:`setup_training` (a config that changes the model, anchors, ... of the workdir's).
    """
    missing = FileNotFoundError(
        f"no checkpoint in {os.path.join(workdir, checkpoints_lib.CHECKPOINTS_DIR)}: train "
        "first, or point --workdir at a training workdir"
    )
    if not os.path.isdir(os.path.join(workdir, checkpoints_lib.CHECKPOINTS_DIR)):
        raise missing
    trainer, _ = setup_training(config, workdir)
    if not trainer.restore():
        raise missing
    return trainer


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluate the latest checkpoint in ``workdir`` (:meth:`Trainer.evaluate_and_record`)."""
    return setup_evaluation(config, workdir).evaluate_and_record()
