"""Train and evaluate an RPN: train state, per-device steps, the loop, checkpoints, recall.

The per-device ``train_step`` and ``eval_step`` are wrapped for all devices in one place,
:func:`jax_rpn.parallel.parallelize` (``config.parallelism``: ``shard_map`` or ``pmap``).
"""

import contextlib
import functools
import json
import os
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

from jax_rpn import config_checks, inference, parallel, recall, viz
from jax_rpn.data import pipeline
from jax_rpn.models import build_rpn, init_variables
from jax_rpn.objective import rpn_objective
from jax_rpn.optim import create_optimizer
from jax_rpn.settings import LossSettings, ProposalSettings, TargetSettings


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; checkpointed as one pytree."""

    step: jax.Array  # int32 scalar
    params: Any
    model_state: Any  # non-trainable variables (norm statistics)
    opt_state: Any
    key: jax.Array  # base PRNG key; step and image keys are folded in from it


def create_train_state(config, model, tx, key) -> TrainState:
    """Initialise parameters at the configured padded image size."""
    init_key, state_key = jax.random.split(key)
    h, w = config.data.pad_to
    variables = init_variables(model, init_key, (1, h, w, 3))
    params = variables.pop("params")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=dict(variables),
        opt_state=tx.init(params),
        key=state_key,
    )


def _image_keys(key, step, batch_size):
    """One key per image from its global index in the batch, so sampling does not depend on
    how the batch is split over devices."""
    step_key = jax.random.fold_in(key, step)
    first = jax.lax.axis_index(parallel.AXIS) * batch_size
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first + jnp.arange(batch_size))


def make_train_step(config, model, tx, schedule):
    """Per-device ``train_step(state, batch) -> (state, metrics)``; metrics are pmean-ed.

    A step whose loss or gradients are not finite leaves parameters and optimizer state
    unchanged and reports ``finite = 0`` (the loop then stops with a message).
    """
    mutable = list(model_state_collections(config))
    objective = functools.partial(
        rpn_objective,
        targets_settings=TargetSettings.from_config(config),
        loss_settings=LossSettings.from_config(config),
    )

    def train_step(state, batch):
        keys = _image_keys(state.key, state.step, batch["image"].shape[0])

        def loss_fn(params):
            variables = {"params": params, **state.model_state}
            outputs, new_model_state = model.apply(
                variables, batch["image"], train=True, mutable=mutable
            )
            loss, metrics = objective(outputs, batch, keys)
            return loss, (metrics, new_model_state)

        (_, (metrics, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
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
    """Builds the model, optimizer, steps, data and checkpoints for one config and workdir."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        config_checks.validate(config)
        self.config = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.mode = config.parallelism
        self.mesh = parallel.data_mesh()
        self.model = build_rpn(config, axis_name=parallel.AXIS)
        self.tx, self.schedule = create_optimizer(config.optim, config.num_train_steps)
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.state = jax.device_put(
            create_train_state(config, build_rpn(config), self.tx, jax.random.PRNGKey(config.seed)),
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
        self.train_iter = pipeline.create_train_iterator(config)
        self.checkpoints = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints"),
            item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=False
            ),
        )

    # Checkpoints -------------------------------------------------------------------------

    def restore(self) -> bool:
        """Resume from the latest checkpoint in the workdir; False if there is none."""
        step = self.checkpoints.latest_step()
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
            disable=jax.process_index() != 0,
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
        if jax.process_index() == 0:
            step = int(self.state.step) if step is None else step
            self._write_eval_pictures(acc, vis, step, writer)
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
            grid = viz.plot_proposal_grid(
                batch["image"][:n],
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

    def train(self) -> dict[str, float]:
        """Train to ``config.num_train_steps`` (resuming if possible); returns final recall."""
        from tensorboardX import SummaryWriter

        config = self.config
        resumed = self.restore()
        start = int(self.state.step)
        lead = jax.process_index() == 0
        if resumed and lead:
            print(f"Resumed from checkpoint at step {start} in {self.workdir}", flush=True)
        if lead:
            devices = jax.devices()
            print(
                f"Training on {len(devices)} {devices[0].platform} device(s) in "
                f"{jax.process_count()} process(es), "
                f"{config.batch_size // len(devices)} images per device",
                flush=True,
            )
        with contextlib.ExitStack() as stack:
            writer = metrics_file = None
            if lead:
                writer = stack.enter_context(
                    SummaryWriter(os.path.join(self.workdir, "tensorboard"))
                )
                metrics_file = stack.enter_context(
                    open(os.path.join(self.workdir, "metrics.jsonl"), "a")
                )
            bar = stack.enter_context(
                tqdm(
                    total=config.num_train_steps,
                    initial=start,
                    disable=not lead,
                    desc="train",
                    unit="step",
                    dynamic_ncols=True,
                )
            )
            pending = None  # the previous step's metrics, read one step late (device busy)
            history = []
            t0, steps_timed = time.perf_counter(), 0
            for step in range(start + 1, config.num_train_steps + 1):
                batch = parallel.shard_batch(next(self.train_iter), mode=self.mode, mesh=self.mesh)
                self.state, metrics = self.p_train_step(self.state, batch)
                if pending is not None:
                    history.append(self._check(*pending))
                pending = (step, metrics)
                steps_timed += 1
                bar.update(1)
                last = step == config.num_train_steps
                if step % config.log_every == 0 or last:
                    history.append(self._check(*pending))
                    pending = None
                    rate = steps_timed / (time.perf_counter() - t0)
                    summary = _mean_metrics(history)
                    summary["steps_per_sec"] = rate
                    history, t0, steps_timed = [], time.perf_counter(), 0
                    bar.set_postfix(loss=f"{summary['loss']:.4f}", steps_s=f"{rate:.2f}")
                    if lead:
                        _write_metrics(writer, metrics_file, step, summary, prefix="train")
                if step % config.checkpoint_every == 0 or last:
                    if pending is not None:
                        history.append(self._check(*pending))
                        pending = None
                    self.save()
                if step % config.eval_every == 0 and not last:
                    result = self.evaluate(writer=writer, step=step)
                    if lead:
                        _write_metrics(writer, metrics_file, step, result, prefix="eval")
                        bar.write(f"step {step}: " + recall.short_recall(result))
            bar.close()
            result = self.evaluate(writer=writer)
            if lead:
                step = int(self.state.step)
                _write_metrics(writer, metrics_file, step, result, prefix="eval")
                print(recall.format_recall_table(result, title=f"Recall at step {step}"))
            return result

    def _check(self, step, metrics):
        metrics = jax.device_get(metrics)
        if not metrics.pop("finite"):
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}); "
                f"training stopped, the last good checkpoint in {self.workdir} is kept. "
                "Lower optim.learning_rate or set optim.grad_clip_norm."
            )
        return {k: float(v) for k, v in metrics.items()}


def _mean_metrics(history):
    return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def _write_metrics(writer, metrics_file, step, metrics, *, prefix):
    for k, v in metrics.items():
        writer.add_scalar(f"{prefix}/{k.replace('@', '_')}", v, step)
    writer.flush()
    metrics_file.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
    metrics_file.flush()


def set_up_compilation_cache(workdir: str) -> None:
    """Persistent XLA compilation cache in the workdir (fast restarts and re-runs), unless one
    is set already (``JAX_COMPILATION_CACHE_DIR``)."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (resuming from ``workdir`` if it holds a checkpoint), then report recall."""
    set_up_compilation_cache(workdir)
    return Trainer(config, workdir).train()


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluate the latest checkpoint in ``workdir`` and print the recall table."""
    set_up_compilation_cache(workdir)
    trainer = Trainer(config, workdir)
    if not trainer.restore():
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    result = trainer.evaluate()
    if jax.process_index() == 0:
        print(recall.format_recall_table(result, title=f"Recall at step {int(trainer.state.step)}"))
    return result
