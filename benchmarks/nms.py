"""NMS speed, side by side in one process: jax_rpn.nms (jitted) vs `torchvision.ops.nms` (its
C++ CPU kernel), TensorFlow's CPU kernels (`tf.image.non_max_suppression`,
`tf.image.non_max_suppression_padded`) and a numpy greedy; and `jax_rpn.nms.batched_nms` vs
`torchvision.ops.batched_nms` on per-level RPN candidates.

    python benchmarks/nms.py            # full table (about 2 minutes on 2 cores)
    python benchmarks/nms.py --quick    # RPN-like 6000 -> 1000 and 12000 -> 1000 only
    python -m benchmarks.nms --cpu-time # same, timed by process CPU time (busy machines)

Inputs are xyxy pixel boxes on an 800 x 1333 image, IoU threshold 0.7:
  rpn-like: boxes jittered around 300 object centres (like RPN outputs before NMS), scores
            higher for smaller jitter;
  uniform:  boxes of side 10-200 placed uniformly (few overlaps);
  dense:    boxes of side 50-150 centred in a 100 x 100 square: most pairs overlap, only a
            few hundred survive, so every method must visit all N boxes.
Scores are made distinct (a rank transform) so that every method visits boxes in the same
order, and coordinates are continuous so that no IoU equals the threshold exactly (TF
suppresses at IoU >= thr, we and torchvision at > thr). torchvision's kernel has no output
cap: it keeps every survivor, and its first `max_output` are compared. Times are medians over
repeats after a warm-up; the implementations take turns within each repeat, so load from
other processes hits all alike.

Batched (level-aware) NMS: 5 pyramid levels of RPN-like candidates (N / 5 per level, as
`pre_nms_topk` per level gives), groups = levels; `torchvision.ops.batched_nms` (on CPU above
4000 coordinates: one `nms` per level, then a sort) vs `jax_rpn.nms.batched_nms` (one pass,
suppression masked by group), first 1000 kept.
"""

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# torch before TensorFlow: the other order crashes (segfault) at the first torch op here.
import torch  # noqa: E402, I001
import torchvision  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.torchvision_rpn import DEVICE  # noqa: E402
from jax_rpn import nms  # noqa: E402

IMAGE_HW = (800, 1333)
IOU_THRESHOLD = 0.7
NUMPY_REPEATS = 3  # the numpy greedy is slow: fewer timed repeats


def _distinct_scores(quality):
    """float32 scores in (0, 1) with the order of ``quality`` and no ties."""
    scores = np.empty(len(quality), np.float32)
    scores[np.argsort(quality, kind="stable")] = (np.arange(len(quality)) + 0.5) / len(quality)
    return scores


def rpn_like(n, rng, num_objects=300):
    h, w = IMAGE_HW
    side = np.exp(rng.uniform(np.log(16), np.log(400), num_objects))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), num_objects))
    ow, oh = side / np.sqrt(aspect), side * np.sqrt(aspect)
    cx, cy = rng.uniform(0, w, num_objects), rng.uniform(0, h, num_objects)
    obj = rng.integers(0, num_objects, n)
    jitter = rng.normal(0.0, 0.15, (n, 4))
    bx, by = cx[obj] + jitter[:, 0] * ow[obj], cy[obj] + jitter[:, 1] * oh[obj]
    bw, bh = ow[obj] * np.exp(jitter[:, 2]), oh[obj] * np.exp(jitter[:, 3])
    boxes = np.stack([bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2], axis=1)
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    quality = -np.abs(jitter).sum(axis=1) + rng.normal(0.0, 0.3, n)
    return boxes, _distinct_scores(quality)


def uniform(n, rng):
    h, w = IMAGE_HW
    wh = rng.uniform(10, 200, (n, 2))
    xy = rng.uniform(0, 1, (n, 2)) * ([w, h] - wh)
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    return boxes, _distinct_scores(rng.uniform(size=n))


