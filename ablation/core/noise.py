"""The Gaussian noise of DP-SGD: jax.random.normal's values, drawn as fast as XLA:CPU allows.

Every coordinate of the clipped sum gets N(0, σ²C²). The values are those of
``jax.random.normal(key, (n,))`` for the whole flattened sum (n = the number of parameters, in
the order of ``jax.tree.leaves``), bit for bit: the same threefry2x32 generator, the same
counters (the flat index under ``jax_threefry_partitionable``, JAX's default), the same
uniform (23 mantissa bits, open at -1) and ``sqrt(2)·erfinv``. Only how they are computed
differs, for three measured reasons (``scripts/bench_noise.py`` prints them):

1. On a CPU, JAX lowers threefry with rolled loops (a ``while`` of five four-round bodies, to
   keep compile times down), so every round trip writes the state to memory and the hash
   costs ~10 ns a value; the same 20 rounds written out as ``uint32`` arithmetic fuse into one
   vectorised loop.
2. One key for all leaves, each leaf's counters offset by where it starts in the flat sum,
   instead of ``split`` into a key per leaf: no split, and no fixed cost per leaf beyond its
   own loop.
3. The draw is a function of the counter alone, so XLA fuses it into the loop that adds it to
   the sum (and divides and updates): the noise is never written to memory.

Counters are ``uint32``: at most 2³² - 1 parameters (checked).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

#: What the records name as the noise generator (part of a record's identity).
GENERATOR = "threefry2x32 partitionable counters, erfinv normal (= jax.random.normal, fused)"

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)  # Threefish's key-schedule constant


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al., 2011) of the counter pair ``(x0, x1)``
    (``uint32`` arrays of one shape) under ``key`` (``uint32[2]``), written out round by round
    so that XLA fuses the whole hash into one elementwise loop. Equals
    ``jax.extend.random.threefry_2x32``."""
    k0, k1 = key[0], key[1]
    schedule = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = x0 + k0, x1 + k1
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, r) ^ x0
        x0 = x0 + schedule[(i + 1) % 3]
        x1 = x1 + schedule[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _normal_from_bits(bits: jax.Array, dtype: Any) -> jax.Array:
    """``jax.random.normal``'s transform of 32 random bits: a uniform on [-1, 1) from 23
    mantissa bits, clamped above -1, then ``sqrt(2)·erfinv``."""
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    mantissa = (bits >> np.uint32(9)) | np.uint32(0x3F800000)  # a float in [1, 2)
    unit = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    u = jnp.maximum(np.float32(lo), unit * (np.float32(1.0) - lo) + lo)
    return (np.float32(math.sqrt(2.0)) * jax.lax.erf_inv(u)).astype(dtype)


def _threefry_key(key: jax.Array) -> jax.Array:
    """The two words of one threefry key; anything else (a batch of keys, an ``rbg`` key's four
    words) is an error rather than noise from part of it."""
    data = jax.random.key_data(key)
    if data.shape != (2,):
        raise ValueError(f"the noise needs one threefry2x32 key (2 words), got key data of "
                         f"shape {data.shape}: one key per step, the default PRNG")
    return data.astype(jnp.uint32)


def normal_at(key: jax.Array, offset: int, shape: tuple[int, ...], dtype: Any = jnp.float32
              ) -> jax.Array:
    """Standard normals of flat positions ``offset .. offset + prod(shape) - 1`` of the stream
    of ``key``: ``jax.random.normal(key, (N,))[offset:offset + size].reshape(shape)`` for any
    ``N`` past the end."""
    size = math.prod(shape)
    if offset + size > 2 ** 32 - 1:
        raise ValueError(f"the noise counters are uint32: {offset + size:,} values is too many")
    counters = (jax.lax.iota(jnp.uint32, size) + np.uint32(offset)).reshape(shape)
    b0, b1 = threefry2x32(_threefry_key(key), jnp.zeros_like(counters), counters)
    return _normal_from_bits(b0 ^ b1, dtype)


def gaussian_like(tree: PyTree, key: jax.Array) -> PyTree:
    """Standard normals shaped like ``tree``: leaf ``i`` holds flat positions ``offset_i ..``
    of one stream, the leaves laid end to end, drawn in float32 and cast to the leaf's dtype
    (a float64 leaf gets float32 values)."""
    leaves, treedef = jax.tree.flatten(tree)
    offsets = np.cumsum([0] + [math.prod(leaf.shape) for leaf in leaves])
    return jax.tree.unflatten(treedef, [normal_at(key, int(o), leaf.shape, leaf.dtype)
                                        for o, leaf in zip(offsets, leaves)])


def add_noise(grad_sum: PyTree, key: jax.Array, noise_std: float) -> PyTree:
    """``grad_sum`` plus N(0, noise_std²) on every coordinate (nothing added when the std is
    0). The same key gives the same noise in every engine."""
    if noise_std == 0:
        return grad_sum
    noise = gaussian_like(grad_sum, key)
    return jax.tree.map(lambda g, z: g + noise_std * z, grad_sum, noise)
