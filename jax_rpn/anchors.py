"""Anchors: the A boxes of one cell, tiled over a feature map, for every pyramid level.

Boxes are xyxy in absolute pixels. Anchors are constants of the input shape, so they are
computed with numpy at trace time. Aspect ratio is ``h / w``. Three presets reproduce their
peers exactly:

| convention         | cell anchor                                     | order in a cell   |
|--------------------|-------------------------------------------------|-------------------|
| ``detectron2``     | area ``size^2``, ``w = sqrt(size^2 / r)``,      | size-major        |
|                    | ``h = w * r``, centred on 0, not rounded        |                   |
| ``torchvision``    | same formula in float32, rounded to integers    | ratio-major       |
| ``py-faster-rcnn`` | base 16x16 box, ratio then scale enumeration,   | ratio-major       |
|                    | ``+1`` widths, rounded, centre 7.5              |                   |

Within a level, anchors are ordered cell-major (row, then column), then the A cell anchors:
the order of the head's output channels reshaped ``[H, W, A] -> [H * W * A]``.
"""

from collections.abc import Sequence

import numpy as np

from jax_rpn.shape_checks import check_shape

CONVENTIONS = ("detectron2", "torchvision", "py-faster-rcnn")


def _check_positive(name, values):
    """``values [V]`` -> a tuple of floats; ValueError unless all are finite and > 0."""
    check_shape(values, name, "[V]", dtype="real")
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    if any(not np.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{name} must all be finite and > 0, got {values}")
    return values


def cell_anchors(
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    *,
    convention: str = "detectron2",
    base_size: int = 16,
) -> np.ndarray:
    """The A = len(sizes) * len(aspect_ratios) anchors of one cell -> float32 ``[A, 4]`` xyxy.

    Args:
      sizes: anchor sizes in pixels (square root of the area). For ``py-faster-rcnn`` each size
        is ``base_size * scale``, e.g. sizes (128, 256, 512) are its scales (8, 16, 32).
      aspect_ratios: ``h / w`` ratios.
      convention: ``detectron2`` (default), ``torchvision`` or ``py-faster-rcnn``.
      base_size: py-faster-rcnn's base anchor size (its feature stride); unused otherwise.
    """
    sizes = _check_positive("sizes", sizes)
    ratios = _check_positive("aspect_ratios", aspect_ratios)
    if convention == "detectron2":
        out = []
        for size in sizes:  # size-major, ratio inner
            for r in ratios:
                w = np.sqrt(size * size / r)
                h = r * w
                out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return np.asarray(out, np.float32)
    if convention == "torchvision":
        scales = np.asarray(sizes, np.float32)
        h_ratios = np.sqrt(np.asarray(ratios, np.float32))
        w_ratios = np.float32(1.0) / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)  # ratio-major, size inner
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)
        return np.round(base).astype(np.float32)
    if convention == "py-faster-rcnn":
        if base_size <= 0:
            raise ValueError(f"base_size must be > 0, got {base_size}")
        ctr = 0.5 * (base_size - 1)  # centre of the base box [0, 0, base - 1, base - 1]
        out = []
        for r in ratios:  # ratio-major, scale inner
            ws = np.round(np.sqrt(base_size * base_size / r))
            hs = np.round(ws * r)
            for size in sizes:
                w, h = ws * size / base_size, hs * size / base_size
                out.append(
                    [
                        ctr - 0.5 * (w - 1),
                        ctr - 0.5 * (h - 1),
                        ctr + 0.5 * (w - 1),
                        ctr + 0.5 * (h - 1),
                    ]
                )
        return np.asarray(out, np.float32)
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def num_cell_anchors(sizes, aspect_ratios, *, convention: str = "detectron2") -> int:
    """A, the number of anchors per cell (what the head must predict), from :func:`cell_anchors`."""
    return cell_anchors(sizes, aspect_ratios, convention=convention).shape[0]


