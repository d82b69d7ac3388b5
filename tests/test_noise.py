"""The Gaussian noise (ablation/core/noise.py): JAX's generator bit for bit, N(0, 1) by test,
no counter shared between coordinates, and the same draw in every engine."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ablation.core import noise


@pytest.mark.parametrize("key", [jax.random.key(7), jax.random.PRNGKey(7)],
                         ids=["typed key", "raw key"])
def test_the_leaves_hold_jax_random_normal_end_to_end(key):
    """The fused draw computes what jax.random.normal draws for the flat sum (threefry with
    partitionable counters, JAX's default), laid over the leaves in tree order."""
    tree = {"a": jnp.zeros((3, 4, 5)), "b": jnp.zeros(7), "c": jnp.zeros((1,)),
            "d": jnp.zeros((2, 2, 2, 3))}
    got = jax.jit(noise.gaussian_like)(tree, key)
    flat = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(got)])
    with jax.threefry_partitionable(True):
        expected = np.asarray(jax.random.normal(key, (flat.size,)))
    np.testing.assert_array_equal(flat, expected)


def test_hash_equals_jaxs_threefry():
    from jax.extend.random import threefry_2x32
    key = jax.random.key_data(jax.random.key(123))
    counters = jnp.arange(0, 2_000, dtype=jnp.uint32)
    a, b = noise.threefry2x32(key, counters[:1_000], counters[1_000:])
    np.testing.assert_array_equal(np.concatenate([a, b]), threefry_2x32(key, counters))


def test_the_noise_is_standard_normal():
    """1.2M draws over leaves of the cifar10 net's sizes against N(0, 1): mean, variance,
    Kolmogorov-Smirnov and both tails beyond 3 and 4 sigma. Each check's false-alarm rate for a
    correct generator is at most 1e-4 (so < 1e-3 for the lot); the key is fixed, so the test is
    deterministic, and it fails for a wrong scale, a uniform, a truncated tail or a skew."""
    tree = [jnp.zeros(s) for s in ((5, 5, 3, 32), (32,), (500, 1200), (1200,), (600_000,))]
    z = np.concatenate([np.ravel(v) for v in noise.gaussian_like(tree, jax.random.key(2))])
    n = z.size
    alpha = 1e-4
    bound = stats.norm.isf(alpha / 2)  # two-sided z bound at alpha
    assert abs(z.mean()) * math.sqrt(n) < bound
    assert abs(z.var() - 1) / math.sqrt(2 / n) < bound
    assert stats.kstest(z, "norm").pvalue > alpha
    for t in (3.0, 4.0):
        for side in (z > t, z < -t):
            p = stats.norm.sf(t)
            # the count of a tail is binomial(n, p): its two-sided p-value
            assert stats.binomtest(int(side.sum()), n, p).pvalue > alpha, (t, side.sum(), n * p)


def test_no_two_coordinates_share_a_counter():
    """Each coordinate its own counter: leaves of one shape are not copies or shifts of each
    other (as a key or an offset reused per leaf would make them)."""
    tree = [jnp.zeros(1000), jnp.zeros(1000), jnp.zeros((10, 100))]
    a, b, c = (np.ravel(v) for v in noise.gaussian_like(tree, jax.random.key(0)))
    for x, y in ((a, b), (a, c), (b, c)):
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.15  # 1000 pairs: |r| < 0.15 is > 4.7 s.e.
        assert np.mean(x == y) < 0.01
        assert not np.intersect1d(x[:100], y).size > 5  # no block of one inside the other


def test_add_noise_scales_and_keys():
    grads = {"w": jnp.ones((4, 5)), "b": jnp.zeros(3)}
    key = jax.random.key(1)
    assert noise.add_noise(grads, key, 0.0) is grads
    noised = noise.add_noise(grads, key, 2.5)
    unit = noise.gaussian_like(grads, key)
    for g, n, u in zip(jax.tree.leaves(grads), jax.tree.leaves(noised), jax.tree.leaves(unit)):
        np.testing.assert_allclose(n, g + 2.5 * u, rtol=1e-6)
    other = noise.add_noise(grads, jax.random.key(2), 2.5)
    assert not np.allclose(other["w"], noised["w"])


def test_too_many_values_for_the_counters_is_an_error():
    with pytest.raises(ValueError, match="uint32"):
        noise.normal_at(jax.random.key(0), 2 ** 32 - 10, (20,))


def test_a_batch_of_keys_or_another_generators_key_is_an_error():
    """A [K] batch of keys (steps_per_call without its scan) or an rbg key's four words would
    otherwise be read in part and broadcast: refused instead."""
    tree = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="one threefry2x32 key"):
        noise.gaussian_like(tree, jax.random.split(jax.random.key(0), 2))
    with pytest.raises(ValueError, match="one threefry2x32 key"):
        noise.gaussian_like(tree, jax.random.key(0, impl="rbg"))


def test_odd_leaves_share_no_counter_and_keep_their_shapes_and_dtypes():
    """Empty and scalar leaves, bfloat16 and float16 ones: still the one stream end to end
    (in float32, then cast), with keys whose first word is not zero."""
    key = jax.random.fold_in(jax.random.key(3), 12345)
    assert int(jax.random.key_data(key)[0]) != 0
    tree = [jnp.zeros((0, 3)), jnp.zeros(()), jnp.zeros(4, jnp.bfloat16), jnp.zeros(3, jnp.float16),
            jnp.zeros((2,))]
    out = noise.gaussian_like(tree, key)
    assert [(o.shape, o.dtype) for o in out] == [(t.shape, t.dtype) for t in tree]
    stream = np.asarray(jax.random.normal(key, (10,)))
    np.testing.assert_array_equal(np.asarray(out[1]), stream[0])
    np.testing.assert_array_equal(np.asarray(out[2], np.float32),
                                  stream[1:5].astype(jnp.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out[4]), stream[8:10])
