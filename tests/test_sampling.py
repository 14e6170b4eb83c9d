"""Balanced sampler: exact counts (detectron2's subsample_labels formula), uniformity, keys."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_rpn import sampling


@functools.partial(jax.jit, static_argnames=("num_samples", "positive_fraction"))
def _sample_many(keys, labels, *, num_samples, positive_fraction):
    """One sample per key: ``keys [K]``, ``labels [K, N]`` -> ``[K, N]``."""
    fn = functools.partial(
        sampling.sample_labels, num_samples=num_samples, positive_fraction=positive_fraction
    )
    return jax.vmap(fn)(keys, labels)


@pytest.mark.parametrize(
    ("num_samples", "positive_fraction"), [(256, 0.5), (10, 0.25), (7, 0.5), (5, 0.0)]
)
def test_exact_counts_over_random_label_configs(num_samples, positive_fraction):
    # Expected counts from detectron2's subsample_labels docstring:
    # min(#pos, int(num_samples * fraction)), then min(#neg, num_samples - sampled positives).
    rng = np.random.default_rng(num_samples)
    k, n = 64, 400
    fg = rng.uniform(0, 0.6, (k, 1))  # from no positives to most of them
    bg = rng.uniform(0, 1, (k, 1)) * (1 - fg)
    u = rng.random((k, n))
    labels = np.where(u < fg, 1, np.where(u < fg + bg, 0, -1))
    labels[:, :5] = [2, -5, 3, -2, 7]  # values other than {1, 0} are never sampled
    labels[0] = -1  # nothing to sample
    labels[1] = 0  # only negatives
    labels[2, 5:] = 1  # only positives (and junk)
    keys = jax.random.split(jax.random.key(0), k)
    out = np.asarray(
        _sample_many(
            keys, jnp.asarray(labels), num_samples=num_samples, positive_fraction=positive_fraction
        )
    )
    num_pos, num_neg = (labels == 1).sum(1), (labels == 0).sum(1)
    want_pos = np.minimum(num_pos, int(num_samples * positive_fraction))
    want_neg = np.minimum(num_neg, num_samples - want_pos)
    np.testing.assert_array_equal((out == 1).sum(1), want_pos)
    np.testing.assert_array_equal((out == 0).sum(1), want_neg)
    assert np.all(labels[out == 1] == 1) and np.all(labels[out == 0] == 0)
    assert set(np.unique(out)) <= {-1, 0, 1}


def test_uniform_among_candidates():
    # 12 positives, 4 drawn: each positive is drawn with probability 1/3; 30 negatives fill 6
    # slots: probability 1/5. Chi-square over 3000 keys, bound far above the 99.99th percentile.
    labels = np.full(50, -1)
    pos = np.arange(3, 50, 4)  # 12 positives
    neg = np.setdiff1d(np.arange(50), pos)[:30]
    labels[pos], labels[neg] = 1, 0
    k = 3000
    keys = jax.random.split(jax.random.key(42), k)
    out = np.asarray(
        _sample_many(
            keys, jnp.tile(jnp.asarray(labels), (k, 1)), num_samples=10, positive_fraction=0.4
        )
    )
    for idx, label, p in ((pos, 1, 4 / 12), (neg, 0, 6 / 30)):
        counts = (out[:, idx] == label).sum(0)
        expected = k * p
        chi2 = np.sum((counts - expected) ** 2 / expected)
        assert chi2 < 3 * len(idx), (counts, expected)  # dof = len - 1; mean ~ len
    # Pairs too: how often two given positives are drawn together, C(10,2)/C(12,4) = 1/11.
    both = np.mean((out[:, pos[0]] == 1) & (out[:, pos[5]] == 1))
    assert abs(both - 1 / 11) < 0.02


def test_deterministic_for_a_key_and_varies_with_it():
    labels = jnp.asarray(np.random.default_rng(0).choice([-1, 0, 1], 1000, p=[0.2, 0.7, 0.1]))
    fn = jax.jit(functools.partial(sampling.sample_labels, num_samples=64))
    a = fn(jax.random.key(1), labels)
    np.testing.assert_array_equal(a, fn(jax.random.key(1), labels))
    assert not np.array_equal(a, fn(jax.random.key(2), labels))


def test_more_samples_than_anchors():
    labels = jnp.array([1, 0, -1, 1, 0])
    out = sampling.sample_labels(jax.random.key(0), labels, num_samples=256)
    np.testing.assert_array_equal(out, [1, 0, -1, 1, 0])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 2.5}, "num_samples"),
        ({"positive_fraction": 1.5}, "positive_fraction"),
        ({"positive_fraction": -0.1}, "positive_fraction"),
    ],
)
def test_bad_settings_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sampling.sample_labels(jax.random.key(0), jnp.zeros(4, jnp.int32), **kwargs)


def test_bad_labels_shape_raises():
    with pytest.raises(ValueError, match="labels"):
        sampling.sample_labels(jax.random.key(0), jnp.zeros((2, 4), jnp.int32))


def _top_k_reference(priority, candidate, k):
    """numpy: the k candidates of highest priority, equal priorities in index order."""
    order = np.lexsort(
        (np.arange(len(priority)), -np.where(candidate, priority.astype(np.int64), -1))
    )
    take = np.zeros(len(priority), bool)
    take[order[:k]] = True
    return take & candidate


@pytest.mark.parametrize(
    "draw",
    [
        # Uniform 31-bit priorities, as sample_labels draws them.
        lambda rng, shape: rng.integers(0, 2**31, shape),
        # Six distinct values: most of the cut-off is ties, resolved by index.
        lambda rng, shape: rng.integers(0, 6, shape) * 2**28,
        # Far from uniform (squared, clustered near 0): the interpolation guesses are poor and
        # the bisection steps must still land on the exact k-th value.
        lambda rng, shape: (rng.random(shape) ** 8 * (2**31 - 1)).astype(np.int64),
        # Two adjacent values.
        lambda rng, shape: 2**30 + rng.integers(0, 2, shape),
    ],
)
def test_select_top_equals_numpy_top_k(draw):
    rng = np.random.default_rng(7)
    b, n = 24, 700
    priority = draw(rng, (b, n)).astype(np.uint32)
    candidate = rng.random((b, n)) < rng.random((b, 1))
    candidate[0] = False  # nothing to take
    k = np.minimum(rng.integers(0, 400, b), candidate.sum(1))
    k[1], k[2] = 0, candidate[2].sum()  # none, and every candidate
    select = jax.jit(jax.vmap(sampling._select_top))
    out = np.asarray(select(jnp.asarray(priority), jnp.asarray(candidate), jnp.asarray(k)))
    for i in range(b):
        np.testing.assert_array_equal(out[i], _top_k_reference(priority[i], candidate[i], k[i]))


def test_inside_shard_map_equals_vmap():
    # Users call the sampler inside their own shard_map (default check_vma=True): the loop
    # carries must keep the per-device type, and each device must sample as vmap does.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    spec = jax.sharding.PartitionSpec("data")
    labels = jnp.asarray(np.random.default_rng(3).choice([-1, 0, 1], (4, 500), p=[0.3, 0.6, 0.1]))
    keys = jax.random.split(jax.random.key(5), 4)
    fn = jax.vmap(functools.partial(sampling.sample_labels, num_samples=32))
    sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
    np.testing.assert_array_equal(sharded(keys, labels), jax.jit(fn)(keys, labels))
