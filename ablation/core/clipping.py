"""The ghost engine's clipping rules: each example's gradient norm without its gradient.

DP-SGD needs ``Σ_i g_i · min(1, C/‖g_i‖)`` with ``‖g_i‖`` the global L2 norm over every
parameter. The paper's engines materialise each ``g_i`` (vmap or a loop). For the layers of
these networks each ``‖∇_layer ℓ_i‖²`` also follows from what one forward and backward pass
already has: the layer's input ``A_i`` and its output gradient ``G_i`` (Li et al., ICLR 2022;
Bu et al., NeurIPS 2022, ICML 2023). :mod:`ablation.core.taps` collects both, from the same
per-example (batch-of-one) loss every engine differentiates, ``vmap``ped over the examples;
this module turns them into norms (:data:`RULES`, one rule per layer kind) and the clipped sum.

===========  =================================================================================
kind         ‖∇W_i‖² (+ ‖∇b_i‖²), for ``A_i [T, d]`` (positions × inputs), ``G_i [T, p]``
===========  =================================================================================
dense        no positions (T = 1): ``‖a_i‖² ‖g_i‖²``. Over positions or time (the lstm's gate
             projection over 256 steps): the Gram form ``⟨A_i A_iᵀ, G_i G_iᵀ⟩`` (cost T²·(d+p))
             or the per-layer gradient ``‖A_iᵀ G_i‖²`` (cost T·d·p), whichever is cheaper for the
             shapes. Bias: ``‖Σ_t g_it‖²``.
conv2d       the input's patches are ``A_i`` over the output positions; then the dense rule,
             in the form (Gram or materialised) and with the patches held the way (written out,
             or one view per kernel offset) that measured fastest for the layer's shapes on
             this machine (:func:`conv_form`; ``ABLATION_CONV_FORMS=model`` takes the flop
             count's form instead).
embed        ``Σ_v ‖Σ_{t: id_t = v} g_t‖²``: each example's output gradients summed over repeated
             token ids (grouped by a table of first positions, or a sort where T is short; then a
             segment sum), never a vocabulary-sized gradient. Ids map as
             the lookup maps them (below 0 wraps once; outside the table gets no gradient).
===========  =================================================================================

The guarantee: for every example, the squared norm that sets its clip factor is at least the
squared norm of what the sum adds for that example, so no example counts for more than C.

* Where a rule holds each example's gradient of the layer (the materialised form, the bias, the
  embedding's per-id sums), the sum is built from those very values (book-keeping reuse), so
  the norm and the contribution are the same numbers.
* The Gram form is a signed double sum that can cancel in float32 (a large offset shared by the
  inputs): it carries a rigorous bound on its rounding error (:func:`gram_rounding_bound`: each
  inner product, the products and the two sums, in any summation order), which is added to it.
  Where that bound exceeds :data:`GRAM_TOLERANCE` of the value for some example of the batch,
  the layer falls back, for that batch, to each example's own float32 gradient, one example at a
  time (norm and sum), so a Gram norm over-clips by at most that relative amount and the
  rounding of what an example adds stays that of its own gradient. A negative or zero Gram
  value is never read as "no clipping".
* Contractions run at ``precision=HIGHEST``.

The clipped sum then comes one of two ways (``mode``): ``bookkeeping`` (Bu et al., 2023) takes
each layer's gradient from the stored ``A`` and the output gradients scaled by the clip factors,
``Σ_i c_i ∇W_i = VJP_W(layer at A)(c ⊙ G)``, in the same pass; ``two_pass`` (ghost clipping)
takes it from a second backward pass of ``Σ_i c_i ℓ_i``. Either way, layers whose rule holds the
per-example gradients reuse them. A parameter no rule covers, a layer used twice, a parameter
used outside its layer, or a layer the taps cannot see is an error naming it: the sum is exact
or not computed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ablation.core import autotune
from ablation.core.masking import fill_padded, zero_unless_any
from ablation.core.patches import Patches, patch_views
from ablation.core.taps import (HIGHEST, GhostUnsupported, LayeredLoss, LayerTap,
                                parameter_violations)

PyTree = Any
MODES = ("bookkeeping", "two_pass")
#: float32's unit roundoff.
UNIT_ROUNDOFF = 2.0 ** -24
#: The largest relative over-estimate of a squared norm that the Gram form's rounding bound may
#: add before its layer falls back to materialised per-example gradients for the batch.
GRAM_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------
# The rules: per-example squared gradient norms of one layer, ``[B]``.


def _positions(a: jax.Array) -> jax.Array:
    """``[B, ..., f] -> [B, T, f]``: every axis between the example and the features is a
    position (including the batch-of-one axis of the per-example pass)."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


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
    ``γ_d Σ_ts ‖a_t‖‖a_s‖|g_t·g_s| + γ_p Σ_ts |a_t·a_s|‖g_t‖‖g_s‖ + (2T+2)u Σ_ts |a_t·a_s||g_t·g_s|``
    to first order, plus ``2 γ_d γ_p (Σ_t ‖a_t‖‖g_t‖)²`` for the second. The norms are the
    Gram matrices' diagonals (sums of squares: relative error ``γ_d/2``, ``γ_p/2``); the factor
    1.1 and 4 more roundoffs per width cover that and the rounding of the bound itself (its
    terms are all non-negative, so that is relative: ``T²·u`` ≤ 0.1 for any T below 1,290).
    """
    positions = aa.shape[1]
    na = jnp.sqrt(jnp.diagonal(aa, axis1=1, axis2=2))  # [B, T]: ‖a_t‖
    ng = jnp.sqrt(jnp.diagonal(gg, axis1=1, axis2=2))
    abs_aa, abs_gg = jnp.abs(aa), jnp.abs(gg)
    u = UNIT_ROUNDOFF
    terms = ((inputs + 4) * u * (na[:, :, None] * na[:, None, :]) * abs_gg
             + (outputs + 4) * u * abs_aa * (ng[:, :, None] * ng[:, None, :])
             + (2 * positions + 6) * u * abs_aa * abs_gg)
    second_order = 2 * (inputs + 4) * (outputs + 4) * u * u * jnp.square(jnp.sum(na * ng, axis=1))
    return 1.1 * (jnp.sum(terms, axis=(1, 2)) + second_order)


def _weighted(c: jax.Array, per_example: jax.Array) -> jax.Array:
    """``Σ_i c_i · per_example[i]``: each example's own values, scaled, then summed."""
    return jnp.tensordot(c.astype(per_example.dtype), per_example, axes=1, precision=HIGHEST)


