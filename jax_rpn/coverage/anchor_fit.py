"""Anchor fitting: k-means of box shapes with distance ``1 - IoU``, and anchors per level.

Suggests anchors for a set of boxes with the same A on every level (one shared head): a shared
set of aspect ratios (``h / w``) from k-means over box shapes with distance ``1 - IoU`` of
centred boxes (YOLOv2), and per-level sizes from the same k-means over the sizes of the boxes
that fall to each level (the level whose current anchor sizes are nearest in log scale, so each
level keeps its size-to-stride proportion). k-means maximises the mean IoU, not the fraction of
boxes above the matcher's threshold: measure the coverage of the result
(:mod:`jax_rpn.coverage.analysis`) before adopting it.

Boxes are ``[x1, y1, x2, y2]`` in absolute pixels; shapes ``(w, h)`` in pixels.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_rpn import anchors as anchor_ops
from jax_rpn import boxes as box_ops
from jax_rpn.shape_checks import check_shape


@jax.jit
def _centred_iou(wh1, wh2):
    def centred(wh):
        return jnp.concatenate([-wh / 2, wh / 2], axis=-1)  # [M, 4]

    return box_ops.pairwise_iou(centred(wh1), centred(wh2))


def shape_iou(wh1, wh2) -> np.ndarray:
    """IoU of centred boxes of shapes ``wh1 [M, 2]`` and ``wh2 [K, 2]`` (w, h) -> ``[M, K]``."""
    check_shape(wh1, "wh1", "[M, 2]")
    check_shape(wh2, "wh2", "[K, 2]")
    return np.asarray(_centred_iou(np.float32(wh1), np.float32(wh2)), np.float64)


def kmeans_shapes(wh, k: int, *, seed: int = 0, max_iter: int = 100) -> np.ndarray:
    """k-means of box shapes ``wh [M, 2]`` (w, h) with distance ``1 - IoU`` of centred boxes.

    YOLOv2's anchor clustering: k-means++ initialisation, nearest centre by IoU, centre update
    by the median w and h of its boxes. Returns ``[k, 2]`` centres, sorted by area then h / w.
    """
    check_shape(wh, "wh", "[M, 2]")
    wh = np.asarray(wh, np.float64)
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
    check_shape(boxes, "boxes", "[M, 4]")
    boxes = np.asarray(boxes, np.float64)
    wh = boxes[:, 2:] - boxes[:, :2]  # [M, 2]
    wh = wh[np.all(wh > 0, axis=1)]  # empty and flipped boxes have no shape to fit
    size = np.sqrt(wh[:, 0] * wh[:, 1])  # [M]
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