def grid_anchors(
    feature_hw: tuple[int, int],
    stride: float,
    cell_anchors: np.ndarray,
    *,
    offset: float = 0.0,
) -> np.ndarray:
    """Tile ``cell_anchors [A, 4]`` over an ``H x W`` feature map -> float32 ``[H * W * A, 4]``.

    Cell (i, j) is shifted by ``((j + offset) * stride, (i + offset) * stride)``; anchors are
    ordered by row, then column, then cell anchor.
    """
    check_shape(feature_hw, "feature_hw", "[2]", dtype="int")
    check_shape(stride, "stride", "[]", dtype="real")
    check_shape(cell_anchors, "cell_anchors", "[A, 4]")
    h, w = (int(v) for v in feature_hw)
    if h <= 0 or w <= 0:
        raise ValueError(f"feature_hw must be two positive ints, got {feature_hw}")
    if not stride > 0:
        raise ValueError(f"stride must be > 0, got {stride}")
    if not 0.0 <= offset < 1.0:
        raise ValueError(f"offset must be in [0, 1), got {offset}")
    cells = np.asarray(cell_anchors, np.float32)
    stride = np.float32(stride)
    shift_x = np.arange(w, dtype=np.float32) * stride + np.float32(offset) * stride
    shift_y = np.arange(h, dtype=np.float32) * stride + np.float32(offset) * stride
    sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")  # [H, W]
    shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)  # [H*W, 1, 4]
    return (shifts + cells[None]).reshape(-1, 4)  # [H*W*A, 4]


def per_level(name: str, values, num_levels: int) -> list[tuple]:
    """Broadcast a flat sequence ``[V]`` (shared by all levels) or validate a per-level one
    (``[L]`` sequences ``[Vl]``) -> a list of L tuples."""
    values = list(values)
    if not values or (not isinstance(values[0], (list, tuple)) and np.ndim(values[0]) == 0):
        check_shape(values, name, "[V]")
        return [tuple(values)] * num_levels
    for level, v in enumerate(values):
        check_shape(v, f"{name}[{level}]", "[V]")
    if len(values) == 1:
        return [tuple(values[0])] * num_levels
    if len(values) != num_levels:
        raise ValueError(
            f"{name} has {len(values)} levels but strides has {num_levels}; give one entry "
            f"per level or one shared by all"
        )
    return [tuple(v) for v in values]


def level_cell_anchors(
    strides: Sequence[float],
    sizes,
    aspect_ratios,
    *,
    convention: str = "detectron2",
) -> list[np.ndarray]:
    """Cell anchors ``[A, 4]`` for each of L levels; every level must have the same A.

    ``sizes`` and ``aspect_ratios`` are either one sequence shared by all levels or one
    sequence per level, as in detectron2's ``DefaultAnchorGenerator``.
    """
    strides = _check_positive("strides", strides)
    level_sizes = per_level("sizes", sizes, len(strides))
    level_ratios = per_level("aspect_ratios", aspect_ratios, len(strides))
    cells = [
        cell_anchors(s, r, convention=convention, base_size=int(round(stride)))
        for s, r, stride in zip(level_sizes, level_ratios, strides, strict=True)
    ]
    counts = [c.shape[0] for c in cells]
    if len(set(counts)) != 1:
        raise ValueError(
            f"every level must have the same number of anchors per cell (one shared head), "
            f"got {counts} from sizes={level_sizes} and aspect_ratios={level_ratios}"
        )
    return cells


def multilevel_anchors(
    feature_hws: Sequence[tuple[int, int]],
    strides: Sequence[float],
    sizes,
    aspect_ratios,
    *,
    offset: float = 0.0,
    convention: str = "detectron2",
) -> list[np.ndarray]:
    """Anchors of every pyramid level -> list of L float32 ``[Hl * Wl * A, 4]`` arrays."""
    levels = check_shape(feature_hws, "feature_hws", "[L, 2]", dtype="int")
    check_shape(strides, "strides", "[L]", sizes=levels)
    cells = level_cell_anchors(strides, sizes, aspect_ratios, convention=convention)
    return [
        grid_anchors(hw, stride, c, offset=offset)
        for hw, stride, c in zip(feature_hws, strides, cells, strict=True)
    ]