@dataclasses.dataclass(frozen=True)
class LayerNorms:
    """A rule's answer for one layer.

    Attributes:
      sq: ``[B]`` squared norms that set the clip factors: at least the squared norm of what
        the sum adds for each example.
      exact_sum: ``(c [B], names) -> {name: Σ_i c_i ∇_i}`` for the parameters ``names``, built
        from each example's own gradient values (those the norms were computed from).
      names: the parameters whose sum always comes from ``exact_sum`` (the rule holds their
        per-example gradients anyway); the others come from the batched sum.
      fallback: a scalar bool (traced) that is True where ``exact_sum`` must replace the
        batched sum of every parameter for this batch (the Gram bound was too loose), or None.
    """

    sq: jax.Array
    exact_sum: Callable[[jax.Array, tuple[str, ...]], dict[str, jax.Array]]
    names: tuple[str, ...] = ()
    fallback: jax.Array | None = None


def dense_norms(inputs: jax.Array | Patches, grads: jax.Array, names: tuple[str, ...],
                weight_shape: tuple[int, ...] | None = None, form: str | None = None
                ) -> LayerNorms:
    """``‖∇W_i‖² (+ ‖∇b_i‖²)`` of ``A @ W + b`` from ``A [B, ..., d]`` (or a conv's
    :class:`Patches`) and ``G [B, ..., p]``; over positions in the ``form`` given (``gram`` or
    ``materialised``), else in the one :func:`prefers_gram` picks."""
    a, g = (inputs if isinstance(inputs, Patches) else _positions(inputs)), _positions(grads)
    batch, positions, d = a.shape
    p = g.shape[2]
    shape = weight_shape or (d, p)
    if form is None:
        form = flop_form(positions, d, p)
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")

    held = {}  # the per-example gradients this rule computes anyway
    sq = jnp.zeros(batch, a.dtype)
    if "b" in names:
        held["b"] = jnp.sum(g, axis=1)  # [B, p]: each example's bias gradient
        sq = jnp.sum(jnp.square(held["b"]), axis=-1)
    fallback = None
    if positions == 1:  # a rank-1 gradient: its norm is a product of two positive sums
        w_sq = _sq_rows(a) * jnp.sum(jnp.square(g), axis=(1, 2))
    elif form == "gram":
        aa = _gram(a)
        gg = jnp.einsum("btp,bsp->bts", g, g, precision=HIGHEST)
        # Two sums of T terms each (a barrier keeps XLA from merging them into one of T²), so
        # the bound's 2T holds whatever order each sum runs in.
        gram = jnp.sum(lax.optimization_barrier(jnp.sum(aa * gg, axis=2)), axis=1)
        bound = gram_rounding_bound(aa, gg, d, p)
        # Always at least the exact value. Where the bound is loose (cancellation) the example
        # is over-clipped, and the layer's sum for the batch is built from each example's own
        # gradient (the fallback), so that its rounding stays relative to that gradient.
        fallback = jnp.any(bound > GRAM_TOLERANCE * gram)
        w_sq = gram + bound
    else:
        held["w"] = _outer(a, g)
        w_sq = jnp.sum(jnp.square(held["w"]), axis=(1, 2))

    def exact_sum(c, wanted):
        sums = {name: _weighted(c, held[name]) for name in wanted if name in held}
        if "w" in wanted and "w" not in held:
            dense = a.dense() if isinstance(a, Patches) else a
            sums["w"] = _one_by_one_sum(dense, g, c, jnp.sqrt(w_sq))
        if "w" in sums:
            sums["w"] = sums["w"].reshape(shape)
        return sums

    return LayerNorms(sq + w_sq, exact_sum, tuple(sorted(held)), fallback)


