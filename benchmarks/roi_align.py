"""RoIAlign speed, side by side in one process: jax_rpn.roi_align vs torchvision's C++ kernels.

    python benchmarks/roi_align.py           # both cases, 10 rounds (about a minute)
    python benchmarks/roi_align.py --quick   # 4 rounds

A Faster R-CNN box head's pooling at COCO scale: a batch of 2 images padded to 800 x 1344,
256 feature channels, 512 RoIs per image (the box head's sample), 7 x 7 output, 2 x 2
samples per bin (torchvision's Faster R-CNN setting). RoIs are random COCO-like boxes (sides
12-600 px, aspect 1/3 to 3) in the 800 x 1333 image.

- single level: the stride-16 map ``[B, 50, 84, C]`` (a C4 head, or one FPN level).
  Ours ``jax.jit(jax.vmap(partial(jax_rpn.roi_align.roi_align, aligned=True, ...)))`` vs
  ``torchvision.ops.roi_align(..., aligned=True)``.
- multi-scale: P2..P5 (strides 4..32), each RoI pooled from its FPN level (FPN eq. 1,
  canonical 224 px at level 4). Ours ``jax.jit(jax.vmap(partial(
  jax_rpn.roi_align.multilevel_roi_align, aligned=False, ...)))`` vs
  ``torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)`` (which uses
  ``aligned=False``).

Each side gets the features in its own layout (ours NHWC, torchvision NCHW) and returns its
own (``[K, 7, 7, C]`` / ``[K, C, 7, 7]``); the outputs are compared (max abs difference)
before timing. The level rules differ in their rounding guard (torchvision adds 1e-6 after
the log, detectron2 and we 1e-8 inside it), so a RoI whose size sits within ~1e-6 of a level
boundary could go to different levels; the script counts them.
"""

import argparse
import functools
import sys
from pathlib import Path

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402, I001
import torchvision  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.torchvision_rpn import DEVICE  # noqa: E402
from jax_rpn import roi_align  # noqa: E402

PAD_HW = (800, 1344)
STRIDES = (4, 8, 16, 32)
SINGLE_STRIDE = 16
OUTPUT, SAMPLING = 7, 2


def inputs(batch: int, rois: int, channels: int, seed: int = 0):
    """Per-level features ``[B, H / s, W / s, C]`` (P2..P5) and boxes ``[B, K, 4]``."""
    rng = np.random.default_rng(seed)
    h, w = PAD_HW
    feats = [rng.normal(size=(batch, h // s, w // s, channels)).astype(np.float32) for s in STRIDES]
    boxes = common.random_gt_boxes(rng, batch, rois, common.COCO_IMAGE_HW)
    return feats, boxes


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(DEVICE)


def single_level(feats, boxes):
    """(ours, torchvision) calls for RoIAlign on the stride-16 map."""
    f = feats[STRIDES.index(SINGLE_STRIDE)]
    ours_fn = jax.jit(
        jax.vmap(
            functools.partial(
                roi_align.roi_align,
                output_size=OUTPUT,
                spatial_scale=1.0 / SINGLE_STRIDE,
                sampling_ratio=SAMPLING,
                aligned=True,
            )
        )
    )
    fj, bj = jnp.asarray(f), jnp.asarray(boxes)
    ft, bt = nchw(f), [torch.from_numpy(b).to(DEVICE) for b in boxes]

    def ours():
        return ours_fn(fj, bj)  # [B, K, 7, 7, C]

    def tv():
        return torchvision.ops.roi_align(
            ft, bt, OUTPUT, spatial_scale=1.0 / SINGLE_STRIDE, sampling_ratio=SAMPLING, aligned=True
        )  # [B * K, C, 7, 7]

    return ours, tv


def multi_scale(feats, boxes):
    """(ours, torchvision) calls for FPN RoIAlign over P2..P5."""
    ours_fn = jax.jit(
        jax.vmap(
            functools.partial(
                roi_align.multilevel_roi_align,
                strides=STRIDES,
                output_size=OUTPUT,
                sampling_ratio=SAMPLING,
                aligned=False,
            )
        )
    )
    fj, bj = [jnp.asarray(f) for f in feats], jnp.asarray(boxes)
    names = [f"p{i + 2}" for i in range(len(STRIDES))]
    pooler = torchvision.ops.MultiScaleRoIAlign(names, OUTPUT, SAMPLING)
    ft = {n: nchw(f) for n, f in zip(names, feats, strict=True)}
    bt = [torch.from_numpy(b).to(DEVICE) for b in boxes]
    image_shapes = [common.COCO_IMAGE_HW] * len(boxes)

    def ours():
        return ours_fn(fj, bj)

    def tv():
        return pooler(ft, bt, image_shapes)

    return ours, tv


def level_disagreements(boxes) -> int:
    """RoIs whose FPN level differs between torchvision's LevelMapper and ours."""
    from torchvision.ops.poolers import LevelMapper

    mapper = LevelMapper(2, 5)
    tv = mapper([torch.from_numpy(b) for b in boxes]).numpy() + 2
    ours = np.asarray(jax.vmap(roi_align.assign_levels)(jnp.asarray(boxes))).reshape(-1)
    return int(np.sum(tv != ours))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rois", type=int, default=512, help="RoIs per image")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="4 rounds")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 4
    load_before = common.load_average()
    feats, boxes = inputs(args.batch, args.rois, args.channels)
    rows = []
    cases = (("single level (stride 16)", single_level), ("multi-scale P2-P5", multi_scale))
    for name, make in cases:
        ours, tv = make(feats, boxes)
        got = np.asarray(common.block(ours()))  # [B, K, 7, 7, C]; compiles
        want = tv().cpu().numpy().transpose(0, 2, 3, 1).reshape(got.shape)
        diff = float(np.max(np.abs(got - want)))
        times = common.time_interleaved({"ours": ours, "tv": tv}, repeats=args.repeats)
        o, t = times["ours"], times["tv"]
        rows.append(
            [name, o["median"] * 1e3, t["median"] * 1e3, f"{t['median'] / o['median']:.1f}x"]
            + [o["cpu_median"] * 1e3, t["cpu_median"] * 1e3]
            + [f"{t['cpu_median'] / o['cpu_median']:.1f}x", f"{diff:.2g}"]
        )
        print(f"done {name}", file=sys.stderr, flush=True)
    print(f"machine: {common.machine()}")
    print(
        f"torchvision {torchvision.__version__} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads); {common.load_average()} (before: {load_before})"
    )
    h, w = PAD_HW
    print(
        f"\nRoIAlign, batch {args.batch} at {h}x{w}, {args.channels} channels, {args.rois} RoIs "
        f"per image, {OUTPUT}x{OUTPUT}, sampling ratio {SAMPLING}; median of {args.repeats} "
        f"rounds, wall ms and process CPU ms; RoIs on different FPN levels: "
        f"{level_disagreements(boxes)} of {args.batch * args.rois}\n"
    )
    print(
        common.table(
            ["case", "ours ms", "torchvision ms", "torchvision / ours", "ours CPU ms"]
            + ["torchvision CPU ms", "CPU ratio", "max abs diff"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
