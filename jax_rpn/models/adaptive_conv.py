"""Adaptive convolution (Cascade RPN, Vu et al. 2019): a 3x3 convolution whose nine taps read
the input at positions given per output cell, by bilinear interpolation, at a static shape.

For output cell ``(i, j)`` and tap ``k = ky * 3 + kx`` the convolution reads ``x`` at
``points[i, j, k] = (y, x)``, in the input's pixel coordinates (pixel ``(r, c)`` sits at
``(r, c)``), interpolating bilinearly between the four pixels around it; pixels outside the
map read as zero. That is mmcv's ``DeformConv2d`` (stride 1, padding 1, one offset group) with
``points = (i + ky - 1 + offset_y, j + kx - 1 + offset_x)``. At the points of
:func:`regular_points` it is a plain 3x3 convolution of that dilation with zero padding.

:func:`anchor_points` places the taps on an anchor as mmdetection's
``StageCascadeRPNHead.anchor_offset`` does: at its centre, the midpoints of its sides and its
corners, in feature coordinates ``image coordinate / stride``, so that what a cell sees is
aligned with its anchor. The points are constants of the convolution (no gradient flows into
them; Cascade RPN detaches the anchors it refines).

Speed on XLA CPU: a gather materialising every tap's four corners at once writes
``36 * C`` floats per cell, and writing that buffer costs more than the arithmetic. The cells
of all maps and images (:func:`multilevel_adaptive_conv`) are therefore processed together in
chunks inside one ``lax.scan`` (a few MiB per step, reused): one gather from a table of 2x2
pixel neighbourhoods per tap (the four corners in one contiguous row), the corner weights,
then one matmul with the kernel. The backward pass (a custom VJP) walks the same chunks and
scatter-adds into one accumulator carried through the scan. :func:`adaptive_conv_at` does the
same at chosen cells only (a training step's sampled anchors).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_rpn.shape_checks import check_shape

NORMAL_001 = nn.initializers.normal(stddev=0.01)
_TAPS = np.array([(ky, kx) for ky in (-1, 0, 1) for kx in (-1, 0, 1)], np.float32)  # [9, 2]
# Gathered floats per scan step (chunk cells x 9 taps x 4 corners x C): ~2-4 MiB.
_CHUNK_ELEMENTS = 1 << 20


def regular_points(feature_hw, *, dilation: int = 1) -> np.ndarray:
    """The taps of a plain 3x3 convolution of ``dilation`` -> float32 ``[H, W, 9, 2]`` (y, x)."""
    h, w = (int(v) for v in feature_hw)
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)  # [H, W, 2]
    return (grid[:, :, None, :] + dilation * _TAPS).astype(np.float32)


def anchor_points(anchors: jax.Array, *, stride: float) -> jax.Array:
    """Taps on xyxy ``anchors [..., 4]`` (absolute pixels) -> ``[..., 9, 2]`` (y, x) positions in
    feature coordinates (``pixel / stride``): the anchor's centre plus ``(ky * h / 2, kx * w / 2)``
    for ``ky, kx`` in ``{-1, 0, 1}``, i.e. its centre, side midpoints and corners.

    mmdetection's ``anchor_offset`` (ctr_offset + shape_offset, kernel 3, dilation 1) added to
    the regular taps of cell ``(i, j)`` gives the same positions.
    """
    check_shape(anchors, "anchors", "[..., 4]")
    anchors = jnp.asarray(anchors, jnp.float32) / stride
    center = jnp.stack(
        [(anchors[..., 1] + anchors[..., 3]) * 0.5, (anchors[..., 0] + anchors[..., 2]) * 0.5], -1
    )  # [..., 2] (y, x)
    half = jnp.stack(
        [(anchors[..., 3] - anchors[..., 1]) * 0.5, (anchors[..., 2] - anchors[..., 0]) * 0.5], -1
    )  # [..., 2]
    return center[..., None, :] + half[..., None, :] * _TAPS  # [..., 9, 2]


def _neighbourhoods(x):
    """``x [H, W, C]`` -> ``[(H + 1) (W + 1), 4C]``: row ``(r + 1) (W + 1) + c + 1`` holds pixels
    ``(r, c), (r, c + 1), (r + 1, c), (r + 1, c + 1)`` of the zero-padded map,
    ``r`` in ``[-1, H - 1]``, ``c`` in ``[-1, W - 1]``."""
    h, w, c = x.shape
    p = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))  # [H + 2, W + 2, C]
    quads = jnp.concatenate([p[:-1, :-1], p[:-1, 1:], p[1:, :-1], p[1:, 1:]], axis=-1)
    return quads.reshape((h + 1) * (w + 1), 4 * c)


def _rows_and_weights(points, feature_hw):
    """Neighbourhood row ``[...]`` int32 and bilinear corner weights ``[..., 4]`` of
    ``points [..., 2]``; points that touch no pixel (or are not finite) get weight 0."""
    h, w = feature_hw
    finite = jnp.all(jnp.isfinite(points), axis=-1)
    y = jnp.where(finite, points[..., 0], -2.0)
    x = jnp.where(finite, points[..., 1], -2.0)
    y0, x0 = jnp.floor(y), jnp.floor(x)
    # The 2x2 neighbourhood at (y0, x0) touches the map iff y0 in [-1, H-1] and x0 in [-1, W-1].
    touches = (y0 >= -1) & (y0 <= h - 1) & (x0 >= -1) & (x0 <= w - 1)
    ly, lx = y - y0, x - x0
    weights = jnp.stack([(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx], -1)
    weights = jnp.where(touches[..., None], weights, 0.0)
    row = (jnp.clip(y0, -1, h - 1).astype(jnp.int32) + 1) * (w + 1)
    return row + jnp.clip(x0, -1, w - 1).astype(jnp.int32) + 1, weights


def _chunked(chunk, *arrays):
    """Pad the leading axis of each array to a multiple of ``chunk`` and split it off."""
    n = arrays[0].shape[0]
    num = -(-n // chunk)
    pad = num * chunk - n
    return [
        jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(num, chunk, *a.shape[1:])
        for a in arrays
    ]


def _chunk_size(num_cells, channels):
    chunk = max(_CHUNK_ELEMENTS // (36 * channels), 8)
    return int(min(1 << (chunk.bit_length() - 1), num_cells))


def _taps(quads, rows, weights):
    """Bilinear samples ``[P, 9C]`` of P cells: rows ``[P, 9]``, weights ``[P, 9, 4]``."""
    p = rows.shape[0]
    c = quads.shape[1] // 4
    corners = quads.at[rows].get(mode="promise_in_bounds").reshape(p, 9, 4, c)
    return jnp.einsum("pkjc,pkj->pkc", corners, weights).reshape(p, 9 * c)


def _forward(quads, rows, weights, kernel):
    chunk = _chunk_size(rows.shape[0], quads.shape[1] // 4)

    def step(_, xs):
        taps = _taps(quads, *xs)  # [chunk, 9C]
        return None, (taps @ kernel, taps)

    _, (out, taps) = lax.scan(step, None, _chunked(chunk, rows, weights))
    return out.reshape(-1, kernel.shape[1])[: rows.shape[0]], taps


@jax.custom_vjp
def _sampled_conv(quads, rows, weights, kernel):
    """``[P, O]``: for each of P cells, the 9 taps bilinearly sampled from the neighbourhood
    table ``quads [R, 4C]`` (rows ``[P, 9]``, corner weights ``[P, 9, 4]``) times ``kernel
    [9C, O]``. Gradients flow to ``quads`` and ``kernel``."""
    return _forward(quads, rows, weights, kernel)[0]


def _sampled_conv_fwd(quads, rows, weights, kernel):
    out, taps = _forward(quads, rows, weights, kernel)
    return out, (taps, rows, weights, kernel, quads.shape)


def _sampled_conv_bwd(res, d_out):
    taps, rows, weights, kernel, table_shape = res
    num_chunks, chunk = taps.shape[:2]
    c = table_shape[1] // 4
    (d_chunks,) = _chunked(chunk, d_out.astype(kernel.dtype))  # [num_chunks, chunk, O]
    d_kernel = jnp.einsum("mpi,mpo->io", taps, d_chunks)  # [9C, O]

    def step(acc, xs):
        r, wt, d = xs
        d_taps = (d @ kernel.T).reshape(chunk, 9, 1, c)
        update = (wt[..., None] * d_taps).reshape(chunk * 9, 4 * c).astype(acc.dtype)
        # Materialised (a small buffer): XLA CPU's scatter with a fused update computation is
        # ~10x slower than the plain scatter-add of a ready buffer.
        update = lax.optimization_barrier(update)
        return acc.at[r.reshape(-1)].add(update, mode="promise_in_bounds"), None

    acc = jnp.zeros(table_shape, jnp.float32)
    d_quads, _ = lax.scan(step, acc, (*_chunked(chunk, rows, weights), d_chunks))
    return d_quads.astype(kernel.dtype), jnp.zeros_like(rows), jnp.zeros_like(weights), d_kernel


_sampled_conv.defvjp(_sampled_conv_fwd, _sampled_conv_bwd)


def _tables(xs):
    """The neighbourhood tables of L maps ``[B, Hl, Wl, C]``, levels then images concatenated,
    -> ``(table [R, 4C], first row of each level, C)``."""
    c = check_shape(xs[0], "xs[0]", "[B, H, W, C]")["C"]
    tables, offsets, offset = [], [], 0
    for level, x in enumerate(xs):
        check_shape(x, f"xs[{level}]", "[B, H, W, C]", sizes={"C": c})
        b, h, w = x.shape[:3]
        tables.append(jax.vmap(_neighbourhoods)(x).reshape(b * (h + 1) * (w + 1), 4 * c))
        offsets.append(offset)
        offset += b * (h + 1) * (w + 1)
    return jnp.concatenate(tables), offsets, c


def _rows_in_table(points, image, level_hw, offset):
    """Rows of :func:`_tables`' table and corner weights of ``points [..., 9, 2]`` on one level
    (``level_hw``, first row ``offset``) in images ``image [...]`` int32."""
    h, w = level_hw
    rows, weights = _rows_and_weights(points, (h, w))
    return rows + offset + (h + 1) * (w + 1) * image[..., None], weights


def multilevel_adaptive_conv(
    xs: Sequence[jax.Array], points: Sequence[jax.Array], kernel: jax.Array
) -> list[jax.Array]:
    """:func:`adaptive_conv` of a batch on several maps with one kernel, in one pass:
    ``xs`` L arrays ``[B, Hl, Wl, C]``, ``points`` L arrays ``[B, Hl, Wl, 9, 2]`` -> L arrays
    ``[B, Hl, Wl, O]`` (what a head shared by the pyramid levels needs). With ``A`` sets of
    taps per cell, ``points [B, Hl, Wl, A, 9, 2]`` (one per anchor), the outputs are
    ``[B, Hl, Wl, A, O]``."""
    if len(xs) != len(points) or not xs:
        raise ValueError(f"need one points array per map, got {len(points)} for {len(xs)} maps")
    table, offsets, c = _tables(xs)
    check_shape(kernel, "kernel", "[3, 3, C, O]", sizes={"C": c})
    rows, weights, shapes = [], [], []
    for level, (x, p, offset) in enumerate(zip(xs, points, offsets, strict=True)):
        level_sizes = check_shape(x, f"xs[{level}]", "[B, H, W, C]")
        layout = "[B, H, W, A, 9, 2]" if np.ndim(p) == 6 else "[B, H, W, 9, 2]"
        check_shape(p, f"points[{level}]", layout, sizes=level_sizes)
        b, h, w = x.shape[:3]
        p = _as_points(p).reshape(b, -1, 9, 2)  # [B, Hl * Wl * A, 9, 2]
        image = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], p.shape[:2])
        r, wt = _rows_in_table(p, image, (h, w), offset)
        rows.append(r.reshape(-1, 9))
        weights.append(wt.reshape(-1, 9, 4).astype(x.dtype))
        shapes.append(np.shape(points[level])[:-2])  # (B, Hl, Wl[, A])
    kernel_2d = kernel.reshape(9 * c, -1).astype(xs[0].dtype)  # row (ky * 3 + kx) * C + c
    out = _sampled_conv(table, jnp.concatenate(rows), jnp.concatenate(weights), kernel_2d)
    sizes = np.cumsum([np.prod(shape) for shape in shapes])[:-1]
    return [o.reshape(*shape, -1) for o, shape in zip(jnp.split(out, sizes), shapes, strict=True)]


def adaptive_conv_at(
    xs: Sequence[jax.Array], points: jax.Array, levels: jax.Array, kernel: jax.Array
) -> jax.Array:
    """:func:`multilevel_adaptive_conv` at S chosen cells per image only: ``xs`` L arrays
    ``[B, Hl, Wl, C]``, ``points [B, S, 9, 2]`` (y, x) in the feature coordinates of each cell's
    map, ``levels`` int32 ``[B, S]`` the map of each -> ``[B, S, O]``.

    The cost is that of S cells, not of every cell of every map: what a training step needs
    when its loss reads only sampled anchors. Gradients flow to ``xs`` and ``kernel``; a level
    outside ``[0, L)`` reads zeros.
    """
    table, offsets, c = _tables(xs)
    check_shape(kernel, "kernel", "[3, 3, C, O]", sizes={"C": c})
    sizes = check_shape(points, "points", "[B, S, 9, 2]", sizes={"B": xs[0].shape[0]})
    check_shape(levels, "levels", "[B, S]", sizes=sizes)
    points = _as_points(points)
    image = jnp.broadcast_to(jnp.arange(sizes["B"], dtype=jnp.int32)[:, None], levels.shape)
    rows = jnp.zeros(points.shape[:3], jnp.int32)  # [B, S, 9]
    weights = jnp.zeros((*points.shape[:3], 4), jnp.float32)  # [B, S, 9, 4]
    for level, (x, offset) in enumerate(zip(xs, offsets, strict=True)):
        r, wt = _rows_in_table(points, image, x.shape[1:3], offset)
        on_level = (levels == level)[..., None]  # [B, S, 1]
        rows = jnp.where(on_level, r, rows)
        weights = jnp.where(on_level[..., None], wt, weights)
    kernel_2d = kernel.reshape(9 * c, -1).astype(xs[0].dtype)
    out = _sampled_conv(
        table, rows.reshape(-1, 9), weights.reshape(-1, 9, 4).astype(xs[0].dtype), kernel_2d
    )
    return out.reshape(*levels.shape, -1)


def _as_points(p):
    if isinstance(p, np.ndarray):  # e.g. a broadcast view: jit wants a plain array
        p = np.ascontiguousarray(p, np.float32)
    return jnp.asarray(p, jnp.float32)


def adaptive_conv(x: jax.Array, points: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 convolution of ``x [H, W, C]`` whose tap ``k`` of cell ``(i, j)`` reads ``x`` at
    ``points [H, W, 9, 2]`` (y, x; bilinear, zero outside) -> ``[H, W, O]``.

    ``kernel [3, 3, C, O]`` (``nn.Conv`` layout, tap ``k = ky * 3 + kx``); no bias. One image
    (:func:`multilevel_adaptive_conv` takes a batch of several maps at once). Differentiable in
    ``x`` and ``kernel``; ``points`` get no gradient.
    """
    sizes = check_shape(x, "x", "[H, W, C]")
    check_shape(kernel, "kernel", "[3, 3, C, O]", sizes=sizes)
    check_shape(points, "points", "[H, W, 9, 2]", sizes=sizes)
    return multilevel_adaptive_conv([x[None]], [points[None]], kernel)[0][0]


