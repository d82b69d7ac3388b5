"""The ghost engine's clipping rules: each example's gradient norm without its gradient.

DP-SGD needs ``Σ_i g_i · min(1, C/‖g_i‖)`` with ``‖g_i‖`` the global L2 norm over every
parameter. The paper's engines materialise each ``g_i`` (vmap or a loop). For the layers of
these networks each ``‖∇_layer ℓ_i‖²`` also follows from what one batched forward and backward
pass already has: the layer's input ``A_i`` and its output gradient ``G_i`` (Li et al., ICLR
2022; Bu et al., NeurIPS 2022, ICML 2023). :mod:`ablation.core.taps` collects both; this module
turns them into norms (:data:`RULES`, one rule per layer kind) and the clipped sum.

===========  =================================================================================
kind         ‖∇W_i‖² (+ ‖∇b_i‖²), for ``A_i [T, d]`` (positions × inputs), ``G_i [T, p]``
===========  =================================================================================
dense        no positions (T = 1): ``‖a_i‖² ‖g_i‖²``. Over positions or time (the lstm's gate
             projection over 256 steps): the Gram form ``⟨A_i A_iᵀ, G_i G_iᵀ⟩`` (cost T²·(d+p))
             or the per-layer gradient ``‖A_iᵀ G_i‖²`` (cost T·d·p), whichever is cheaper for the
             shapes. Bias: ``‖Σ_t g_it‖²``.
conv2d       the input's patches (``lax.conv_general_dilated_patches``) are ``A_i`` over the
             output positions; then the dense rule, Gram or materialised by the same cost rule.
embed        ``Σ_v ‖Σ_{t: id_t = v} g_t‖²``: each example's output gradients summed over repeated
             token ids (a sort and a segment sum), never a vocabulary-sized gradient.
===========  =================================================================================

The clipped sum then comes one of two ways (``mode``): ``bookkeeping`` (Bu et al., 2023) takes
each layer's gradient from the stored ``A`` and the output gradients scaled by the clip factors,
``Σ_i c_i ∇W_i = VJP_W(layer at A)(c ⊙ G)``, in the same pass; ``two_pass`` (ghost clipping) runs a
second backward pass of the reweighted loss ``Σ_i c_i ℓ_i``. A parameter no rule covers, or a
layer used twice, is an error naming the layer: the sum is exact or not computed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from ablation.core.taps import GhostUnsupported, LayeredLoss, LayerTap

PyTree = Any
MODES = ("bookkeeping", "two_pass")


# ---------------------------------------------------------------------------------------------
# The rules: per-example squared gradient norms of one layer, ``[B]``.


def _positions(a: jax.Array) -> jax.Array:
    """``[B, ..., f] -> [B, T, f]``: every axis between the batch and the features is a position."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


def prefers_gram(positions: int, inputs: int, outputs: int) -> bool:
    """Gram form (cost T²·(d+p)) rather than the materialised per-layer gradient (T·d·p)?"""
    return positions * positions * (inputs + outputs) < positions * inputs * outputs


@dataclasses.dataclass(frozen=True)
class LayerNorms:
    """A rule's answer for one layer: per-example squared norms ``[B]``, and where the rule
    materialised each example's gradient of the layer (``{name: [B, *param.shape]}`` with the
    weight flattened to ``[B, d, p]``), those gradients, which book-keeping then reuses."""

    sq: jax.Array
    grads: Mapping[str, jax.Array] | None = None


