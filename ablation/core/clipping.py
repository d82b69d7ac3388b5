"""The ghost engine: each example's gradient norm without its gradient, and the clipped sum.

DP-SGD needs ``Σ_i g_i · min(1, C/‖g_i‖)`` with ``‖g_i‖`` the global L2 norm over every
parameter. The paper's engines materialise each ``g_i`` (vmap or a loop). For the layers of
these networks each ``‖∇_layer ℓ_i‖²`` also follows from what one forward and backward pass
already has: the layer's input ``A_i`` and its output gradient ``G_i`` (Li et al., ICLR 2022;
Bu et al., NeurIPS 2022, ICML 2023). :mod:`ablation.core.taps` collects both, from the same
per-example (batch-of-one) loss every engine differentiates, ``vmap``ped over the examples;
the rules of :mod:`ablation.core.rules` (one module per layer kind) turn them into norms and
exact sums, and this module is the engine over that table: it plans which rule clips each
parameter, runs the tapped pass, sets the clip factors and forms the clipped sum.

The guarantee: for every example, the squared norm that sets its clip factor is at least the
squared norm of what the sum adds for that example, so no example counts for more than C; and
it is above the true one by at most :data:`GRAM_TOLERANCE` (a Gram-form layer's rounding bound,
within that tolerance or replaced by the example's materialised norm), so no example is clipped
harder than DP-SGD would clip it.

* Where a rule holds each example's gradient of the layer (the materialised form, biases, the
  embedding's per-id sums, norms, the per-example rule's layers) the sum is built from those
  very values (book-keeping reuse), so the norm and the contribution are the same numbers.
* Where a Gram-form layer took some example's exact norm, its sum for the batch is built from
  each example's own gradient, one at a time, shrunk (if need be) to the norm it was given.
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
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from ablation.core.masking import fill_padded, zero_unless_any
from ablation.core.rules import RULES
from ablation.core.rules.base import LayerNorms, weighted
from ablation.core.rules.dense import GRAM_TOLERANCE
from ablation.core.taps import GhostUnsupported, LayeredLoss, LayerTap, parameter_violations

PyTree = Any
MODES = ("bookkeeping", "two_pass")
__all__ = ["FALLBACKS", "GRAM_TOLERANCE", "MODES", "ghost_clipped_sum", "ghost_unclipped_sum",
           "layer_rules", "per_example_sq_norms"]


# ---------------------------------------------------------------------------------------------
# The clipped sum.


#: What the ghost engine does with parameters no rule covers exactly: refuse (``error``,
#: naming them) or compute those parameters' per-example gradients (``materialise``).
FALLBACKS = ("error", "materialise")


def _uncovered(params: Mapping[str, Mapping[str, jax.Array]],
               layers: Mapping[str, LayerTap], materialised: Mapping[str, LayerTap]
               ) -> dict[str, str]:
    """``{scope: why}`` for every parameter scope no rule covers."""
    out = {}
    for scope, leaves in params.items():
        if scope in materialised and scope not in layers:
            continue  # the per-example rule: every leaf of the scope, from the backward pass
        if scope not in layers:
            out[scope] = (f"no clipping rule covers the parameters of {scope!r} "
                          f"({', '.join(sorted(leaves))}); supported layers: "
                          f"{'; '.join(r.covers for r in RULES.values())}")
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
      materialised: ``{scope: why}``: parameter scopes whose per-example gradients are taken
        from the examples' backward pass instead: the per-example rule's layers, and (with
        ``engine.fallback=materialise``) what no rule covers.
      taps: the per-example rule's taps (by scope), for their descriptions.
      output_shapes: each tapped layer's output, for its zero perturbation.
      input_shapes: each tapped layer's input, as the layer saw it (its batch of one).
    """

    layers: Mapping[str, LayerTap]
    materialised: Mapping[str, str]
    taps: Mapping[str, LayerTap]
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
                               "per-example inputs are not visible; apply layers to the batch "
                               "directly, or tap them by hand (models/nets.py's LSTM)"
                               ) from error
    recorder = found[-1]
    by_rule = {scope: tap for scope, tap in recorder.materialised.items()
               if scope not in recorder.layers}
    problems = _uncovered(params, recorder.layers, by_rule)
    if fallback == "error" and problems:
        raise GhostUnsupported(f"ghost: {next(iter(problems.values()))} (or "
                               "engine.fallback=materialise)")
    paths = [(_key_name(path[0]), _key_name(path[-1]))
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    ruled = [(scope, name) for scope, name in paths
             if scope not in problems and scope not in by_rule]
    uses = parameter_violations(closed, [p if p in ruled else None for p in paths],
                                recorder.regions)
    if fallback == "error" and uses:
        raise GhostUnsupported(next(iter(uses.values())))
    why = {**{scope: "its rule: the per-example gradient" for scope in by_rule if scope in params},
           **{scope: "no rule covers this layer" for scope in problems},
           **{scope: "its weights are used outside the layer too" for scope in uses}}
    layers = {scope: tap for scope, tap in recorder.layers.items() if scope not in why}
    outputs = {scope: shape for scope, shape in recorder.outputs.items() if scope in layers}
    return Plan(layers, why, by_rule, outputs, dict(recorder.input_shapes))


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
    grads = {scope: {name: weighted(scale, g) for name, g in leaves.items()}
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
    # [B, n, ...]: each example's pass saw n rows (its batch of one, or n images); the batched
    # layer sees B·n rows.
    inputs = inputs.reshape(-1, *inputs.shape[2:])
    scaled = scaled.reshape(-1, *scaled.shape[2:])
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
    ``[B, ...]`` of the parameters the plan materialises (the same backward pass)."""
    plan = _plan(loss, params, _example(x), _example(y), fallback)
    zeros = {scope: jnp.zeros(s.shape, s.dtype) for scope, s in plan.output_shapes.items()}
    loose = {scope: params[scope] for scope in plan.materialised}
    fixed = {scope: leaves for scope, leaves in params.items() if scope not in plan.materialised}

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
    ``per-example gradient (hk.GroupNorm)``, ``fallback: materialised (<why>)``. A conv
    layer's form is measured for the shapes of a batch
    (:func:`ablation.core.rules.conv.conv_form`): with ``batch_size`` it is the one a step of
    that batch takes (``conv2d: materialised over 1024 positions (patches as views;
    measured)``); without, the flop model's.

    Raises:
      GhostUnsupported: as :func:`ghost_clipped_sum` would, naming the layer.
    """
    one = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))  # noqa: E731
    plan = _plan(loss, params, one(x1), one(y1), fallback)
    rules = {}
    for scope in params:
        if scope in plan.taps:
            tap = plan.taps[scope]
            rules[scope] = RULES[tap.kind].describe(tap, (), (), batch_size)
        elif scope in plan.materialised:
            rules[scope] = f"fallback: materialised ({plan.materialised[scope]})"
        else:
            tap = plan.layers[scope]
            rules[scope] = RULES[tap.kind].describe(tap, plan.input_shapes[scope],
                                                    plan.output_shapes[scope].shape, batch_size)
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
