"""Shape and dtype checks of the ops' array arguments, with errors that name the argument.

Shapes are static under ``jit``, so :func:`check_shape` works the same on concrete arrays,
traced arrays, numpy arrays and nested Python sequences; it never reads values, so it costs
nothing in the compiled program. Expected shapes are written as in the docstrings:
``"[N, 4]"`` (numbers exact, letters any size), ``"[..., 4]"`` (any leading dimensions),
``"[]"`` (a scalar). A letter bound by an earlier argument must agree::

    n = check_shape(boxes, "boxes", "[N, 4]")
    check_shape(scores, "scores", "[N]", sizes=n)  # "scores must have shape [N] with N = 5, ..."
"""

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# dtype kinds: what each accepts, in words (for the error) and as numpy/JAX dtype classes.
_DTYPES = {
    "mask": ("a bool mask (bool or integer dtype; nonzero is True)", (jnp.bool_, jnp.integer)),
    "int": ("an integer dtype", (jnp.integer,)),
    "real": ("a real dtype (integer or float)", (jnp.integer, jnp.floating)),
}


@functools.cache
def _parse(expected: str) -> tuple[bool, tuple]:
    """``"[..., N, 4]"`` -> (leading ellipsis, ("N", 4))."""
    inner = expected.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        raise ValueError(f"expected shape must look like '[N, 4]', got {expected!r}")
    parts = [p.strip() for p in inner[1:-1].split(",") if p.strip()]
    ellipsis = bool(parts) and parts[0] == "..."
    dims = tuple(int(p) if p.isdigit() else p for p in parts[ellipsis:])
    if any(isinstance(d, str) and not d.isidentifier() for d in dims):
        raise ValueError(
            f"expected shape must hold numbers, letters and a leading '...', got {expected!r}"
        )
    return ellipsis, dims


def _shape(x, name: str, expected: str) -> tuple[int, ...]:
    """Static shape of an array, tracer, scalar or nested sequence of them."""
    if hasattr(x, "shape"):
        return tuple(x.shape)
    if isinstance(x, (list, tuple)):
        inner = {_shape(v, name, expected) for v in x}
        if len(inner) > 1:
            raise ValueError(
                f"{name} must have shape {expected}, got a sequence of mixed shapes {sorted(inner)}"
            )
        return (len(x), *(inner.pop() if inner else ()))
    return np.shape(x)


def check_shape(
    x,
    name: str,
    expected: str,
    *,
    dtype: str | None = None,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Raise ValueError unless ``x`` has shape ``expected`` (and, given, the ``dtype`` kind).

    Args:
      x: an array, a traced array, a scalar or a (nested) sequence.
      name: the argument's name, for the error.
      expected: e.g. ``"[N, 4]"``, ``"[..., 4]"``, ``"[2]"``, ``"[]"``.
      dtype: None (any), ``"mask"`` (bool or integer), ``"int"`` or ``"real"`` (integer or
        float; not bool).
      sizes: letters bound by earlier arguments, e.g. ``{"N": 5}``.

    Returns:
      ``sizes`` plus the letters ``x`` binds.
    """
    ellipsis, dims = _parse(expected)
    bound = dict(sizes or {})
    given = {d: bound[d] for d in dims if isinstance(d, str) and d in bound}
    shape = _shape(x, name, expected)
    ok = len(shape) >= len(dims) if ellipsis else len(shape) == len(dims)
    if ok:
        for dim, size in zip(dims, shape[len(shape) - len(dims) :], strict=True):
            want = bound.setdefault(dim, size) if isinstance(dim, str) else dim
            ok &= size == want
    if not ok:
        known = ", ".join(f"{k} = {v}" for k, v in given.items())
        where = f" with {known}" if known else ""
        raise ValueError(f"{name} must have shape {expected}{where}, got {shape}")
    if dtype is not None:
        words, kinds = _DTYPES[dtype]
        got = _dtype(x)
        if got is not None and not any(jnp.issubdtype(got, kind) for kind in kinds):
            raise ValueError(f"{name} must be {words}, got dtype {got}")
    return bound


def _dtype(x):
    """dtype of an array or tracer, or the promoted dtype of a sequence's leaves (None if none)."""
    if hasattr(x, "dtype"):
        return x.dtype
    leaves = jax.tree.leaves(x)
    return jnp.result_type(*leaves) if leaves else None