#: The dense rule's forms over positions.
FORMS = ("gram", "materialised")


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


def _one_by_one_sum(a: jax.Array, g: jax.Array, c: jax.Array, norms: jax.Array) -> jax.Array:
    """``Σ_i c_i · A_iᵀ G_i``, one example at a time, each shrunk (if need be) to the norm its
    clip factor was computed from: a second evaluation of the same product could round
    differently, and the example must not count for more than its norm said."""
    def add(total, item):
        a_i, g_i, c_i, n_i = item
        m = jnp.dot(a_i.T, g_i, precision=HIGHEST)
        shrink = jnp.minimum(1.0, n_i / jnp.sqrt(jnp.sum(jnp.square(m))))  # 1 when m = 0
        return total + (c_i * shrink).astype(m.dtype) * m, None

    zeros = jnp.zeros((a.shape[2], g.shape[2]), a.dtype)
    return lax.scan(add, zeros, (a, g, c, norms))[0]


def dense_sq_norms(inputs: jax.Array, grads: jax.Array, names: tuple[str, ...]) -> jax.Array:
    """The dense rule's per-example squared norms alone (see :func:`dense_norms`)."""
    return dense_norms(inputs, grads, names).sq


_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}

#: How the conv rule picks its form for a layer's shapes, from the environment variable
#: ``ABLATION_CONV_FORMS``: ``measured`` (the default) times its exact candidates once per shape
#: on this machine (:mod:`ablation.core.autotune`) and keeps the fastest; ``model`` writes the
#: patches out and takes the form the flop count prefers (:func:`prefers_gram`).
CONV_FORM_CHOICES = ("measured", "model")
CONV_FORMS_ENV = "ABLATION_CONV_FORMS"
#: How the patches are held: written out (``[B, T, d]``) or as one view per kernel offset.
#: (Each example's weight gradient from the layer's own VJP, vmapped, was slower than both on
#: every paper layer: 1.5-10x, so it is no candidate.)
LAYOUTS = ("written", "views")
#: Candidates costlier than the cheapest by more than this factor in flops are not timed (the
#: measured choice never took one beyond 2×).
FLOP_SLACK = 3


def conv_form_choice() -> str:
    """``measured`` or ``model`` (see :data:`CONV_FORM_CHOICES`)."""
    choice = os.environ.get(CONV_FORMS_ENV, "measured")
    if choice not in CONV_FORM_CHOICES:
        raise ValueError(f"{CONV_FORMS_ENV}={choice!r}; valid: {', '.join(CONV_FORM_CHOICES)}")
    return choice


def _dilated(tap: LayerTap) -> bool:
    o = tap.options
    return any(d != 1 for d in (*o["lhs_dilation"], *o["rhs_dilation"]))


def conv_form(tap: LayerTap, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
              dtype: Any = jnp.float32) -> tuple[str, str, bool]:
    """``(layout, form, measured)`` for a conv layer with inputs ``[B, n, *spatial, C]`` and
    output gradients ``[B, n, *out, O]``: how :func:`conv_norms` computes it."""
    positions = int(np.prod(output_shape[1:-1]))
    d = int(np.prod(tap.options["filter_shape"])) * input_shape[-1]
    p = output_shape[-1]
    model = flop_form(positions, d, p)
    if conv_form_choice() == "model" or positions == 1:
        return "written", model, False
    flops = {"gram": positions * positions * (d + p), "materialised": positions * d * p}
    forms = [f for f in FORMS if flops[f] <= FLOP_SLACK * min(flops.values())]
    layouts = ("written",) if _dilated(tap) else LAYOUTS
    candidates = [(layout, form) for layout in layouts for form in forms]
    if len(candidates) == 1:
        return (*candidates[0], False)
    o = tap.options
    key = ("conv", jax.default_backend(), tuple(input_shape), tuple(output_shape),
           jnp.dtype(dtype).name,
           tuple(o["filter_shape"]), tuple(o["window_strides"]), str(o["padding"]),
           tuple(o["lhs_dilation"]), tuple(o["rhs_dilation"]), tuple(tap.params))

    def timed(layout, form):
        return lambda inputs, grads, c: conv_layer_work(tap, inputs, grads, c, layout, form)

    specs = (jax.ShapeDtypeStruct(tuple(input_shape), dtype),
             jax.ShapeDtypeStruct(tuple(output_shape), dtype),
             jax.ShapeDtypeStruct(input_shape[:1], dtype))
    name = autotune.fastest(key, {f"{layout}/{form}": timed(layout, form)
                                  for layout, form in candidates}, specs,
                            default=f"written/{model}")
    layout, form = name.split("/")
    return layout, form, True


