"""Speed of the full RPN train step: steps/s, images/s, compile time, RPN overhead, memory.

For each config (``configs/default.py`` and its Cascade RPN variant ``configs/cascade.py`` as
they are, the cascade also with three anchors per cell (``cascade_a3``);
``configs/coco_r50_fpn.py`` at a CPU-feasible ``pad_to`` 256x384 and batch 2) the
train step is built exactly as the trainer builds it (``build_rpn``, ``create_optimizer``,
``create_train_state``, ``make_train_step``, ``parallel.parallelize``) and fed a random batch
of the pipeline's structure.

- steps/s, images/s: median over timed steps after warm-up (state threaded through); the
  full step and the two variants below are timed in turn, round after round, each timed call
  right after an untimed call of the same step, as in a training loop (timed straight after
  the other variants instead, the default's step measured 1.14x and the cascade's 1.26x
  slower in one session: benchmarks/README.md, eighteenth session).
- compile: ``p_train_step.lower(state, batch)`` and ``.compile()`` times, measured in a fresh
  subprocess twice with the same persistent compilation cache directory
  (``jax_persistent_cache_min_compile_time_secs=0``): cold (empty cache), then warm.
- RPN overhead: the same step with the loss replaced by a dummy loss on the backbone + neck
  features (head, anchors, targets and RPN losses dropped; optimizer update kept), and with a
  dummy loss on the head outputs (targets and RPN losses dropped). Overhead = 1 - time of the
  features-only step / time of the full step; the second variant splits it into head vs
  targets + losses (for the cascade, the dummy loss reads stage 2's outputs at every anchor,
  as inference does, where the full step runs stage 2 at the sampled anchors only, so its
  head share can exceed its whole overhead). The same shares of XLA's FLOP count
  (``cost_analysis``) are printed
  beside them: where time and FLOP shares agree, the share is bound by arithmetic, not by
  how it is compiled.
- memory: the XLA temporary buffers of the compiled step (``memory_analysis``), and the peak
  resident memory of the cold subprocess (imports, state, compile and one step).

Run from the repository root: ``python benchmarks/train_step.py`` (``--quick``: the default
config only, fewer steps; ``--set model.head_dim=16``, repeatable: change a config field;
``--cpu-devices 2``: split the CPU into devices as ``train.py`` does by default).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402

# name -> (config module, overrides): coco_r50_fpn shrunk to something a 2-core CPU can step.
CONFIGS = {
    "default": ("configs.default", {}),
    "cascade": ("configs.cascade", {}),
    # Cascade RPN with three anchors per cell (one size per level, ratios 0.5, 1, 2).
    "cascade_a3": ("configs.cascade", {"anchors.aspect_ratios": (0.5, 1.0, 2.0)}),
    "coco_r50_fpn": ("configs.coco_r50_fpn", {"data.pad_to": (256, 384), "batch_size": 2}),
}


def load_config(name: str, settings: tuple[str, ...] = ()):
    """The named config with its CPU-size overrides, then ``settings`` ("field.path=value",
    the value parsed as a Python literal, e.g. ``model.head_dim=16``) applied."""
    module, overrides = CONFIGS[name]
    return common.load_config(module, overrides, settings)


def make_partial_step(config, model, tx, *, upto: str):
    """Per-device step like ``make_train_step`` but with a dummy loss (mean of squares) on the
    backbone + neck features (``upto="features"``) or on the head outputs (``"head"``)."""
    from jax_rpn import parallel, training

    mutable = list(training.model_state_collections(config))

    def train_step(state, batch):
        def loss_fn(params):
            variables = {"params": params, **state.model_state}
            if upto == "features":
                outputs, new_model_state = model.apply(
                    variables, batch["image"], train=True, method="features", mutable=mutable
                )
            else:
                out, new_model_state = model.apply(
                    variables, batch["image"], train=True, mutable=mutable
                )
                outputs = list(out.objectness) + list(out.deltas)
            loss = sum(jnp.mean(jnp.square(o.astype(jnp.float32))) for o in outputs)
            return loss, new_model_state

        (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = jax.lax.pmean(grads, parallel.AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            model_state={**state.model_state, **new_model_state},
        )
        return new, {"loss": jax.lax.pmean(loss, parallel.AXIS)}

    return train_step


def build(config, *, variant: str = "full"):
    """(jitted step, replicated state, sharded batch) as ``jax_rpn.training.Trainer`` builds
    them (the step donates the state it is given); ``variant`` "full", "features" or "head"
    (see :func:`make_partial_step`)."""
    from jax_rpn import parallel, training
    from jax_rpn.models import build_rpn
    from jax_rpn.optim import create_optimizer

    mesh = parallel.data_mesh()
    model = build_rpn(config, axis_name=parallel.AXIS)
    tx, schedule = create_optimizer(config.optim, config.num_train_steps)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = training.create_train_state(
        config, build_rpn(config), tx, jax.random.PRNGKey(config.seed)
    )
    state = jax.device_put(state, replicated)
    if variant == "full":
        per_device = training.make_train_step(config, model, tx, schedule)
    else:
        per_device = make_partial_step(config, model, tx, upto=variant)
    step = parallel.parallelize(
        per_device,
        mode=config.parallelism,
        mesh=mesh,
        replicated_out=(True, True),
        donate_state=True,
    )
    batch = parallel.shard_batch(common.random_batch(config), mode=config.parallelism, mesh=mesh)
    return step, state, batch


def compile_only(name: str, cache_dir: str, settings: tuple[str, ...] = ()) -> dict:
    """In this process: build the full step, time ``lower`` and ``compile``, run one step."""
    common.set_compilation_cache(cache_dir)
    config = load_config(name, settings)
    step, state, batch = build(config)
    before = len(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else 0
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    stats = compiled.memory_analysis()
    common.block(compiled(state, batch))  # one step: the process peak covers a whole step
    return {
        "lower_s": lowered_at - start,
        "compile_s": done - lowered_at,
        "cache_entries_before": before,
        "xla_temp_mib": stats.temp_size_in_bytes / 2**20,
        "peak_mib": common.peak_memory_mib(),
    }


def compile_in_subprocess(name: str, cache_dir: str, settings: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--compile-only", name]
    cmd += ["--cache-dir", cache_dir] + [f"--set={s}" for s in settings]
    cmd += [f"--cpu-devices={jax.config.jax_num_cpu_devices}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"compile subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compiled_flops(compiled) -> float:
    """Floating-point operations of one call of a compiled step, by XLA's cost analysis."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # a list of one dict on older jax
    return float(cost["flops"])


