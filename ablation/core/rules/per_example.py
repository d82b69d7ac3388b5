"""The per-example rule: a stock layer's own per-example gradient, where no cheaper rule is exact.

Some stock Haiku layers hold few parameters, or compute something the specialised rules do not
model: ``hk.Bias``, ``hk.GroupNorm``, the depthwise and transposed convolutions, grouped,
masked or channels-first ``hk.ConvND``, a norm given its scale or offset at call time. For
those the engine differentiates each example's loss with respect to the layer's parameters in
the same vmapped backward pass that gives the other layers' output gradients (as
``engine.fallback=materialise`` does for parameters no rule covers), and the norm and the sum
are built from those very values: exact for any input and any use of the parameters, at the
memory of ``B`` copies of the layer's parameters.

Taps of this kind carry no ``apply``: nothing differentiates the layer on its own.
"""

from __future__ import annotations

import haiku as hk

from ablation.core.rules.base import LayerTap, Rule

KIND = "per_example"


def per_example_tap(params: tuple[str, ...], layer: str) -> LayerTap:
    """The tap of a layer clipped by its own per-example gradient (``layer`` names it in the
    layer's rule description, e.g. ``hk.DepthwiseConv2D``)."""
    return LayerTap(KIND, None, params, {"layer": layer})  # type: ignore[arg-type]


def _bias_tap(module: hk.Bias, args, kwargs) -> LayerTap:
    return per_example_tap(("b",), "hk.Bias")


def _describe(tap, input_shape, output_shape, batch_size) -> str:
    return f"per-example gradient ({tap.options['layer']})"


RULE = Rule(KIND, None,
            "hk.Bias, hk.GroupNorm, hk.DepthwiseConv1D/2D/3D, hk.Conv1D/2D/3DTranspose, and "
            "grouped, masked or channels-first convolutions: each example's own gradient of "
            "the layer, from the same backward pass",
            _describe, {hk.Bias: _bias_tap}, materialised=True)
