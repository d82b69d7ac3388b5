"""The dense rule: ``hk.Linear`` (and any linear map over the last axis) at one position or many.

For ``A_i [T, d]`` (positions × inputs) and ``G_i [T, p]`` (the output gradients), example i's
weight gradient is ``A_iᵀ G_i`` and its bias gradient ``Σ_t g_it``:

* no positions (T = 1): ``‖a_i‖² ‖g_i‖²``, a product of two sums of squares (no cancellation);
* over positions or time: the Gram form ``⟨A_i A_iᵀ, G_i G_iᵀ⟩`` (cost T²·(d+p)) or the
  materialised per-layer gradient ``‖A_iᵀ G_i‖²`` (cost T·d·p), whichever is cheaper for the
  shapes (:func:`prefers_gram`).

The Gram form is a signed double sum that can cancel in float32: inputs that share an offset
much larger than their variation (raw pixels, a user's features, an adversary's) make
``A_i A_iᵀ`` nearly constant while the gradient is small. It carries a rigorous bound on its
rounding error (:func:`gram_rounding_bound`), and the norm that sets an example's clip factor is

* ``gram + bound`` where the bound is within :data:`GRAM_TOLERANCE` of the value (so at least
  the exact squared norm, and above it by at most that fraction), and
* the squared norm of the example's own materialised float32 gradient ``A_iᵀ G_i`` where it is
  not: computed in the same step for those examples only (a ``lax.cond`` per example inside one
  taken only when some example of the batch needs it), so no example is clipped harder than
  DP-SGD would clip it, whatever the offset.

When any example of a batch takes its exact norm, the layer's sum for that batch is built from
each example's own gradient, one example at a time, each shrunk (if need be) to the norm its
clip factor was computed from, so what an example adds is what its norm measured.
"""

from __future__ import annotations

from typing import Mapping

import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax

from ablation.core.rules.base import (HIGHEST, LayerNorms, LayerTap, Rule, positions,
                                      weighted)
from ablation.core.rules.patches import Patches

#: float32's unit roundoff.
UNIT_ROUNDOFF = 2.0 ** -24
#: The largest relative over-estimate of a squared norm that the Gram form's rounding bound may
#: add; an example whose bound is looser takes the squared norm of its materialised gradient.
GRAM_TOLERANCE = 1e-3
#: The dense rule's forms over positions.
FORMS = ("gram", "materialised")


def prefers_gram(positions: int, inputs: int, outputs: int) -> bool:
    """Gram form (cost T²·(d+p)) rather than the materialised per-layer gradient (T·d·p)?"""
    return positions * positions * (inputs + outputs) < positions * inputs * outputs


def flop_form(positions: int, inputs: int, outputs: int) -> str:
    """The dense rule's form over positions by the flop count: ``gram`` or ``materialised``."""
    return "gram" if prefers_gram(positions, inputs, outputs) else "materialised"


def gram_rounding_bound(aa: jax.Array, gg: jax.Array, inputs: int, outputs: int) -> jax.Array:
    """``[B]``: how far the float32 Gram value ``Σ_ts (a_t·a_s)(g_t·g_s)`` can lie from its
    exact value, whatever order each sum runs in, from the two Gram matrices ``aa = AAᵀ`` and
    ``gg = GGᵀ`` (``[B, T, T]``, as computed) and the widths d and p.

    Each inner product of length d is off by at most ``γ_d ‖a_t‖‖a_s‖`` (``γ_n = n·u``, u the
    unit roundoff), likewise for g; the products and the two sums of T terms add
    ``(2T + 2)·u`` of ``Σ_ts |a_t·a_s||g_t·g_s|``. So the error is at most
    ``γ_d Σ_ts ‖a_t‖‖a_s‖|g_t·g_s| + γ_p Σ_ts |a_t·a_s|‖g_t‖‖g_s‖
    + (2T+2)u Σ_ts |a_t·a_s||g_t·g_s|`` to first order, plus ``2 γ_d γ_p (Σ_t ‖a_t‖‖g_t‖)²``
    for the second. The norms are the Gram matrices' diagonals (sums of squares: relative error
    ``γ_d/2``, ``γ_p/2``); the factor 1.1 and 4 more roundoffs per width cover that and the
    rounding of the bound itself (its terms are all non-negative, so that is relative:
    ``T²·u`` ≤ 0.1 for any T below 1,290).
    """
    count = aa.shape[1]
    na = jnp.sqrt(jnp.diagonal(aa, axis1=1, axis2=2))  # [B, T]: ‖a_t‖
    ng = jnp.sqrt(jnp.diagonal(gg, axis1=1, axis2=2))
    abs_aa, abs_gg = jnp.abs(aa), jnp.abs(gg)
    u = UNIT_ROUNDOFF
    terms = ((inputs + 4) * u * (na[:, :, None] * na[:, None, :]) * abs_gg
             + (outputs + 4) * u * abs_aa * (ng[:, :, None] * ng[:, None, :])
             + (2 * count + 6) * u * abs_aa * abs_gg)
    second_order = 2 * (inputs + 4) * (outputs + 4) * u * u * jnp.square(jnp.sum(na * ng, axis=1))
    return 1.1 * (jnp.sum(terms, axis=(1, 2)) + second_order)