def conv_layer_work(tap: LayerTap, inputs: jax.Array, grads: jax.Array, c: jax.Array,
                    layout: str, form: str) -> tuple[jax.Array, dict[str, jax.Array]]:
    """What a step needs of one conv layer in one layout and form (what the measured choice
    times): the per-example squared norms and ``Σ_i c_i ∇_i`` (the materialised form's from
    its per-example gradients, the Gram form's by the book-keeping VJP)."""
    norms = _conv_layer_norms(inputs, grads, tap, layout, form)
    sums = norms.exact_sum(c, norms.names)
    if "w" not in norms.names:
        kernel = jnp.zeros((*tap.options["filter_shape"], inputs.shape[-1], grads.shape[-1]),
                           inputs.dtype)
        sums.update(_bookkeeping_sum(tap, {"w": kernel}, inputs, grads, c, skip=norms.names))
    return norms.sq, sums


def conv_norms(inputs: jax.Array, grads: jax.Array, tap: LayerTap) -> LayerNorms:
    """The conv rule: the input's patches are the dense rule's ``A`` over output positions, in
    the layout and form :func:`conv_form` picks for the shapes.

    ``inputs [B, n, *spatial, C]`` and ``grads [B, n, *out, O]`` (``n`` inputs per example: 1
    for a network that convolves its input as it comes).
    """
    layout, form, _ = conv_form(tap, inputs.shape, grads.shape, inputs.dtype)
    return _conv_layer_norms(inputs, grads, tap, layout, form)


def _conv_layer_norms(inputs: jax.Array, grads: jax.Array, tap: LayerTap, layout: str,
                      form: str) -> LayerNorms:
    o = tap.options
    dims = o["spatial_dims"]
    batch, channels = inputs.shape[0], inputs.shape[-1]
    images = inputs.reshape(-1, *inputs.shape[-(dims + 1):])
    kernel = tuple(o["filter_shape"])
    if _dilated(tap):
        if dims not in _SPATIAL:
            raise GhostUnsupported(f"ghost: a dilated {dims}-D convolution has no conv rule "
                                   "(1-, 2- and 3-D do)")
        letters = _SPATIAL[dims]
        patches = lax.conv_general_dilated_patches(
            images, kernel, o["window_strides"], o["padding"], lhs_dilation=o["lhs_dilation"],
            rhs_dilation=o["rhs_dilation"], precision=HIGHEST,
            dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"))
        # lax orders a patch's features (C, k₁, …); the kernel's rows are (k₁, …, C).
        patches = patches.reshape(*patches.shape[:-1], channels, *kernel)
        patches = jnp.moveaxis(patches, -dims - 1, -1).reshape(*patches.shape[:dims + 1], -1)
        patches = patches.reshape(batch, -1, patches.shape[-1])
    else:
        patches = patch_views(images, kernel, o["window_strides"], o["padding"], batch)
        if layout == "written":
            patches = patches.dense()
    out = grads.shape[-1]
    return dense_norms(patches, grads, tap.params, (*kernel, channels, out), form)


def _to_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """Haiku's norm axes (an int, a sequence or a slice) as absolute axes of an ``ndim`` array."""
    if isinstance(axis, slice):
        return tuple(range(ndim)[axis])
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def norm_affine_norms(inputs: jax.Array, grads: jax.Array, tap: LayerTap) -> LayerNorms:
    """``hk.LayerNorm`` and ``hk.RMSNorm``: ``out = scale ⊙ x̂ + offset`` of the normalised input,
    so each example's gradient is ``Σ x̂ ⊙ g`` (scale) and ``Σ g`` (offset) over the axes the
    parameters do not span: small (``[B, d]``), held and reused, never a Gram form.

    ``inputs [B, *x]`` are the layer's inputs as it saw them (``x`` with its batch of one):
    ``x̂`` is computed from them exactly as the stock layer computes it.
    """
    o = tap.options
    ndim = inputs.ndim - 1  # the layer's own view: [1, ...] per example
    axes = tuple(a + 1 for a in _to_axes(o["axis"], ndim))
    x = inputs
    if o["rms"]:
        normalized = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + o["eps"])
    else:
        mean = jnp.mean(x, axis=axes, keepdims=True)
        if o["fast_variance"]:
            variance = jnp.mean(jnp.square(x), axis=axes, keepdims=True) - jnp.square(mean)
        else:
            variance = jnp.var(x, axis=axes, keepdims=True)
        normalized = (x - mean) * lax.rsqrt(variance + jnp.asarray(o["eps"], variance.dtype))
    param_axes = _to_axes(o["param_axis"], ndim)
    summed = tuple(a + 1 for a in range(ndim) if a not in param_axes)
    param_shape = ((inputs.shape[-1],) if param_axes == (ndim - 1,) else
                   tuple(inputs.shape[1 + i] if i in param_axes else 1 for i in range(ndim)))
    held = {}
    if "scale" in tap.params:
        held["scale"] = jnp.sum(normalized * grads, axis=summed).reshape(-1, *param_shape)
    if "offset" in tap.params:
        held["offset"] = jnp.sum(grads, axis=summed).reshape(-1, *param_shape)
    sq = sum(jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=1) for v in held.values())

    def exact_sum(c, wanted):
        return {name: _weighted(c, held[name]) for name in wanted}

    return LayerNorms(sq, exact_sum, tuple(sorted(held)))


