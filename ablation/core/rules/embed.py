"""The embed rule: ``hk.Embed``, each example's gradient summed over its repeated ids.

Example i's gradient of the table has one row per distinct id it looks up, the sum of its
output gradients at that id's positions: ``‖∇E_i‖² = Σ_v ‖Σ_{t: id_t = v} g_t‖²``, never a
vocabulary-sized gradient. Equal ids are grouped by a per-example table of first positions or a
sort, whichever is cheaper for T and V (:func:`prefers_buckets`), then summed; the clipped sum
reuses those group sums, so each example adds exactly the rows its norm was computed from.

Ids map as the layer's lookup maps them and as its gradient lands: with ``ARRAY_INDEX`` (the
default) an id below 0 wraps once (``V + id``) and one still outside ``[0, V)`` adds to no row
(the gather clamps, its transposed scatter drops); with ``ONE_HOT`` every id outside ``[0, V)``
(negative ones included) is an all-zero row and adds to no row.
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ablation.core.rules.base import HIGHEST, LayerNorms, LayerTap, Rule, positions

#: The embedding rule's two ways of grouping equal ids, timed on a 2-core AMD EPYC (jax 0.10.2,
#: ``scripts/bench_embed_groups.py``): a per-example sort costs about SORT_NS·T·log2 T; a
#: per-example table of first positions costs BUCKET_FIXED_NS + BUCKET_NS_PER_ROW·V to clear
#: (V rows, in cache) plus the same T-proportional scatter and gather either way.
SORT_NS, BUCKET_FIXED_NS, BUCKET_NS_PER_ROW = 4.7, 600.0, 0.07
#: hk.Embed's lookup styles the rule covers.
STYLES = ("ARRAY_INDEX", "ONE_HOT")


def prefers_buckets(steps: int, vocab_size: int) -> bool:
    """Whether grouping T ids of a V-row table is cheaper by a table of first positions than
    by a sort (IMDb's T = 256, V = 10,004: buckets, 3-4× faster; T = 16: the sort)."""
    sort_ns = SORT_NS * steps * max(1.0, math.log2(max(steps, 2)))
    return BUCKET_FIXED_NS + BUCKET_NS_PER_ROW * vocab_size < sort_ns


def _group_repeated_ids(ids: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """For ids ``[B, T]`` already in ``[0, V)``, each position's group (``[B, T]`` in
    ``[0, T)``: equal ids share one) and each group's id (``[B, T]``; a group no position
    uses holds zeros, so its id does not matter). By buckets or a sort, whichever
    :func:`prefers_buckets`."""
    if prefers_buckets(ids.shape[1], vocab_size):
        return _group_by_buckets(ids, vocab_size)
    return _group_by_sorting(ids, vocab_size)


def _group_by_buckets(ids: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """Each position's group is the first position holding the same id, found through a table
    of V first positions per example (one example at a time, so the table stays in cache and
    the memory is V ints, not B·V). A group's slot is its first position, whose id it is."""
    steps = ids.shape[1]
    where = jnp.arange(steps, dtype=jnp.int32)

    def first_positions(example_ids):
        table = jnp.full((vocab_size,), steps, jnp.int32).at[example_ids].min(where)
        return table[example_ids]

    return lax.map(first_positions, ids), ids


def _group_by_sorting(ids: jax.Array, vocab_size: int, pack: bool = True
                      ) -> tuple[jax.Array, jax.Array]:
    """The groups of :func:`_group_repeated_ids` by one sort per example: group ``k`` is the
    k-th distinct id in sorted order (a group no position uses has id 0). ``pack=False``
    sorts (id, position) pairs even where both would fit one int32 key (for tests)."""
    batch, steps = ids.shape
    rows = jnp.arange(batch)[:, None]
    if pack and vocab_size * steps < 2 ** 31:
        # ids and positions packed in one int32 key: XLA:CPU sorts plain keys several times
        # faster than key-value pairs.
        packed = jnp.sort(ids * steps + jnp.arange(steps, dtype=jnp.int32), axis=1)
        sorted_ids, position = packed // steps, packed % steps
    else:  # ids too large to pack beside a position: sort (id, position) pairs instead
        position = jnp.argsort(ids, axis=1)
        sorted_ids = jnp.take_along_axis(ids, position, axis=1)
    new = jnp.concatenate([jnp.ones((batch, 1), bool), sorted_ids[:, 1:] != sorted_ids[:, :-1]],
                          axis=1)
    in_order = jnp.cumsum(new, axis=1, dtype=jnp.int32) - 1  # group of each sorted position
    group = jnp.zeros((batch, steps), jnp.int32).at[rows, position].set(in_order)
    # Each group's id, added once (by its first member) into its slot.
    group_ids = jnp.zeros((batch, steps), jnp.int32).at[rows, in_order].add(
        jnp.where(new, sorted_ids, 0))
    return group, group_ids


def embed_norms(ids: jax.Array, grads: jax.Array, vocab_size: int,
                wrap: bool = True) -> LayerNorms:
    """``Σ_v ‖Σ_{t: id_t = v} g_t‖²`` per example, from ids ``[B, ...]`` and ``G [B, ..., D]``.

    ``wrap``: an id below 0 wraps once (``ARRAY_INDEX``); without, it adds to no row
    (``ONE_HOT``). Either way an id outside ``[0, V)`` after that adds to no row.
    """
    ids = ids.reshape(ids.shape[0], -1).astype(jnp.int32)
    g = positions(grads)
    batch, steps = ids.shape
    mapped = jnp.where(ids < 0, ids + vocab_size, ids) if wrap else ids
    valid = (mapped >= 0) & (mapped < vocab_size)
    # A position that adds to no row gets a zero gradient and any id in range: it then adds
    # exactly nothing to whichever group it joins.
    keys = jnp.where(valid, mapped, 0)
    g = jnp.where(valid[..., None], g, jnp.zeros_like(g))
    group, group_ids = _group_repeated_ids(keys, vocab_size)
    rows = jnp.arange(batch)[:, None]
    sums = jnp.zeros(g.shape, g.dtype).at[rows, group].add(g)  # [B, T, D]: ≤ T groups

    def exact_sum(c, wanted=("embeddings",)):
        del wanted  # the table is the layer's only parameter
        scaled = sums * c.astype(sums.dtype)[:, None, None]
        table = jnp.zeros((vocab_size, g.shape[-1]), g.dtype)
        return {"embeddings": table.at[group_ids.reshape(-1)].add(
            scaled.reshape(-1, g.shape[-1]))}

    return LayerNorms(jnp.sum(jnp.square(sums), axis=(1, 2)), exact_sum, ("embeddings",))


def embed_sq_norms(ids: jax.Array, grads: jax.Array, vocab_size: int) -> jax.Array:
    """The embed rule's per-example squared norms alone (see :func:`embed_norms`)."""
    return embed_norms(ids, grads, vocab_size).sq


def embed_apply(params, ids: jax.Array) -> jax.Array:
    """``embeddings[ids]``: hk.Embed's ARRAY_INDEX lookup, indexed exactly as it indexes (ids
    below 0 wrap once, a gather clamps, and its gradient drops what lies outside the table)."""
    return jnp.asarray(params["embeddings"])[(ids,)]


def one_hot_apply(params, ids: jax.Array) -> jax.Array:
    """hk.Embed's ONE_HOT lookup: ``one_hot(ids) @ embeddings``."""
    table = params["embeddings"]
    return jnp.dot(jax.nn.one_hot(ids, table.shape[0], dtype=table.dtype), table,
                   precision=HIGHEST)


def _style_name(style) -> str:
    return str(getattr(style, "name", style)).upper()


def _embed_tap(module: hk.Embed, args, kwargs) -> LayerTap:
    style = kwargs.get("lookup_style", args[1] if len(args) > 1 else None)
    style = _style_name(style or module.lookup_style)
    if style not in STYLES:  # hk.Embed itself raises on any other
        style = "ARRAY_INDEX"
    one_hot = style == "ONE_HOT"
    return LayerTap("embed", one_hot_apply if one_hot else embed_apply, ("embeddings",),
                    {"vocab_size": module.vocab_size, "wrap": not one_hot, "style": style})


def _describe(tap, input_shape, output_shape, batch_size) -> str:
    ids = int(np.prod(input_shape))
    how = "buckets" if prefers_buckets(ids, tap.options["vocab_size"]) else "a sort"
    style = "" if tap.options.get("wrap", True) else ", one-hot lookup"
    return f"embed: segment sum over {ids} ids (grouped by {how}{style})"


RULE = Rule("embed",
            lambda ids, g, tap: embed_norms(ids, g, tap.options["vocab_size"],
                                            tap.options.get("wrap", True)),
            "hk.Embed (ARRAY_INDEX or ONE_HOT lookup): segment sum over repeated ids",
            _describe, {hk.Embed: _embed_tap})
