#!/usr/bin/env python3
"""Time the embedding rule's two ways of grouping equal ids, side by side in one process: a
per-example sort (``sort``) and tables of first positions over chunks of C examples
(``chunkC``; chunk1 is what the rule uses), on IMDb's shapes and others. Checks that every way
gives the same norms. The constants of ``ablation.core.rules.embed.prefers_buckets`` come from it.

    python scripts/bench_embed_groups.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from ablation.core.autotune import median_ms as bench

from ablation.core.rules.embed import _group_repeated_ids
D = 16

def sums_sort(ids, g, V):
    group, gids = _group_repeated_ids(ids, V)
    rows = jnp.arange(ids.shape[0])[:, None]
    sums = jnp.zeros(g.shape, g.dtype).at[rows, group].add(g)
    return jnp.sum(sums**2, axis=(1, 2))

def first_positions(ids, V):
    B, T = ids.shape
    rows = jnp.arange(B)[:, None]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), ids.shape)
    first = jnp.full((B, V), T, jnp.int32).at[rows, ids].min(pos)
    return first[rows, ids]

def sums_chunked(ids, g, V, chunk):
    B, T = ids.shape
    if chunk >= B:
        group = first_positions(ids, V)
    else:
        group = jax.lax.map(lambda i: first_positions(i, V), ids.reshape(B // chunk, chunk, T)).reshape(B, T)
    rows = jnp.arange(B)[:, None]
    sums = jnp.zeros(g.shape, g.dtype).at[rows, group].add(g)
    return jnp.sum(sums**2, axis=(1, 2))


for B, T, V in [(64, 256, 10004), (256, 256, 10004), (64, 16, 10004), (256, 32, 10004), (64, 256, 1000), (64, 256, 50000), (256, 128, 30000)]:
    ids = jax.random.randint(jax.random.key(0), (B, T), 0, V)
    g = jax.random.normal(jax.random.key(1), (B, T, D))
    ref = jax.jit(sums_sort, static_argnums=2)(ids, g, V)
    res = {"sort": bench(lambda i, g: sums_sort(i, g, V), ids, g)}
    for c in (1, 4, 16, 64, B):
        if c > B or B % c: continue
        out = jax.jit(lambda i, g: sums_chunked(i, g, V, c))(ids, g)
        np.testing.assert_allclose(out, ref, rtol=1e-5)
        res[f"chunk{c}"] = bench(lambda i, g: sums_chunked(i, g, V, c), ids, g)
    print(f"B={B} T={T} V={V}: " + "  ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