def dense_norms(inputs: jax.Array, grads: jax.Array, names: tuple[str, ...]) -> LayerNorms:
    """``‖∇W_i‖² (+ ‖∇b_i‖²)`` of ``A @ W + b`` from ``A [B, ..., d]`` and ``G [B, ..., p]``."""
    a, g = _positions(inputs), _positions(grads)
    positions, d, p = a.shape[1], a.shape[2], g.shape[2]
    materialised = None
    if positions == 1:
        w = jnp.sum(jnp.square(a), axis=(1, 2)) * jnp.sum(jnp.square(g), axis=(1, 2))
    elif prefers_gram(positions, d, p):
        aa = jnp.einsum("btd,bsd->bts", a, a)
        gg = jnp.einsum("btp,bsp->bts", g, g)
        w = jnp.sum(aa * gg, axis=(1, 2))
    else:
        per_example = jnp.einsum("btd,btp->bdp", a, g)
        w = jnp.sum(jnp.square(per_example), axis=(1, 2))
        materialised = {"w": per_example}
    w = jnp.maximum(w, 0.0)  # the Gram form can cancel below zero in float32
    if "b" in names:
        bias = jnp.sum(g, axis=1)  # [B, p]
        w = w + jnp.sum(jnp.square(bias), axis=-1)
        if materialised is not None:
            materialised["b"] = bias
    return LayerNorms(w, materialised)


def dense_sq_norms(inputs: jax.Array, grads: jax.Array, names: tuple[str, ...]) -> jax.Array:
    """The dense rule's per-example squared norms alone (see :func:`dense_norms`)."""
    return dense_norms(inputs, grads, names).sq


def extract_patches(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int],
                    padding: Any) -> jax.Array:
    """``[B, H, W, C] -> [B, H', W', kh·kw·C]``: each output position's input window, in the
    ``(kh, kw, C)`` order of an HWIO kernel.

    Pads and takes ``kh·kw`` strided slices: memory moves only, where
    ``lax.conv_general_dilated_patches`` runs a convolution with an identity kernel (on
    XLA:CPU several times slower for the cifar10 layers).
    """
    spatial = x.shape[1:3]
    pads = (lax.padtype_to_pads(spatial, kernel, strides, padding) if isinstance(padding, str)
            else [tuple(p) for p in padding])
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_h = (x.shape[1] - kernel[0]) // strides[0] + 1
    out_w = (x.shape[2] - kernel[1]) // strides[1] + 1
    views = [x[:, i:i + strides[0] * (out_h - 1) + 1:strides[0],
               j:j + strides[1] * (out_w - 1) + 1:strides[1]]
             for i in range(kernel[0]) for j in range(kernel[1])]
    return jnp.concatenate(views, axis=-1)  # [B, H', W', kh·kw·C], (kh, kw, C) order


def conv_norms(inputs: jax.Array, grads: jax.Array, tap: LayerTap) -> LayerNorms:
    """The conv rule: the input's patches are the dense rule's ``A`` over output positions."""
    o = tap.options
    if any(d != 1 for d in (*o["lhs_dilation"], *o["rhs_dilation"])):
        # lax's patches order features (C, kh, kw): the norms hold, reuse would not.
        patches = lax.conv_general_dilated_patches(inputs, **o)
        return LayerNorms(dense_norms(patches, grads, tap.params).sq)
    patches = extract_patches(inputs, o["filter_shape"], o["window_strides"], o["padding"])
    return dense_norms(patches, grads, tap.params)


