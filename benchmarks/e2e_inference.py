"""End-to-end proposal inference, ours vs torchvision (eager and torch.compile): images -> backbone
+ RPN in eval mode -> proposals. Images/s and latency per image at batch 1 and batch 8.

    python benchmarks/e2e_inference.py           # both sizes, batch 1 and 8, 7 rounds
    python benchmarks/e2e_inference.py --quick   # default config, 3 rounds, no torch.compile

Same two sizes as ``benchmarks/e2e_train.py``: ``default`` (``configs/default.py``: narrow
ResNet-18-FPN, 256 x 256, test top-k 1000 -> NMS 0.65 -> 1000) and ``r50_fpn``
(``configs/coco_r50_fpn.py`` at 512 x 512: R50-FPN, 1000 -> NMS 0.7 -> 1000). Random
initialisation on both sides (no weights can be downloaded here) and random images.

- ours: ``jax_rpn.inference.predict_proposals`` (one ``jax.jit``: forward, per-level top-k,
  decode, clip, level-aware NMS, fixed 1000 slots per image) on one device, as a user calls
  it; and at batch 8 also the per-device function ``inference.proposals_from_images`` under
  ``parallel.parallelize`` (shard_map) over one CPU device per core, as the trainer's eval
  step runs it.
- torchvision: ``benchmarks/torchvision_rpn.py``'s backbone + ``RegionProposalNetwork`` in
  eval mode under ``torch.inference_mode()`` (anchors, head, ``filter_proposals`` with
  ``batched_nms``); eager (NCHW, and ``channels_last``), and with ``torch.compile`` on the
  backbone + FPN and the head. Ratios are against the fastest of these.

All calls take turns within each round; medians. Latency per image = batch time / batch.
"""

import argparse
import functools
import json
import os
import sys
from pathlib import Path

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402, I001
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import torchvision_rpn as tvr  # noqa: E402
from benchmarks.e2e_train import CONFIGS, load_config  # noqa: E402


def ours_calls(config, batch: int, images, image_hw) -> dict:
    """``{name: call}``: ``predict_proposals`` on one device; at batch > 1 also shard_map over
    every device (when there is more than one and the batch divides)."""
    from jax_rpn import inference, parallel
    from jax_rpn.models import build_rpn, init_variables
    from jax_rpn.settings import ProposalSettings

    h, w = config.data.pad_to
    variables = init_variables(build_rpn(config), jax.random.PRNGKey(config.seed), (1, h, w, 3))
    images_j, hw_j = jnp.asarray(images), jnp.asarray(image_hw)
    calls = {
        "ours, 1 device": lambda: inference.predict_proposals(
            variables, images_j, hw_j, config=config
        )
    }
    n = len(jax.devices())
    if batch > 1 and n > 1 and batch % n == 0:
        mesh = parallel.data_mesh()
        model = build_rpn(config)
        settings = ProposalSettings.from_config(config, train=False)

        def per_device(variables, batch):
            props = inference.proposals_from_images(
                model, variables, batch["image"], batch["image_hw"], settings=settings
            )
            return (props,)

        fn = parallel.parallelize(per_device, mode="shard_map", mesh=mesh, replicated_out=(False,))
        replicated = jax.device_put(
            variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        )
        sharded = parallel.shard_batch(
            {"image": images, "image_hw": image_hw}, mode="shard_map", mesh=mesh
        )
        calls[f"ours, shard_map over {n} devices"] = functools.partial(fn, replicated, sharded)
    return calls


def torch_calls(config, images, image_hw, *, compile_torch: bool) -> dict:
    torch.manual_seed(config.seed)
    eager = tvr.build(config).eval()
    images_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(tvr.DEVICE)
    sizes = [(int(h), int(w)) for h, w in image_hw]

    def run(model):
        def call():
            with torch.inference_mode():
                return model(images_t, sizes)[0]

        return call

    calls = {"torchvision eager": run(eager)}
    last = tvr.build(config).eval().to(memory_format=torch.channels_last)
    last.load_state_dict(eager.state_dict())
    images_last = images_t.contiguous(memory_format=torch.channels_last)

    def run_last():
        with torch.inference_mode():
            return last(images_last, sizes)[0]

    calls["torchvision eager, channels_last"] = run_last
    if compile_torch:
        compiled = tvr.build(config).eval()
        compiled.load_state_dict(eager.state_dict())
        compiled.backbone = torch.compile(compiled.backbone)
        compiled.rpn.head = torch.compile(compiled.rpn.head)
        calls["torchvision torch.compile"] = run(compiled)
    return calls


def bench(name: str, batch: int, *, repeats: int, compile_torch: bool) -> dict:
    config = load_config(name)
    config.batch_size = batch
    data = common.random_batch(config)
    images, image_hw = data["image"], data["image_hw"]
    calls = ours_calls(config, batch, images, image_hw)
    calls.update(torch_calls(config, images, image_hw, compile_torch=compile_torch))
    first = {}
    for label, call in calls.items():  # compile / first call, twice for torch.compile
        with common.Timer() as t:
            common.block(call())
        first[label] = t.seconds
        common.block(call())
    load_before = common.load_average()
    times = common.time_interleaved(calls, repeats=repeats, warmup=0)
    return {
        "config": name,
        "image": "x".join(str(s) for s in config.data.pad_to),
        "batch": batch,
        "load": f"{load_before} before, {common.load_average()} after",
        "median_s": {k: v["median"] for k, v in times.items()},
        "cpu_s": {k: v["cpu_median"] for k, v in times.items()},
        "first_call_s": first,
    }


def rows(r: dict) -> list[list]:
    med, b = r["median_s"], r["batch"]
    best_tv = min(s for k, s in med.items() if k.startswith("torchvision"))
    return [
        [r["config"], r["batch"], label, s * 1e3, r["cpu_s"][label] * 1e3, s * 1e3 / b, b / s]
        + [f"{best_tv / s:.2f}x"]
        for label, s in med.items()
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument("--quick", action="store_true", help="default config, 3 rounds")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=os.cpu_count(),
        help="JAX CPU devices for the shard_map rows (default: one per core)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=os.cpu_count(),
        help="PyTorch intra-op threads (default: one per core)",
    )
    common.add_malloc_flag(parser)
    args = parser.parse_args()
    malloc = common.set_malloc(args)
    if args.quick:
        args.configs, args.repeats, args.no_compile = ["default"], 3, True
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    torch.set_num_threads(args.torch_threads)
    print(f"machine: {common.machine()}; {malloc}")
    print(tvr.versions())
    results = []
    for name in args.configs:
        for batch in args.batches:
            results.append(
                bench(name, batch, repeats=args.repeats, compile_torch=not args.no_compile)
            )
            print(json.dumps(results[-1]), flush=True)
    print(
        f"\nProposal inference (eval mode, images -> 1000 proposals per image), median of "
        f"{args.repeats} rounds (wall, and process CPU time over all threads); ratio = best "
        "torchvision time / time"
    )
    print(
        common.table(
            ["config", "batch", "implementation", "ms per batch", "CPU ms per batch"]
            + ["ms per image", "images/s", "vs best torchvision"],
            [row for r in results for row in rows(r)],
        )
    )
    for r in results:
        first = ", ".join(f"{k} {v:.1f} s" for k, v in r["first_call_s"].items())
        print(f"\n{r['config']} batch {r['batch']}: {r['load']}; first call: {first}")


if __name__ == "__main__":
    main()
