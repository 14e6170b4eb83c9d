"""Coverage analysis: per-box best anchor IoU, the matcher's positives, and their summaries.

For each ground-truth box (after the input pipeline's resizing; padding and ignored boxes left
out) :func:`compute_coverage` finds the best IoU any anchor reaches and how many positive
anchors the matcher gives it; :func:`summarize` breaks that down by box size and aspect ratio
(``h / w``). A box is

* ``high``: best IoU ``>= targets.high``: positive at the matcher's high threshold;
* ``low_quality_only``: best IoU in ``(0, high)``: positive only through low-quality matching
  (and never positive when ``targets.allow_low_quality`` is off);
* ``none``: best IoU 0: no anchor overlaps it, never positive.

Boxes are ``[x1, y1, x2, y2]`` in absolute pixels.
"""

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from jax_rpn import boxes as box_ops
from jax_rpn import matching
from jax_rpn.settings import TargetSettings
from jax_rpn.shape_checks import check_shape

CATEGORIES = ("high", "low_quality_only", "none")
# COCO's size classes by box area (px^2), as half-open ranges so each box is in one.
COCO_SIZES = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, math.inf))
# Aspect-ratio bins: log2(h / w) rounded to the nearest integer, clipped to [-2, 2].
RATIO_BINS = (("<=1/4", -2), ("1/2", -1), ("1", 0), ("2", 1), (">=4", 2))
SIZE_BINS_PER_OCTAVE = 2  # the fine histogram of sqrt(area): half-octave bins
# Auto chunking: at most this many IoU values per scan step (64 MiB of float32).
_CHUNK_ELEMENTS = 1 << 24


# --- per-box computation (jit) -----------------------------------------------------------------