def dense_norms(inputs: jax.Array | Patches, grads: jax.Array, names: tuple[str, ...],
                weight_shape: tuple[int, ...] | None = None, form: str | None = None
                ) -> LayerNorms:
    """``‖∇W_i‖² (+ ‖∇b_i‖²)`` of ``A @ W + b`` from ``A [B, ..., d]`` (or a conv's
    :class:`Patches`) and ``G [B, ..., p]``; over positions in the ``form`` given (``gram`` or
    ``materialised``), else in the one :func:`prefers_gram` picks."""
    a, g = (inputs if isinstance(inputs, Patches) else positions(inputs)), positions(grads)
    batch, count, d = a.shape
    p = g.shape[2]
    shape = weight_shape or (d, p)
    if form is None:
        form = flop_form(count, d, p)
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")

    held = {}  # the per-example gradients this rule computes anyway
    sq = jnp.zeros(batch, a.dtype)
    if "b" in names:
        held["b"] = jnp.sum(g, axis=1)  # [B, p]: each example's bias gradient
        sq = jnp.sum(jnp.square(held["b"]), axis=-1)
    fallback = None
    if count == 1:  # a rank-1 gradient: its norm is a product of two positive sums
        w_sq = _sq_rows(a) * jnp.sum(jnp.square(g), axis=(1, 2))
    elif form == "gram":
        aa = _gram(a)
        gg = jnp.einsum("btp,bsp->bts", g, g, precision=HIGHEST)
        # Two sums of T terms each (a barrier keeps XLA from merging them into one of T²), so
        # the bound's 2T holds whatever order each sum runs in.
        gram = jnp.sum(lax.optimization_barrier(jnp.sum(aa * gg, axis=2)), axis=1)
        bound = gram_rounding_bound(aa, gg, d, p)
        # Always at least the exact value; where that over-estimates by more than the
        # tolerance (cancellation), the example's own gradient gives its norm instead.
        loose = ~(bound <= GRAM_TOLERANCE * gram)  # NaN counts as loose
        w_sq = exact_where_loose(loose, gram + bound, a, g)
        fallback = jnp.any(loose)
    else:
        held["w"] = _outer(a, g)
        w_sq = jnp.sum(jnp.square(held["w"]), axis=(1, 2))

    def exact_sum(c, wanted):
        sums = {name: weighted(c, held[name]) for name in wanted if name in held}
        if "w" in wanted and "w" not in held:
            sums["w"] = one_by_one_sum(_written(a), g, c, jnp.sqrt(w_sq))
        if "w" in sums:
            sums["w"] = sums["w"].reshape(shape)
        return sums

    return LayerNorms(sq + w_sq, exact_sum, tuple(sorted(held)), fallback)


def dense_sq_norms(inputs: jax.Array, grads: jax.Array, names: tuple[str, ...]) -> jax.Array:
    """The dense rule's per-example squared norms alone (see :func:`dense_norms`)."""
    return dense_norms(inputs, grads, names).sq


def _written(a: jax.Array | Patches) -> jax.Array:
    return a.dense() if isinstance(a, Patches) else a


