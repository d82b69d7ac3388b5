"""Taps: where the ghost engine sees each parameterised layer of a Haiku network.

A *tapped* forward pass runs a network with every parameterised layer reporting three things:

* its kind (a key of :data:`ablation.core.clipping.RULES`) and the module scope that holds its
  parameters (``linear_1``, ``conv2_d``, ``lstm/linear``: the keys of the parameter dict);
* its input as the layer saw it, and ``apply(layer_params, input) -> output``, the layer as a
  function of its parameters (linear in them), which the rules and book-keeping differentiate;
* its output, to which the tap adds a zero "perturbation": the gradient of the summed loss with
  respect to that zero is the layer's output gradient, one row per example.

Stock Haiku layers (``hk.Linear``, ``hk.Conv2D``, ``hk.Embed``) are tapped by method
interception, so any network built from them is tapped without changing it. A layer the
interceptor cannot see (the lstm's gate projection, whose recurrent half runs inside a scan)
calls :func:`tap_output` and :func:`tap_input` itself; both do nothing outside a tapped pass.
Parameter trees are never changed: a tapped network has exactly the untapped one's parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping

import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any
#: ``apply(layer_params, inputs) -> outputs``: a layer as a function of its parameters.
LayerApply = Callable[[Mapping[str, jax.Array], jax.Array], jax.Array]


class GhostUnsupported(ValueError):
    """A network the ghost engine cannot clip exactly; the message names the layer."""


@dataclasses.dataclass(frozen=True)
class LayerTap:
    """What the rules need to know of one layer besides its arrays (static, not traced).

    Attributes:
      kind: ``dense`` (a linear map over the last axis, any positions before it), ``conv2d``
        or ``embed``.
      apply: the layer as a function of its parameters (see the module docstring).
      params: the parameter names of the layer's scope that ``apply`` consumes.
      options: what the kind's rule needs besides arrays: for ``conv2d`` the keyword arguments
        of ``lax.conv_general_dilated_patches``, for ``embed`` the ``vocab_size``.
    """

    kind: str
    apply: LayerApply
    params: tuple[str, ...]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Recorder:
    """Collects the taps of one traced forward pass.

    ``perturbations`` (scope → zeros shaped like the layer's output) are added at each
    output; with None the pass only records (shapes are learned this way first).
    """

    def __init__(self, perturbations: Mapping[str, jax.Array] | None = None):
        self.perturbations = perturbations
        self.layers: dict[str, LayerTap] = {}
        self.inputs: dict[str, jax.Array] = {}
        self.outputs: dict[str, jax.ShapeDtypeStruct] = {}

    def record(self, scope: str, tap: LayerTap, inputs: jax.Array) -> None:
        if scope in self.layers:
            raise GhostUnsupported(f"ghost: layer {scope!r} is applied more than once in one "
                                   "forward pass (shared weights); its per-example gradient "
                                   "norm has cross terms no layer rule computes")
        self.layers[scope] = tap
        self.inputs[scope] = inputs

    def perturb(self, scope: str, output: jax.Array) -> jax.Array:
        self.outputs[scope] = jax.ShapeDtypeStruct(output.shape, output.dtype)
        if self.perturbations is None:
            return output
        return output + self.perturbations[scope]


_ACTIVE: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("ghost_taps",
                                                                         default=None)


def tap_output(scope: str, output: jax.Array) -> jax.Array:
    """A layer's output, with the tap's zero added in a tapped pass (identity otherwise)."""
    recorder = _ACTIVE.get()
    return output if recorder is None else recorder.perturb(scope, output)


def tap_input(scope: str, tap: LayerTap, inputs: jax.Array) -> None:
    """Report a layer's input and kind in a tapped pass (nothing otherwise)."""
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.record(scope, tap, inputs)


# ---------------------------------------------------------------------------------------------
# The stock Haiku layers, as functions of their parameters.


def dense_apply(params: Mapping[str, jax.Array], inputs: jax.Array) -> jax.Array:
    """``inputs @ w (+ b)``: hk.Linear over the last axis."""
    out = jnp.dot(inputs, params["w"])
    return out + params["b"] if "b" in params else out


def embed_apply(params: Mapping[str, jax.Array], ids: jax.Array) -> jax.Array:
    """``embeddings[ids]``: hk.Embed's default lookup."""
    return jnp.take(params["embeddings"], ids, axis=0)


def _conv_tap(module: hk.Conv2D) -> LayerTap:
    if module.mask is not None or module.channel_index != -1:
        raise GhostUnsupported(f"ghost: conv layer {module.module_name!r} is masked or "
                               "channels-first; the conv rule covers unmasked NHWC convolutions")
    conv = dict(window_strides=tuple(module.stride), padding=module.padding,
                lhs_dilation=tuple(module.lhs_dilation),
                rhs_dilation=tuple(module.kernel_dilation),
                dimension_numbers=module.dimension_numbers,
                feature_group_count=module.feature_group_count)

    def apply(params, inputs):
        out = lax.conv_general_dilated(inputs, params["w"], **conv)
        return out + params["b"] if "b" in params else out

    names = ("w", "b") if module.with_bias else ("w",)
    patches = dict(filter_shape=tuple(module.kernel_shape), window_strides=conv["window_strides"],
                   padding=module.padding, lhs_dilation=conv["lhs_dilation"],
                   rhs_dilation=conv["rhs_dilation"],
                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if module.feature_group_count != 1:
        raise GhostUnsupported(f"ghost: conv layer {module.module_name!r} is grouped; the conv "
                               "rule covers ungrouped convolutions")
    return LayerTap("conv2d", apply, names, patches)


def _stock_tap(module: hk.Module) -> LayerTap | None:
    if isinstance(module, hk.Linear):
        return LayerTap("dense", dense_apply, ("w", "b") if module.with_bias else ("w",))
    if isinstance(module, hk.Conv2D):
        return _conv_tap(module)
    if isinstance(module, hk.Embed):
        style = getattr(module.lookup_style, "name", module.lookup_style)
        if str(style).upper() != "ARRAY_INDEX":
            raise GhostUnsupported(f"ghost: embedding {module.module_name!r} uses lookup style "
                                   f"{module.lookup_style}; the embed rule covers ARRAY_INDEX")
        return LayerTap("embed", embed_apply, ("embeddings",), {"vocab_size": module.vocab_size})
    return None


def _intercept(recorder: Recorder):
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        tap = _stock_tap(context.module)
        if tap is None:
            return next_fun(*args, **kwargs)
        inputs = args[0] if args else kwargs.get("inputs", kwargs.get("ids"))
        if tap.kind == "conv2d" and jnp.ndim(inputs) != 4:
            raise GhostUnsupported(f"ghost: conv layer {context.module.module_name!r} got an "
                                   "unbatched input; taps need [B, H, W, C]")
        output = next_fun(*args, **kwargs)
        scope = context.module.module_name
        recorder.record(scope, tap, inputs)
        return recorder.perturb(scope, output)
    return interceptor


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    """Tap every layer of the Haiku network called inside (use within ``hk.transform``)."""
    token = _ACTIVE.set(recorder)
    try:
        with hk.intercept_methods(_intercept(recorder)):
            yield recorder
    finally:
        _ACTIVE.reset(token)


# ---------------------------------------------------------------------------------------------
# The loss the ghost engine takes: a per-example loss that also knows its network.


@dataclasses.dataclass(frozen=True)
class LayeredLoss:
    """A per-example loss whose network is a Haiku function, so its layers can be tapped.

    Called as ``loss(params, x1, y1)`` it is the usual per-example loss of
    :func:`ablation.clipped_grad_sum` (ONE example, no batch axis), which every engine takes;
    the ghost engine also uses :meth:`batch_losses` and :meth:`tapped`.

    Attributes:
      network: the Haiku function ``inputs [B, ...] -> outputs [B, K]`` (untransformed).
      output_loss: ``(outputs [K], label []) -> scalar``: the loss of one example's outputs.
    """

    network: Callable[[jax.Array], jax.Array]
    output_loss: Callable[[jax.Array, jax.Array], jax.Array]

    @property
    def transformed(self) -> hk.Transformed:
        return _transform(self.network)

    def __call__(self, params: PyTree, x1: jax.Array, y1: jax.Array) -> jax.Array:
        return self.output_loss(self.transformed.apply(params, x1[None])[0], y1)

    def batch_losses(self, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        """Per-example losses ``[B]`` of one batched forward pass."""
        return jax.vmap(self.output_loss)(self.transformed.apply(params, x), y)

    def tapped(self, params: PyTree, x: jax.Array, y: jax.Array,
               perturbations: Mapping[str, jax.Array] | None
               ) -> tuple[jax.Array, dict[str, jax.Array], Recorder]:
        """Per-example losses ``[B]`` of a tapped pass, the layers' inputs, and the recorder
        (its ``layers`` and output shapes are static: valid after tracing)."""
        recorder = Recorder(perturbations)

        def fn(inputs):
            with recording(recorder):
                return self.network(inputs)

        outputs = hk.without_apply_rng(hk.transform(fn)).apply(params, x)
        return jax.vmap(self.output_loss)(outputs, y), dict(recorder.inputs), recorder


@functools.lru_cache(maxsize=64)
def _transform(fn: Callable) -> hk.Transformed:
    """One transform per network function, so repeated calls reuse it (and jit's caches)."""
    return hk.without_apply_rng(hk.transform(fn))
