"""The one place where per-device functions become multi-device programs.

A per-device function sees its slice of the batch and the replicated state, and reduces across
devices with ``lax.pmean(..., "data")``. :func:`parallelize` wraps it with ``jax.shard_map``
over a 1-D mesh axis ``data`` (default) or with ``jax.pmap``; :func:`shard_batch` lays out a
host's batch to match. Multi-host runs work the same way once ``jax.distributed`` is set up.
"""

import os
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
MODES = ("shard_map", "pmap")


def cpu_devices_for(batch_size: int, *, cpu_count: int | None = None) -> int:
    """CPU devices to split one host into for data parallelism: the largest divisor of
    ``batch_size`` not above ``cpu_count`` (default ``os.cpu_count()``).

    XLA on CPU runs most of a step's operations on one thread, so one device per core runs
    the devices' shards side by side (measured in benchmarks/README.md, "Train step").
    :func:`split_cpu` applies it.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    cores = (os.cpu_count() or 1) if cpu_count is None else cpu_count
    if cores < 1:
        raise ValueError(f"cpu_count must be >= 1, got {cpu_count}")
    return max(d for d in range(1, min(cores, batch_size) + 1) if batch_size % d == 0)


def split_cpu(batch_size: int, *, requested: int | None = None) -> int | None:
    """Split this host's CPU into JAX devices for data parallelism, before JAX's first use.

    ``requested`` devices, or by default :func:`cpu_devices_for` ``(batch_size)``. Does nothing
    (returns None) when ``XLA_FLAGS`` already forces a host device count; otherwise returns the
    count set. It has no effect on GPU/TPU devices.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    if requested is not None and (int(requested) != requested or requested < 1):
        raise ValueError(f"the CPU device count must be >= 1, got {requested}")
    count = requested or cpu_devices_for(batch_size)
    jax.config.update("jax_num_cpu_devices", count)
    return count


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh, axis ``data``, auto sharding, over ``devices`` (default: every device of
    every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def parallelize(
    fn: Callable,
    *,
    mode: str,
    mesh: jax.sharding.Mesh,
    num_replicated: int = 1,
    replicated_out: tuple[bool, ...] = (True, True),
    donate_state: bool = False,
) -> Callable:
    """Wrap per-device ``fn(*replicated, batch)`` for all devices.

    The first ``num_replicated`` arguments are replicated (state, keys), the last is the batch,
    split along axis 0. ``replicated_out[i]`` says whether output ``i`` is the same on every
    device (``pmean``-ed metrics, the new state) or split along axis 0 like the batch.
    ``donate_state`` donates the first argument's buffers (the train state, replaced by the
    step's output), so a step holds one copy of the parameters and optimizer state, not two.

    ``shard_map`` runs with ``check_vma=False``: gradients of replicated parameters are then
    per-device and the function's explicit ``pmean`` averages them, exactly as under ``pmap``.
    (With ``check_vma=True`` they come back already summed, and a ``pmean`` would give N x.)
    """
    donate = (0,) if donate_state else ()
    if mode == "shard_map":
        in_specs = (P(),) * num_replicated + (P(AXIS),)
        out_specs = tuple(P() if r else P(AXIS) for r in replicated_out)
        return jax.jit(
            jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False),
            donate_argnums=donate,
        )
    if mode == "pmap":
        in_axes = (None,) * num_replicated + (0,)
        out_axes = tuple(None if r else 0 for r in replicated_out)
        devices = list(mesh.devices.flat)
        return jax.pmap(
            fn,
            axis_name=AXIS,
            in_axes=in_axes,
            out_axes=out_axes,
            devices=devices,
            donate_argnums=donate,
        )
    raise ValueError(f"parallelism must be one of {MODES}, got {mode!r}")


def shard_batch(batch, *, mode: str, mesh: jax.sharding.Mesh):
    """Lay out this host's part of the global batch (numpy, leading axis) for :func:`parallelize`.

    ``shard_map``: one global array split over ``data``. ``pmap``: ``[local devices, b, ...]``.
    """
    n_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    leaves = jax.tree.leaves(batch)
    if leaves and leaves[0].shape[0] % n_local:
        raise ValueError(
            f"the per-host batch ({leaves[0].shape[0]}) must divide evenly over this host's "
            f"{n_local} devices: set batch_size to a multiple of {mesh.size}"
        )
    if mode == "pmap":
        return jax.tree.map(lambda x: np.reshape(x, (n_local, -1) + x.shape[1:]), batch)
    sharding = NamedSharding(mesh, P(AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def unshard(x, *, mode: str):
    """Outputs split over devices back to one host array ``[B, ...]`` (this host's part)."""
    if mode == "pmap":
        x = np.asarray(x)
        return x.reshape((-1,) + x.shape[2:])
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.concatenate([np.asarray(s.data) for s in x.addressable_shards], axis=0)