def step_fn(step, state, batch):
    """A no-argument call of ``step`` that threads the state from one call to the next."""
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

    return one


def bench_config(
    name: str, *, repeats: int, warmup: int, cache_root: str, settings: tuple[str, ...] = ()
) -> dict:
    config = load_config(name, settings)
    cache_dir = os.path.join(cache_root, name)
    cold = compile_in_subprocess(name, cache_dir, settings)
    warm = compile_in_subprocess(name, cache_dir, settings)
    common.set_compilation_cache(cache_dir)  # the full step below then loads from the warm cache

    calls, flops = {}, {}
    for variant in ("full", "features", "head"):
        step, state, batch = build(config, variant=variant)
        compiled = step.lower(state, batch).compile()
        flops[variant] = compiled_flops(compiled)
        state, _ = common.block(compiled(state, batch))  # first step (the state is donated)
        calls[variant] = step_fn(compiled, state, batch)
    # Interleaved, so load changes on the shared machine hit the three variants alike.
    times = common.time_interleaved(calls, repeats=repeats, warmup=warmup, back_to_back=True)

    full, feat, head = (times[v]["median"] for v in ("full", "features", "head"))
    b = config.batch_size
    return {
        "config": name,
        "image": f"{config.data.pad_to[0]}x{config.data.pad_to[1]}",
        "batch": b,
        "max_boxes": config.data.max_boxes,
        "step_s": full,
        "steps_per_s": 1.0 / full,
        "images_per_s": b / full,
        "features_step_s": feat,
        "head_step_s": head,
        "rpn_overhead": 1.0 - feat / full,
        "head_share": (head - feat) / full,
        "targets_loss_share": 1.0 - head / full,
        "step_gflop": flops["full"] / 1e9,
        "rpn_overhead_flops": 1.0 - flops["features"] / flops["full"],
        "head_share_flops": (flops["head"] - flops["features"]) / flops["full"],
        "targets_loss_share_flops": 1.0 - flops["head"] / flops["full"],
        "compile_cold_s": cold["lower_s"] + cold["compile_s"],
        "compile_cold_xla_s": cold["compile_s"],
        "compile_warm_s": warm["lower_s"] + warm["compile_s"],
        "compile_warm_xla_s": warm["compile_s"],
        "warm_cache_entries": warm["cache_entries_before"],
        "xla_temp_mib": cold["xla_temp_mib"],
        "process_peak_mib": cold["peak_mib"],
    }


