"""The norm rule: ``hk.LayerNorm``, ``hk.InstanceNorm`` and ``hk.RMSNorm``, ``scale ⊙ x̂ + offset``.

Each example's gradient is ``Σ x̂ ⊙ g`` (scale) and ``Σ g`` (offset) over the axes the
parameters do not span: small (``[B, d]``), held and reused, so the norm and what the sum adds
are the same numbers. ``x̂`` is computed from the layer's input exactly as the stock layer
computes it (mean, variance or mean square over its axes, its epsilon, its fast-variance
switch). Any of scale and offset may be absent; a layer with neither holds nothing to clip and
is not tapped.

``hk.GroupNorm``, and a layer norm given its scale or offset at call time (conditional
normalisation), take the per-example rule (:mod:`ablation.core.rules.per_example`): their own
per-example scale and offset gradients from the examples' backward pass.
"""

from __future__ import annotations

from typing import Any, Mapping

import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax

from ablation.core.rules.base import LayerNorms, LayerTap, Rule, held_norms
from ablation.core.rules.per_example import per_example_tap

KIND = "norm_affine"


def _to_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """Haiku's norm axes (an int, a sequence or a slice) as absolute axes of an ``ndim`` array."""
    if isinstance(axis, slice):
        return tuple(range(ndim)[axis])
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def normalized(x: jax.Array, options: Mapping[str, Any], axes: tuple[int, ...]) -> jax.Array:
    """The stock layer's ``x̂`` of ``x`` over ``axes``."""
    if options["rms"]:
        return x * lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + options["eps"])
    mean = jnp.mean(x, axis=axes, keepdims=True)
    if options["fast_variance"]:
        variance = jnp.mean(jnp.square(x), axis=axes, keepdims=True) - jnp.square(mean)
    else:
        variance = jnp.var(x, axis=axes, keepdims=True)
    return (x - mean) * lax.rsqrt(variance + jnp.asarray(options["eps"], variance.dtype))


def norm_affine_norms(inputs: jax.Array, grads: jax.Array, tap: LayerTap) -> LayerNorms:
    """Each example's scale and offset gradients from ``inputs [B, *x]`` (the layer's inputs as
    it saw them: ``x`` with its batch of one) and ``G [B, *x]``."""
    o = tap.options
    ndim = inputs.ndim - 1  # the layer's own view: [1, ...] per example
    axes = tuple(a + 1 for a in _to_axes(o["axis"], ndim))
    param_axes = _to_axes(o["param_axis"], ndim)
    summed = tuple(a + 1 for a in range(ndim) if a not in param_axes)
    param_shape = ((inputs.shape[-1],) if param_axes == (ndim - 1,) else
                   tuple(inputs.shape[1 + i] if i in param_axes else 1 for i in range(ndim)))
    held = {}
    if "scale" in tap.params:
        held["scale"] = jnp.sum(normalized(inputs, o, axes) * grads,
                                axis=summed).reshape(-1, *param_shape)
    if "offset" in tap.params:
        held["offset"] = jnp.sum(grads, axis=summed).reshape(-1, *param_shape)
    return held_norms(held)


def _norm_affine_apply(params: Mapping[str, jax.Array], x_hat: jax.Array) -> jax.Array:
    out = x_hat * params["scale"] if "scale" in params else x_hat
    return out + params["offset"] if "offset" in params else out


def _given_at_call(args: tuple, kwargs: Mapping[str, Any]) -> bool:
    return (len(args) > 1 or kwargs.get("scale") is not None
            or kwargs.get("offset") is not None)


def _norm_tap(module: hk.Module, args, kwargs, rms: bool) -> LayerTap | None:
    names = tuple(n for n, made in (("scale", module.create_scale),
                                    ("offset", getattr(module, "create_offset", False))) if made)
    if not names:
        return None  # nothing to clip
    if _given_at_call(args, kwargs):
        return per_example_tap(names, f"hk.{type(module).__name__} given scale or offset "
                               "at call time")
    options = {"rms": rms, "axis": module.axis, "param_axis": module.param_axis,
               "eps": module.eps, "fast_variance": getattr(module, "use_fast_variance", False)}
    return LayerTap(KIND, _norm_affine_apply, names, options)


def _group_norm_tap(module: hk.GroupNorm, args, kwargs) -> LayerTap | None:
    names = tuple(n for n, made in (("scale", module.create_scale),
                                    ("offset", module.create_offset)) if made)
    return per_example_tap(names, "hk.GroupNorm") if names else None


def _describe(tap, input_shape, output_shape, batch_size) -> str:
    return "rms norm" if tap.options["rms"] else "layer norm"


def _layer_norm_tap(module, args, kwargs):
    return _norm_tap(module, args, kwargs, rms=False)


RULE = Rule(KIND, norm_affine_norms,
            "hk.LayerNorm, hk.InstanceNorm, hk.RMSNorm: their scale and offset gradients, "
            "materialised (small)",
            _describe,
            {hk.LayerNorm: _layer_norm_tap, hk.InstanceNorm: _layer_norm_tap,
             hk.RMSNorm: lambda m, a, k: _norm_tap(m, a, k, rms=True),
             hk.GroupNorm: _group_norm_tap})
