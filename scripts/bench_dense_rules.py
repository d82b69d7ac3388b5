#!/usr/bin/env python3
"""Time the dense rule's parts for one layer shape, side by side in one process: the two Gram
matrices, the Gram norm bare and with its rounding bound and barrier (what the rule runs), the
materialised per-example gradients (with and without their weighted sum) and the batched
weight gradient the Gram form's sum needs (book-keeping).

    python scripts/bench_dense_rules.py B T d p      # e.g. 256 25 256 32: the cnn's conv2
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ablation.core.autotune import median_ms as bench
from jax import lax
from ablation.core.rules.dense import HIGHEST, gram_rounding_bound
B, T, d, p = [int(v) for v in sys.argv[1:5]]
k1, k2 = jax.random.split(jax.random.key(0))
a = jax.random.normal(k1, (B, T, d)); g = jax.random.normal(k2, (B, T, p))
def gram(a, g, prec=None):
    aa = jnp.einsum("btd,bsd->bts", a, a, precision=prec); gg = jnp.einsum("btp,bsp->bts", g, g, precision=prec)
    return jnp.sum(aa * gg, axis=(1, 2))
def gram_full(a, g):
    aa = jnp.einsum("btd,bsd->bts", a, a, precision=HIGHEST); gg = jnp.einsum("btp,bsp->bts", g, g, precision=HIGHEST)
    s = jnp.sum(lax.optimization_barrier(jnp.sum(aa * gg, axis=2)), axis=1)
    return s + gram_rounding_bound(aa, gg, d, p)
def aa_only(a, g): return jnp.einsum("btd,bsd->bts", a, a)
def gg_only(a, g): return jnp.einsum("btp,bsp->bts", g, g)
def mat(a, g): return jnp.sum(jnp.square(jnp.einsum("btd,btp->bdp", a, g)), axis=(1, 2))
def mat_and_sum(a, g):
    w = jnp.einsum("btd,btp->bdp", a, g); c = jnp.linspace(0, 1, B)
    return jnp.sum(jnp.square(w), axis=(1, 2)), jnp.tensordot(c, w, axes=1)
def bookkeeping(a, g): return jnp.einsum("btd,btp->dp", a, g)
for f in (aa_only, gg_only, gram, gram_full, mat, mat_and_sum, bookkeeping):
    print(f"{f.__name__:12s} {bench(f, a, g):.3f} ms")