#: The embedding rule's two ways of grouping equal ids, timed on a 2-core AMD EPYC (jax 0.10.2,
#: ``scripts/bench_embed_groups.py``): a per-example sort costs about SORT_NS·T·log2 T; a
#: per-example table of first positions costs BUCKET_FIXED_NS + BUCKET_NS_PER_ROW·V to clear
#: (V rows, in cache) plus the same T-proportional scatter and gather either way.
SORT_NS, BUCKET_FIXED_NS, BUCKET_NS_PER_ROW = 4.7, 600.0, 0.07


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
    positions = jnp.arange(steps, dtype=jnp.int32)

    def first_positions(example_ids):
        table = jnp.full((vocab_size,), steps, jnp.int32).at[example_ids].min(positions)
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


def embed_norms(ids: jax.Array, grads: jax.Array, vocab_size: int) -> LayerNorms:
    """``Σ_v ‖Σ_{t: id_t = v} g_t‖²`` per example, from ids ``[B, ...]`` and ``G [B, ..., D]``.

    Ids map as ``hk.Embed``'s lookup maps them and as its gradient lands: an id below 0 wraps
    once (``V + id``), and one that is still outside ``[0, V)`` adds to no row (the lookup's
    gather clamps it, its transposed scatter drops it). Repeated ids are grouped by one sort
    per example (a table of first positions, or a sort where T is short:
    :func:`prefers_buckets`): T buckets per example, never a vocabulary-sized gradient. The
    sum reuses the groups' gradients, so each example adds exactly the rows its norm was
    computed from.
    """
    ids = ids.reshape(ids.shape[0], -1).astype(jnp.int32)
    g = _positions(grads)
    batch, steps = ids.shape
    wrapped = jnp.where(ids < 0, ids + vocab_size, ids)
    valid = (wrapped >= 0) & (wrapped < vocab_size)
    # A position that adds to no row gets a zero gradient and any id in range: it then adds
    # exactly nothing to whichever group it joins.
    keys = jnp.where(valid, wrapped, 0)
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


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one layer kind gives per-example squared norms: ``norms(inputs, G, tap)``."""

    norms: Callable[[jax.Array, jax.Array, LayerTap], LayerNorms]
    description: str


#: The layer kinds the ghost engine clips exactly, and how.
RULES: Mapping[str, Rule] = {
    "dense": Rule(lambda a, g, tap: dense_norms(a, g, tap.params),
                  "hk.Linear (and dense maps over positions or time): ‖a‖²‖g‖², or Gram / "
                  "materialised over positions, whichever is cheaper"),
    "conv": Rule(conv_norms, "hk.Conv1D/2D/3D, hk.ConvND: patches (written out or as views), "
                 "then the dense rule over positions, in the form measured fastest"),
    "embed": Rule(lambda ids, g, tap: embed_norms(ids, g, tap.options["vocab_size"]),
                  "hk.Embed: segment sum over repeated ids"),
    "norm_affine": Rule(norm_affine_norms, "hk.LayerNorm, hk.RMSNorm: their scale and offset "
                        "gradients, materialised (small)"),
}


# ---------------------------------------------------------------------------------------------
# The clipped sum.


#: What the ghost engine does with parameters no rule covers exactly: refuse (``error``,
#: naming them) or compute those parameters' per-example gradients (``materialise``).
FALLBACKS = ("error", "materialise")


def _uncovered(params: Mapping[str, Mapping[str, jax.Array]],
               layers: Mapping[str, LayerTap]) -> dict[str, str]:
    """``{scope: why}`` for every parameter scope no rule covers."""
    out = {}
    for scope, leaves in params.items():
        if scope not in layers:
            out[scope] = (f"no clipping rule covers the parameters of {scope!r} "
                          f"({', '.join(sorted(leaves))}); supported layers: "
                          f"{'; '.join(r.description for r in RULES.values())}")
            continue
        tap = layers[scope]
        if set(leaves) != set(tap.params):
            out[scope] = (f"layer {scope!r} holds parameters {sorted(leaves)} but its "
                          f"{tap.kind} rule covers {sorted(tap.params)}")
        elif tap.kind not in RULES:
            out[scope] = (f"layer {scope!r} is of kind {tap.kind!r}, which has no rule "
                          f"(kinds: {', '.join(RULES)})")
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the ghost engine clips one network (static: found by tracing one example).

    Attributes:
      layers: the tapped layers whose rules give their norms and sums.
      fallback: ``{scope: why}``: parameter scopes whose per-example gradients are computed
        instead (``engine.fallback=materialise``), in the same backward pass.
      output_shapes: each tapped layer's output, for its zero perturbation.
      input_shapes: each tapped layer's input, as the layer saw it (its batch of one).
    """

    layers: Mapping[str, LayerTap]
    fallback: Mapping[str, str]
    output_shapes: Mapping[str, jax.ShapeDtypeStruct]
    input_shapes: Mapping[str, tuple[int, ...]]


