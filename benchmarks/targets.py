"""RPN target assignment (match + sample + encode) at COCO-FPN scale: ours vs torchvision's.

Batch of 8 images, 800x1344 input, 268,569 anchors (P2..P6, sizes 32..512, ratios 0.5/1/2),
20 / 100 / 1000 ground-truth boxes per image.

- ours: ``jax.jit(jax.vmap(jax_rpn.targets.anchor_targets))`` (one program for the batch).
- torchvision: its compiled ops cannot be installed here (CPU-only PyTorch wheel), so this
  file carries a faithful PyTorch re-implementation of the per-image procedure of
  ``torchvision/models/detection``: ``ops.box_iou`` (gt x anchors), ``_utils.Matcher``
  (thresholds 0.7 / 0.3, low-quality matches), ``RegionProposalNetwork.
  assign_targets_to_anchors`` (labels 1 / 0 / -1 and matched boxes),
  ``_utils.BoxCoder.encode`` over all anchors, and ``_utils.BalancedPositiveNegativeSampler``
  (256 per image, half positive, ``randperm``). Same tensor ops, same order; none of these
  steps uses a torchvision C++ op, so the timing is torchvision's own.

Agreement checked where deterministic: labels before sampling (``jax_rpn.matching.match`` vs
the Matcher), the number of sampled positives and negatives per image, and the box targets of
our sampled positives that torchvision also labels positive against its encoding of them.

Run from the repository root: ``python benchmarks/targets.py`` (``--quick``: 20 and 100 GT
only). Above 100 GT the PyTorch reference (37 s and 10 GiB per image here) runs on 2 of the 8
images and its time is scaled by 4 (``--ref-images``).
Needs ``pip install torch==2.13.0`` (CPU build).
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

from benchmarks import common  # noqa: E402
from jax_rpn import matching, sampling, targets  # noqa: E402

HIGH, LOW = 0.7, 0.3
NUM_SAMPLES, POSITIVE_FRACTION = 256, 0.5


# --- torchvision's procedure, re-implemented in PyTorch ------------------------------------


class _Phases:
    """Accumulated wall time per phase of the reference (PyTorch CPU ops are synchronous)."""

    def __init__(self):
        self.seconds = {}

    def add(self, name, start):
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - start
        return now


def tv_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """torchvision.ops.box_iou: xyxy ``[N, 4]`` x ``[M, 4]`` -> ``[N, M]``."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])  # [N, M, 2]
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])  # [N, M, 2]
    wh = (rb - lt).clamp(min=0)  # [N, M, 2]
    inter = wh[:, :, 0] * wh[:, :, 1]  # [N, M]
    union = area1[:, None] + area2 - inter
    return inter / union


BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS = -1, -2


