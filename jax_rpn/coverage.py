"""Anchor coverage of a dataset's boxes: does every object get an anchor? What about small ones?

For each ground-truth box of a split (after the input pipeline's resizing; padding and ignored
boxes left out) this computes the best IoU any anchor reaches and how many positive anchors the
matcher gives it, then breaks that down by box size and aspect ratio (``h / w``). A box is

* ``high``: best IoU ``>= targets.high``: positive at the matcher's high threshold;
* ``low_quality_only``: best IoU in ``(0, high)``: positive only through low-quality matching
  (and never positive when ``targets.allow_low_quality`` is off);
* ``none``: best IoU 0: no anchor overlaps it, never positive.

It also suggests anchors for the data with the same A on every level (one shared head): a
shared set of aspect ratios from k-means over box shapes with distance ``1 - IoU`` of centred
boxes (YOLOv2), and per-level sizes from the same k-means over the sizes of the boxes that fall
to each level (the level whose current anchor sizes are nearest in log scale, so each level
keeps its size-to-stride proportion). A stays the config's unless ``--sizes_per_level`` or
``--num_ratios`` ask for more. The suggestion's coverage is computed the same way, side by side.
k-means maximises the mean IoU, not the fraction above ``high``: read the side-by-side numbers.

Boxes are ``[x1, y1, x2, y2]`` in absolute pixels. Anchors are those of the padded image size
``config.data.pad_to``: feature size ``pad_to // stride`` on each level.

    python -m jax_rpn.coverage --config configs/default.py [--split validation] [--out DIR]
        [--max_images N] [--sizes_per_level S] [--num_ratios R] [--nosuggest] [--json]

writes ``report.txt`` (the printed report), ``coverage.json`` and PNGs to ``--out`` (default
``workdirs/<config name>/coverage``); ``--config.<field>=...`` overrides the config.
"""