def _plan(loss: LayeredLoss, params: PyTree, x1: Any, y1: Any, fallback: str) -> Plan:
    """The taps of one example's pass, found by tracing it once (nothing is computed), and the
    structural checks: every parameter covered by a rule and consumed only inside its layer,
    or (with the fallback) materialised.

    Raises:
      GhostUnsupported: what no rule covers or a parameter used outside its layer, naming it
        (with ``fallback="error"``); a layer the taps cannot see (always).
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown ghost fallback {fallback!r}; valid: {', '.join(FALLBACKS)}")
    found: list[Any] = []

    def discover(p, a, b):
        value, _, recorder = loss.tapped_example(p, None, a, b)
        found.append(recorder)
        return value

    try:
        closed = jax.make_jaxpr(discover)(params, x1, y1)
    except jax.errors.UnexpectedTracerError as error:
        raise GhostUnsupported("ghost: a tapped layer runs inside a transformation of the "
                               "network (jax.lax.scan, jax.checkpoint, ...), where its "
                               "per-example inputs are not visible; apply layers to the "
                               "batch directly, or tap them by hand (models/nets.py's LSTM)"
                               ) from error
    recorder = found[-1]
    problems = _uncovered(params, recorder.layers)
    if fallback == "error" and problems:
        raise GhostUnsupported(f"ghost: {next(iter(problems.values()))} (or "
                               "engine.fallback=materialise)")
    paths = [(_key_name(path[0]), _key_name(path[-1]))
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    ruled = [(scope, name) for scope, name in paths if scope not in problems]
    uses = parameter_violations(closed, [p if p in ruled else None for p in paths],
                                recorder.regions)
    if fallback == "error" and uses:
        raise GhostUnsupported(next(iter(uses.values())))
    why = {**{scope: "no rule covers this layer" for scope in problems},
           **{scope: "its weights are used outside the layer too" for scope in uses}}
    layers = {scope: tap for scope, tap in recorder.layers.items() if scope not in why}
    outputs = {scope: shape for scope, shape in recorder.outputs.items() if scope in layers}
    return Plan(layers, why, outputs, dict(recorder.input_shapes))


def ghost_clipped_sum(loss: LayeredLoss, params: PyTree, x: jax.Array, y: jax.Array,
                      clip_norm: float | jax.Array, mask: jax.Array | None = None,
                      mode: str = "bookkeeping", fallback: str = "error") -> PyTree:
    """``Σ_i mask_i · g_i · min(1, C/‖g_i‖)`` from per-layer rules, no per-example gradients
    (but those of the parameters no rule covers, with ``fallback="materialise"``).

    Equal to :func:`ablation.core.engines.vmap_sum` (to float rounding, and to the Gram form's
    documented over-clipping of at most :data:`GRAM_TOLERANCE`). Padded slots (``mask <= 0``)
    hold a copy of a kept example and get a clip factor of exactly 0.

    Raises:
      GhostUnsupported: a parameter no rule covers or used outside its layer (unless the
        fallback materialises it), a layer used twice, a subclassed or transformed layer (the
        message names it).
    """
    if clip_norm is None:  # None is the unclipped timing variant's marker, never a default
        raise ValueError("ghost_clipped_sum needs a clip norm (a positive number or inf)")
    return _ghost_sum(loss, params, x, y, clip_norm, mask, mode, fallback)


def ghost_unclipped_sum(loss: LayeredLoss, params: PyTree, x: jax.Array, y: jax.Array,
                        mask: jax.Array | None = None, mode: str = "bookkeeping",
                        fallback: str = "error") -> PyTree:
    """For timing only (:mod:`ablation.measure.cost_split`): the ghost engine's sum with its
    norms taken away, every kept example weighted by 1 instead of its clip factor. NOT
    clipped, so never a private step's sum; the same tapped pass and weighted sums as
    :func:`ghost_clipped_sum`, whose time less this one's is what the norms cost."""
    return _ghost_sum(loss, params, x, y, None, mask, mode, fallback)