def tv_matcher(match_quality_matrix: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """torchvision ``Matcher(high, low, allow_low_quality_matches=True)`` on ``[G, N]``."""
    matched_vals, matches = match_quality_matrix.max(dim=0)
    all_matches = matches.clone()
    below_low_threshold = matched_vals < low
    between_thresholds = (matched_vals >= low) & (matched_vals < high)
    matches[below_low_threshold] = BELOW_LOW_THRESHOLD
    matches[between_thresholds] = BETWEEN_THRESHOLDS
    # set_low_quality_matches_: every anchor tied at some gt's best IoU gets its best gt.
    highest_quality_foreach_gt, _ = match_quality_matrix.max(dim=1)
    gt_pred_pairs = torch.where(match_quality_matrix == highest_quality_foreach_gt[:, None])
    pred_inds_to_update = gt_pred_pairs[1]
    matches[pred_inds_to_update] = all_matches[pred_inds_to_update]
    return matches


def tv_encode_boxes(reference_boxes, proposals, weights=(1.0, 1.0, 1.0, 1.0)):
    """torchvision ``_utils.encode_boxes``: deltas of ``reference_boxes`` w.r.t. ``proposals``."""
    wx, wy, ww, wh = weights
    ex_widths = proposals[:, 2:3] - proposals[:, 0:1]
    ex_heights = proposals[:, 3:4] - proposals[:, 1:2]
    ex_ctr_x = proposals[:, 0:1] + 0.5 * ex_widths
    ex_ctr_y = proposals[:, 1:2] + 0.5 * ex_heights
    gt_widths = reference_boxes[:, 2:3] - reference_boxes[:, 0:1]
    gt_heights = reference_boxes[:, 3:4] - reference_boxes[:, 1:2]
    gt_ctr_x = reference_boxes[:, 0:1] + 0.5 * gt_widths
    gt_ctr_y = reference_boxes[:, 1:2] + 0.5 * gt_heights
    targets_dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
    targets_dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
    targets_dw = ww * torch.log(gt_widths / ex_widths)
    targets_dh = wh * torch.log(gt_heights / ex_heights)
    return torch.cat((targets_dx, targets_dy, targets_dw, targets_dh), dim=1)


def tv_sampler(labels_per_image, num_samples, positive_fraction, generator):
    """torchvision ``BalancedPositiveNegativeSampler`` -> (pos masks, neg masks), uint8."""
    pos_idx, neg_idx = [], []
    for matched_idxs_per_image in labels_per_image:
        positive = torch.where(matched_idxs_per_image >= 1)[0]
        negative = torch.where(matched_idxs_per_image == 0)[0]
        num_pos = int(num_samples * positive_fraction)
        num_pos = min(positive.numel(), num_pos)
        num_neg = num_samples - num_pos
        num_neg = min(negative.numel(), num_neg)
        perm1 = torch.randperm(positive.numel(), generator=generator)[:num_pos]
        perm2 = torch.randperm(negative.numel(), generator=generator)[:num_neg]
        pos_mask = torch.zeros_like(matched_idxs_per_image, dtype=torch.uint8)
        neg_mask = torch.zeros_like(matched_idxs_per_image, dtype=torch.uint8)
        pos_mask[positive[perm1]] = 1
        neg_mask[negative[perm2]] = 1
        pos_idx.append(pos_mask)
        neg_idx.append(neg_mask)
    return pos_idx, neg_idx


def torchvision_targets(anchors, gt_boxes_list, generator, phases=None):
    """torchvision's RPN training targets for a list of images (anchors shared).

    ``assign_targets_to_anchors`` + ``box_coder.encode`` + ``fg_bg_sampler`` as in
    ``RegionProposalNetwork.forward``/``compute_loss``. Returns (labels before sampling,
    regression targets, sampled positive masks, sampled negative masks), lists over images.
    """
    clock = time.perf_counter
    t = clock()
    labels, matched_gt_boxes = [], []
    for gt_boxes in gt_boxes_list:
        match_quality_matrix = tv_box_iou(gt_boxes, anchors)  # [G, N]
        t = phases.add("iou", t) if phases else t
        matched_idxs = tv_matcher(match_quality_matrix, HIGH, LOW)
        matched_gt_boxes_per_image = gt_boxes[matched_idxs.clamp(min=0)]
        labels_per_image = (matched_idxs >= 0).to(dtype=torch.float32)
        labels_per_image[matched_idxs == BELOW_LOW_THRESHOLD] = 0.0
        labels_per_image[matched_idxs == BETWEEN_THRESHOLDS] = -1.0
        labels.append(labels_per_image)
        matched_gt_boxes.append(matched_gt_boxes_per_image)
        t = phases.add("matcher", t) if phases else t
    # BoxCoder.encode: one encode_single over the concatenation, split back per image.
    boxes_per_image = [len(b) for b in matched_gt_boxes]
    regression = tv_encode_boxes(
        torch.cat(matched_gt_boxes, dim=0), torch.cat([anchors] * len(gt_boxes_list), dim=0)
    ).split(boxes_per_image, 0)
    t = phases.add("encode", t) if phases else t
    pos, neg = tv_sampler(labels, NUM_SAMPLES, POSITIVE_FRACTION, generator)
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


def time_reference(ref, *, repeats, budget_s):
    """Time the PyTorch reference: calls until ``repeats`` or ``budget_s`` seconds, each with
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

    The reference runs on the first ``ref_images`` images (its per-image loop makes its time
    linear in the number of images) and its time is scaled to the batch.
    """
    full, match, sample = fns
    anchors_j = jnp.asarray(anchors_np)
    anchors_t = torch.from_numpy(anchors_np)
    gt_np = common.random_gt_boxes(rng, batch, g, common.COCO_IMAGE_HW)  # [B, G, 4]
    gt_j = jnp.asarray(gt_np)
    valid_j = jnp.ones((batch, g), bool)
    keys = jax.random.split(jax.random.key(seed), batch)
    gt_list = [torch.from_numpy(b) for b in gt_np[:ref_images]]
    generator = torch.Generator().manual_seed(seed)

    def ours_call():
        return full(keys, anchors_j, gt_j, valid_j)

    def ref(phases):
        return torchvision_targets(anchors_t, gt_list, generator, phases)

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

    tv_s, tv_cpu, phases, tv_mib, tv_out = time_reference(ref, repeats=repeats, budget_s=budget_s)
    tv_labels, tv_regression, tv_pos, tv_neg = tv_out
    scale = batch / ref_images
    tv_s, tv_cpu = tv_s * scale, tv_cpu * scale

    name = str(g) if ref_images == batch else f"{g} *"
    result = [name, ours["median"] * 1e3, tv_s * 1e3, f"{tv_s / ours['median']:.1f}x"]
    result += [ours["cpu_median"] * 1e3, tv_cpu * 1e3, f"{tv_cpu / ours['cpu_median']:.1f}x"]
    result += [ours_mib, tv_mib, compile_s]
    breakdown = [name, t_match["median"] * 1e3, t_sample["median"] * 1e3]
    breakdown += [phases[k] * scale * 1e3 for k in ("iou", "matcher", "encode", "sampler")]

    # Agreement where deterministic, on the images the reference ran on.
    n = ref_images
    ours_pre = np.asarray(match_labels_j)[:n]  # [n, N]
    tv_pre = np.stack([lab.numpy() for lab in tv_labels]).astype(np.int32)  # [n, N]
    labels = np.asarray(labels_j)[:n]  # [n, N]
    ours_counts = np.stack([(labels == 1).sum(1), (labels == 0).sum(1)], 1)  # [n, 2]
    tv_counts = np.array(
        [[int(p.sum()), int(q.sum())] for p, q in zip(tv_pos, tv_neg, strict=True)]
    )
    both_pos = (labels == 1) & (tv_pre == 1)  # [n, N]
    tv_reg = np.stack([r.numpy() for r in tv_regression])  # [n, N, 4]
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
        help="images the PyTorch reference runs on above 100 GT (time scaled to the batch)",
    )
    parser.add_argument("--quick", action="store_true", help="20 and 100 GT, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.num_gt, args.repeats = [g for g in args.num_gt if g <= 100], 3
    torch.set_num_threads(os.cpu_count())
    print(f"machine: {common.machine()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
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
            ["GT/image", "ours ms", "torchvision (PyTorch) ms", "speed-up", "ours CPU ms"]
            + ["PyTorch CPU ms", "CPU ratio", "ours XLA MiB", "PyTorch peak MiB"]
            + ["ours first call s"],
            results,
        )
    )
    print("\nBreakdown, ms for the batch (ours: each part jitted alone; PyTorch: its phases)")
    print(
        common.table(
            ["GT/image", "ours match", "ours sample"]
            + ["tv box_iou", "tv Matcher", "tv encode", "tv sampler"],
            breakdown,
        )
    )
    print("\nAgreement with the reference")
    print(
        common.table(
            ["GT/image", "labels differing before sampling", "of", "sampled counts equal"]
            + ["mean sampled pos / neg", "max abs diff box targets"],
            agreement,
        )
    )
    if any(str(r[0]).endswith("*") for r in results):
        print(
            f"\n* PyTorch reference run on {args.ref_images} of the {args.batch} images, time "
            f"scaled by {args.batch / args.ref_images:g}; agreement on those images."
        )


if __name__ == "__main__":
    main()