def best_anchor_iou(
    anchors: jax.Array,
    gt_boxes: jax.Array,
    *,
    gt_image_hw: jax.Array | None = None,
    border: float | None = None,
    chunk: int | None = None,
) -> jax.Array:
    """The best IoU any anchor reaches with each box -> float32 ``[M]``.

    Args:
      anchors: ``[N, 4]`` xyxy anchors (all levels), shared by every box.
      gt_boxes: ``[M, 4]`` xyxy boxes, e.g. the flattened ground truth of a batch of images.
        Zero-area or non-finite boxes get 0.
      gt_image_hw: ``[M, 2]`` ``(h, w)`` of each box's image; needed with ``border``.
      border: None, or the matcher's straddle tolerance: anchors leaving the box's image by more
        than ``border`` pixels do not count (:func:`jax_rpn.matching.inside_image`).
      chunk: anchors per scan step; None keeps ``chunk * M`` near 16M IoU values.
    """
    check_shape(anchors, "anchors", "[N, 4]")
    sizes = check_shape(gt_boxes, "gt_boxes", "[M, 4]")
    if border is not None and gt_image_hw is None:
        raise ValueError("border needs gt_image_hw [M, 2]")
    if gt_image_hw is not None:
        check_shape(gt_image_hw, "gt_image_hw", "[M, 2]", dtype="real", sizes=sizes)
    anchors = jnp.asarray(anchors, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if chunk is None:
        chunk = max(1, _CHUNK_ELEMENTS // max(num_gt, 1))
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk must be None or a positive integer, got {chunk}")
    chunk = min(int(chunk), max(num_anchors, 1))
    num_chunks = -(-num_anchors // chunk)
    # Zero-area padding anchors have IoU 0 with everything.
    padded = jnp.pad(anchors, ((0, num_chunks * chunk - num_anchors), (0, 0)))
    gt_ok = box_ops.is_valid(gt_boxes)  # [M]

    def step(best, chunk_anchors):  # [M], [C, 4]
        iou = box_ops.pairwise_iou(chunk_anchors, gt_boxes)  # [C, M]
        if border is not None:
            inside = jax.vmap(
                lambda hw: matching.inside_image(chunk_anchors, hw, float(border)), out_axes=1
            )(gt_image_hw)  # [C, M]
            iou = jnp.where(inside, iou, 0.0)
        return jnp.maximum(best, jnp.max(iou, axis=0)), None

    best, _ = lax.scan(step, jnp.zeros((num_gt,), jnp.float32), padded.reshape(-1, chunk, 4))
    return jnp.where(gt_ok, best, 0.0)


@functools.partial(
    jax.jit,
    static_argnames=(
        "high",
        "low",
        "allow_low_quality",
        "border",
        "images_per_step",
        "count_positives",
    ),
)
def batch_coverage(
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    gt_ignore: jax.Array,
    image_hw: jax.Array,
    *,
    high: float,
    low: float,
    allow_low_quality: bool,
    border: float | None = None,
    images_per_step: int = 1,
    count_positives: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Best anchor IoU and positive-anchor count of every box of a batch (jitted).

    Args:
      anchors: ``[N, 4]`` xyxy anchors of the padded image.
      gt_boxes: ``[B, G, 4]`` xyxy padded ground truth; ``gt_valid``, ``gt_ignore`` bool
        ``[B, G]``; ``image_hw`` int ``[B, 2]``.
      high, low, allow_low_quality, border: the matcher's settings (:func:`matching.match`).
      images_per_step: images matched at once (vmap) inside the sequential map over the batch.
      count_positives: run the matcher; False skips it (about 4x faster) and gives -1 counts.

    Returns:
      ``best_iou`` float32 ``[B, G]`` (0 for padding and ignored boxes) and ``num_positive``
      int32 ``[B, G]``: anchors that :func:`matching.match` labels positive and assigns to the
      box (neighbouring boxes competing, as in training).
    """
    b, g = gt_boxes.shape[:2]
    use = gt_valid & ~gt_ignore  # [B, G]
    best = best_anchor_iou(
        anchors,
        gt_boxes.reshape(b * g, 4),
        gt_image_hw=jnp.repeat(image_hw, g, axis=0),
        border=border,
    ).reshape(b, g)

    matcher = {"high": high, "low": low, "allow_low_quality": allow_low_quality, "border": border}

    def count(args):
        boxes, valid, ignore, hw = args
        matched, labels = matching.match(
            anchors, boxes, valid, gt_ignore=ignore, image_hw=hw, **matcher
        )
        return jnp.zeros((g,), jnp.int32).at[matched].add((labels == 1).astype(jnp.int32))

    if count_positives:
        num_positive = lax.map(
            count, (gt_boxes, gt_valid, gt_ignore, image_hw), batch_size=images_per_step
        )
    else:
        num_positive = jnp.full((b, g), -1, jnp.int32)
    return jnp.where(use, best, 0.0), jnp.where(use, num_positive, 0)


# --- data --------------------------------------------------------------------------------------


class GroundTruth(NamedTuple):
    """The padded ground truth of I images, as the input pipeline gives it."""

    boxes: np.ndarray  # float32 [I, G, 4] xyxy pixels of the resized image
    valid: np.ndarray  # bool [I, G]
    ignore: np.ndarray  # bool [I, G]
    image_hw: np.ndarray  # int32 [I, 2]
    pad_hw: np.ndarray  # int32 [I, 2]: the padded size of the image's batch (its aspect bucket)
    index: np.ndarray  # int32 [I]: record index in the split
    num_dropped: int  # boxes beyond max_boxes the pipeline dropped


def load_ground_truth(
    config, *, split: str | None = None, max_images: int | None = None, progress: bool = True
) -> GroundTruth:
    """The ground truth of ``split`` (default ``config.data.eval_split``) through the eval pipeline.

    No flip, no shuffle; the first ``max_images`` images (None: all). Shows a progress bar on a
    terminal.
    """
    from jax_rpn.data import pipeline  # keeps `import jax_rpn.coverage` free of tfds and grain

    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be None or >= 1, got {max_images}")
    cfg = config.copy_and_resolve_references()
    cfg.data.eval_split = split or cfg.data.eval_split
    cfg.data.num_eval_images = max_images
    total = pipeline.dataset_info(cfg).num_eval_examples
    parts = []
    bar = tqdm(
        total=total,
        desc=f"boxes of {cfg.data.eval_split}",
        unit="img",
        disable=None if progress else True,
    )
    fields = ("boxes", "valid", "ignore", "image_hw", "index", "num_dropped")
    for batch in pipeline.create_eval_iterator(cfg, process_index=0, process_count=1):
        keep = np.asarray(batch["example_valid"], bool)
        parts.append({k: np.asarray(batch[k])[keep] for k in fields})
        parts[-1]["pad_hw"] = np.tile(np.shape(batch["image"])[1:3], (int(keep.sum()), 1))
        bar.update(int(keep.sum()))
    bar.close()
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return GroundTruth(
        boxes=cat["boxes"].astype(np.float32),
        valid=cat["valid"].astype(bool),
        ignore=cat["ignore"].astype(bool),
        image_hw=cat["image_hw"].astype(np.int32),
        pad_hw=cat["pad_hw"].astype(np.int32),
        index=cat["index"].astype(np.int32),
        num_dropped=int(cat["num_dropped"].sum()),
    )


# --- coverage of a set of anchors --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BoxCoverage:
    """Per-box coverage of M boxes (padding and ignored boxes left out)."""

    image_index: np.ndarray  # int32 [M]: record index of the box's image
    boxes: np.ndarray  # float32 [M, 4] xyxy
    best_iou: np.ndarray  # float32 [M]
    num_positive: np.ndarray  # int32 [M]: positive anchors the matcher assigns; -1: not counted


def compute_coverage(
    anchors,
    gt: GroundTruth,
    *,
    targets: TargetSettings,
    images_per_batch: int = 64,
    progress: bool = True,
    desc: str = "coverage",
    count_positives: bool = True,
) -> BoxCoverage:
    """Coverage of ``gt``'s boxes with the matcher of ``targets``.

    ``anchors``: xyxy ``[N, 4]`` shared by every image, or a mapping from each padded shape
    ``(H, W)`` in ``gt.pad_hw`` to its anchors ``[N, 4]`` (aspect-ratio buckets: an image is
    matched against the anchors of the shape it was padded to, as in training).
    ``count_positives=False`` skips the matcher (see :func:`batch_coverage`).
    """
    t = targets
    matching.check_thresholds(t.high, t.low)
    num_images, g = gt.valid.shape
    if isinstance(anchors, Mapping):
        shapes = [tuple(int(v) for v in hw) for hw in gt.pad_hw]
        missing = sorted(set(shapes) - {tuple(hw) for hw in anchors})
        if missing:
            raise ValueError(f"anchors has no entry for the padded shapes {missing} of gt.pad_hw")
        groups = [
            (anchors[hw], np.flatnonzero(np.all(gt.pad_hw == hw, axis=1)))
            for hw in dict.fromkeys(shapes)
        ]
    else:
        groups = [(anchors, np.arange(num_images))]
    best = np.zeros((num_images, g), np.float32)
    count = np.zeros((num_images, g), np.int32)
    for group_anchors, rows in groups:
        group_anchors = np.asarray(group_anchors, np.float32)
        box_ops.check_boxes(group_anchors, name="anchors")
        b = max(1, min(images_per_batch, len(rows)))
        per_step = max(1, min(b, _CHUNK_ELEMENTS // max(len(group_anchors) * g, 1)))
        fn = functools.partial(
            batch_coverage,
            high=t.high,
            low=t.low,
            allow_low_quality=t.allow_low_quality,
            border=t.border,
            images_per_step=per_step,
            count_positives=count_positives,
        )
        for start in tqdm(
            range(0, len(rows), b), desc=desc, unit="batch", disable=None if progress else True
        ):
            part = rows[start : start + b]
            pad = b - len(part)  # the last batch is padded with empty images
            arrays = [
                np.pad(x[part], [(0, pad)] + [(0, 0)] * (x.ndim - 1))
                for x in (gt.boxes, gt.valid, gt.ignore, gt.image_hw)
            ]
            out = fn(group_anchors, *arrays)
            best[part] = np.asarray(out[0])[: len(part)]
            count[part] = np.asarray(out[1])[: len(part)]
    use = gt.valid & ~gt.ignore & np.asarray(box_ops.is_valid(gt.boxes))  # [I, G]
    return BoxCoverage(
        image_index=np.broadcast_to(gt.index[:, None], use.shape)[use].astype(np.int32),
        boxes=gt.boxes[use],
        best_iou=best[use],
        num_positive=count[use],
    )


# --- summaries ---------------------------------------------------------------------------------


def _box_stats(boxes):
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return w * h, h / np.maximum(w, 1e-12)  # area [M], h / w [M]


def categories(best_iou, *, high: float) -> np.ndarray:
    """``best_iou [M]`` -> int ``[M]`` index into :data:`CATEGORIES` (high / low-quality / none)."""
    best = np.asarray(best_iou)
    return np.where(best >= high, 0, np.where(best > 0, 1, 2))


def size_bin_edges(boxes, *, bins_per_octave: int = SIZE_BINS_PER_OCTAVE) -> np.ndarray:
    """Log2-spaced edges of sqrt(area) (pixels) spanning xyxy ``boxes [M, 4]``."""
    size = np.sqrt(_box_stats(np.asarray(boxes, np.float64).reshape(-1, 4))[0])
    size = size[size > 0]
    if size.size == 0:
        return np.array([1.0, 2.0])
    lo = math.floor(math.log2(size.min()) * bins_per_octave)
    hi = math.floor(math.log2(size.max()) * bins_per_octave) + 1
    return 2.0 ** (np.arange(lo, hi + 1) / bins_per_octave)


def _row(name, lo, hi, cat, best, num_positive):
    n = int(cat.size)
    frac = [float(np.mean(cat == i)) if n else 0.0 for i in range(len(CATEGORIES))]
    counted = n > 0 and bool(np.all(num_positive >= 0))
    return {
        "bin": name,
        "lo": lo,
        "hi": None if math.isinf(hi) else hi,  # None: unbounded (JSON has no infinity)
        "boxes": n,
        "mean_best_iou": float(best.mean()) if n else 0.0,
        **dict(zip(CATEGORIES, frac, strict=True)),
        # None when the matcher was skipped (counts -1).
        "matched": float(np.mean(num_positive > 0)) if counted else None,
    }


def summarize(cov: BoxCoverage, *, high: float, size_edges=None, worst: int = 10) -> dict:
    """JSON-able summary of a :class:`BoxCoverage`: overall, by COCO size, by sqrt(area) bin,
    by aspect ratio bin, and the ``worst`` lowest-IoU boxes. Empty bins are left out."""
    area, ratio = _box_stats(cov.boxes)
    size = np.sqrt(area)
    cat = categories(cov.best_iou, high=high)
    best, npos = cov.best_iou, cov.num_positive

    def rows(groups):
        return [
            _row(name, lo, hi, cat[m], best[m], npos[m]) for name, lo, hi, m in groups if m.any()
        ]

    edges = size_bin_edges(cov.boxes) if size_edges is None else np.asarray(size_edges)
    size_groups = [
        (f"[{lo:.3g}, {hi:.3g})", float(lo), float(hi), (size >= lo) & (size < hi))
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]
    ratio_bin = np.clip(np.round(np.log2(np.maximum(ratio, 1e-12))), -2, 2)
    lo_k, hi_k = RATIO_BINS[0][1], RATIO_BINS[-1][1]
    ratio_groups = [
        (
            name,
            0.0 if k == lo_k else 2.0 ** (k - 0.5),
            math.inf if k == hi_k else 2.0 ** (k + 0.5),
            ratio_bin == k,
        )
        for name, k in RATIO_BINS
    ]
    order = np.lexsort((area, best))[:worst]
    counted = npos.size > 0 and npos.min() >= 0  # the matcher ran
    return {
        "overall": {
            **_row("all", 0.0, math.inf, cat, best, npos),
            "median_positives": float(np.median(npos)) if counted else None,
        },
        "coco_sizes": rows((n, lo, hi, (area >= lo) & (area < hi)) for n, lo, hi in COCO_SIZES),
        "sizes": rows(size_groups),
        "ratios": rows(ratio_groups),
        "worst": [
            {
                "image_index": int(cov.image_index[i]),
                "box": [round(float(v), 2) for v in cov.boxes[i]],
                "best_iou": float(best[i]),
                "size": float(size[i]),
                "aspect_ratio": float(ratio[i]),
                "num_positive": int(npos[i]) if npos[i] >= 0 else None,
            }
            for i in order
        ],
    }
