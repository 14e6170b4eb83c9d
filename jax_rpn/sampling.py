"""Static-shape balanced sampling of positive and negative anchors.

detectron2's ``subsample_labels`` / torchvision's ``BalancedPositiveNegativeSampler``: keep
``min(#pos, int(num_samples * positive_fraction))`` positives and
``min(#neg, num_samples - kept positives)`` negatives, each a uniformly random subset of its
candidates. Instead of ``randperm`` over a data-dependent number of candidates, every anchor
draws a random 31-bit priority and the k highest-priority candidates are kept. The k-th
largest priority is found by interpolation search: the priorities are uniform, so the
threshold whose count is k can be interpolated from the counts at the ends of the current
bracket, and each step costs one masked count over N; a bisection step every
``_BISECT_EVERY`` steps bounds the worst case at about 4 x 31 steps. It takes 2 to 12 steps
in practice, several times fewer passes over the anchors than a 32-step radix search, and is
many times faster on CPU than ``lax.top_k`` or a permutation over ~270k anchors. Shapes never
depend on the data.

Equal priorities at the cut-off (probability about ``#candidates / 2**31`` per call) are
broken by anchor index, the only departure from exact uniformity.
"""

import jax
import jax.numpy as jnp
from jax import lax

from jax_rpn.shape_checks import check_shape


def check_sampling(num_samples: int, positive_fraction: float) -> None:
    """Raise ValueError unless ``num_samples`` is a positive int and the fraction in [0, 1]."""
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")


def check_key(key, *, name: str = "key") -> None:
    """Raise ValueError unless ``key`` is one PRNG key: a typed key ``[]`` (``jax.random.key``)
    or a raw uint32 key ``[K]`` (``jax.random.PRNGKey``)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        check_shape(key, f"{name} (a typed PRNG key)", "[]")
    elif dtype == jnp.uint32:
        check_shape(key, f"{name} (a raw uint32 PRNG key)", "[K]")
    else:
        got = f"dtype {dtype}" if dtype is not None else type(key).__name__
        raise ValueError(f"{name} must be a PRNG key (jax.random.key or PRNGKey), got {got}")


_TOP = 2**31  # priorities are in [0, _TOP)
_BISECT_EVERY = 4


def _kth_largest(priority, candidate, k):
    """Largest ``t`` with ``#{candidate & priority >= t} >= k`` (the k-th largest candidate
    priority), or a ``t`` whose count is exactly ``k``; ``1 <= k <= #candidates``, traced."""

    def count(t):
        return jnp.sum(candidate & (priority >= t), dtype=jnp.int32)

    # Bracket lo < hi with count(lo) >= k > count(hi), narrowed until count(lo) == k or the
    # two are adjacent.
    def unfinished(state):
        lo, c_lo, hi, _, _ = state
        return (c_lo > k) & (hi - lo > 1)

    def narrow(state):
        lo, c_lo, hi, c_hi, step = state
        width = hi - lo
        frac = (c_lo - k).astype(jnp.float32) / (c_lo - c_hi).astype(jnp.float32)
        guess = (frac * width.astype(jnp.float32)).astype(jnp.uint32)  # uniform priorities
        guess = jnp.where(step % _BISECT_EVERY == _BISECT_EVERY - 1, width // 2, guess)
        t = lo + jnp.clip(guess, 1, width - 1)
        c = count(t)
        up = c >= k
        return (
            jnp.where(up, t, lo),
            jnp.where(up, c, c_lo),
            jnp.where(up, hi, t),
            jnp.where(up, c_hi, c),
            step + 1,
        )

    zero = _varying_zero(priority, candidate, k)
    top = zero.astype(jnp.uint32) + jnp.uint32(_TOP)
    start = (zero.astype(jnp.uint32), jnp.sum(candidate, dtype=jnp.int32) + zero, top, zero, zero)
    return lax.while_loop(unfinished, narrow, start)[0]


def _varying_zero(*arrays):
    """int32 zero that varies across ``shard_map`` devices wherever one of ``arrays`` does, so
    loop carries started from it keep their type when the loop body mixes in those arrays."""
    return sum(lax.full_like(a, 0, jnp.int32, shape=()) for a in arrays)


def _select_top(priority, candidate, k):
    """Bool ``[N]``: the ``k`` (traced, ``<= #candidates``) candidates of highest priority
    (uint32 ``[N]`` in ``[0, 2**31)``), equal priorities taken in index order."""
    t = _kth_largest(priority, candidate, jnp.maximum(k, 1))
    above = candidate & (priority > t)  # [N]
    ties = candidate & (priority == t)  # [N]
    need = k - jnp.sum(above, dtype=jnp.int32)
    index = jnp.arange(priority.shape[0], dtype=jnp.int32)

    # More ties than places (rare): bisect for the index cut-off j, ties before j taken.
    def unfinished(bounds):
        j_lo, j_hi = bounds
        return j_hi - j_lo > 1

    def narrow(bounds):
        j_lo, j_hi = bounds
        mid = (j_lo + j_hi) // 2
        enough = jnp.sum(ties & (index < mid), dtype=jnp.int32) >= need
        return jnp.where(enough, j_lo, mid), jnp.where(enough, mid, j_hi)

    zero = _varying_zero(ties, need)
    n = zero + priority.shape[0]
    too_many = jnp.sum(ties, dtype=jnp.int32) > need
    _, cut = lax.while_loop(unfinished, narrow, (jnp.where(too_many, zero, n - 1), n))
    return (above | (ties & (index < cut))) & (k > 0)


def sample_labels(
    key: jax.Array, labels: jax.Array, *, num_samples: int = 256, positive_fraction: float = 0.5
) -> jax.Array:
    """Subsample integer ``labels [N]`` (1 positive, 0 negative, other values ignored)
    -> int32 ``[N]``.

    Returns 1 for sampled positives, 0 for sampled negatives and -1 for everything else.
    Labels other than 0 and 1 are never sampled. Deterministic for a given ``key`` (one key).
    """
    check_sampling(num_samples, positive_fraction)
    check_key(key)
    check_shape(labels, "labels", "[N]", dtype="int")
    labels = jnp.asarray(labels)
    max_pos = int(num_samples * positive_fraction)  # truncated, as detectron2
    positive = labels == 1  # [N]
    negative = labels == 0  # [N]
    num_pos = jnp.minimum(jnp.sum(positive), max_pos)
    num_neg = jnp.minimum(jnp.sum(negative), int(num_samples) - num_pos)
    priority = jax.random.bits(key, labels.shape, jnp.uint32) >> 1  # [N], 31 random bits
    take_pos = _select_top(priority, positive, num_pos)
    take_neg = _select_top(priority, negative, num_neg)
    return jnp.where(take_pos, 1, jnp.where(take_neg, 0, -1)).astype(jnp.int32)