def _ghost_sum(loss, params, x, y, clip_norm, mask, mode, fallback) -> PyTree:
    """:func:`ghost_clipped_sum`, or with ``clip_norm=None`` :func:`ghost_unclipped_sum`."""
    if mode not in MODES:
        raise ValueError(f"unknown ghost mode {mode!r}; valid: {', '.join(MODES)}")
    if not isinstance(loss, LayeredLoss):
        raise GhostUnsupported("ghost: the loss must be a LayeredLoss (a model's `loss` from "
                               "models.get_model, or ablation.Model(...).loss), so that its "
                               "layers can be tapped")
    keep = None
    if mask is not None:
        keep = mask > 0
        x, y = fill_padded(x, y, keep)

    norms, inputs, out_grads, plan, materialised = _tapped_pass(loss, params, x, y, fallback)
    if clip_norm is None:  # weights of 1 that XLA cannot fold away: the same weighted sums
        scale = lax.optimization_barrier(jnp.ones(jnp.shape(y)[:1], jnp.float32))
    else:
        sq_norms = _total_sq(norms, materialised)
        scale = jnp.minimum(1.0, clip_norm / jnp.sqrt(sq_norms))  # [B]; 1 for a zero gradient
    if keep is not None:
        scale = jnp.where(keep, scale, 0.0)

    if mode == "two_pass":
        c = lax.stop_gradient(scale)
        batched = jax.grad(lambda p: jnp.sum(c * loss.batch_losses(p, x, y)))(params)
    grads = {scope: {name: _weighted(scale, g) for name, g in leaves.items()}
             for scope, leaves in materialised.items()}
    for scope, tap in plan.layers.items():
        rule = norms[scope]
        if mode == "two_pass":
            layer = {n: g for n, g in batched[scope].items() if n not in rule.names}
        else:
            layer = _bookkeeping_sum(tap, params[scope], inputs[scope], out_grads[scope], scale,
                                     skip=rule.names)
        layer.update(rule.exact_sum(scale, rule.names))
        if rule.fallback is not None and clip_norm is not None:  # the Gram bound was loose:
            # every example's own gradient
            names = tuple(layer)
            layer = lax.cond(rule.fallback, lambda c: rule.exact_sum(c, names),
                             lambda c: layer, scale)
        grads[scope] = {name: layer[name] for name in params[scope]}
    grads = {scope: grads[scope] for scope in params}  # the parameters' own order
    grads = type(params)(grads) if isinstance(params, dict) else grads
    return grads if keep is None else zero_unless_any(keep, grads)


def _bookkeeping_sum(tap: LayerTap, layer_params: Mapping[str, jax.Array], inputs: jax.Array,
                     out_grads: jax.Array, scale: jax.Array, skip: tuple[str, ...]) -> dict:
    """``Σ_i c_i ∇_layer ℓ_i`` as one VJP of the layer at the stored inputs, for the parameters
    the rule does not already hold per example (``skip``: those come from its exact sum)."""
    names = [n for n in layer_params if n not in skip]
    if not names:
        return {}
    scaled = out_grads * scale.reshape((-1,) + (1,) * (out_grads.ndim - 1)).astype(
        out_grads.dtype)
    if tap.kind == "conv":  # [B, n, *spatial, C]: n inputs per example, the layer sees B·n
        dims = tap.options["spatial_dims"] + 1
        inputs = inputs.reshape(-1, *inputs.shape[-dims:])
        scaled = scaled.reshape(-1, *scaled.shape[-dims:])
    fixed = {n: v for n, v in layer_params.items() if n not in names}
    _, vjp = jax.vjp(lambda free: tap.apply({**fixed, **free}, inputs),
                     {n: layer_params[n] for n in names})
    return dict(vjp(scaled)[0])


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def _example(x: Any) -> jax.ShapeDtypeStruct:
    """One example of a batch ``x`` (``[B, ...]``), as a shape."""
    return jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x))


