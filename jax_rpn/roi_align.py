"""RoIAlign (torchvision's ``roi_align``) and FPN level assignment, single image, static shapes.

Boxes are ``[x1, y1, x2, y2]`` in absolute input-image pixels; features are ``[H, W, C]``
(NHWC without the batch axis). Batch with ``vmap`` over features and boxes together, e.g.
``jax.vmap(partial(roi_align, spatial_scale=1 / 16))(features [B, H, W, C], boxes [B, K, 4])``.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jax_rpn import boxes as box_ops
from jax_rpn.shape_checks import check_shape


def _output_size(output_size) -> tuple[int, int]:
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2 or any(int(s) != s or s <= 0 for s in size):
        raise ValueError(f"output_size must be a positive int or (height, width), got {size}")
    return int(size[0]), int(size[1])


def _check_sampling(sampling_ratio, max_sampling_ratio):
    if int(sampling_ratio) != sampling_ratio:
        raise ValueError(f"sampling_ratio must be an integer, got {sampling_ratio}")
    if int(max_sampling_ratio) != max_sampling_ratio or max_sampling_ratio < 1:
        raise ValueError(f"max_sampling_ratio must be an integer >= 1, got {max_sampling_ratio}")


def _pool(
    flat,
    boxes,
    height,
    width,
    offset,
    scale,
    *,
    output_size,
    sampling_ratio,
    max_sampling_ratio,
    aligned,
):
    """RoIAlign of ``boxes [K, 4]`` from ``flat [P, C]`` holding one ``[H, W, C]`` map per ROI.

    ROI ``k`` reads the map of size ``height[k] x width[k]`` stored row-major at
    ``flat[offset[k]:]`` with ``spatial_scale = scale[k]``. Returns ``[K, oh, ow, C]``.
    """
    oh, ow = output_size
    boxes = boxes.astype(jnp.float32)
    h_f = height.astype(jnp.float32)[:, None]  # [K, 1]
    w_f = width.astype(jnp.float32)[:, None]
    shift = 0.5 if aligned else 0.0
    start_w = boxes[:, 0] * scale - shift  # [K]
    start_h = boxes[:, 1] * scale - shift
    roi_w = boxes[:, 2] * scale - shift - start_w
    roi_h = boxes[:, 3] * scale - shift - start_h
    if not aligned:  # torchvision forces malformed ROIs to 1x1
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    bin_h = roi_h / oh  # [K]
    bin_w = roi_w / ow
    if sampling_ratio > 0:
        grid_size = int(sampling_ratio)
        grid_h = jnp.full(boxes.shape[:1], grid_size, jnp.int32)
        grid_w = grid_h
    else:
        grid_size = int(max_sampling_ratio)

        def adaptive(extent, bins):  # ceil(roi / bins); 0 for empty or NaN ROIs
            n = jnp.clip(jnp.ceil(extent / bins), 0, grid_size)
            return jnp.where(extent > 0, n, 0).astype(jnp.int32)

        grid_h = adaptive(roi_h, oh)  # [K]
        grid_w = adaptive(roi_w, ow)
    count = jnp.maximum(grid_h * grid_w, 1).astype(jnp.float32)  # [K]
    ph = jnp.arange(oh, dtype=jnp.float32)[None, :]  # [1, oh]
    pw = jnp.arange(ow, dtype=jnp.float32)[None, :]

    def axis_weights(coord, size):
        """torchvision's bilinear rules along one axis: ``coord [K, n]`` -> low/high/weights."""
        inside = (coord >= -1.0) & (coord <= size)  # False for NaN
        coord = jnp.where(inside, jnp.maximum(coord, 0.0), 0.0)
        low = jnp.floor(coord)
        at_edge = low >= size - 1
        low = jnp.where(at_edge, size - 1, low)
        high = jnp.where(at_edge, low, low + 1)
        frac = jnp.where(at_edge, 0.0, coord - low)
        return inside, low.astype(jnp.int32), high.astype(jnp.int32), 1.0 - frac, frac

    def sample(s, acc):
        iy, ix = s // grid_size, s % grid_size
        gh = jnp.maximum(grid_h, 1).astype(jnp.float32)[:, None]  # [K, 1]
        gw = jnp.maximum(grid_w, 1).astype(jnp.float32)[:, None]
        y = start_h[:, None] + ph * bin_h[:, None] + (iy + 0.5) * bin_h[:, None] / gh  # [K, oh]
        x = start_w[:, None] + pw * bin_w[:, None] + (ix + 0.5) * bin_w[:, None] / gw  # [K, ow]
        in_y, y0, y1, hy, ly = axis_weights(y, h_f)
        in_x, x0, x1, hx, lx = axis_weights(x, w_f)
        in_y &= (iy < grid_h)[:, None]
        in_x &= (ix < grid_w)[:, None]
        hy, ly = jnp.where(in_y, hy, 0.0), jnp.where(in_y, ly, 0.0)
        hx, lx = jnp.where(in_x, hx, 0.0), jnp.where(in_x, lx, 0.0)
        base = offset[:, None, None]
        row0 = base + y0[:, :, None] * width[:, None, None]  # [K, oh, 1]
        row1 = base + y1[:, :, None] * width[:, None, None]
        col0, col1 = x0[:, None, :], x1[:, None, :]  # [K, 1, ow]
        value = (  # float32 whatever the feature dtype
            (hy[:, :, None] * hx[:, None, :])[..., None] * flat[row0 + col0]
            + (hy[:, :, None] * lx[:, None, :])[..., None] * flat[row0 + col1]
            + (ly[:, :, None] * hx[:, None, :])[..., None] * flat[row1 + col0]
            + (ly[:, :, None] * lx[:, None, :])[..., None] * flat[row1 + col1]
        )  # [K, oh, ow, C]
        return acc + value

    acc = jnp.zeros((boxes.shape[0], oh, ow, flat.shape[-1]), jnp.float32)
    acc = lax.fori_loop(0, grid_size * grid_size, sample, acc)
    return (acc / count[:, None, None, None]).astype(flat.dtype)


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    *,
    output_size=(7, 7),
    spatial_scale: float,
    sampling_ratio: int = -1,
    aligned: bool = True,
    max_sampling_ratio: int = 4,
) -> jax.Array:
    """RoIAlign of xyxy ``boxes [K, 4]`` (input-image pixels) from ``features [H, W, C]``.

    Matches ``torchvision.ops.roi_align`` (NCHW there): a box maps to feature coordinates by
    ``* spatial_scale`` (minus 0.5 when ``aligned``; when not aligned its width and height are
    forced >= 1); each of the ``output_size = (oh, ow)`` bins averages bilinear samples on a
    ``grid_h x grid_w`` grid, with torchvision's edge rules (samples beyond 1 pixel outside the
    map count as 0, samples in ``[-1, 0]`` read the border). ``sampling_ratio > 0`` fixes the
    grid; ``sampling_ratio <= 0`` uses torchvision's per-ROI ``ceil(roi_h / oh)`` by
    ``ceil(roi_w / ow)``, which static shapes cap at ``max_sampling_ratio`` per axis: ROIs up to
    ``max_sampling_ratio * oh`` by ``* ow`` feature pixels match torchvision exactly, larger
    ones average ``max_sampling_ratio`` evenly spread samples per axis instead.

    Returns ``[K, oh, ow, C]``; boxes with NaN coordinates give zeros.
    """
    output_size = _output_size(output_size)
    _check_sampling(sampling_ratio, max_sampling_ratio)
    if not spatial_scale > 0:
        raise ValueError(f"spatial_scale must be > 0, got {spatial_scale}")
    check_shape(features, "features", "[H, W, C]")
    check_shape(boxes, "boxes", "[K, 4]")
    h, w, c = features.shape
    k = boxes.shape[0]
    return _pool(
        jnp.asarray(features).reshape(h * w, c),
        boxes,
        jnp.full((k,), h, jnp.int32),
        jnp.full((k,), w, jnp.int32),
        jnp.zeros((k,), jnp.int32),
        jnp.full((k,), spatial_scale, jnp.float32),
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        max_sampling_ratio=max_sampling_ratio,
        aligned=aligned,
    )


