"""End-to-end RPN train step, ours vs torchvision (eager and torch.compile): images/s, memory,
and where the time goes on each side.

    python benchmarks/e2e_train.py           # both sizes, 5 rounds (about 25 minutes)
    python benchmarks/e2e_train.py --quick   # default config, 3 rounds, no torch.compile or memory

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
the trainer runs it (no proposals) and as ``make_train_step(..., with_proposals=True)``
builds it, returning the batch's training-mode proposals (the two-stage case, like for like).

torchvision's side (``benchmarks/torchvision_rpn.py``): its ResNet + ``BackboneWithFPN`` +
``RegionProposalNetwork`` (train mode: anchors, head, ``filter_proposals``, targets, sampler,
losses), backward, ``clip_grad_norm_`` and a fused AdamW/SGD step; eager (contiguous NCHW
tensors, as torchvision's detection models run, and ``channels_last``, oneDNN's preferred CPU
layout), and with ``torch.compile`` on the backbone + FPN and on the head (the dense part;
compiling the whole RPN recompiles every step on its data-dependent shapes). Ratios are
against the fastest of these.

Timing: the whole steps (ours, ours + proposals, each torchvision variant) take turns
within each round (load changes hit all alike; the order rotates), each timed right after
an untimed call of itself, as in a training loop; medians. The breakdown's programs then
take turns in rounds of their own, with our full steps. Peak memory: each side in a fresh
subprocess (build, three steps): its peak RSS, and the rise over the RSS after imports.
Breakdown: ours by differences of programs (features forward; features forward + backward
with a dummy loss; + head; the full loss without the optimizer; the full step; + proposals;
targets, the optimizer and the proposals alone), torchvision by timing its modules and
methods in one step (module hooks and wrapped methods) plus the same dummy-loss programs for
its backward split.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
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


def breakdown_programs(config, model, tx, outputs):
    """Per-device programs ``fn(state, batch) -> (output,)`` whose time differences split our
    step: ``features_fwd``, ``features_grad`` (dummy loss), ``head_grad`` (dummy loss on the
    head outputs), ``loss_grad`` (the RPN objective, no optimizer), ``targets`` (targets
    alone), ``optimizer`` (the optimizer update alone, parameters as stand-in gradients),
    ``proposals`` (the training proposals alone; its batch holds the ``objectness`` and
    ``deltas`` of ``outputs``, an :class:`RPNOutput` of the model, and ``image_hw``)."""
    from jax_rpn import inference, parallel, targets, training
    from jax_rpn.models import flatten_outputs
    from jax_rpn.objective import rpn_objective
    from jax_rpn.settings import LossSettings, ProposalSettings, TargetSettings

    mutable = list(training.model_state_collections(config))
    axis = parallel.AXIS
    target_settings = TargetSettings.from_config(config)
    loss_settings = LossSettings.from_config(config)
    proposal_settings = ProposalSettings.from_config(config, train=True)
    anchors = np.asarray(flatten_outputs(outputs).anchors)  # [N, 4]

    def apply(params, state, images, **kwargs):
        variables = {"params": params, **state.model_state}
        return model.apply(variables, images, train=True, mutable=mutable, **kwargs)[0]

    def features_fwd(state, batch):
        features = apply(state.params, state, batch["image"], method="features")
        return (jax.lax.pmean(_dummy_loss(features), axis),)

    def grad_of(loss_fn):
        def program(state, batch):
            return (jax.lax.pmean(jax.value_and_grad(loss_fn)(state.params, state, batch), axis),)

        return program

    def features_loss(params, state, batch):
        return _dummy_loss(apply(params, state, batch["image"], method="features"))

    def head_loss(params, state, batch):
        out = apply(params, state, batch["image"])
        return _dummy_loss(list(out.objectness) + list(out.deltas))

    def objective(params, state, batch):
        key = jax.random.fold_in(state.key, state.step)
        outputs = apply(params, state, batch["image"])
        return rpn_objective(
            outputs, batch, key, targets_settings=target_settings, loss_settings=loss_settings
        )[0]

    def targets_only(state, batch):
        labels, box_targets = targets.batch_anchor_targets(
            jax.random.fold_in(state.key, state.step),
            anchors,
            batch["boxes"],
            batch["valid"],
            gt_ignore=batch["ignore"],
            image_hw=batch["image_hw"],
            **target_settings.kwargs(),
        )
        return (jax.lax.pmean(jnp.sum(box_targets) + jnp.sum(labels), axis),)

    def optimizer_only(state, batch):
        grads = jax.lax.pmean(state.params, axis)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return (state.replace(params=params, opt_state=opt_state),)

    def proposals_only(state, batch):
        out = outputs.replace(objectness=batch["objectness"], deltas=batch["deltas"])
        props = inference.proposals_from_outputs(
            out, batch["image_hw"], settings=proposal_settings, objectness=model.objectness
        )
        return (jax.lax.pmean(jnp.sum(jnp.where(props.valid[..., None], props.boxes, 0)), axis),)

    return {
        "features_fwd": features_fwd,
        "features_grad": grad_of(features_loss),
        "head_grad": grad_of(head_loss),
        "loss_grad": grad_of(objective),
        "targets": targets_only,
        "optimizer": optimizer_only,
        "proposals": proposals_only,
    }


class Ours:
    """The trainer's step on a fixed random batch (state donated and threaded through, as
    ``Trainer`` runs it), plus the breakdown programs."""

    def __init__(self, config, *, breakdown: bool = True):
        from jax_rpn import parallel, training
        from jax_rpn.models import build_rpn
        from jax_rpn.optim import create_optimizer

        mode = config.parallelism
        self.mesh = parallel.data_mesh()
        model = build_rpn(config, axis_name=parallel.AXIS)
        tx, schedule = create_optimizer(config.optim, config.num_train_steps)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        state = training.create_train_state(
            config, build_rpn(config), tx, jax.random.PRNGKey(config.seed)
        )
        self.holder = {"state": jax.device_put(state, replicated)}
        batch = common.random_batch(config)
        self.batch = parallel.shard_batch(batch, mode=mode, mesh=self.mesh)

        def wrap(fn, replicated_out, donate):
            return parallel.parallelize(
                fn, mode=mode, mesh=self.mesh, replicated_out=replicated_out, donate_state=donate
            )

        step = training.make_train_step(config, model, tx, schedule)
        self.step = wrap(step, (True, True), True)
        self.step_proposals = wrap(
            training.make_train_step(config, model, tx, schedule, with_proposals=True),
            (True, True, False),
            True,
        )
        self.programs, self.program_batches = {}, {}
        if breakdown:
            # The model's outputs on the batch, the input of the proposals program.
            variables = {"params": state.params, **state.model_state}
            out = jax.jit(functools.partial(build_rpn(config).apply, train=False))(
                variables, batch["image"]
            )
            head_outputs = {"objectness": out.objectness, "deltas": out.deltas}
            self.program_batches["proposals"] = parallel.shard_batch(
                {**jax.device_get(head_outputs), "image_hw": batch["image_hw"]},
                mode=mode,
                mesh=self.mesh,
            )
            for name, fn in breakdown_programs(config, model, tx, out).items():
                self.programs[name] = wrap(fn, (True,), False)

    def compile_step(self) -> tuple[float, float]:
        """(lower + compile seconds of the step, its XLA temporary buffers MiB)."""
        with common.Timer() as t:
            compiled = self.step.lower(self.holder["state"], self.batch).compile()
        return t.seconds, compiled.memory_analysis().temp_size_in_bytes / 2**20

    def calls(self) -> dict:
        """No-argument calls; ``step`` and ``step_proposals`` thread the state through."""

        def threaded(step):
            def one():
                self.holder["state"], *out = step(self.holder["state"], self.batch)
                return out

            return one

        calls = {"step": threaded(self.step), "step_proposals": threaded(self.step_proposals)}
        for name, program in self.programs.items():
            batch = self.program_batches.get(name, self.batch)
            calls[name] = lambda p=program, b=batch: p(self.holder["state"], b)
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

    def __init__(
        self,
        config,
        *,
        compiled: bool = False,
        instrumented: bool = False,
        channels_last: bool = False,
    ):
        torch.manual_seed(config.seed)
        self.model = tvr.build(config).train()
        self.images, self.sizes, self.targets = tvr.to_torch_batch(common.random_batch(config))
        if channels_last:  # oneDNN's preferred layout on CPU
            self.model = self.model.to(memory_format=torch.channels_last)
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        if compiled:
            self.model.backbone = torch.compile(self.model.backbone)
            self.model.rpn.head = torch.compile(self.model.rpn.head)
        self.opt, self.sched = tvr.create_optimizer(config, self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = config.optim.grad_clip_norm
        self.box_weight = config.loss.box_weight
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
    """In this (fresh) process: the RSS after imports (``base_mib``), then build ``side`` and
    run a first step (ours loads its compiled step from the parent's compilation cache;
    torch.compile compiles or hits its own cache): the process peak so far (``peak_mib``,
    ``VmHWM``); then 3 more steps with the peak reset before them: ``steady_mib``, the peak
    while stepping."""
    config = load_config(config_name)
    jax.devices()  # initialise the backend before the baseline
    base = common.current_memory_mib()
    if side.startswith("ours"):
        ours = Ours(config, breakdown=False)
        call = ours.calls()["step_proposals" if side == "ours_proposals" else "step"]
    else:
        call = Torchvision(
            config,
            compiled=side == "torch_compile",
            channels_last=side == "torch_channels_last",
        ).step
    common.block(call())
    peak = common.peak_memory_mib()
    common.reset_peak_memory()
    for _ in range(3):
        common.block(call())
    return {"base_mib": base, "peak_mib": peak, "steady_mib": common.peak_memory_mib()}


def memory_in_subprocess(side: str, config_name: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.e2e_train", "--memory-of", side]
    cmd += ["--configs", config_name, f"--cpu-devices={len(jax.devices())}"]
    cmd += [f"--torch-threads={torch.get_num_threads()}"]
    cmd += [f"--cache-dir={jax.config.jax_compilation_cache_dir}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_call_s(fn) -> float:
    with common.Timer() as t:
        common.block(fn())
    return t.seconds


def bench_config(name: str, *, repeats: int, compile_torch: bool, memory: bool) -> dict:
    config = load_config(name)
    b = config.batch_size
    ours = Ours(config)
    ours_compile_s, xla_temp_mib = ours.compile_step()
    calls = {f"ours {k}": v for k, v in ours.calls().items()}
    first = {"ours step": first_call_s(calls["ours step"])}

    eager = Torchvision(config)
    instrumented = Torchvision(config, instrumented=True)
    channels_last = Torchvision(config, channels_last=True)
    calls["tv eager"] = eager.step
    calls["tv channels_last"] = channels_last.step
    calls["tv instrumented"] = instrumented.step
    calls["tv features_grad"] = eager.features_grad
    calls["tv head_grad"] = eager.head_grad
    first["tv eager"] = first_call_s(eager.step)
    first["tv channels_last"] = first_call_s(channels_last.step)
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
    # The whole steps take turns among themselves. With the breakdown's programs in the same
    # rounds every step, ours and torchvision's, ran 20-35% slower (default size: 449 / 496 /
    # 545 ms against 337 / 368 / 396 ms for ours, ours + proposals, channels_last), so the
    # breakdown has rounds of its own, with our full steps to subtract from (torchvision's
    # whole steps are not used there: its parts come from the instrumented step).
    steps = {k: v for k, v in calls.items() if k in HEADLINE_STEPS}
    breakdown = {k: v for k, v in calls.items() if k not in TORCH_STEPS}
    times = common.time_interleaved(steps, repeats=repeats, warmup=1, back_to_back=True)
    parts = common.time_interleaved(breakdown, repeats=repeats, warmup=1)
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
        "breakdown_median_s": {k: v["median"] for k, v in parts.items()},
        "tv_phases_s": tv_phases,
        "first_call_s": first,
        "ours_compile_s": ours_compile_s,
        "ours_xla_temp_mib": xla_temp_mib,
    }
    if memory:
        sides = ["ours", "ours_proposals", "torch_eager", "torch_channels_last"]
        sides += ["torch_compile"] * compile_torch
        result["memory"] = {s: memory_in_subprocess(s, name) for s in sides}
    return result


# --- tables -------------------------------------------------------------------------------------


# Timed torchvision steps: key in the results -> (table label, memory subprocess side).
TORCH_STEPS = {
    "tv eager": ("torchvision eager", "torch_eager"),
    "tv channels_last": ("torchvision eager, channels_last", "torch_channels_last"),
    "tv compiled": ("torchvision torch.compile", "torch_compile"),
}
HEADLINE_STEPS = ("ours step", "ours step_proposals", *TORCH_STEPS)


def throughput_rows(r: dict) -> list[list]:
    med, b = r["median_s"], r["batch"]
    best_tv = min(s for k, s in med.items() if k in TORCH_STEPS)
    mem = r.get("memory", {})

    def row(label, key, mem_key):
        s = med[key]
        m = mem.get(mem_key)
        steady = f"{m['steady_mib']:.0f} (+{m['steady_mib'] - m['base_mib']:.0f})" if m else "-"
        peak = f"{m['peak_mib']:.0f} (+{m['peak_mib'] - m['base_mib']:.0f})" if m else "-"
        cpu = r["cpu_s"][key] * 1e3
        return [r["config"], label, s * 1e3, cpu, b / s, f"{best_tv / s:.2f}x", steady, peak]

    rows = [
        row("ours (trainer's step)", "ours step", "ours"),
        row("ours + proposals", "ours step_proposals", "ours_proposals"),
    ]
    for key, (label, side) in TORCH_STEPS.items():
        if key in med:
            rows.append(row(label, key, side))
    return rows


def breakdown_rows(r: dict) -> list[list]:
    med, ph = r["breakdown_median_s"], r["tv_phases_s"]
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
        [
            "optimizer (+ finite check)",
            f"{(d - c) * ms:.3g} ({med['ours optimizer'] * ms:.3g} alone)",
            ph.get("optimizer", 0.0) * ms,
        ],
        [
            "proposals (decode, top-k, NMS)",
            f"{med['ours proposals'] * ms:.3g} alone ({(e - d) * ms:.3g} step difference)",
            ph.get("proposals", 0.0) * ms,
        ],
        ["step without proposals", d * ms, (tv_total - ph.get("proposals", 0.0)) * ms],
        ["step with proposals", e * ms, tv_total * ms],
        ["of which backbone + FPN + head (fwd + bwd)", h * ms, med["tv head_grad"] * ms],
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="default config, 3 rounds, no torch.compile, no memory subprocesses",
    )
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
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=os.cpu_count(),
        help="PyTorch intra-op threads (default: one per core)",
    )
    common.add_malloc_flag(parser)
    args = parser.parse_args()
    malloc = common.set_malloc(args)
    from jax_rpn import parallel

    if args.quick:
        args.configs, args.repeats, args.no_compile, args.no_memory = ["default"], 3, True, True
    batches = [load_config(n).batch_size for n in args.configs]
    devices = args.cpu_devices or min(parallel.cpu_devices_for(b) for b in batches)
    jax.config.update("jax_num_cpu_devices", devices)
    torch.set_num_threads(args.torch_threads)
    if args.memory_of:
        common.set_compilation_cache(args.cache_dir)
        print(json.dumps(memory_of(args.memory_of, args.configs[0])))
        return
    # Our programs compiled here are cached, so the memory subprocesses load them instead of
    # compiling (XLA's compiler would otherwise set their peak, and malloc keeps it resident).
    cache = tempfile.TemporaryDirectory(prefix="jax_rpn_e2e_cache_")
    common.set_compilation_cache(cache.name)

    print(f"machine: {common.machine()}; {malloc}")
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
        f"\nTrain step, median of {args.repeats} rounds (wall, and process CPU time over all "
        "threads); ratio = best torchvision time / time; "
        "memory of a fresh process in MiB, its rise over the RSS after imports in brackets: "
        "peak RSS while stepping, and peak RSS including the first step (compilation)"
    )
    rows = [row for r in results for row in throughput_rows(r)]
    print(
        common.table(
            ["config", "implementation", "step ms", "CPU ms", "images/s", "vs best torchvision"]
            + ["stepping MiB", "with first step MiB"],
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