def _gram(a: jax.Array | Patches) -> jax.Array:
    """``[B, T, T]``: ``A_i A_iᵀ``."""
    if isinstance(a, Patches):
        return a.gram()
    return jnp.einsum("btd,bsd->bts", a, a, precision=HIGHEST)


def _outer(a: jax.Array | Patches, g: jax.Array) -> jax.Array:
    """``[B, d, p]``: each example's ``A_iᵀ G_i``."""
    if isinstance(a, Patches):
        return a.outer(g)
    return jnp.einsum("btd,btp->bdp", a, g, precision=HIGHEST)


def _sq_rows(a: jax.Array | Patches) -> jax.Array:
    """``[B]``: ``‖A_i‖²``."""
    if isinstance(a, Patches):
        return a.sq_rows()
    return jnp.sum(jnp.square(a), axis=(1, 2))


def _example_gradient(a_i: jax.Array, g_i: jax.Array) -> jax.Array:
    """``[d, p]``: one example's weight gradient ``A_iᵀ G_i``, the same product for its norm
    and for its share of the sum."""
    return jnp.dot(a_i.T, g_i, precision=HIGHEST)


def exact_where_loose(loose: jax.Array, sq: jax.Array, a: jax.Array | Patches,
                      g: jax.Array) -> jax.Array:
    """``sq`` with each example flagged ``loose`` (``[B]`` bools) replaced by the squared
    norm of its own materialised gradient ``‖A_iᵀ G_i‖²``.

    Nothing is materialised for a batch with no loose example (the outer ``lax.cond``), and
    within a batch that has some only those examples are (a ``lax.cond`` per example inside
    ``lax.map``): the cost is one per-example product per loose example.
    """
    def exact(sq):
        dense = _written(a)  # the patches are written out only here

        def one(item):
            loose_i, sq_i, a_i, g_i = item
            return lax.cond(loose_i,
                            lambda: jnp.sum(jnp.square(_example_gradient(a_i, g_i))),
                            lambda: sq_i)

        return lax.map(one, (loose, sq, dense, g))

    return lax.cond(jnp.any(loose), exact, lambda sq: sq, sq)


def one_by_one_sum(a: jax.Array, g: jax.Array, c: jax.Array, norms: jax.Array) -> jax.Array:
    """``Σ_i c_i · A_iᵀ G_i``, one example at a time, each shrunk (if need be) to the norm its
    clip factor was computed from: a second evaluation of the same product could round
    differently, and the example must not count for more than its norm said."""
    def add(total, item):
        a_i, g_i, c_i, n_i = item
        m = _example_gradient(a_i, g_i)
        shrink = jnp.minimum(1.0, n_i / jnp.sqrt(jnp.sum(jnp.square(m))))  # 1 when m = 0
        return total + (c_i * shrink).astype(m.dtype) * m, None

    zeros = jnp.zeros((a.shape[2], g.shape[2]), a.dtype)
    return lax.scan(add, zeros, (a, g, c, norms))[0]


def dense_apply(params: Mapping[str, jax.Array], inputs: jax.Array) -> jax.Array:
    """``inputs @ w (+ b)``: hk.Linear over the last axis."""
    out = jnp.dot(inputs, params["w"], precision=HIGHEST)
    return out + params["b"] if "b" in params else out


def _linear_tap(module, args, kwargs) -> LayerTap:
    return LayerTap("dense", dense_apply, ("w", "b") if module.with_bias else ("w",))


def describe_dense(kind: str, features: int, outputs: int, count: int) -> str:
    """``dense``, or ``dense: gram over 25 positions`` (the form over positions)."""
    if count == 1:
        return kind
    return f"{kind}: {flop_form(count, features, outputs)} over {count} positions"


def _describe(tap, input_shape, output_shape, batch_size) -> str:
    count = 1
    for n in output_shape[:-1]:
        count *= n
    return describe_dense("dense", input_shape[-1], output_shape[-1], count)


RULE = Rule("dense", lambda a, g, tap: dense_norms(a, g, tap.params),
            "hk.Linear (and dense maps over positions or time): ‖a‖²‖g‖², or Gram / "
            "materialised over positions, whichever is cheaper (the materialised norm for an "
            "example whose Gram bound is loose)", _describe, {hk.Linear: _linear_tap})