def dense(n, rng):
    centre = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(50, 150, (n, 2))
    boxes = np.concatenate([centre - wh / 2, centre + wh / 2], axis=1).astype(np.float32)
    return boxes, _distinct_scores(rng.uniform(size=n))


def numpy_greedy(boxes, scores, iou_threshold, max_output):
    """Plain greedy NMS: one candidate at a time against the kept set (IoU > threshold)."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = np.empty(max_output, np.int64)
    num = 0
    for i in order:
        k = kept[:num]
        lt = np.maximum(boxes[k, :2], boxes[i, :2])
        rb = np.minimum(boxes[k, 2:], boxes[i, 2:])
        wh = np.maximum(rb - lt, 0)
        inter = wh[:, 0] * wh[:, 1]
        union = area[i] + area[k] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0)
        if not np.any(iou > np.float32(iou_threshold)):
            kept[num] = i
            num += 1
            if num == max_output:
                break
    return kept[:num]


def _median_ms(times):
    return 1e3 * float(np.median(times))


def run_case(kind, n, max_output, repeats, numpy_repeats, rng, clock):
    boxes, scores = {"rpn-like": rpn_like, "uniform": uniform, "dense": dense}[kind](n, rng)
    jb, js = jax.device_put(boxes), jax.device_put(scores)
    tb, ts = tf.constant(boxes), tf.constant(scores)
    pb, ps = (torch.from_numpy(x).to(DEVICE) for x in (boxes, scores))

    ours_fn = jax.jit(partial(nms.nms, iou_threshold=IOU_THRESHOLD, max_output=max_output))

    def ours():
        return jax.block_until_ready(ours_fn(jb, js))

    def tv_kernel():
        return torchvision.ops.nms(pb, ps, IOU_THRESHOLD)[:max_output].cpu().numpy()

    def tf_kernel():
        return tf.image.non_max_suppression(tb, ts, max_output, IOU_THRESHOLD).numpy()

    def tf_padded():
        idx, num = tf.image.non_max_suppression_padded(
            tb, ts, max_output, IOU_THRESHOLD, pad_to_max_output_size=True
        )
        return idx.numpy(), num.numpy()

    def numpy_ref():
        return numpy_greedy(boxes, scores, IOU_THRESHOLD, max_output)

    fns = {"ours": ours, "tv": tv_kernel, "tf": tf_kernel, "tf_padded": tf_padded}
    fns["numpy"] = numpy_ref
    results = {name: fn() for name, fn in fns.items()}  # warm-up (compiles)
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            if name == "numpy" and r >= numpy_repeats:
                continue
            t0 = clock()
            fn()
            times[name].append(clock() - t0)

    idx, num = results["ours"]
    kept = np.asarray(idx)[: int(num)]
    tf_idx = results["tf"]
    pad_idx, pad_num = results["tf_padded"]
    pad_kept = pad_idx[: int(pad_num)]
    agree = {
        "numpy": np.array_equal(kept, results["numpy"]),
        "tv": np.array_equal(kept, results["tv"]),
        "tf": np.array_equal(kept, tf_idx),
        "tf_padded": np.array_equal(kept, pad_kept),
    }
    overlap = len(np.intersect1d(kept, pad_kept)) / max(len(kept), 1)
    med = {name: _median_ms(t) for name, t in times.items()}
    return dict(
        kind=kind,
        n=n,
        max_output=max_output,
        kept=len(kept),
        med=med,
        agree=agree,
        padded_overlap=overlap,
    )


def run_batched_case(n, max_output, num_levels, repeats, rng, clock):
    """Level-aware NMS of ``n`` RPN-like boxes split evenly over ``num_levels`` groups."""
    boxes, scores = rpn_like(n, rng)
    groups = rng.permutation(np.arange(n) % num_levels).astype(np.int32)
    jb, js, jg = (jax.device_put(x) for x in (boxes, scores, groups))
    pb, ps, pg = (torch.from_numpy(x).to(DEVICE) for x in (boxes, scores, groups.astype(np.int64)))
    ours_fn = jax.jit(partial(nms.batched_nms, iou_threshold=IOU_THRESHOLD, max_output=max_output))

    def ours():
        return jax.block_until_ready(ours_fn(jb, js, jg))

    def tv():
        keep = torchvision.ops.batched_nms(pb, ps, pg, IOU_THRESHOLD)
        return keep[:max_output].cpu().numpy()

    fns = {"ours": ours, "tv": tv}
    results = {name: fn() for name, fn in fns.items()}  # warm-up (compiles)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    idx, num = results["ours"]
    kept = np.asarray(idx)[: int(num)]
    med = {name: _median_ms(t) for name, t in times.items()}
    agree = "yes" if np.array_equal(kept, results["tv"]) else "NO"
    return [f"rpn-like, {num_levels} levels", n, max_output, len(kept), med["ours"], med["tv"]] + [
        f"{med['tv'] / med['ours']:.1f}x",
        agree,
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="RPN-like N -> 1000 cases only")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process CPU clock (all threads) instead of wall time: steadier "
        "on a machine shared with other work",
    )
    args = parser.parse_args()
    if args.quick:
        cases = [("rpn-like", n, 1000) for n in (6000, 12000)]
        batched = [(10000, 1000)]
        repeats = args.repeats or 20
    else:
        cases = [
            (kind, n, k)
            for kind in ("rpn-like", "uniform", "dense")
            for n in (2000, 6000, 12000)
            for k in (300, 1000)
        ]
        batched = [(5000, 1000), (10000, 1000), (10000, 2000)]
        repeats = args.repeats or 30
    clock = time.process_time if args.cpu_time else time.perf_counter
    load_before = common.load_average()
    rng = np.random.default_rng(0)
    rows = []
    for kind, n, k in cases:
        r = run_case(kind, n, k, repeats, NUMPY_REPEATS, rng, clock)
        m, a = r["med"], r["agree"]
        padded = "yes" if a["tf_padded"] else f"no ({100 * r['padded_overlap']:.0f}% shared)"
        agree = ", ".join("yes" if a[name] else "NO" for name in ("numpy", "tv", "tf"))
        rows.append(
            [kind, n, k, r["kept"], m["ours"], m["tv"], m["tf"], m["tf_padded"], m["numpy"]]
            + [f"{m['tv'] / m['ours']:.1f}x", f"{m['tf'] / m['ours']:.1f}x"]
            + [f"{m['tf_padded'] / m['ours']:.1f}x", f"{agree}, {padded}"]
        )
        print(f"done {kind} {n} -> {k}", file=sys.stderr, flush=True)
    batched_rows = [run_batched_case(n, k, 5, repeats, rng, clock) for n, k in batched]
    what = "process CPU" if args.cpu_time else "wall"
    print(f"Machine: {common.machine()}")
    print(
        f"torchvision {torchvision.__version__} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), TensorFlow {tf.__version__}, NumPy {np.__version__}"
    )
    print(f"Load: {load_before} before, {common.load_average()} after")
    print(
        f"IoU threshold {IOU_THRESHOLD}; median {what} ms over {repeats} repeats "
        f"(numpy: {NUMPY_REPEATS})\n"
    )
    headers = ["boxes", "N", "max_output", "kept", "ours ms", "torchvision ms", "TF ms"]
    headers += ["TF padded ms", "numpy ms", "torchvision / ours", "TF / ours", "TF padded / ours"]
    headers += ["agree (numpy, torchvision, TF, TF padded)"]
    print(common.table(headers, rows))
    print(f"\nLevel-aware NMS (batched_nms), median {what} ms\n")
    headers = ["boxes", "N", "max_output", "kept", "ours ms", "torchvision ms"]
    headers += ["torchvision / ours", "agree"]
    print(common.table(headers, batched_rows))


if __name__ == "__main__":
    main()
