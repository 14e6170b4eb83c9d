"""Aspect-ratio buckets vs one square padded shape, R50-FPN at COCO scale (issue 16, part 5).

A COCO-shaped synthetic stream of image sizes goes through the pipeline's resize (shorter side
800, longer at most 1333). Padded to one 1344x1344 square (``coco_r50_fpn`` before buckets)
or to its landscape / portrait bucket (``data.pad_to = (800, 1344)``, ``aspect_buckets``),
each image carries some padding; the train step's FLOPs (XLA's cost analysis) and time per
image follow the padded area. Printed: the share of real pixels, FLOPs per image and images/s
of the R50-FPN train step, before and after, and the ratios.

    python -m benchmarks.buckets            # full scale (a few minutes on 2 CPU cores)
    python -m benchmarks.buckets --quick    # half the resolution

The stream: COCO 2017 images are mostly 640 px on the longer side; about 2/3 are landscape.
Here the longer side is 640, the shorter uniform in [360, 640], landscape with probability
2/3 (an assumption stated, not COCO's exact histogram).
"""

import argparse
import json

import jax
import numpy as np

from benchmarks import common
from benchmarks import train_step as ts
from jax_rpn import parallel
from jax_rpn.data import augment, buckets


def stream(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 2]`` COCO-shaped image sizes ``(h, w)`` (see the module doc)."""
    short = rng.integers(360, 641, n)
    landscape = rng.random(n) < 2 / 3
    return np.stack([np.where(landscape, short, 640), np.where(landscape, 640, short)], 1)


def pixel_shares(sizes, shapes, *, short_side, max_size) -> tuple[float, np.ndarray]:
    """Mean share of real pixels in the padded input, and each image's bucket."""
    shares, ids = [], []
    for hw in sizes.tolist():
        b = buckets.bucket_of(hw, shapes, short_side=short_side, max_size=max_size)
        h, w = augment.resized_hw(hw, short_side=short_side, max_size=max_size, pad_hw=shapes[b])
        shares.append(h * w / (shapes[b][0] * shapes[b][1]))
        ids.append(b)
    return float(np.mean(shares)), np.asarray(ids)


def step_at(pad_hw, scale_settings, repeats):
    """FLOPs per image and seconds per image of the R50-FPN train step at ``pad_hw``."""
    config = ts.load_config("coco_r50_fpn", scale_settings + (f"data.pad_to={tuple(pad_hw)}",))
    step, state, batch = ts.build(config)
    compiled = step.lower(state, batch).compile()
    flops = ts.compiled_flops(compiled) / config.batch_size
    stats = common.time_fn(ts.step_fn(compiled, state, batch), repeats=repeats, warmup=1)
    return flops, stats["median"] / config.batch_size


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about half resolution, 2 repeats")
    parser.add_argument("--images", type=int, default=5000, help="size of the stream")
    args = parser.parse_args()
    parallel.split_cpu(2)  # as train.py runs it: one device per core, one image each
    if args.quick:  # about half the resolution, sides divisible by 64
        short_side, max_size, square, wide = 384, 640, (640, 640), (384, 640)
    else:
        short_side, max_size, square, wide = 800, 1333, (1344, 1344), (800, 1344)
    sizes = stream(np.random.default_rng(0), args.images)
    share_square, _ = pixel_shares(sizes, (square,), short_side=short_side, max_size=max_size)
    share_buckets, ids = pixel_shares(
        sizes,
        buckets.padded_shapes(wide, aspect_buckets=True),
        short_side=short_side,
        max_size=max_size,
    )
    scale = (f"data.short_side={short_side}", f"data.max_size={max_size}", "batch_size=2")
    repeats = 2 if args.quick else 3
    flops_square, s_square = step_at(square, scale, repeats)
    flops_wide, s_wide = step_at(wide, scale, repeats)  # the portrait bucket costs the same
    rows = [
        ["one square", f"{square[0]}x{square[1]}", share_square, flops_square / 1e9, 1 / s_square],
        [
            "aspect buckets",
            f"{wide[0]}x{wide[1]} / {wide[1]}x{wide[0]}",
            share_buckets,
            flops_wide / 1e9,
            1 / s_wide,
        ],
    ]
    print(f"machine: {common.machine()}")
    print(
        f"stream: {args.images} images, {np.mean(ids == 0):.0%} in the landscape bucket; "
        f"train step R50-FPN batch 2, shorter side {short_side}, longer <= {max_size}"
    )
    print(
        common.table(
            ["padding", "padded shape", "real pixels", "GFLOPs / image", "images / s"], rows
        )
    )
    print(
        f"ratio: {flops_square / flops_wide:.2f}x fewer FLOPs per image, "
        f"{s_square / s_wide:.2f}x images/s"
    )
    print(
        json.dumps(
            {
                "share_square": share_square,
                "share_buckets": share_buckets,
                "gflops_square": flops_square / 1e9,
                "gflops_buckets": flops_wide / 1e9,
                "images_per_s_square": 1 / s_square,
                "images_per_s_buckets": 1 / s_wide,
                "devices": len(jax.devices()),
            }
        )
    )


if __name__ == "__main__":
    main()