import dataclasses
import functools
import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from jax_rpn import anchors as anchor_ops
from jax_rpn import boxes as box_ops
from jax_rpn import matching, viz
from jax_rpn.settings import AnchorSettings, TargetSettings

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
    anchors = jnp.asarray(anchors, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    if anchors.ndim != 2 or anchors.shape[1] != 4:
        raise ValueError(f"anchors must have shape [N, 4], got {anchors.shape}")
    if gt_boxes.ndim != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"gt_boxes must have shape [M, 4], got {gt_boxes.shape}")
    if border is not None and gt_image_hw is None:
        raise ValueError("border needs gt_image_hw [M, 2]")
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

    def count(args):
        boxes, valid, ignore, hw = args
        matched, labels = matching.match(
            anchors,
            boxes,
            valid,
            high=high,
            low=low,
            allow_low_quality=allow_low_quality,
            gt_ignore=ignore,
            image_hw=hw,
            border=border,
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
    index: np.ndarray  # int32 [I]: record index in the split
    num_dropped: int  # boxes beyond max_boxes the pipeline dropped


def load_ground_truth(
    config, *, split: str | None = None, max_images: int | None = None, progress: bool = True
) -> GroundTruth:
    """The ground truth of ``split`` (default ``config.data.eval_split``) through the eval pipeline.

    No flip, no shuffle; the first ``max_images`` images (None: all). Shows a progress bar.
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
        total=total, desc=f"boxes of {cfg.data.eval_split}", unit="img", disable=not progress
    )
    for batch in pipeline.create_eval_iterator(cfg, process_index=0, process_count=1):
        keep = np.asarray(batch["example_valid"], bool)
        parts.append({k: np.asarray(batch[k])[keep] for k in GroundTruth._fields})
        bar.update(int(keep.sum()))
    bar.close()
    cat = {k: np.concatenate([p[k] for p in parts]) for k in GroundTruth._fields}
    return GroundTruth(
        boxes=cat["boxes"].astype(np.float32),
        valid=cat["valid"].astype(bool),
        ignore=cat["ignore"].astype(bool),
        image_hw=cat["image_hw"].astype(np.int32),
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
    """Coverage of ``gt``'s boxes by xyxy ``anchors [N, 4]`` with the matcher of ``targets``.

    ``count_positives=False`` skips the matcher (see :func:`batch_coverage`).
    """
    anchors = np.asarray(anchors, np.float32)
    box_ops.check_boxes(anchors, name="anchors")
    t = targets
    matching.check_thresholds(t.high, t.low)
    num_images, g = gt.valid.shape
    b = max(1, min(images_per_batch, num_images))
    per_step = max(1, min(b, _CHUNK_ELEMENTS // max(len(anchors) * g, 1)))
    fn = functools.partial(
        batch_coverage,
        high=t.high,
        low=t.low,
        allow_low_quality=t.allow_low_quality,
        border=t.border,
        images_per_step=per_step,
        count_positives=count_positives,
    )
    best, count = [], []
    for start in tqdm(range(0, num_images, b), desc=desc, unit="batch", disable=not progress):
        sl = slice(start, start + b)
        pad = b - len(gt.valid[sl])  # the last batch is padded with empty images
        arrays = [
            np.pad(x[sl], [(0, pad)] + [(0, 0)] * (x.ndim - 1))
            for x in (gt.boxes, gt.valid, gt.ignore, gt.image_hw)
        ]
        out = fn(anchors, *arrays)
        best.append(np.asarray(out[0])[: b - pad])
        count.append(np.asarray(out[1])[: b - pad])
    use = gt.valid & ~gt.ignore & np.asarray(box_ops.is_valid(gt.boxes))  # [I, G]
    return BoxCoverage(
        image_index=np.broadcast_to(gt.index[:, None], use.shape)[use].astype(np.int32),
        boxes=gt.boxes[use],
        best_iou=np.concatenate(best)[use],
        num_positive=np.concatenate(count)[use].astype(np.int32),
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


# --- suggestion: k-means (1 - IoU) fitted to the pyramid ---------------------------------------


@jax.jit
def _centred_iou(wh1, wh2):
    def centred(wh):
        return jnp.concatenate([-wh / 2, wh / 2], axis=-1)  # [M, 4]

    return box_ops.pairwise_iou(centred(wh1), centred(wh2))


def shape_iou(wh1, wh2) -> np.ndarray:
    """IoU of centred boxes of shapes ``wh1 [M, 2]`` and ``wh2 [K, 2]`` (w, h) -> ``[M, K]``."""
    return np.asarray(_centred_iou(np.float32(wh1), np.float32(wh2)), np.float64)


def kmeans_shapes(wh, k: int, *, seed: int = 0, max_iter: int = 100) -> np.ndarray:
    """k-means of box shapes ``wh [M, 2]`` (w, h) with distance ``1 - IoU`` of centred boxes.

    YOLOv2's anchor clustering: k-means++ initialisation, nearest centre by IoU, centre update
    by the median w and h of its boxes. Returns ``[k, 2]`` centres, sorted by area then h / w.
    """
    wh = np.asarray(wh, np.float64)
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"wh must have shape [M, 2], got {wh.shape}")
    if not np.all(np.isfinite(wh) & (wh > 0)):
        raise ValueError("wh must hold finite, positive widths and heights")
    if int(k) != k or not 1 <= k <= len(wh):
        raise ValueError(f"k must be an integer in [1, M={len(wh)}], got {k}")
    rng = np.random.default_rng(seed)
    centres = wh[[rng.integers(len(wh))]]  # [1, 2]
    while len(centres) < k:  # k-means++: the next centre far (in 1 - IoU) from the chosen ones
        d = 1.0 - shape_iou(wh, centres).max(axis=1)  # [M]
        p = d**2 / np.sum(d**2) if np.sum(d**2) > 0 else None
        centres = np.concatenate([centres, wh[[rng.choice(len(wh), p=p)]]])
    for _ in range(max_iter):
        assign = np.argmax(shape_iou(wh, centres), axis=1)  # [M]
        new = np.stack(
            [np.median(wh[assign == j], axis=0) if np.any(assign == j) else c
             for j, c in enumerate(centres)]
        )  # fmt: skip
        if np.allclose(new, centres):
            break
        centres = new
    area, ratio = centres[:, 0] * centres[:, 1], centres[:, 1] / centres[:, 0]
    return centres[np.lexsort((ratio, area))]


class Suggestion(NamedTuple):
    """Suggested ``config.anchors.sizes`` (one tuple per level) and shared ``aspect_ratios``."""

    sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[float, ...]
    boxes_per_level: tuple[int, ...]  # boxes each level's sizes were fitted to (0: kept)


def _check_count(name, value):
    if value is not None and (int(value) != value or value < 1):
        raise ValueError(
            f"{name} must be None (keep the config's) or a positive integer, got {value}"
        )


def suggest_anchors(
    boxes,
    *,
    strides,
    sizes,
    aspect_ratios,
    sizes_per_level: int | None = None,
    num_ratios: int | None = None,
    seed: int = 0,
) -> Suggestion:
    """Anchor sizes and ratios fitted to xyxy ``boxes [M, 4]``, with the same A on every level.

    Ratios: the ``h / w`` of :func:`kmeans_shapes` centres of the unit-area box shapes,
    k = ``num_ratios`` (None: the config's count), shared by all levels. Sizes: each box goes to
    the level whose current sizes are nearest to its sqrt(area) in log scale (their geometric
    mean), so each level keeps its size-to-stride proportion; each level's sizes become the
    k-means centres of its boxes' sizes (centred squares, 1 - IoU), k = ``sizes_per_level``
    (None: the config's count). A level with fewer boxes than k keeps its sizes, or, when k
    changes, spreads k sizes over the octave around their geometric mean.
    ``A = sizes_per_level * num_ratios`` changes only when those are given.
    """
    _check_count("sizes_per_level", sizes_per_level)
    _check_count("num_ratios", num_ratios)
    strides = tuple(strides)
    level_sizes = anchor_ops.per_level("sizes", sizes, len(strides))
    level_ratios = anchor_ops.per_level("aspect_ratios", aspect_ratios, len(strides))
    if num_ratios is None and len({len(r) for r in level_ratios}) != 1:
        raise ValueError(
            f"aspect_ratios must have the same count on every level (or give num_ratios), got "
            f"{level_ratios}"
        )
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    area, _ = _box_stats(boxes)
    ok = area > 0
    wh = np.stack([boxes[ok, 2] - boxes[ok, 0], boxes[ok, 3] - boxes[ok, 1]], axis=1)  # [M, 2]
    size = np.sqrt(area[ok])  # [M]
    k_ratios = len(level_ratios[0]) if num_ratios is None else int(num_ratios)
    if len(wh) >= k_ratios:
        shapes = kmeans_shapes(wh / size[:, None], k_ratios, seed=seed)
        ratios = tuple(sorted(round(float(h / w), 2) for w, h in shapes))
    elif num_ratios is None:
        ratios = tuple(float(r) for r in level_ratios[0])
    else:
        raise ValueError(f"num_ratios={num_ratios} needs at least that many boxes, got {len(wh)}")
    centres = np.log([np.exp(np.mean(np.log(s))) for s in level_sizes])  # [L]
    level = np.argmin(np.abs(np.log(size)[:, None] - centres[None, :]), axis=1)  # [M]
    new_sizes, counts = [], []
    for i, current in enumerate(level_sizes):
        k = len(current) if sizes_per_level is None else int(sizes_per_level)
        s = size[level == i]
        counts.append(int(s.size))
        if s.size >= k:
            sq = kmeans_shapes(np.stack([s, s], axis=1), k, seed=seed)
            fitted = np.sqrt(sq[:, 0] * sq[:, 1])
        elif k == len(current):
            fitted = np.asarray(current, np.float64)
        else:  # k sizes over the octave around the level's centre
            fitted = np.exp(centres[i]) * 2.0 ** ((np.arange(k) - (k - 1) / 2) / k)
        new_sizes.append(tuple(sorted(max(0.1, round(float(v), 1)) for v in fitted)))
    return Suggestion(tuple(new_sizes), ratios, tuple(counts))


# --- report ------------------------------------------------------------------------------------


def _pct(x):
    return "  n/a" if x is None else f"{100 * x:5.1f}%"


def _table(title, rows, first="bin"):
    head = f"  {first:<16} {'boxes':>7} {'mean IoU':>8} {'>=high':>7} {'low-q':>7} {'none':>7}"
    lines = [title, head + f" {'matched':>8}"]
    for r in rows:
        lines.append(
            f"  {r['bin']:<16} {r['boxes']:>7} {r['mean_best_iou']:>8.3f} {_pct(r['high']):>7} "
            f"{_pct(r['low_quality_only']):>7} {_pct(r['none']):>7} {_pct(r['matched']):>8}"
        )
    return lines


def _anchor_lines(a):
    return [
        f"  strides {tuple(a['strides'])}, sizes {tuple(tuple(s) for s in a['sizes'])}, "
        f"aspect ratios (h/w) {tuple(a['aspect_ratios'])}",
        f"  A = {a['num_cell_anchors']} anchors per cell, N = {a['num_anchors']} anchors per "
        f"image; smallest anchor area {a['min_anchor_area']:.0f} px^2",
    ]


def format_report(result: dict) -> str:
    """The printed report of :func:`run`'s result, in the article's questions."""
    c, cur, sug = result["setup"], result["current"], result.get("suggested")
    high = c["high"]
    o = cur["overall"]
    lq = "on" if c["allow_low_quality"] else "OFF: these boxes get no positive anchor"
    lines = [
        f"Anchor coverage of {c['dataset']} {c['split']}: {c['num_images']} images, "
        f"{o['boxes']} boxes after resizing to at most {c['image_hw'][0]}x{c['image_hw'][1]} "
        f"({c['num_ignored']} ignored and {c['num_dropped']} beyond max_boxes left out)",
        "Anchors:",
        *_anchor_lines(cur["anchors"]),
        f"Matcher: high {high}, low {c['low']}, low-quality matching "
        f"{'on' if c['allow_low_quality'] else 'off'}, border {c['border']}",
        "",
        "Does every object get an anchor?",
    ]
    for label, value, note in (
        (f"best IoU >= {high} (positive at the high threshold)", o["high"], ""),
        (
            f"best IoU in (0, {high}): positive only via low-quality matching",
            o["low_quality_only"],
            f"  (low-quality matching {lq})",
        ),
        ("best IoU 0: uncovered, never positive", o["none"], ""),
    ):
        lines.append(f"  {label:<64} {_pct(value)}{note}")
    if o["matched"] is None:
        lines.append("  (the matcher's positive-anchor counts were skipped: --nomatch)")
    else:
        lines.append(
            f"  with the matcher as in training (neighbours competing): {_pct(o['matched'])} of "
            f"boxes get at least one positive anchor, median {o['median_positives']:g} per box"
        )
    lines += ["", "What about very small boxes?"]
    min_side = math.sqrt(high * cur["anchors"]["min_anchor_area"])
    lines.append(
        f"  IoU <= (smaller area) / (larger area), so a box with sqrt(area) < {min_side:.1f} px "
        f"(area below {high} x the smallest anchor's) can never reach IoU {high}."
    )
    for r in cur["sizes"][:2] + [r for r in cur["coco_sizes"] if r["bin"] == "small"]:
        name = "COCO small (area < 32^2)" if r["bin"] == "small" else f"sqrt(area) {r['bin']} px"
        lines.append(
            f"  {name}: {r['boxes']} boxes, {_pct(r['high']).strip()} >= {high}, "
            f"{_pct(r['low_quality_only']).strip()} only via low-quality matching, "
            f"{_pct(r['none']).strip()} uncovered, mean best IoU {r['mean_best_iou']:.3f}"
        )
    lines += [""] + _table("By COCO size (box area after resizing):", cur["coco_sizes"], "size")
    lines += [""] + _table("By sqrt(area), half-octave bins (px):", cur["sizes"], "sqrt(area)")
    lines += [""] + _table("By aspect ratio h/w (log2 bins):", cur["ratios"], "h/w")
    lines += [
        "",
        "Worst-covered boxes:",
        "  image  box [x1, y1, x2, y2]          best IoU  size   h/w",
    ]
    for w in cur["worst"]:
        box = "[" + ", ".join(f"{v:.1f}" for v in w["box"]) + "]"
        lines.append(
            f"  {w['image_index']:>5}  {box:<28} {w['best_iou']:>8.3f} {w['size']:>5.1f} "
            f"{w['aspect_ratio']:>5.2f}"
        )
    if sug is not None:
        so = sug["overall"]
        a = sug["anchors"]
        lines += [
            "",
            "Suggested anchors (k-means with 1 - IoU over box shapes, YOLOv2; sizes fitted per "
            f"level to the boxes nearest its current sizes: {tuple(a['boxes_per_level'])} boxes):",
            *_anchor_lines(a),
            f"  config.anchors.sizes = {tuple(tuple(s) for s in a['sizes'])}",
            f"  config.anchors.aspect_ratios = {tuple(a['aspect_ratios'])}",
            "",
            "Current vs suggested anchors (each column pair: current, suggested):",
            f"  {'bin':<16} {'boxes':>7} {'>=high':>15} {'low-q only':>15} "
            f"{'matched':>15} {'mean IoU':>13}",
        ]
        pairs = [("all", o, so)] + [
            (r["bin"], r, s) for r, s in zip(cur["sizes"], sug["sizes"], strict=True)
        ]
        pairs += [
            (f"h/w {r['bin']}", r, s) for r, s in zip(cur["ratios"], sug["ratios"], strict=True)
        ]
        for name, r, s in pairs:
            lines.append(
                f"  {name:<16} {r['boxes']:>7}  {_pct(r['high'])} {_pct(s['high'])}  "
                f"{_pct(r['low_quality_only'])} {_pct(s['low_quality_only'])}  "
                f"{_pct(r['matched'])} {_pct(s['matched'])}  "
                f"{r['mean_best_iou']:.3f} {s['mean_best_iou']:.3f}"
            )
        verdict = "improves" if so["high"] > o["high"] else "does not improve"
        lines.append(
            f"  The suggestion {verdict} the fraction of boxes reaching IoU {high} "
            f"({_pct(o['high']).strip()} -> {_pct(so['high']).strip()})."
        )
        a_cur, a_new = cur["anchors"]["num_cell_anchors"], a["num_cell_anchors"]
        if a_new != a_cur:
            lines.append(f"  A changes from {a_cur} to {a_new}: the head must be trained anew.")
        else:
            lines.append(
                "  Sizes one octave apart and a grid of one stride cap the IoU a box can reach; "
                "more anchors per cell (--sizes_per_level, --num_ratios) raise the cap."
            )
    return "\n".join(lines)


# --- pictures ----------------------------------------------------------------------------------

_CATEGORY_STYLE = (
    ("high", "tab:green", "IoU >= high"),
    ("low_quality_only", "tab:orange", "low-quality only"),
    ("none", "tab:red", "uncovered"),
)


def _plot_hist(ax, best_ious: dict, *, high, low):
    bins = np.linspace(0, 1, 41)
    for name, best in best_ious.items():
        ax.hist(best, bins=bins, histtype="step", lw=2, label=f"{name} ({len(best)} boxes)")
    ax.axvline(high, color="k", ls="--", lw=1, label=f"high {high}")
    ax.axvline(low, color="0.5", ls=":", lw=1, label=f"low {low}")
    ax.set(xlabel="best IoU of a box with any anchor", ylabel="boxes", title="best anchor IoU")
    ax.legend(fontsize="small")


def _plot_stacked(ax, rows, *, title, xlabel):
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for key, color, label in _CATEGORY_STYLE:
        v = np.array([r[key] for r in rows])
        ax.bar(x, v, bottom=bottom, color=color, label=label)
        bottom += v
    for i, r in enumerate(rows):
        ax.text(i, 1.01, str(r["boxes"]), ha="center", va="bottom", fontsize="x-small")  # count
    ax.set_xticks(x, [r["bin"] for r in rows], rotation=30, ha="right", fontsize="small")
    ax.set(ylim=(0, 1.25), ylabel="fraction of boxes", xlabel=xlabel, title=title)
    ax.legend(fontsize="small", loc="upper center", ncol=3)


def _plot_compare(ax, cur, sug, *, high):
    rows = [("all", cur["overall"], sug["overall"])]
    rows += [(r["bin"], r, s) for r, s in zip(cur["sizes"], sug["sizes"], strict=True)]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["high"] for _, r, _ in rows], 0.4, label="current", color="tab:blue")
    ax.bar(x + 0.2, [s["high"] for _, _, s in rows], 0.4, label="suggested", color="tab:purple")
    ax.set_xticks(x, [n for n, _, _ in rows], rotation=30, ha="right", fontsize="small")
    ax.set(
        ylim=(0, 1.05),
        ylabel=f"fraction with best IoU >= {high}",
        xlabel="sqrt(area) bin (px)",
        title="current vs suggested anchors",
    )
    ax.legend(fontsize="small")


def write_pictures(result: dict, coverages: dict, out_dir: str) -> list[str]:
    """PNGs of :func:`run`'s result into ``out_dir``; returns their paths.

    ``coverages``: name ("current", "suggested") -> :class:`BoxCoverage`, for the histogram.
    """
    os.makedirs(out_dir, exist_ok=True)
    c, cur, sug = result["setup"], result["current"], result.get("suggested")
    high, low = c["high"], c["low"]
    best = {k: v.best_iou for k, v in coverages.items()}
    paths = {}

    def single(name, draw, size=(7.0, 4.5)):
        fig, axes = viz.new_figure(size=size)
        draw(axes[0, 0])
        paths[name] = os.path.join(out_dir, f"{name}.png")
        viz.save_figure(fig, paths[name])

    single("best_iou", lambda ax: _plot_hist(ax, best, high=high, low=low))
    size_title = "coverage by size (current anchors)"
    ratio_title = "coverage by aspect ratio (current anchors)"
    single(
        "coverage_by_size",
        lambda ax: _plot_stacked(ax, cur["sizes"], title=size_title, xlabel="sqrt(area) (px)"),
    )
    single(
        "coverage_by_ratio",
        lambda ax: _plot_stacked(ax, cur["ratios"], title=ratio_title, xlabel="h / w"),
    )
    if sug is not None:
        single("current_vs_suggested", lambda ax: _plot_compare(ax, cur, sug, high=high))
    # Everything in one figure (the README's picture).
    fig, axes = viz.new_figure(2, 2, size=(6.0, 4.2))
    _plot_hist(axes[0, 0], best, high=high, low=low)
    _plot_stacked(axes[0, 1], cur["sizes"], title=size_title, xlabel="sqrt(area) (px)")
    _plot_stacked(axes[1, 0], cur["ratios"], title=ratio_title, xlabel="h / w")
    if sug is not None:
        _plot_compare(axes[1, 1], cur, sug, high=high)
    else:
        axes[1, 1].set_axis_off()
    fig.suptitle(f"anchor coverage: {c['dataset']} {c['split']}, {cur['overall']['boxes']} boxes")
    paths["coverage"] = os.path.join(out_dir, "coverage.png")
    viz.save_figure(fig, paths["coverage"])
    # The A anchors of a cell of every level, drawn on one centre.
    a = cur["anchors"]
    cells = anchor_ops.level_cell_anchors(
        a["strides"], a["sizes"], a["aspect_ratios"], convention=c["convention"]
    )
    fig = viz.plot_cell_anchors(np.concatenate(cells), stride=a["strides"][0])
    fig.axes[0].set_title(
        f"cell anchors of {len(cells)} levels (strides {tuple(a['strides'])}), "
        f"A = {a['num_cell_anchors']}",
        fontsize="small",
    )
    paths["cell_anchors"] = os.path.join(out_dir, "cell_anchors.png")
    viz.save_figure(fig, paths["cell_anchors"])
    return list(paths.values())


# --- the whole analysis ------------------------------------------------------------------------


def _plain(values):
    """Nested sequences of numbers -> nested lists of floats (JSON)."""
    if isinstance(values, (list, tuple)):
        return [_plain(v) for v in values]
    return float(values)


def _anchor_info(settings: AnchorSettings, anchors):
    cells = settings.cell_anchors()
    ratios = settings.aspect_ratios
    return {
        "strides": [int(s) for s in settings.strides],
        "sizes": _plain(settings.sizes),
        "aspect_ratios": _plain(ratios[0] if len(set(ratios)) == 1 else ratios),
        "num_cell_anchors": int(cells[0].shape[0]),
        "num_anchors": int(len(anchors)),
        "min_anchor_area": float(np.asarray(box_ops.area(np.concatenate(cells))).min()),
    }


def run(
    config,
    *,
    split: str | None = None,
    out_dir: str | None = None,
    max_images: int | None = None,
    suggest: bool = True,
    sizes_per_level: int | None = None,
    num_ratios: int | None = None,
    worst: int = 10,
    count_positives: bool = True,
    progress: bool = True,
) -> dict:
    """Coverage of ``split``'s boxes by ``config``'s anchors (and by suggested ones).

    ``sizes_per_level`` / ``num_ratios``: see :func:`suggest_anchors` (None: keep the config's,
    so A stays). Returns a JSON-able dict: ``setup``, ``current`` and ``suggested`` (None when
    ``suggest`` is False) summaries (:func:`summarize`, plus ``anchors``), ``pictures`` (paths).
    ``count_positives=False`` skips the matcher's counts (``matched`` None). With ``out_dir``,
    writes ``coverage.json``, ``report.txt`` and the PNGs of
    :func:`write_pictures` there.
    """
    gt = load_ground_truth(config, split=split, max_images=max_images, progress=progress)
    t, a = TargetSettings.from_config(config), AnchorSettings.from_config(config)
    pad_hw = tuple(int(v) for v in config.data.pad_to)
    anchors = np.concatenate(a.for_image(pad_hw))  # [N, 4]
    kw = {"targets": t, "progress": progress, "count_positives": count_positives}
    cov = compute_coverage(anchors, gt, desc="current anchors", **kw)
    if cov.boxes.shape[0] == 0:
        raise ValueError("the split has no (non-ignored) ground-truth boxes")
    edges = size_bin_edges(cov.boxes)
    current = summarize(cov, high=t.high, size_edges=edges, worst=worst)
    current["anchors"] = _anchor_info(a, anchors)
    coverages = {"current": cov}
    suggested = None
    if suggest:
        s = suggest_anchors(
            cov.boxes,
            strides=a.strides,
            sizes=a.sizes,
            aspect_ratios=a.aspect_ratios,
            sizes_per_level=sizes_per_level,
            num_ratios=num_ratios,
            seed=config.seed,
        )
        new = dataclasses.replace(a, sizes=s.sizes, aspect_ratios=s.aspect_ratios)
        new_anchors = np.concatenate(new.for_image(pad_hw))  # [N', 4]
        coverages["suggested"] = compute_coverage(new_anchors, gt, desc="suggested anchors", **kw)
        suggested = summarize(coverages["suggested"], high=t.high, size_edges=edges, worst=worst)
        suggested["anchors"] = _anchor_info(new, new_anchors)
        suggested["anchors"]["boxes_per_level"] = list(s.boxes_per_level)
    result = {
        "setup": {
            "dataset": config.data.name,
            "split": split or config.data.eval_split,
            "num_images": int(len(gt.index)),
            "num_ignored": int(np.sum(gt.valid & gt.ignore)),
            "num_dropped": gt.num_dropped,
            "image_hw": list(pad_hw),
            "high": float(t.high),
            "low": float(t.low),
            "allow_low_quality": bool(t.allow_low_quality),
            "border": t.border,
            "convention": a.convention,
        },
        "current": current,
        "suggested": suggested,
        "pictures": [],
    }
    if out_dir is not None:
        result["pictures"] = write_pictures(result, coverages, out_dir)
        with open(os.path.join(out_dir, "coverage.json"), "w") as f:
            json.dump(result, f, indent=1, allow_nan=False)
        with open(os.path.join(out_dir, "report.txt"), "w") as f:
            f.write(format_report(result) + "\n")
    return result


def main(argv):
    del argv
    from absl import flags
    from ml_collections import config_flags

    f = flags.FLAGS
    config = f.config
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(f["config"])))[0]
    out_dir = f.out or os.path.join("workdirs", name, "coverage")
    result = run(
        config,
        split=f.split,
        out_dir=out_dir,
        max_images=f.max_images,
        suggest=f.suggest,
        sizes_per_level=f.sizes_per_level,
        num_ratios=f.num_ratios,
        worst=f.worst,
        count_positives=f.match,
    )
    if f.json:
        print(json.dumps(result, indent=1, allow_nan=False))
    else:
        print(format_report(result))
        print(f"\nWritten to {out_dir}: coverage.json, report.txt, " + ", ".join(
            os.path.basename(p) for p in result["pictures"]))  # fmt: skip


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    default = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "default.py")
    config_flags.DEFINE_config_file("config", default, "Config file (get_config()).")
    flags.DEFINE_string("split", None, "Dataset split; default config.data.eval_split.")
    flags.DEFINE_string("out", None, "Output folder; default workdirs/<config name>/coverage.")
    flags.DEFINE_integer("max_images", None, "Only the first N images; default the whole split.")
    flags.DEFINE_integer("worst", 10, "How many worst-covered boxes to list.")
    flags.DEFINE_bool("suggest", True, "Suggest anchors (k-means) and report their coverage.")
    flags.DEFINE_integer(
        "sizes_per_level", None, "Suggest this many sizes per level (changes A); default keep."
    )
    flags.DEFINE_integer(
        "num_ratios", None, "Suggest this many aspect ratios (changes A); default keep."
    )
    flags.DEFINE_bool(
        "match", True, "Also count each box's positive anchors with the matcher (4x slower)."
    )
    flags.DEFINE_bool("json", False, "Print the result as JSON instead of the text report.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
