"""End-to-end RPN train step, ours vs torchvision (eager and torch.compile): images/s, memory,
and where the time goes on each side.

    python benchmarks/e2e_train.py           # both sizes, 5 rounds (about 25 minutes)
    python benchmarks/e2e_train.py --quick   # default config, 3 rounds, no compiled PyTorch

The same architecture on both sides, one random batch with the input pipeline's structure
(8 valid ground-truth boxes per image), at two sizes:

- ``default``: ``configs/default.py`` as it is: ResNet-18 at width 32 with batch norm, FPN
  dim 64, 1x1 predictors on the FPN (no head conv), 9 anchors per cell, batch 8, 256 x 256,
  AdamW with clipping.
- ``r50_fpn``: ``configs/coco_r50_fpn.py`` (R50-FPN with frozen BN, detectron2's head with
  one 3x3 conv, 3 anchors per cell, SGD) at a CPU-feasible batch 2 at 512 x 512.

Ours is the trainer's own step, built as ``jax_rpn.training.Trainer`` builds it
(``build_rpn``, ``create_optimizer``, ``create_train_state``, ``make_train_step``,
``parallel.parallelize`` with ``shard_map``), on one JAX CPU device per core as ``train.py``
splits the CPU (``jax_num_cpu_devices``, ``parallel.cpu_devices_for``). torchvision's RPN in
training mode also makes proposals (its second stage needs them), so ours is timed both as
the trainer runs it (no proposals) and with ``inference.proposals_from_outputs(...,
train=True)`` added to the step (the two-stage case, like for like).

torchvision's side (``benchmarks/torchvision_rpn.py``): its ResNet + ``BackboneWithFPN`` +
``RegionProposalNetwork`` (train mode: anchors, head, ``filter_proposals``, targets, sampler,
losses), backward, ``clip_grad_norm_`` and a fused AdamW/SGD step; eager, and with
``torch.compile`` on the backbone + FPN and on the head (the dense part; compiling the whole
RPN recompiles every step on its data-dependent shapes).

Timing: all steps take turns within each round (load changes hit all alike); medians. Peak
memory: each side in a fresh subprocess (build, three steps): its peak RSS, and the rise
over the RSS after imports. Breakdown: ours by differences of programs (features forward;
features forward + backward with a dummy loss; + head; the full loss without the optimizer;
the full step; + proposals; targets alone), torchvision by timing its modules and methods in
one step (module hooks and wrapped methods) plus the same dummy-loss programs for its
backward split.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402, I001
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import torchvision_rpn as tvr  # noqa: E402

# name -> (config module, overrides)
CONFIGS = {
    "default": ("configs.default", {}),
    "r50_fpn": ("configs.coco_r50_fpn", {"data.pad_to": (512, 512), "batch_size": 2}),
}


def load_config(name: str):
    return common.load_config(*CONFIGS[name])


# --- ours ---------------------------------------------------------------------------------


def _dummy_loss(arrays):
    return sum(jnp.mean(jnp.square(a.astype(jnp.float32))) for a in arrays)


def make_step_with_proposals(config, model, tx, schedule):
    """``training.make_train_step``'s step that also returns the batch's training proposals
    (``inference.proposals_from_outputs(..., train=True)`` on the step's own outputs), as a
    two-stage detector's first stage needs them. Returns ``(state, metrics, proposals)``."""
    from jax_rpn import inference, parallel, training
    from jax_rpn.rpn_loss import rpn_loss

    mutable = list(training.model_state_collections(config))

    def train_step(state, batch):
        keys = training._image_keys(state.key, state.step, batch["image"].shape[0])

        def loss_fn(params):
            variables = {"params": params, **state.model_state}
            outputs, new_model_state = model.apply(
                variables, batch["image"], train=True, mutable=mutable
            )
            loss, metrics = rpn_loss(outputs, batch, keys, config=config)
            props = inference.proposals_from_outputs(
                jax.lax.stop_gradient(outputs), batch["image_hw"], config=config, train=True
            )
            return loss, (metrics, new_model_state, props)

        (_, (metrics, new_model_state, props)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
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
        metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": schedule(state.step)}
        return new.replace(step=state.step + 1), metrics, props

    return train_step


def breakdown_programs(config, model, tx, anchors):
    """Per-device programs ``fn(state, batch) -> (output,)`` whose time differences split our
    step: ``features_fwd``, ``features_grad`` (dummy loss), ``head_grad`` (dummy loss on the
    head outputs), ``loss_grad`` (the RPN loss, no optimizer), ``targets`` (targets alone),
    ``optimizer`` (the optimizer update alone, parameters as stand-in gradients)."""
    from jax_rpn import parallel, targets, training
    from jax_rpn.rpn_loss import rpn_loss

    mutable = list(training.model_state_collections(config))
    axis = parallel.AXIS

    def apply(params, state, images, **kwargs):
        variables = {"params": params, **state.model_state}
        return model.apply(variables, images, train=True, mutable=mutable, **kwargs)[0]

    def features_fwd(state, batch):
        return (
            jax.lax.pmean(
                _dummy_loss(apply(state.params, state, batch["image"], method="features")), axis
            ),
        )

    def grad_of(loss_fn):
        def program(state, batch):
            return (jax.lax.pmean(jax.value_and_grad(loss_fn)(state.params, state, batch), axis),)

        return program

    def features_loss(params, state, batch):
        return _dummy_loss(apply(params, state, batch["image"], method="features"))

    def head_loss(params, state, batch):
        out = apply(params, state, batch["image"])
        return _dummy_loss(list(out.objectness) + list(out.deltas))

    def rpn_objective(params, state, batch):
        key = jax.random.fold_in(state.key, state.step)
        return rpn_loss(apply(params, state, batch["image"]), batch, key, config=config)[0]

    t = config.targets

    def targets_only(state, batch):
        keys = jax.random.split(state.key, batch["image"].shape[0])
        labels, box_targets = jax.vmap(
            lambda k, boxes, valid, ignore, hw: targets.anchor_targets(
                k,
                anchors,
                boxes,
                valid,
                high=t.high,
                low=t.low,
                allow_low_quality=t.allow_low_quality,
                num_samples=t.num_samples,
                positive_fraction=t.positive_fraction,
                weights=tuple(t.weights),
                gt_ignore=ignore,
                image_hw=hw,
            )
        )(keys, batch["boxes"], batch["valid"], batch["ignore"], batch["image_hw"])
        return (jax.lax.pmean(jnp.sum(box_targets) + jnp.sum(labels), axis),)

    def optimizer_only(state, batch):
        grads = jax.lax.pmean(state.params, axis)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return (
            state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state),
        )

    return {
        "features_fwd": features_fwd,
        "features_grad": grad_of(features_loss),
        "head_grad": grad_of(head_loss),
        "loss_grad": grad_of(rpn_objective),
        "targets": targets_only,
        "optimizer": optimizer_only,
    }


class Ours:
    """The trainer's step on a fixed random batch, plus the breakdown programs."""

    def __init__(self, config, *, breakdown: bool = True):
        from jax_rpn import parallel, training
        from jax_rpn.models import build_rpn, flatten_outputs
        from jax_rpn.optim import create_optimizer

        mode = config.parallelism
        self.mesh = parallel.data_mesh()
        model = build_rpn(config, axis_name=parallel.AXIS)
        tx, schedule = create_optimizer(config.optim, config.num_train_steps)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        state = training.create_train_state(
            config, build_rpn(config), tx, jax.random.PRNGKey(config.seed)
        )
        self.state = jax.device_put(state, replicated)
        self.batch = parallel.shard_batch(common.random_batch(config), mode=mode, mesh=self.mesh)

        def wrap(fn, replicated_out):
            return parallel.parallelize(
                fn, mode=mode, mesh=self.mesh, replicated_out=replicated_out
            )

        self.step = wrap(training.make_train_step(config, model, tx, schedule), (True, True))
        self.step_proposals = wrap(
            make_step_with_proposals(config, model, tx, schedule), (True, True, False)
        )
        self.programs = {}
        if breakdown:
            h, w = config.data.pad_to
            eval_model = build_rpn(config)
            variables = {"params": state.params, **state.model_state}
            out = eval_model.apply(variables, jnp.zeros((1, h, w, 3)), train=False)
            anchors = np.asarray(flatten_outputs(out).anchors)  # [N, 4]
            for name, fn in breakdown_programs(config, model, tx, anchors).items():
                self.programs[name] = wrap(fn, (True,))

    def compile_step(self) -> tuple[float, float]:
        """(lower + compile seconds of the step, its XLA temporary buffers MiB)."""
        start = time.perf_counter()
        compiled = self.step.lower(self.state, self.batch).compile()
        seconds = time.perf_counter() - start
        return seconds, compiled.memory_analysis().temp_size_in_bytes / 2**20

    def calls(self) -> dict:
        """No-argument calls: ``step`` and ``step_proposals`` thread the state through."""
        holder = {"state": self.state}

        def threaded(step):
            def one():
                holder["state"], *out = step(holder["state"], self.batch)
                return out

            return one

        calls = {"step": threaded(self.step), "step_proposals": threaded(self.step_proposals)}
        for name, program in self.programs.items():
            calls[name] = lambda p=program: p(self.state, self.batch)
        return calls


# --- torchvision ----------------------------------------------------------------------------


class Phases:
    """Exclusive wall time per named region of one torchvision step (regions may nest: an
    inner region's time is not counted in the outer one). PyTorch CPU ops are synchronous."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.stack = []
        self.active = False

    def enter(self, name):
        if self.active:
            self.stack.append([name, time.perf_counter(), 0.0])

    def exit(self):
        if self.active:
            name, start, inner = self.stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed - inner
            if self.stack:
                self.stack[-1][2] += elapsed

    def wrap(self, obj, method, name):
        fn = getattr(obj, method)

        def timed(*args, **kwargs):
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()

        setattr(obj, method, timed)

    def hook(self, module, name):
        module.register_forward_pre_hook(lambda *_: self.enter(name))
        module.register_forward_hook(lambda *_: self.exit())


class Torchvision:
    """torchvision's RPN train step on the same batch (eager or compiled), optionally timed
    region by region (``phases``)."""

    def __init__(self, config, *, compiled: bool = False, instrumented: bool = False):
        torch.manual_seed(config.seed)
        self.model = tvr.build(config).train()
        if compiled:
            self.model.backbone = torch.compile(self.model.backbone)
            self.model.rpn.head = torch.compile(self.model.rpn.head)
        self.opt, self.sched = tvr.create_optimizer(config, self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = config.optim.grad_clip_norm
        self.box_weight = config.loss.box_weight
        self.images, self.sizes, self.targets = tvr.to_torch_batch(common.random_batch(config))
        self.phases = Phases()
        if instrumented:
            rpn, p = self.model.rpn, self.phases
            p.hook(self.model.backbone, "backbone + FPN forward")
            p.hook(rpn.head, "head forward")
            p.hook(rpn.anchor_generator, "anchors")
            p.wrap(rpn.box_coder, "decode", "proposals")
            p.wrap(rpn, "filter_proposals", "proposals")
            p.wrap(rpn, "assign_targets_to_anchors", "targets")
            p.wrap(rpn.box_coder, "encode", "targets")
            p.wrap(rpn, "fg_bg_sampler", "targets")
            p.wrap(rpn, "compute_loss", "losses forward")

    def loss(self):
        _, losses = self.model(self.images, self.sizes, self.targets)
        return losses["loss_objectness"] + self.box_weight * losses["loss_rpn_box_reg"]

    def step(self):
        p = self.phases
        p.enter("forward, other")
        loss = self.loss()
        p.exit()
        p.enter("backward")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        p.exit()
        p.enter("optimizer")
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        p.exit()
        return loss.detach()

    def features_grad(self):
        self.opt.zero_grad(set_to_none=True)
        feats = self.model.backbone(self.images)
        loss = _torch_dummy_loss(feats.values())
        loss.backward()
        return loss.detach()

    def head_grad(self):
        self.opt.zero_grad(set_to_none=True)
        feats = list(self.model.backbone(self.images).values())
        logits, deltas = self.model.rpn.head(feats)
        loss = _torch_dummy_loss(logits + deltas)
        loss.backward()
        return loss.detach()


def _torch_dummy_loss(tensors):
    return sum(torch.mean(torch.square(t)) for t in tensors)


# --- measurement ------------------------------------------------------------------------------


def memory_of(side: str, config_name: str) -> dict:
    """In this (fresh) process: the RSS after imports, then build ``side`` and run 3 steps;
    returns ``{"base_mib", "peak_mib"}`` (peak: the process's ``VmHWM``)."""
    config = load_config(config_name)
    jax.devices()  # initialise the backend before the baseline
    base = common.current_memory_mib()
    if side.startswith("ours"):
        ours = Ours(config, breakdown=False)
        call = ours.calls()["step_proposals" if side == "ours_proposals" else "step"]
    else:
        call = Torchvision(config, compiled=side == "torch_compile").step
    for _ in range(3):
        common.block(call())
    return {"base_mib": base, "peak_mib": common.peak_memory_mib()}


def memory_in_subprocess(side: str, config_name: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.e2e_train", "--memory-of", side]
    cmd += ["--configs", config_name, f"--cpu-devices={len(jax.devices())}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_call_s(fn) -> float:
    start = time.perf_counter()
    common.block(fn())
    return time.perf_counter() - start


def bench_config(name: str, *, repeats: int, compile_torch: bool, memory: bool) -> dict:
    config = load_config(name)
    b = config.batch_size
    ours = Ours(config)
    ours_compile_s, xla_temp_mib = ours.compile_step()
    calls = {f"ours {k}": v for k, v in ours.calls().items()}
    first = {"ours step": first_call_s(calls["ours step"])}

    eager = Torchvision(config)
    instrumented = Torchvision(config, instrumented=True)
    calls["tv eager"] = eager.step
    calls["tv instrumented"] = instrumented.step
    calls["tv features_grad"] = eager.features_grad
    calls["tv head_grad"] = eager.head_grad
    first["tv eager"] = first_call_s(eager.step)
    if compile_torch:
        compiled = Torchvision(config, compiled=True)
        calls["tv compiled"] = compiled.step
        first["tv compiled"] = first_call_s(compiled.step)
        first_call_s(compiled.step)  # a second call: anything left to compile

    # The instrumented step records its phases only in the timed rounds.
    phase_rounds = []

    def instrumented_step():
        instrumented.phases.active = True
        instrumented.phases.seconds = defaultdict(float)
        out = instrumented.step()
        instrumented.phases.active = False
        phase_rounds.append(dict(instrumented.phases.seconds))
        return out

    calls["tv instrumented"] = instrumented_step
    load_before = common.load_average()
    times = common.time_interleaved(calls, repeats=repeats, warmup=1)
    med = {k: v["median"] for k, v in times.items()}
    tv_phases = {
        k: float(np.median([r.get(k, 0.0) for r in phase_rounds[1:]])) for k in phase_rounds[-1]
    }

    result = {
        "config": name,
        "image": "x".join(str(s) for s in config.data.pad_to),
        "batch": b,
        "devices": len(jax.devices()),
        "load_before": load_before,
        "load_after": common.load_average(),
        "median_s": med,
        "cpu_s": {k: v["cpu_median"] for k, v in times.items()},
        "tv_phases_s": tv_phases,
        "first_call_s": first,
        "ours_compile_s": ours_compile_s,
        "ours_xla_temp_mib": xla_temp_mib,
    }
    if memory:
        sides = ["ours", "ours_proposals", "torch_eager"] + ["torch_compile"] * compile_torch
        result["memory"] = {s: memory_in_subprocess(s, name) for s in sides}
    return result


# --- tables -------------------------------------------------------------------------------------


def throughput_rows(r: dict) -> list[list]:
    med, b = r["median_s"], r["batch"]
    best_tv = min(med["tv eager"], med.get("tv compiled", float("inf")))
    mem = r.get("memory", {})

    def row(label, key, mem_key):
        s = med[key]
        m = mem.get(mem_key)
        peak = f"{m['peak_mib']:.0f} (+{m['peak_mib'] - m['base_mib']:.0f})" if m else "-"
        return [r["config"], label, s * 1e3, b / s, f"{best_tv / s:.2f}x", peak]

    rows = [
        row("ours (trainer's step)", "ours step", "ours"),
        row("ours + proposals", "ours step_proposals", "ours_proposals"),
        row("torchvision eager", "tv eager", "torch_eager"),
    ]
    if "tv compiled" in med:
        rows.append(row("torchvision torch.compile", "tv compiled", "torch_compile"))
    return rows


def breakdown_rows(r: dict) -> list[list]:
    med, ph = r["median_s"], r["tv_phases_s"]
    ms = 1e3
    f, a, h = med["ours features_fwd"], med["ours features_grad"], med["ours head_grad"]
    c, d, e = med["ours loss_grad"], med["ours step"], med["ours step_proposals"]
    t = med["ours targets"]
    tv_bb_fwd, tv_head_fwd = ph.get("backbone + FPN forward", 0.0), ph.get("head forward", 0.0)
    tv_bb_bwd = med["tv features_grad"] - tv_bb_fwd
    tv_head_bwd = med["tv head_grad"] - med["tv features_grad"] - tv_head_fwd
    tv_rest_bwd = ph.get("backward", 0.0) - tv_bb_bwd - tv_head_bwd
    tv_total = med["tv instrumented"]
    return [
        ["backbone + FPN forward", f * ms, tv_bb_fwd * ms],
        ["backbone + FPN backward", (a - f) * ms, tv_bb_bwd * ms],
        ["head forward + backward", (h - a) * ms, (tv_head_fwd + tv_head_bwd) * ms],
        ["anchors", "0 (constants)", ph.get("anchors", 0.0) * ms],
        ["targets (match, sample, encode)", f"{t * ms:.3g} alone", ph.get("targets", 0.0) * ms],
        [
            "targets + losses, forward and backward",
            (c - h) * ms,
            (ph.get("targets", 0.0) + ph.get("losses forward", 0.0) + tv_rest_bwd) * ms,
        ],
        ["rest of the forward (reshapes, concatenation)", "-", ph.get("forward, other", 0.0) * ms],
        ["optimizer (+ all-reduce, finite check)", (d - c) * ms, ph.get("optimizer", 0.0) * ms],
        ["proposals (decode, top-k, NMS)", (e - d) * ms, ph.get("proposals", 0.0) * ms],
        ["step without proposals", d * ms, (tv_total - ph.get("proposals", 0.0)) * ms],
        ["step with proposals", e * ms, tv_total * ms],
        ["of which backbone + FPN + head (fwd + bwd)", h * ms, med["tv head_grad"] * ms],
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--quick", action="store_true", help="default config, 3 rounds")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="JAX CPU devices (default: as train.py, the largest divisor of the batch sizes up "
        "to the core count)",
    )
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from jax_rpn import parallel

    if args.quick:
        args.configs, args.repeats, args.no_compile = ["default"], 3, True
    batches = [load_config(n).batch_size for n in args.configs]
    devices = args.cpu_devices or min(parallel.cpu_devices_for(b) for b in batches)
    jax.config.update("jax_num_cpu_devices", devices)
    torch.set_num_threads(os.cpu_count())
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args.configs[0])))
        return

    print(f"machine: {common.machine()}")
    print(f"{tvr.versions()}")
    results = []
    for name in args.configs:
        results.append(
            bench_config(
                name,
                repeats=args.repeats,
                compile_torch=not args.no_compile,
                memory=not args.no_memory,
            )
        )
        print(json.dumps(results[-1]), flush=True)

    print(
        f"\nTrain step, median of {args.repeats} rounds; images/s; peak RSS of a fresh process MiB"
    )
    print("(rise over the RSS after imports in brackets); ratio = best torchvision time / time")
    rows = [row for r in results for row in throughput_rows(r)]
    print(
        common.table(
            ["config", "implementation", "step ms", "images/s", "vs best torchvision", "peak MiB"],
            rows,
        )
    )
    for r in results:
        print(
            f"\n{r['config']} ({r['image']}, batch {r['batch']}, ours on {r['devices']} devices): "
            f"{r['load_before']} before, {r['load_after']} after; first step: ours "
            f"{r['first_call_s']['ours step']:.1f} s (lower + compile "
            f"{r['ours_compile_s']:.1f} s, XLA temp {r['ours_xla_temp_mib']:.0f} MiB), "
            + ", ".join(
                f"{k} {v:.1f} s" for k, v in r["first_call_s"].items() if k.startswith("tv")
            )
        )
        print(f"\nWhere the time goes, {r['config']}: ms per step (ours; torchvision eager)")
        print(common.table(["part", "ours ms", "torchvision ms"], breakdown_rows(r)))


if __name__ == "__main__":
    main()
