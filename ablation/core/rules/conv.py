"""The conv rule: ``hk.Conv1D/2D/3D`` and ``hk.ConvND`` as the dense rule over output positions.

The input's patches are the dense rule's ``A`` over the output positions (``d = k₁···k_n·C``),
so each example's weight gradient is ``A_iᵀ G_i`` and its norm comes from the dense rule, in the
form (Gram or materialised) and with the patches held the way (written out, or one view per
kernel offset: :mod:`ablation.core.rules.patches`) that measured fastest for the layer's shapes
on this machine (:func:`conv_form`; ``ABLATION_CONV_FORMS=model`` takes the flop count's form).
Any explicit padding works, asymmetric or negative (a negative pad crops, as the convolution's
own padding does), with any stride and dilation.

The stock convolutions this rule does not cover — grouped (``feature_group_count > 1``),
masked, channels-first, the depthwise ``hk.DepthwiseConv1D/2D/3D`` (and so
``hk.SeparableDepthwiseConv2D``) and the transposed ``hk.Conv1DTranspose/2DTranspose/
3DTranspose`` — are tapped for the per-example rule (:mod:`ablation.core.rules.per_example`):
each example's own gradient of the layer, exact for any configuration.
"""

from __future__ import annotations

import os
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ablation.core import autotune
from ablation.core.rules.base import HIGHEST, LayerNorms, LayerTap, Rule
from ablation.core.rules.dense import FORMS, dense_norms, describe_dense, flop_form
from ablation.core.rules.patches import patch_views
from ablation.core.rules.per_example import per_example_tap

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
    count = int(np.prod(output_shape[1:-1]))
    d = int(np.prod(tap.options["filter_shape"])) * input_shape[-1]
    p = output_shape[-1]
    model = flop_form(count, d, p)
    if conv_form_choice() == "model" or count == 1:
        return "written", model, False
    flops = {"gram": count * count * (d + p), "materialised": count * d * p}
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
        scaled = grads * c.reshape((-1,) + (1,) * (grads.ndim - 1)).astype(grads.dtype)
        dims = tap.options["spatial_dims"] + 1
        flat_in = inputs.reshape(-1, *inputs.shape[-dims:])
        _, vjp = jax.vjp(lambda w: tap.apply({"w": w}, flat_in), kernel)
        sums["w"] = vjp(scaled.reshape(-1, *scaled.shape[-dims:]))[0]
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


def _bias_names(module: Any) -> tuple[str, ...]:
    return ("w", "b") if module.with_bias else ("w",)


def _conv_tap(module: hk.ConvND, args, kwargs) -> LayerTap:
    """hk.ConvND and its stock 1-, 2- and 3-D forms: the conv rule where it applies (unmasked,
    ungrouped, channels last, 1 to 3 spatial dims), the per-example rule otherwise."""
    inputs = args[0] if args else kwargs.get("inputs")
    unusual = [why for why, holds in (
        ("masked", module.mask is not None), ("channels first", module.channel_index != -1),
        ("grouped", module.feature_group_count != 1),
        (f"{module.num_spatial_dims}-D", module.num_spatial_dims not in _SPATIAL),
        ("unbatched input", jnp.ndim(inputs) != module.num_spatial_dims + 2)) if holds]
    if unusual:
        return per_example_tap(_bias_names(module),
                               f"hk.{type(module).__name__}, {', '.join(unusual)}")
    conv = dict(window_strides=tuple(module.stride), padding=module.padding,
                lhs_dilation=tuple(module.lhs_dilation),
                rhs_dilation=tuple(module.kernel_dilation),
                dimension_numbers=module.dimension_numbers)

    def apply(params, inputs):
        out = lax.conv_general_dilated(inputs, params["w"], precision=HIGHEST, **conv)
        return out + params["b"] if "b" in params else out

    patches = dict(filter_shape=tuple(module.kernel_shape), window_strides=conv["window_strides"],
                   padding=module.padding, lhs_dilation=conv["lhs_dilation"],
                   rhs_dilation=conv["rhs_dilation"], spatial_dims=module.num_spatial_dims)
    return LayerTap("conv", apply, _bias_names(module), patches)


def _other_conv_tap(module: Any, args, kwargs) -> LayerTap:
    """The depthwise and transposed convolutions: the per-example rule."""
    return per_example_tap(_bias_names(module), f"hk.{type(module).__name__}")


def _describe(tap, input_shape, output_shape, batch_size) -> str:
    features = input_shape[-1] * int(np.prod(tap.options["filter_shape"]))
    kind = f"conv{tap.options['spatial_dims']}d"
    count = int(np.prod(output_shape[:-1]))
    if count == 1:
        return kind
    if batch_size is None:
        return describe_dense(kind, features, output_shape[-1], count)
    layout, form, measured = conv_form(tap, (batch_size, *input_shape),
                                       (batch_size, *output_shape), jnp.float32)
    how = ""
    if measured:
        how = f" (patches {'as views' if layout == 'views' else 'written out'}; measured)"
    return f"{kind}: {form} over {count} positions{how}"


RULE = Rule("conv", conv_norms,
            "hk.Conv1D/2D/3D, hk.ConvND (unmasked, ungrouped, channels last; any stride, "
            "padding and dilation): patches, then the dense rule over positions, in the form "
            "measured fastest",
            _describe,
            {hk.ConvND: _conv_tap, hk.Conv1D: _conv_tap, hk.Conv2D: _conv_tap,
             hk.Conv3D: _conv_tap,
             hk.DepthwiseConv1D: _other_conv_tap, hk.DepthwiseConv2D: _other_conv_tap,
             hk.DepthwiseConv3D: _other_conv_tap,
             hk.Conv1DTranspose: _other_conv_tap, hk.Conv2DTranspose: _other_conv_tap,
             hk.Conv3DTranspose: _other_conv_tap, hk.ConvNDTranspose: _other_conv_tap})
