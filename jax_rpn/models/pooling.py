"""Max pooling with a gradient that XLA's CPU backend runs fast.

The forward pass is ``flax.linen.max_pool``. The gradient is the same as JAX's own: each
output's gradient goes to the first maximum of its window, in row-major order. PyTorch's
``max_pool2d`` does the same. (Where windows overlap, an input's sum over the outputs it won
may round differently.) JAX's gradient is a ``select_and_scatter``, which XLA's CPU
backend expands into an iota per dimension, a variadic reduce-window that finds each
window's argmax, and a scatter. That was 8% of the default train step (ResNet's stem pool,
``benchmarks/README.md``). Here the backward pass reads the window's taps in order as
strided slices, keeps each output's first match, and pads the gradient back to the input
with interior padding. It is all elementwise work, which XLA fuses.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: tuple, strides: tuple, padding: tuple) -> jax.Array:
    """Max pooling of ``x [B, H, W, C]`` over ``window (kh, kw)`` with ``strides (sh, sw)``
    and ``padding ((top, bottom), (left, right))`` (padded cells never win) ->
    ``[B, Ho, Wo, C]``, as ``flax.linen.max_pool``."""
    return nn.max_pool(x, window, strides=strides, padding=padding)


def _max_pool_fwd(x, window, strides, padding):
    y = max_pool(x, window, strides, padding)
    return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, g):
    x, y = residuals  # [B, H, W, C], [B, Ho, Wo, C]
    b, h, w, c = x.shape
    _, ho, wo, _ = y.shape
    (top, bottom), (left, right) = padding
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-jnp.inf)
    zero = jnp.zeros((), g.dtype)
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, g.dtype)
    for dy, dx in itertools.product(range(window[0]), range(window[1])):
        limit = (b, dy + strides[0] * (ho - 1) + 1, dx + strides[1] * (wo - 1) + 1, c)
        tap = lax.slice(xp, (0, dy, dx, 0), limit, (1, *strides, 1))  # [B, Ho, Wo, C]
        first = (tap == y) & ~taken
        taken = taken | first
        # Back to the padded input's grid: tap (i, j) sits at (dy + sh * i, dx + sw * j).
        config = (
            (0, 0, 0),
            (dy, xp.shape[1] - limit[1], strides[0] - 1),
            (dx, xp.shape[2] - limit[2], strides[1] - 1),
            (0, 0, 0),
        )
        dxp = dxp + lax.pad(jnp.where(first, g, zero), zero, config)
    return (dxp[:, top : top + h, left : left + w],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
