"""Proposal recall as COCO reports it: AR@100/300/1000 over IoU .50:.95, recall@.5/.7, by size.

Boxes are ``[x1, y1, x2, y2]`` in absolute pixels. Two parts:

* :func:`recall_stats` (pure, jittable, one image; ``vmap`` it over a batch) scans the
  proposals in score order and records, per area range, IoU threshold and proposal rank,
  whether that proposal matched a new ground-truth box. Shapes are static.
* :class:`RecallAccumulator` (host side) sums those records over the evaluation set and
  turns them into metrics and curves.

Matching follows pycocotools ``COCOeval`` with ``useCats=0`` exactly: at each IoU threshold,
proposals taken in score order are greedily matched, each to the unmatched counted ground
truth with the highest IoU ``>= threshold`` (on an exact tie the later box, as COCOeval does);
each ground truth is matched at most once. Recall at ``n`` proposals is the number of ground
truth matched by the first ``n`` proposals over the number counted. Ground truth that is
padded, marked ignore (crowd / difficult) or outside the area range is not counted and, as in
COCOeval, never changes which counted box a proposal matches (COCOeval lets a proposal fall
back to ignored ground truth only when no counted one qualifies). Area ranges use the box
area ``w * h`` with COCOeval's inclusive bounds (a 32x32 box is both small and medium).

detectron2's ``_evaluate_box_proposals`` differs: per image it repeatedly takes the
(proposal, ground truth) pair with the largest IoU among all, so its numbers can be slightly
higher; we report COCOeval's.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_rpn import boxes as box_ops

# COCO's IoU thresholds .50:.05:.95 (np.linspace as COCOeval builds them).
IOU_THRESHOLDS = tuple(float(t) for t in np.linspace(0.5, 0.95, 10))
# COCO's area ranges (name, low, high), bounds inclusive, in squared pixels.
AREA_RANGES = (
    ("all", 0.0, 1e10),
    ("small", 0.0, 32.0**2),
    ("medium", 32.0**2, 96.0**2),
    ("large", 96.0**2, 1e10),
)
PROPOSAL_COUNTS = (100, 300, 1000)
RECALL_IOUS = (0.5, 0.7)


class RecallStats(NamedTuple):
    """Per-image recall record; sums over images (any leading axes) are records too.

    R area ranges, T IoU thresholds, K proposal slots.
    """

    matches: jax.Array  # int32 [R, T, K]: 1 where the k-th proposal matched a counted GT
    num_gt: jax.Array  # int32 [R]: counted ground truth per area range
    num_proposals: jax.Array  # int32 []: valid proposals
    num_images: jax.Array  # int32 []: 1 per image


def _check_settings(iou_thresholds, area_ranges):
    thr = np.asarray(iou_thresholds, np.float64)
    if thr.ndim != 1 or thr.size == 0 or np.any((thr < 0) | (thr > 1)):
        raise ValueError(f"iou_thresholds must be a non-empty list in [0, 1], got {iou_thresholds}")
    names = [r[0] for r in area_ranges]
    if not area_ranges or len(set(names)) != len(names) or names[0] != "all":
        raise ValueError(
            f"area_ranges must be (name, low, high) tuples with unique names, 'all' first; "
            f"got {area_ranges}"
        )
    for name, lo, hi in area_ranges:
        if not 0 <= lo <= hi:
            raise ValueError(f"area_ranges[{name!r}] must satisfy 0 <= low <= high, got {lo, hi}")


def recall_stats(
    boxes: jax.Array,
    scores: jax.Array,
    valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    gt_ignore: jax.Array | None = None,
    *,
    iou_thresholds=IOU_THRESHOLDS,
    area_ranges=AREA_RANGES,
) -> RecallStats:
    """COCOeval (``useCats=0``) matching record of one image's proposals; jittable, vmappable.

    Args:
      boxes: ``[K, 4]`` xyxy proposals.
      scores: ``[K]``; proposals are ranked by score, descending (stable), valid ones first,
        so ``k`` in the output is the rank among valid proposals.
      valid: bool ``[K]``; invalid slots never match and are not counted as proposals.
      gt_boxes: ``[G, 4]`` xyxy ground truth (padded).
      gt_valid: bool ``[G]``; padding is False.
      gt_ignore: bool ``[G]`` or None; ignored (crowd / difficult) boxes are not counted.
      iou_thresholds: T static IoU thresholds (default COCO's .50:.05:.95); match if IoU >= t.
      area_ranges: R static ``(name, low, high)`` tuples, inclusive, on ``w * h``.

    Returns:
      :class:`RecallStats` with ``matches [R, T, K]``, ``num_gt [R]``, ``num_proposals []``,
      ``num_images [] = 1``.
    """
    _check_settings(iou_thresholds, area_ranges)
    boxes, scores, valid = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid)
    gt_boxes, gt_valid = jnp.asarray(gt_boxes), jnp.asarray(gt_valid)
    k = boxes.shape[0]
    g = gt_boxes.shape[0]
    if k == 0 or boxes.shape != (k, 4) or scores.shape != (k,) or valid.shape != (k,):
        raise ValueError(
            f"boxes, scores, valid must be [K, 4], [K], [K] with K >= 1; got {boxes.shape}, "
            f"{scores.shape}, {valid.shape}"
        )
    gt_ignore = jnp.zeros((g,), bool) if gt_ignore is None else jnp.asarray(gt_ignore)
    if gt_boxes.shape != (g, 4) or gt_valid.shape != (g,) or gt_ignore.shape != (g,):
        raise ValueError(
            f"gt_boxes, gt_valid, gt_ignore must be [G, 4], [G], [G]; got {gt_boxes.shape}, "
            f"{gt_valid.shape}, {gt_ignore.shape}"
        )
    valid = valid.astype(bool)
    thresholds = jnp.asarray(iou_thresholds, jnp.float32)  # [T]
    num_r, num_t = len(area_ranges), thresholds.shape[0]

    gt_area = box_ops.area(gt_boxes.astype(jnp.float32))  # [G]
    lo = jnp.asarray([r[1] for r in area_ranges], jnp.float32)[:, None]  # [R, 1]
    hi = jnp.asarray([r[2] for r in area_ranges], jnp.float32)[:, None]
    counted = (
        gt_valid.astype(bool) & ~gt_ignore.astype(bool) & (gt_area >= lo) & (gt_area <= hi)
    )  # [R, G]

    # Rank: valid first, then score descending, then slot index (a stable sort).
    _, _, order = lax.sort(
        ((~valid).astype(jnp.int32), -scores.astype(jnp.float32), jnp.arange(k)), num_keys=3
    )
    sorted_valid = valid[order]  # [K]
    if g == 0:
        matches = jnp.zeros((num_r, num_t, k), jnp.int32)
    else:
        overlaps = box_ops.pairwise_iou(
            boxes[order].astype(jnp.float32), gt_boxes.astype(jnp.float32)
        )

        def step(matched, x):  # matched: bool [R, T, G]
            row, ok = x  # [G], []
            cand = counted[:, None, :] & ~matched & (row >= thresholds[:, None]) & ok  # [R,T,G]
            score = jnp.where(cand, row, -1.0)
            best = g - 1 - jnp.argmax(score[..., ::-1], axis=-1)  # [R, T] last of ties
            hit = jnp.any(cand, axis=-1)  # [R, T]
            matched = matched | (hit[..., None] & (jnp.arange(g) == best[..., None]))
            return matched, hit

        # Derived from the data, not a constant, so the carry's type matches inside shard_map.
        init = jnp.zeros_like(jnp.broadcast_to(counted[:, None, :], (num_r, num_t, g)))
        _, hits = lax.scan(step, init, (overlaps, sorted_valid))  # hits: [K, R, T]
        matches = jnp.transpose(hits, (1, 2, 0)).astype(jnp.int32)  # [R, T, K]
    return RecallStats(
        matches=matches,
        num_gt=jnp.sum(counted, axis=-1, dtype=jnp.int32),
        num_proposals=jnp.sum(sorted_valid, dtype=jnp.int32),
        num_images=jnp.ones((), jnp.int32),
    )


def _recall_at(recall, count):
    """Recall ``[..., K] -> [...]`` with ``count`` proposals (all K when count > K, as COCOeval)."""
    return recall[..., min(count, recall.shape[-1]) - 1]


class RecallAccumulator:
    """Sums :class:`RecallStats` over an evaluation set (host side) into metrics and curves.

    Use the same ``iou_thresholds`` and ``area_ranges`` as :func:`recall_stats`. Where an area
    range has no counted ground truth its recalls are -1, as in COCOeval.
    """

    def __init__(
        self,
        *,
        counts=PROPOSAL_COUNTS,
        iou_thresholds=IOU_THRESHOLDS,
        area_ranges=AREA_RANGES,
        recall_ious=RECALL_IOUS,
    ):
        _check_settings(iou_thresholds, area_ranges)
        if not counts or any(int(c) < 1 for c in counts):
            raise ValueError(f"counts must be positive ints, got {counts}")
        self.counts = tuple(int(c) for c in counts)
        self.iou_thresholds = np.asarray(iou_thresholds, np.float64)
        self.area_ranges = tuple(area_ranges)
        self._recall_index = {}
        for t in recall_ious:
            hit = np.flatnonzero(np.isclose(self.iou_thresholds, t))
            if hit.size == 0:
                raise ValueError(f"recall_ious {recall_ious} must be among iou_thresholds")
            self._recall_index[float(t)] = int(hit[0])
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._matches = None  # int64 [R, T, K]
        self._num_gt = np.zeros(len(self.area_ranges), np.int64)
        self._num_proposals = 0
        self._num_images = 0

    def update(self, stats: RecallStats) -> None:
        """Add a record: one image's, a vmapped batch's (leading axes) or an on-device sum."""
        matches = np.asarray(stats.matches, np.int64)
        r, t = len(self.area_ranges), self.iou_thresholds.size
        if matches.ndim < 3 or matches.shape[-3:-1] != (r, t):
            raise ValueError(f"stats.matches must be [..., {r}, {t}, K], got {matches.shape}")
        matches = matches.reshape(-1, *matches.shape[-3:]).sum(0)  # [R, T, K]
        if self._matches is None:
            self._matches = matches
        elif self._matches.shape != matches.shape:
            raise ValueError(
                f"stats.matches has K = {matches.shape[-1]}, earlier updates had "
                f"{self._matches.shape[-1]}"
            )
        else:
            self._matches += matches
        self._num_gt += np.asarray(stats.num_gt, np.int64).reshape(-1, r).sum(0)
        self._num_proposals += int(np.sum(stats.num_proposals))
        self._num_images += int(np.sum(stats.num_images))

    def recall(self) -> np.ndarray:
        """float64 ``[R, T, K]``: recall with the first k+1 proposals; -1 where no GT counted."""
        if self._matches is None:
            raise ValueError("RecallAccumulator.recall() called before any update()")
        num_gt = self._num_gt[:, None, None]
        found = np.cumsum(self._matches, axis=-1)
        return np.where(num_gt > 0, found / np.maximum(num_gt, 1), -1.0)

    def result(self) -> dict[str, float]:
        """Metrics: ``AR@n``, ``recall@0.5@n``, ``recall@0.7@n``, ``AR_small@n``, ..., ``num_gt``.

        AR is the mean recall over the IoU thresholds; ``n`` runs over ``counts``.
        """
        out = {}
        recall = self.recall()
        for count in self.counts:
            at = _recall_at(recall, count)  # [R, T]
            out[f"AR@{count}"] = float(at[0].mean())
            for iou, ti in self._recall_index.items():
                out[f"recall@{iou:g}@{count}"] = float(at[0, ti])
            for ri, (name, _, _) in enumerate(self.area_ranges[1:], start=1):
                out[f"AR_{name}@{count}"] = float(at[ri].mean())
        out["num_gt"] = int(self._num_gt[0])
        for ri, (name, _, _) in enumerate(self.area_ranges[1:], start=1):
            out[f"num_gt_{name}"] = int(self._num_gt[ri])
        out["num_images"] = self._num_images
        out["proposals_per_image"] = self._num_proposals / max(self._num_images, 1)
        return out

    def curves(self, *, num_points: int = 40) -> dict:
        """Curves for plotting (:func:`jax_rpn.viz.plot_recall_curves`), all for area 'all'.

        Returns a dict with ``iou_thresholds [T]``; ``recall_vs_iou``: ``{count: [T]}``;
        ``num_proposals [P]`` (log-spaced ints from 1 to K); ``recall_vs_num``:
        ``{"recall@0.5": [P], "recall@0.7": [P], "AR": [P]}``.
        """
        recall = self.recall()[0]  # [T, K]
        k = recall.shape[-1]
        nums = np.unique(np.round(np.geomspace(1, k, num_points)).astype(np.int64))  # [P]
        vs_num = {f"recall@{iou:g}": recall[ti, nums - 1] for iou, ti in self._recall_index.items()}
        vs_num["AR"] = recall[:, nums - 1].mean(0)
        return {
            "iou_thresholds": self.iou_thresholds.copy(),
            "recall_vs_iou": {c: _recall_at(recall, c) for c in self.counts},
            "num_proposals": nums,
            "recall_vs_num": vs_num,
        }


def format_recall_table(result: dict[str, float], *, title: str = "Recall") -> str:
    """The metrics of :meth:`RecallAccumulator.result` as a fixed-width text table."""
    width = max(len(k) for k in result)
    lines = [title, "-" * (width + 10)]
    lines += [f"{k:<{width}}  {v:8.4f}" for k, v in result.items()]
    return "\n".join(lines)


def short_recall(result: dict[str, float]) -> str:
    """The headline metrics on one line: AR@100, AR@1000, recall@0.5@100, recall@0.7@100."""
    keys = ("AR@100", "AR@1000", "recall@0.5@100", "recall@0.7@100")
    return ", ".join(f"{k} {result[k]:.3f}" for k in keys if k in result)
