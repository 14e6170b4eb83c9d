"""Does the input pipeline keep up with the train step? Step time with synthetic on-device
input vs the real ``rpn_shapes`` pipeline, run as ``train.py`` runs it.

    python benchmarks/input_pipeline.py           # 3 rounds of 20 steps per variant
    python benchmarks/input_pipeline.py --quick   # 2 rounds of 8 steps
    python benchmarks/input_pipeline.py --config cascade --set 'data.data_dir="/data/tfds"'

``configs/default.py`` (or ``--config NAME``: ``configs/NAME.py``) through
``jax_rpn.training.Trainer`` (its ``p_train_step``, state, mesh and
``pipeline.create_train_iterator``: grain, decode + augment + pad in 2 threads,
``data.num_workers`` worker processes), on one JAX CPU device per core as ``train.py``
splits the CPU, with huge pages as ``train.py`` asks for them (``--glibc-malloc``: without).
The loop is ``Trainer.train``'s: shard the host batch, step, read the
previous step's metrics. Variants, taking turns round after round:

- ``device``: one batch placed on the devices once and reused (no input cost at all);
- ``host``: one numpy batch, ``parallel.shard_batch`` every step (host -> device copy);
- ``pipeline``: ``next(train_iter)`` + ``shard_batch`` every step (the real input);
- ``pipeline alone``: ``next(train_iter)`` only, no step: how fast the pipeline can go.

The pipeline starves the step if ``pipeline`` steps are slower than ``host`` steps; its
headroom is the ``pipeline alone`` rate over the step rate. The time the loop waits in
``next()`` is reported too.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402


def run_steps(trainer, next_batch, steps: int) -> tuple[float, float]:
    """``steps`` iterations of ``Trainer.train``'s loop -> (seconds per step, seconds per
    step spent getting the batch)."""
    from jax_rpn import parallel

    pending, waited = None, 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next_batch()
        waited += time.perf_counter() - t
        batch = parallel.shard_batch(batch, mode=trainer.mode, mesh=trainer.mesh)
        trainer.state, metrics = trainer.p_train_step(trainer.state, batch)
        if pending is not None:
            jax.device_get(pending)
        pending = metrics
    jax.device_get(pending)
    return (time.perf_counter() - start) / steps, waited / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps per variant and round")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 8 steps")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field, e.g. --set data.num_workers=1",
    )
    parser.add_argument("--cpu-devices", type=int, default=None, help="default: as train.py")
    configs = sorted(p.stem for p in Path(__file__).parents[1].joinpath("configs").glob("[!_]*.py"))
    parser.add_argument("--config", default="default", choices=configs, help="configs/<name>.py")
    common.add_malloc_flag(parser)
    args = parser.parse_args()
    malloc = common.set_malloc(args)
    if args.quick:
        args.rounds, args.steps = 2, 8
    from jax_rpn import parallel, training

    config = common.load_config(f"configs.{args.config}", settings=tuple(args.set))
    devices = args.cpu_devices or parallel.cpu_devices_for(config.batch_size)
    jax.config.update("jax_num_cpu_devices", devices)
    print(f"machine: {common.machine()}; {malloc}")
    with tempfile.TemporaryDirectory(prefix="jax_rpn_input_") as workdir:
        trainer = training.Trainer(config, workdir)
        it = trainer.train_iter
        host_batch = next(it)
        on_device = parallel.shard_batch(host_batch, mode=trainer.mode, mesh=trainer.mesh)
        variants = {
            "device": lambda: on_device,
            "host": lambda: host_batch,
            "pipeline": lambda: next(it),
        }
        run_steps(trainer, variants["host"], 2)  # compile
        load_before = common.load_average()
        step_s = {name: [] for name in variants}
        wait_s = {name: [] for name in variants}
        alone = []
        for _ in range(args.rounds):
            for name, next_batch in variants.items():
                s, w = run_steps(trainer, next_batch, args.steps)
                step_s[name].append(s)
                wait_s[name].append(w)
            start = time.perf_counter()
            for _ in range(args.steps):
                next(it)
            alone.append((time.perf_counter() - start) / args.steps)
        load_after = common.load_average()

    med = {name: statistics.median(v) for name, v in step_s.items()}
    pipeline_alone = statistics.median(alone)
    b = config.batch_size
    rows = [
        [name, med[name] * 1e3, b / med[name], statistics.median(wait_s[name]) * 1e3]
        + [f"{med[name] / med['device']:.3f}"]
        for name in variants
    ]
    rows.append(["pipeline alone (no step)", pipeline_alone * 1e3, b / pipeline_alone, "-", "-"])
    print(
        f"\nconfigs/{args.config}.py (batch {b}, {config.data.pad_to[0]}x{config.data.pad_to[1]}, "
        f"data.num_workers={config.data.num_workers}, {len(jax.devices())} devices, "
        f"{os.cpu_count()} cores): median over {args.rounds} rounds of {args.steps} steps; "
        f"{load_before} before, {load_after} after\n"
    )
    print(
        common.table(
            ["input", "ms per step", "images/s", "ms waiting for the batch", "step / device step"],
            rows,
        )
    )
    headroom = med["host"] / pipeline_alone
    print(
        f"\npipeline alone makes batches {headroom:.1f}x as fast as the step consumes them; "
        f"real input costs {100 * (med['pipeline'] / med['device'] - 1):.1f}% over on-device "
        f"input ({100 * (med['host'] / med['device'] - 1):.1f}% of it the host -> device copy)"
    )


if __name__ == "__main__":
    main()
