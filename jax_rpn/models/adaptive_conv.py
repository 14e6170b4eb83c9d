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
are therefore processed in chunks inside a ``lax.scan`` (a few MiB per step, reused): one
gather of a table of 2x2 pixel neighbourhoods per tap (the four corners in one contiguous
row), the corner weights, then one matmul with the kernel. The backward pass (a custom VJP)
walks the same chunks and scatter-adds into one accumulator carried through the scan.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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


def _taps(quads, rows, weights, chunk, channels):
    """Bilinear samples ``[chunk, 9C]`` of one chunk: rows ``[chunk, 9]``, weights
    ``[chunk, 9, 4]``."""
    corners = quads.at[rows].get(mode="promise_in_bounds").reshape(chunk, 9, 4, channels)
    return jnp.einsum("pkjc,pkj->pkc", corners, weights).reshape(chunk, 9 * channels)


def _forward(x, points, kernel):
    h, w, c = x.shape
    n = h * w
    chunk = _chunk_size(n, c)
    kernel = kernel.reshape(9 * c, -1).astype(x.dtype)  # [9C, O], row (ky * 3 + kx) * C + c
    rows, weights = _rows_and_weights(points.reshape(n, 9, 2), (h, w))
    weights = weights.astype(x.dtype)
    quads = _neighbourhoods(x)

    def step(_, xs):
        r, wt = xs
        taps = _taps(quads, r, wt, chunk, c)  # [chunk, 9C]
        return None, (taps @ kernel, taps)

    _, (out, taps) = lax.scan(step, None, _chunked(chunk, rows, weights))
    out = out.reshape(-1, kernel.shape[1])[:n].reshape(h, w, -1)
    return out, (taps, rows, weights, kernel)


def adaptive_conv(x: jax.Array, points: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 convolution of ``x [H, W, C]`` whose tap ``k`` of cell ``(i, j)`` reads ``x`` at
    ``points [H, W, 9, 2]`` (y, x; bilinear, zero outside) -> ``[H, W, O]``.

    ``kernel [3, 3, C, O]`` (``nn.Conv`` layout, tap ``k = ky * 3 + kx``); no bias. One image;
    ``vmap`` over a batch. Differentiable in ``x`` and ``kernel``; ``points`` get no gradient.
    """
    if x.ndim != 3:
        raise ValueError(f"x must have shape [H, W, C], got {x.shape}")
    h, w, c = x.shape
    if tuple(points.shape) != (h, w, 9, 2):
        raise ValueError(
            f"points must have shape [H, W, 9, 2] = {(h, w, 9, 2)}, got {points.shape}"
        )
    if kernel.ndim != 4 or tuple(kernel.shape[:3]) != (3, 3, c):
        raise ValueError(f"kernel must have shape [3, 3, C={c}, O], got {kernel.shape}")
    if isinstance(points, np.ndarray):  # e.g. a broadcast view: jit wants a plain array
        points = np.ascontiguousarray(points, np.float32)
    return _adaptive_conv(x, jnp.asarray(points, jnp.float32), kernel)


@jax.custom_vjp
def _adaptive_conv(x, points, kernel):
    return _forward(x, points, kernel)[0]


def _adaptive_conv_fwd(x, points, kernel):
    out, (taps, rows, weights, kernel_2d) = _forward(x, points, kernel)
    return out, (taps, rows, weights, kernel_2d, x, points, kernel)


def _adaptive_conv_bwd(res, d_out):
    taps, rows, weights, kernel_2d, x, points, kernel = res
    h, w, c = x.shape
    n, chunk = h * w, taps.shape[1]
    d_flat = d_out.reshape(n, -1).astype(x.dtype)
    d_kernel = jnp.einsum("mpi,mpo->io", taps, _chunked(chunk, d_flat)[0])  # [9C, O]

    def step(acc, xs):
        r, wt, d = xs
        d_taps = (d @ kernel_2d.T).reshape(chunk, 9, 1, c)
        update = (wt[..., None] * d_taps).reshape(chunk * 9, 4 * c).astype(acc.dtype)
        # Materialised (a small buffer): XLA CPU's scatter with a fused update computation is
        # ~10x slower than the plain scatter-add of a ready buffer.
        update = lax.optimization_barrier(update)
        return acc.at[r.reshape(-1)].add(update, mode="promise_in_bounds"), None

    acc = jnp.zeros(((h + 1) * (w + 1), 4 * c), jnp.float32)
    acc, _ = lax.scan(step, acc, _chunked(chunk, rows, weights, d_flat))
    _, pull = jax.vjp(_neighbourhoods, x)
    (d_x,) = pull(acc.astype(x.dtype))
    return (
        d_x,
        jnp.zeros_like(points),
        d_kernel.reshape(kernel.shape).astype(kernel.dtype),
    )


_adaptive_conv.defvjp(_adaptive_conv_fwd, _adaptive_conv_bwd)


class AdaptiveConv(nn.Module):
    """mmdetection's ``AdaptiveConv``: a 3x3 convolution, ``features`` outputs, normal(0.01) init.

    Called with ``points`` (``[B, H, W, 9, 2]``, e.g. :func:`anchor_points`) it samples there
    (mmdetection's ``type='offset'``, a deformable convolution, no bias); with ``points=None``
    it is a plain convolution of ``dilation`` with zero padding and a bias (``type='dilation'``).

    Attributes:
      features: output channels.
      dilation: tap spacing of the plain convolution (``points=None``).
      dtype: compute dtype; parameters are float32.
    """

    features: int
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, points: jax.Array | None = None) -> jax.Array:
        """``x [B, H, W, C]`` -> ``[B, H, W, features]``."""
        x = x.astype(self.dtype)
        if points is None:
            return nn.Conv(
                self.features,
                (3, 3),
                padding=((self.dilation, self.dilation),) * 2,
                kernel_dilation=self.dilation,
                kernel_init=NORMAL_001,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="conv",
            )(x)
        kernel = self.param("kernel", NORMAL_001, (3, 3, x.shape[-1], self.features))
        points = lax.stop_gradient(jnp.asarray(points, jnp.float32))
        return jax.vmap(adaptive_conv, in_axes=(0, 0, None))(x, points, kernel)