class AdaptiveConv(nn.Module):
    """mmdetection's ``AdaptiveConv``, one set of weights for every pyramid level: a 3x3
    convolution to ``features`` channels, normal(0.01) init.

    Called with ``points`` (L arrays ``[B, Hl, Wl, 9, 2]``, e.g. :func:`anchor_points`) it
    samples there (mmdetection's ``type='offset'``, a deformable convolution, no bias); with
    ``points=None`` it is a plain convolution of ``dilation`` with zero padding and a bias
    (``type='dilation'``). With ``levels`` (int32 ``[B, S]``), ``points`` is one array
    ``[B, S, 9, 2]`` and it runs at those S cells only (:func:`adaptive_conv_at`), returning
    ``[B, S, features]``.

    Attributes:
      features: output channels.
      dilation: tap spacing of the plain convolution (``points=None``).
      dtype: compute dtype; parameters are float32.
    """

    features: int
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        xs: Sequence[jax.Array],
        points: Sequence[jax.Array] | jax.Array | None = None,
        levels: jax.Array | None = None,
    ) -> list[jax.Array] | jax.Array:
        """L maps ``[B, Hl, Wl, C]`` -> L maps ``[B, Hl, Wl, features]`` (``levels``: ``[B, S,
        features]``)."""
        xs = [x.astype(self.dtype) for x in xs]
        if points is None:
            conv = nn.Conv(
                self.features,
                (3, 3),
                padding=((self.dilation, self.dilation),) * 2,
                kernel_dilation=self.dilation,
                kernel_init=NORMAL_001,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="conv",
            )
            return [conv(x) for x in xs]
        kernel = self.param("kernel", NORMAL_001, (3, 3, xs[0].shape[-1], self.features))
        if levels is not None:
            return adaptive_conv_at(xs, lax.stop_gradient(_as_points(points)), levels, kernel)
        points = [lax.stop_gradient(_as_points(p)) for p in points]
        return multilevel_adaptive_conv(xs, points, kernel)