def _tapped_pass(loss: LayeredLoss, params: PyTree, x: jax.Array, y: jax.Array,
                 fallback: str = "error"):
    """Every example's tapped pass, vmapped: per-layer norms, each layer's inputs and output
    gradients ``[B, ...]`` (one row per example), the plan, and the per-example gradients
    ``[B, ...]`` of the parameters the fallback materialises (the same backward pass)."""
    plan = _plan(loss, params, _example(x), _example(y), fallback)
    zeros = {scope: jnp.zeros(s.shape, s.dtype) for scope, s in plan.output_shapes.items()}
    loose = {scope: params[scope] for scope in plan.fallback}
    fixed = {scope: leaves for scope, leaves in params.items() if scope not in plan.fallback}

    def example(perturbations, free, x1, y1):
        joined = type(params)({**fixed, **free}) if isinstance(params, dict) else {**fixed,
                                                                                   **free}
        value, inputs, _ = loss.tapped_example(joined, perturbations, x1, y1)
        return value, {scope: inputs[scope] for scope in plan.layers}

    grad = jax.grad(example, argnums=(0, 1), has_aux=True)
    (out_grads, materialised), inputs = jax.vmap(grad, in_axes=(None, None, 0, 0))(
        zeros, loose, x, y)
    norms = {scope: RULES[tap.kind].norms(inputs[scope], out_grads[scope], tap)
             for scope, tap in plan.layers.items()}
    return norms, inputs, out_grads, plan, materialised


def layer_rules(loss: LayeredLoss, params: PyTree, x1: Any, y1: Any,
                fallback: str = "error", batch_size: int | None = None) -> dict[str, str]:
    """How the ghost engine clips each parameter scope of ``loss``'s network, for examples
    shaped like ``x1`` (one example, no batch axis; arrays or ``ShapeDtypeStruct``s):
    ``{scope: rule}``, e.g. ``dense``, ``dense: gram over 25 positions``, ``conv2d:
    materialised over 196 positions``, ``embed: segment sum over 256 ids``, ``layer norm``,
    ``fallback: materialised (<why>)``. A conv layer's form is measured for the shapes of a
    batch (:func:`conv_form`): with ``batch_size`` it is the one a step of that batch takes
    (``conv2d: materialised over 1024 positions (patches as views; measured)``); without, the
    flop model's.

    Raises:
      GhostUnsupported: as :func:`ghost_clipped_sum` would, naming the layer.
    """
    one = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))  # noqa: E731
    plan = _plan(loss, params, one(x1), one(y1), fallback)
    rules = {}
    for scope in params:
        if scope in plan.fallback:
            rules[scope] = f"fallback: materialised ({plan.fallback[scope]})"
            continue
        tap = plan.layers[scope]
        inputs, outputs = plan.input_shapes[scope], plan.output_shapes[scope].shape
        if tap.kind == "embed":
            ids = int(np.prod(inputs))
            how = "buckets" if prefers_buckets(ids, tap.options["vocab_size"]) else "a sort"
            rules[scope] = f"embed: segment sum over {ids} ids (grouped by {how})"
            continue
        if tap.kind == "norm_affine":
            rules[scope] = "rms norm" if tap.options["rms"] else "layer norm"
            continue
        features, kind = inputs[-1], tap.kind
        if tap.kind == "conv":
            features *= int(np.prod(tap.options["filter_shape"]))
            kind = f"conv{tap.options['spatial_dims']}d"
        positions = int(np.prod(outputs[:-1]))
        if positions == 1:
            rules[scope] = kind
            continue
        form = flop_form(positions, features, outputs[-1])
        how = ""
        if tap.kind == "conv" and batch_size is not None:
            layout, form, measured = conv_form(tap, (batch_size, *inputs),
                                               (batch_size, *outputs), jnp.float32)
            if measured:
                held = "as views" if layout == "views" else "written out"
                how = f" (patches {held}; measured)"
        rules[scope] = f"{kind}: {form} over {positions} positions{how}"
    return rules


def per_example_sq_norms(loss: LayeredLoss, params: PyTree, x: jax.Array, y: jax.Array,
                         fallback: str = "error") -> jax.Array:
    """``‖g_i‖²`` of every example by the rules (what the clip factors are made of)."""
    norms, _, _, _, materialised = _tapped_pass(loss, params, x, y, fallback)
    return _total_sq(norms, materialised)


def _total_sq(norms: Mapping[str, LayerNorms], materialised: Mapping[str, Mapping]) -> jax.Array:
    """Each example's squared norm: the rules' layers and the materialised ones together."""
    total = sum(n.sq for n in norms.values())
    for leaves in materialised.values():
        total = total + sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)
                            for g in leaves.values())
    return total