def embed_sq_norms(ids: jax.Array, grads: jax.Array, vocab_size: int) -> jax.Array:
    """``Σ_v ‖Σ_{t: id_t = v} g_t‖²`` per example, from ids ``[B, ...]`` and ``G [B, ..., D]``.

    Repeated ids are grouped by one sort per example of ``id · T + t`` (ids and positions
    packed in one int32 key: XLA:CPU sorts plain keys several times faster than key-value
    pairs), each position learns its group, and the groups' gradients are summed: T buckets
    per example, never a vocabulary-sized gradient.
    """
    ids = ids.reshape(ids.shape[0], -1).astype(jnp.int32)
    g = _positions(grads)
    batch, steps = ids.shape
    rows = jnp.arange(batch)[:, None]
    if vocab_size * steps < 2 ** 31:
        packed = jnp.sort(ids * steps + jnp.arange(steps, dtype=jnp.int32), axis=1)
        sorted_ids, position = packed // steps, packed % steps
    else:  # ids too large to pack beside a position: sort (id, position) pairs instead
        position = jnp.argsort(ids, axis=1)
        sorted_ids = jnp.take_along_axis(ids, position, axis=1)
    starts = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32),
                              (sorted_ids[:, 1:] != sorted_ids[:, :-1]).astype(jnp.int32)], axis=1)
    group = jnp.zeros((batch, steps), jnp.int32).at[rows, position].set(jnp.cumsum(starts, axis=1))
    sums = jnp.zeros(g.shape, g.dtype).at[rows, group].add(g)  # [B, T, D]: ≤ T groups
    return jnp.sum(jnp.square(sums), axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one layer kind gives per-example squared norms: ``sq_norms(inputs, G, tap) -> [B]``."""

    norms: Callable[[jax.Array, jax.Array, LayerTap], LayerNorms]
    description: str


#: The layer kinds the ghost engine clips exactly, and how.
RULES: Mapping[str, Rule] = {
    "dense": Rule(lambda a, g, tap: dense_norms(a, g, tap.params),
                  "hk.Linear (and dense maps over positions or time): ‖a‖²‖g‖², or Gram / "
                  "materialised over positions, whichever is cheaper"),
    "conv2d": Rule(conv_norms, "hk.Conv2D: patches, then the dense rule over positions"),
    "embed": Rule(lambda ids, g, tap: LayerNorms(embed_sq_norms(ids, g,
                                                                tap.options["vocab_size"])),
                  "hk.Embed: segment sum over repeated ids"),
}


# ---------------------------------------------------------------------------------------------
# The clipped sum.


def _check_coverage(params: Mapping[str, Mapping[str, jax.Array]],
                    layers: Mapping[str, LayerTap]) -> None:
    for scope, leaves in params.items():
        if scope not in layers:
            raise GhostUnsupported(f"ghost: no clipping rule covers the parameters of "
                                   f"{scope!r} ({', '.join(sorted(leaves))}); supported layers: "
                                   f"{'; '.join(r.description for r in RULES.values())}")
        tap = layers[scope]
        if set(leaves) != set(tap.params):
            raise GhostUnsupported(f"ghost: layer {scope!r} holds parameters "
                                   f"{sorted(leaves)} but its {tap.kind} rule covers "
                                   f"{sorted(tap.params)}")
        if tap.kind not in RULES:
            raise GhostUnsupported(f"ghost: layer {scope!r} is of kind {tap.kind!r}, which has "
                                   f"no rule (kinds: {', '.join(RULES)})")


def _scale(c: jax.Array, g: jax.Array) -> jax.Array:
    return g * c.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)


def ghost_clipped_sum(loss: LayeredLoss, params: PyTree, x: jax.Array, y: jax.Array,
                      clip_norm: float | jax.Array, mask: jax.Array | None = None,
                      mode: str = "bookkeeping") -> PyTree:
    """``Σ_i mask_i · g_i · min(1, C/‖g_i‖)`` from per-layer rules, no per-example gradients.

    Equal to :func:`ablation.core.engines.vmap_sum` (to float rounding). Padded slots
    (``mask <= 0``) get a zero input and label before the pass, so they contribute exactly
    nothing whatever they held.

    Raises:
      GhostUnsupported: a parameter no rule covers, or a layer used twice (names the layer).
    """
    if mode not in MODES:
        raise ValueError(f"unknown ghost mode {mode!r}; valid: {', '.join(MODES)}")
    if not isinstance(loss, LayeredLoss):
        raise GhostUnsupported("ghost: the loss must be a LayeredLoss (a model's `loss` from "
                               "models.get_model), so that its layers can be tapped")
    keep = None
    if mask is not None:
        keep = mask > 0
        x = jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))
        y = jnp.where(keep, y, jnp.zeros_like(y))

    norms, inputs, out_grads, layers = _tapped_pass(loss, params, x, y, keep)
    sq_norms = sum(n.sq for n in norms.values())
    scale = jnp.minimum(1.0, clip_norm / jnp.sqrt(sq_norms))  # [B]; 1 for a zero gradient
    if keep is not None:
        scale = jnp.where(keep, scale, 0.0)

    if mode == "two_pass":
        c = lax.stop_gradient(scale)
        return jax.grad(lambda p: jnp.sum(c * loss.batch_losses(p, x, y)))(params)
    grads = {}
    for scope, tap in layers.items():
        materialised = norms[scope].grads
        if materialised is not None:  # the rule already holds each example's gradient
            grads[scope] = {name: jnp.tensordot(scale.astype(g.dtype), g, axes=1).reshape(
                params[scope][name].shape) for name, g in materialised.items()}
            continue
        _, vjp = jax.vjp(lambda layer: tap.apply(layer, inputs[scope]), dict(params[scope]))
        grads[scope] = vjp(_scale(scale, out_grads[scope]))[0]
    return type(params)(grads) if isinstance(params, dict) else grads


def _discover(loss: LayeredLoss, params: PyTree, x: jax.Array, y: jax.Array):
    """The taps' kinds and shapes, from abstract passes (nothing is computed).

    Every rule takes axis 0 of a layer's input and output gradient as the example axis. That
    holds only for a layer applied to the batch as it comes; a layer fed flattened examples
    (``[B·T, d]``) or a time-major ``[T, B, d]`` would give a wrong sum without any error. So
    the pass runs at two batch sizes, and a tap whose leading axis does not follow the batch
    is refused, naming the layer.
    """
    found: list[Any] = []

    def discover(p, a, b):
        losses, _, recorder = loss.tapped(p, a, b, None)
        found.append(recorder)
        return losses

    def one_more(a):
        return jax.ShapeDtypeStruct((a.shape[0] + 1, *a.shape[1:]), a.dtype)

    try:
        jax.eval_shape(discover, params, x, y)
        jax.eval_shape(discover, params, one_more(x), one_more(y))
    except jax.errors.UnexpectedTracerError as error:
        raise GhostUnsupported("ghost: a tapped layer runs inside a transformation of the "
                               "network (hk.scan, hk.vmap, hk.remat, ...), where its per-example "
                               "inputs are not visible; apply layers to the batch directly, or "
                               "tap them by hand (models/nets.py's LSTM)") from error
    first, second = found[0], found[1]
    batch = x.shape[0]
    for scope in first.layers:
        shapes = {"input": (first.inputs[scope].shape, second.inputs[scope].shape),
                  "output": (first.outputs[scope].shape, second.outputs[scope].shape)}
        for what, (a, b) in shapes.items():
            if not a or not b or a[0] != batch or b[0] != batch + 1:
                raise GhostUnsupported(f"ghost: layer {scope!r}'s {what} {a} does not have the "
                                       f"examples on its first axis (batch {batch}); the rules "
                                       "need each example's rows apart")
    return first


def _tapped_pass(loss: LayeredLoss, params: PyTree, x: jax.Array, y: jax.Array,
                 keep: jax.Array | None):
    """One tapped forward and backward pass: per-example squared norms ``[B]``, each layer's
    input and output gradient, and the layers' taps."""
    recorder = _discover(loss, params, x, y)
    layers = dict(recorder.layers)
    _check_coverage(params, layers)
    zeros = {scope: jnp.zeros(s.shape, s.dtype) for scope, s in recorder.outputs.items()}

    def summed(perturbations):
        losses, inputs, _ = loss.tapped(params, x, y, perturbations)
        if keep is not None:
            losses = jnp.where(keep, losses, 0.0)
        return jnp.sum(losses), inputs

    (_, inputs), out_grads = jax.value_and_grad(summed, has_aux=True)(zeros)
    norms = {scope: RULES[tap.kind].norms(inputs[scope], out_grads[scope], tap)
             for scope, tap in layers.items()}
    return norms, inputs, out_grads, layers


def per_example_sq_norms(loss: LayeredLoss, params: PyTree, x: jax.Array,
                         y: jax.Array) -> jax.Array:
    """``‖g_i‖²`` of every example by the rules (what the clip factors are made of)."""
    return sum(n.sq for n in _tapped_pass(loss, params, x, y, None)[0].values())
