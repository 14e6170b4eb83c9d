"""Normalisation layers for the backbones: frozen BN, cross-device BN, GroupNorm, or none.

- ``frozen_bn``: a fixed per-channel affine ``(x - mean) * scale / sqrt(var + eps) + bias``
  (detectron2's ``FrozenBatchNorm2d``); scale, bias, mean and var live in the ``batch_stats``
  collection and are neither trained nor updated.
- ``batch_norm``: ``nn.BatchNorm``; batch statistics when ``train`` (averaged over the
  ``axis_name`` devices when one is given), running statistics otherwise. Scale and bias are
  ``params``, the running mean and var ``batch_stats``.
- ``group_norm``: ``nn.GroupNorm`` with ``gcd(32, channels)`` groups; scale and bias ``params``.
- ``none``: identity (the convolution before it then has a bias).

Momentum 0.9 and epsilon 1e-5 match torchvision's BatchNorm2d (momentum 0.1) and GroupNorm.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("frozen_bn", "batch_norm", "group_norm", "none")
EPSILON = 1e-5


def check_norm(norm: str) -> str:
    """Return ``norm`` if it is one of :data:`NORMS`, else raise ValueError."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


class FrozenBatchNorm(nn.Module):
    """Per-channel affine with fixed statistics over the last axis of ``[..., C]``.

    ``scale``, ``bias``, ``mean`` and ``var`` live in the ``batch_stats`` collection (so they are
    neither trained nor updated; load pretrained statistics there). Initialised to the identity
    up to ``1 / sqrt(1 + eps)``.
    """

    epsilon: float = EPSILON
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale, bias, mean, var = (
            self.variable("batch_stats", name, init, (c,), jnp.float32).value
            for name, init in (
                ("scale", jnp.ones),
                ("bias", jnp.zeros),
                ("mean", jnp.zeros),
                ("var", jnp.ones),
            )
        )
        mult = scale * jax.lax.rsqrt(var + self.epsilon)  # [C]
        add = bias - mean * mult  # [C]
        return x.astype(self.dtype) * mult.astype(self.dtype) + add.astype(self.dtype)


def make_norm(
    norm: str,
    channels: int,
    *,
    train: bool,
    axis_name: str | None,
    dtype: Any,
    name: str,
) -> Callable[[jax.Array], jax.Array]:
    """The normalisation layer ``norm`` for a ``[..., channels]`` input, as a callable.

    Call inside a parent's ``nn.compact`` method; ``name`` names the submodule. ``axis_name``
    (e.g. ``'data'`` inside ``shard_map``/``pmap``) makes ``batch_norm`` average its batch
    statistics over devices; ``None`` for a single device.
    """
    check_norm(norm)
    if norm == "frozen_bn":
        return FrozenBatchNorm(dtype=dtype, name=name)
    if norm == "batch_norm":
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=EPSILON,
            axis_name=axis_name,
            dtype=dtype,
            param_dtype=jnp.float32,
            name=name,
        )
    if norm == "group_norm":
        return nn.GroupNorm(
            num_groups=math.gcd(32, channels),
            epsilon=EPSILON,
            dtype=dtype,
            param_dtype=jnp.float32,
            name=name,
        )
    return lambda x: x
