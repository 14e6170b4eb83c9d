"""RPN target assignment (match + sample + encode) at COCO-FPN scale: ours vs torchvision's.

Batch of 8 images, 800x1344 input, 268,569 anchors (P2..P6, sizes 32..512, ratios 0.5/1/2),
20 / 100 / 1000 ground-truth boxes per image.

- ours: ``jax.jit(jax.vmap(jax_rpn.targets.anchor_targets))`` (one program for the batch).
- torchvision: the real ``torchvision.models.detection.rpn.RegionProposalNetwork`` (thresholds
  0.7 / 0.3, 256 samples per image, half positive), called as its ``forward`` does in
  training: ``assign_targets_to_anchors`` (``box_iou`` + ``Matcher`` with low-quality
  matches, labels 1 / 0 / -1), ``box_coder.encode`` over all anchors, and the
  ``fg_bg_sampler`` that ``compute_loss`` runs. Its phases are timed by wrapping the RPN's
  ``box_similarity`` and ``proposal_matcher`` attributes (the calls themselves unchanged).

Agreement checked where deterministic: labels before sampling (``jax_rpn.matching.match`` vs
``assign_targets_to_anchors``), the number of sampled positives and negatives per image, and
the box targets of our sampled positives that torchvision also labels positive.

Run from the repository root: ``python benchmarks/targets.py`` (``--quick``: 20 and 100 GT
only). Above 100 GT torchvision (37 s and 10 GiB per image here) runs on 2 of the 8 images and
its time is scaled by 4 (``--ref-images``). Needs torch and torchvision (CPU use).
"""

import argparse
import functools
import os
import sys
import time
from pathlib import Path

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision.models.detection.rpn import RegionProposalNetwork  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.torchvision_rpn import DEVICE  # noqa: E402
from jax_rpn import matching, sampling, targets  # noqa: E402

HIGH, LOW = 0.7, 0.3
NUM_SAMPLES, POSITIVE_FRACTION = 256, 0.5


# --- torchvision ----------------------------------------------------------------------------


class _Phases:
    """Accumulated wall time per phase of torchvision (PyTorch CPU ops are synchronous)."""

    def __init__(self):
        self.seconds = {}

    def add(self, name, start):
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - start
        return now


class _Timed:
    """Wraps a function attribute of the RPN: calls go through unchanged, their wall time is
    added to ``phases[name]``."""

    def __init__(self, fn, name):
        self.fn, self.name, self.phases = fn, name, None

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.phases is not None:
            self.phases.add(self.name, start)
        return out


def torchvision_rpn() -> RegionProposalNetwork:
    """torchvision's RPN with the training settings above (no head or anchor generator: only
    its target assignment, box coder and sampler are called), its ``box_iou`` timed."""
    rpn = RegionProposalNetwork(
        anchor_generator=None,
        head=None,
        fg_iou_thresh=HIGH,
        bg_iou_thresh=LOW,
        batch_size_per_image=NUM_SAMPLES,
        positive_fraction=POSITIVE_FRACTION,
        pre_nms_top_n={"training": 2000, "testing": 1000},
        post_nms_top_n={"training": 2000, "testing": 1000},
        nms_thresh=0.7,
    )
    rpn.box_similarity = _Timed(rpn.box_similarity, "iou")
    return rpn


def torchvision_targets(rpn, anchors, gt_boxes_list, phases=None):
    """torchvision's RPN training targets for a list of images (anchors shared), as
    ``RegionProposalNetwork.forward`` and ``compute_loss`` make them.

    Returns (labels before sampling, regression targets, sampled positive masks, sampled
    negative masks), lists over images.
    """
    rpn.box_similarity.phases = phases
    anchors_list = [anchors] * len(gt_boxes_list)
    t = time.perf_counter()
    labels, matched_gt_boxes = rpn.assign_targets_to_anchors(
        anchors_list, [{"boxes": g} for g in gt_boxes_list]
    )
    if phases:  # the assignment minus box_iou: the Matcher and the labels from its matches
        t = phases.add("matcher", t)
        phases.seconds["matcher"] -= phases.seconds["iou"]
    regression = rpn.box_coder.encode(matched_gt_boxes, anchors_list)
    t = phases.add("encode", t) if phases else t
    pos, neg = rpn.fg_bg_sampler(labels)
    if phases:
        phases.add("sampler", t)
    return labels, regression, pos, neg


# --- ours -------------------------------------------------------------------------------------