def assign_levels(
    boxes: jax.Array,
    *,
    min_level: int = 2,
    max_level: int = 5,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
) -> jax.Array:
    """FPN level of each xyxy box ``[K, 4]`` -> ``[K]`` int32 in ``[min_level, max_level]``.

    detectron2's ``assign_boxes_to_levels`` (FPN paper eq. 1):
    ``floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8))``, clamped. Returns the
    level itself (4 for P4), not detectron2's offset from ``min_level``. Non-finite boxes get
    ``min_level``.
    """
    if min_level > max_level:
        raise ValueError(f"min_level ({min_level}) must be <= max_level ({max_level})")
    if not canonical_size > 0:
        raise ValueError(f"canonical_size must be > 0, got {canonical_size}")
    check_shape(boxes, "boxes", "[K, 4]")
    size = jnp.sqrt(box_ops.area(boxes.astype(jnp.float32)))  # [K]
    level = jnp.floor(canonical_level + jnp.log2(size / canonical_size + 1e-8))
    level = jnp.where(jnp.isfinite(level), level, min_level)
    return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def multilevel_roi_align(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    *,
    strides: Sequence[int],
    output_size=(7, 7),
    sampling_ratio: int = 0,
    aligned: bool = True,
    max_sampling_ratio: int = 4,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
) -> jax.Array:
    """RoIAlign of each xyxy box ``[K, 4]`` from its FPN level -> ``[K, oh, ow, C]``.

    ``features`` is a list over L levels of ``[Hl, Wl, C]`` with ``strides`` consecutive powers
    of two (e.g. P2..P5: 4, 8, 16, 32); the level comes from :func:`assign_levels` with
    ``min_level = log2(strides[0])`` (detectron2's ``ROIPooler``). The maps are concatenated
    into one buffer and each ROI samples only its own level, so memory is that of one
    :func:`roi_align` call. Other settings as in :func:`roi_align` (``spatial_scale`` is
    ``1 / stride``; ``sampling_ratio=0`` is detectron2's default).
    """
    output_size = _output_size(output_size)
    _check_sampling(sampling_ratio, max_sampling_ratio)
    if len(features) != len(strides) or not features:
        raise ValueError(
            f"features and strides must have one entry per level, got {len(features)} feature "
            f"maps and {len(strides)} strides"
        )
    levels = [math.log2(s) if s > 0 else math.nan for s in strides]
    if any(not lvl.is_integer() or lvl != levels[0] + i for i, lvl in enumerate(levels)):
        raise ValueError(f"strides must be consecutive powers of two, got {tuple(strides)}")
    channels = {}  # C, bound by the first level
    for level, f in enumerate(features):
        channels = {"C": check_shape(f, f"features[{level}]", "[Hl, Wl, C]", sizes=channels)["C"]}
    check_shape(boxes, "boxes", "[K, 4]")
    min_level = int(levels[0])
    level = (
        assign_levels(
            boxes,
            min_level=min_level,
            max_level=min_level + len(features) - 1,
            canonical_size=canonical_size,
            canonical_level=canonical_level,
        )
        - min_level
    )  # [K] index into features
    sizes = [f.shape[0] * f.shape[1] for f in features]
    flat = jnp.concatenate([jnp.asarray(f).reshape(-1, f.shape[-1]) for f in features])  # [P, C]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def per_roi(values, dtype):  # static per-level table -> [K]
        return jnp.asarray(values, dtype)[level]

    return _pool(
        flat,
        boxes,
        per_roi([f.shape[0] for f in features], jnp.int32),
        per_roi([f.shape[1] for f in features], jnp.int32),
        per_roi(starts, jnp.int32),
        per_roi([1.0 / s for s in strides], jnp.float32),
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        max_sampling_ratio=max_sampling_ratio,
        aligned=aligned,
    )