def share(time_fraction: float, flop_fraction: float) -> str:
    """``"8.0% (2.8%)"``: a share of step time, its share of FLOPs in brackets."""
    return f"{100 * time_fraction:.1f}% ({100 * flop_fraction:.1f}%)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="default config, 4 rounds")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field in every config, e.g. --set model.head_dim=16",
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=1,
        help="split the CPU into this many devices, as train.py does (--cpu_devices)",
    )
    parser.add_argument("--compile-only", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    common.add_malloc_flag(parser)
    args = parser.parse_args()
    malloc = common.set_malloc(args)
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.compile_only:
        print(json.dumps(compile_only(args.compile_only, args.cache_dir, tuple(args.set))))
        return
    if args.quick:
        args.configs, args.repeats = ["default"], 4
    print(f"machine: {common.machine()}; {malloc}")
    if args.set:
        print(f"config changes: {', '.join(args.set)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="jax_rpn_bench_cache_") as cache_root:
        for name in args.configs:
            result = bench_config(
                name,
                repeats=args.repeats,
                warmup=1,
                cache_root=cache_root,
                settings=tuple(args.set),
            )
            results.append(result)
            print(json.dumps(results[-1]))

    print("\nTrain step (median over steps)")
    print(
        common.table(
            ["config", "image", "batch", "G", "step s", "steps/s", "images/s"]
            + ["XLA temp MiB", "process peak MiB"],
            [
                [r["config"], r["image"], r["batch"], r["max_boxes"], r["step_s"]]
                + [r["steps_per_s"], r["images_per_s"], r["xla_temp_mib"]]
                + [r["process_peak_mib"]]
                for r in results
            ],
        )
    )
    print("\nCompile time of the train step (lower + compile; XLA compile alone in brackets)")
    print(
        common.table(
            ["config", "cold s", "warm cache s"],
            [
                [r["config"], f"{r['compile_cold_s']:.1f} ({r['compile_cold_xla_s']:.1f})"]
                + [f"{r['compile_warm_s']:.1f} ({r['compile_warm_xla_s']:.1f})"]
                for r in results
            ],
        )
    )
    print("\nShare of the step outside backbone + neck: time, and XLA's FLOP count in brackets")
    print(
        common.table(
            ["config", "full step s", "backbone+neck step s", "+ head step s", "step GFLOP"]
            + ["RPN overhead", "of which head", "of which targets + losses"],
            [
                [r["config"], r["step_s"], r["features_step_s"], r["head_step_s"]]
                + [f"{r['step_gflop']:.1f}"]
                + [share(r["rpn_overhead"], r["rpn_overhead_flops"])]
                + [share(r["head_share"], r["head_share_flops"])]
                + [share(r["targets_loss_share"], r["targets_loss_share_flops"])]
                for r in results
            ],
        )
    )


if __name__ == "__main__":
    main()