def ours_fns():
    """Jitted batch functions: full targets, matching alone, sampling alone."""
    settings = dict(
        high=HIGH, low=LOW, num_samples=NUM_SAMPLES, positive_fraction=POSITIVE_FRACTION
    )
    full = jax.jit(
        jax.vmap(functools.partial(targets.anchor_targets, **settings), in_axes=(0, None, 0, 0))
    )
    match = jax.jit(
        jax.vmap(functools.partial(matching.match, high=HIGH, low=LOW), in_axes=(None, 0, 0))
    )
    sample = jax.jit(
        jax.vmap(
            functools.partial(
                sampling.sample_labels, num_samples=NUM_SAMPLES, positive_fraction=POSITIVE_FRACTION
            )
        )
    )
    return full, match, sample


def xla_buffers_mib(jitted, *args) -> float:
    """Temporary + output buffers XLA assigns to ``jitted(*args)`` (arguments excluded)."""
    stats = jitted.lower(*args).compile().memory_analysis()
    return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20


def time_torchvision(ref, *, repeats, budget_s):
    """Time torchvision: calls until ``repeats`` or ``budget_s`` seconds, each with
    its phases and peak memory (no warm-up: nothing to compile). Returns (median wall s, its
    process CPU s, phases of the median call, max peak MiB, outputs of the last call)."""
    samples, out = [], None
    for _ in range(repeats):
        phases = _Phases()
        start, start_cpu = time.perf_counter(), time.process_time()
        out, mib = common.measure_peak(functools.partial(ref, phases))
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        samples.append((wall, cpu, phases.seconds, mib))
        if sum(s[0] for s in samples) >= budget_s:
            break
    samples.sort(key=lambda x: x[0])
    wall, cpu, phases, _ = samples[(len(samples) - 1) // 2]
    return wall, cpu, phases, max(s[3] for s in samples), out


def run_one(g, fns, anchors_np, rng, *, batch, ref_images, repeats, budget_s, seed=0):
    """Time, measure and compare both at ``g`` GT boxes per image -> three table rows.

    torchvision runs on the first ``ref_images`` images (its per-image loop makes its time
    linear in the number of images) and its time is scaled to the batch.
    """
    full, match, sample = fns
    anchors_j = jnp.asarray(anchors_np)
    anchors_t = torch.from_numpy(anchors_np).to(DEVICE)
    gt_np = common.random_gt_boxes(rng, batch, g, common.COCO_IMAGE_HW)  # [B, G, 4]
    gt_j = jnp.asarray(gt_np)
    valid_j = jnp.ones((batch, g), bool)
    keys = jax.random.split(jax.random.key(seed), batch)
    gt_list = [torch.from_numpy(b).to(DEVICE) for b in gt_np[:ref_images]]
    rpn = torchvision_rpn()
    torch.manual_seed(seed)  # the sampler's randperm draws from torch's global generator

    def ours_call():
        return full(keys, anchors_j, gt_j, valid_j)

    def ref(phases):
        return torchvision_targets(rpn, anchors_t, gt_list, phases)

    compile_start = time.perf_counter()
    labels_j, box_targets_j = common.block(ours_call())
    compile_s = time.perf_counter() - compile_start
    ours = common.time_fn(ours_call, repeats=repeats, budget_s=budget_s)
    ours_mib = xla_buffers_mib(full, keys, anchors_j, gt_j, valid_j)
    _, match_labels_j = common.block(match(anchors_j, gt_j, valid_j))
    t_match = common.time_fn(
        lambda: match(anchors_j, gt_j, valid_j), repeats=repeats, budget_s=budget_s
    )
    t_sample = common.time_fn(lambda: sample(keys, match_labels_j), repeats=repeats)

    tv_s, tv_cpu, phases, tv_mib, tv_out = time_torchvision(ref, repeats=repeats, budget_s=budget_s)
    tv_labels, tv_regression, tv_pos, tv_neg = tv_out
    scale = batch / ref_images
    tv_s, tv_cpu = tv_s * scale, tv_cpu * scale

    name = str(g) if ref_images == batch else f"{g} *"
    result = [name, ours["median"] * 1e3, tv_s * 1e3, f"{tv_s / ours['median']:.1f}x"]
    result += [ours["cpu_median"] * 1e3, tv_cpu * 1e3, f"{tv_cpu / ours['cpu_median']:.1f}x"]
    result += [ours_mib, tv_mib, compile_s]
    breakdown = [name, t_match["median"] * 1e3, t_sample["median"] * 1e3]
    breakdown += [phases[k] * scale * 1e3 for k in ("iou", "matcher", "encode", "sampler")]

    # Agreement where deterministic, on the images torchvision ran on.
    n = ref_images
    ours_pre = np.asarray(match_labels_j)[:n]  # [n, N]
    tv_pre = np.stack([lab.cpu().numpy() for lab in tv_labels]).astype(np.int32)  # [n, N]
    labels = np.asarray(labels_j)[:n]  # [n, N]
    ours_counts = np.stack([(labels == 1).sum(1), (labels == 0).sum(1)], 1)  # [n, 2]
    tv_counts = np.array(
        [[int(p.sum()), int(q.sum())] for p, q in zip(tv_pos, tv_neg, strict=True)]
    )
    both_pos = (labels == 1) & (tv_pre == 1)  # [n, N]
    tv_reg = np.stack([r.cpu().numpy() for r in tv_regression])  # [n, N, 4]
    diff = np.abs(np.asarray(box_targets_j)[:n][both_pos] - tv_reg[both_pos])
    agreement = [name, int(np.sum(ours_pre != tv_pre)), ours_pre.size]
    agreement += [bool(np.array_equal(ours_counts, tv_counts))]
    agreement += [f"{ours_counts[:, 0].mean():.1f} / {ours_counts[:, 1].mean():.1f}"]
    agreement += [float(diff.max()) if diff.size else 0.0]
    return result, breakdown, agreement


def run(num_gts, *, batch, repeats, budget_s, ref_images_large, seed=0):
    """Rows of the three tables for each number of GT boxes per image."""
    anchors_np = np.concatenate(common.coco_fpn_anchors())  # [N, 4]
    fns = ours_fns()
    rng = np.random.default_rng(seed)
    rows = []
    for g in num_gts:
        ref_images = batch if g <= 100 else min(batch, ref_images_large)
        rows.append(
            run_one(
                g,
                fns,
                anchors_np,
                rng,
                batch=batch,
                ref_images=ref_images,
                repeats=repeats,
                budget_s=budget_s,
            )
        )
    return tuple(list(r) for r in zip(*rows, strict=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-gt", type=int, nargs="+", default=[20, 100, 1000])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--budget", type=float, default=20.0, help="stop repeating a timing after this many s"
    )
    parser.add_argument(
        "--ref-images",
        type=int,
        default=2,
        help="images torchvision runs on above 100 GT (time scaled to the batch)",
    )
    parser.add_argument("--quick", action="store_true", help="20 and 100 GT, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.num_gt, args.repeats = [g for g in args.num_gt if g <= 100], 3
    torch.set_num_threads(os.cpu_count())
    load_before = common.load_average()
    print(f"machine: {common.machine()}")
    print(
        f"torchvision {torchvision.__version__} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    anchors = np.concatenate(common.coco_fpn_anchors())
    print(f"batch {args.batch}, {anchors.shape[0]} anchors per image, input {common.COCO_PAD_HW}")

    results, breakdown, agreement = run(
        args.num_gt,
        batch=args.batch,
        repeats=args.repeats,
        budget_s=args.budget,
        ref_images_large=args.ref_images,
    )
    print(
        f"\nTarget assignment (match + sample + encode), batch of {args.batch}: median wall ms, "
        "process CPU ms of that call"
    )
    print(
        common.table(
            ["GT/image", "ours ms", "torchvision ms", "speed-up", "ours CPU ms"]
            + ["torchvision CPU ms", "CPU ratio", "ours XLA MiB", "torchvision peak MiB"]
            + ["ours first call s"],
            results,
        )
    )
    print("\nBreakdown, ms for the batch (ours: each part jitted alone; torchvision: its phases)")
    print(
        common.table(
            ["GT/image", "ours match", "ours sample"]
            + ["tv box_iou", "tv Matcher", "tv encode", "tv sampler"],
            breakdown,
        )
    )
    print("\nAgreement with torchvision")
    print(
        common.table(
            ["GT/image", "labels differing before sampling", "of", "sampled counts equal"]
            + ["mean sampled pos / neg", "max abs diff box targets"],
            agreement,
        )
    )
    if any(str(r[0]).endswith("*") for r in results):
        print(
            f"\n* torchvision run on {args.ref_images} of the {args.batch} images, time "
            f"scaled by {args.batch / args.ref_images:g}; agreement on those images."
        )
    print(f"\n{common.load_average()} (before: {load_before})")


if __name__ == "__main__":
    main()
