"""Taps: where the ghost engine sees each parameterised layer of a Haiku network.

A *tapped* pass runs a network on ONE example (a batch of one, the same per-example loss every
other engine differentiates) with every parameterised layer reporting three things:

* its kind (a key of :data:`ablation.core.rules.RULES`) and the module scope that holds its
  parameters (``linear_1``, ``conv2_d``, ``lstm/linear``: the keys of the parameter dict);
* its input as the layer saw it, and ``apply(layer_params, input) -> output``, the layer as a
  function of its parameters (linear in them), which the rules and book-keeping differentiate;
* its output, to which the tap adds a zero "perturbation": the gradient of the example's loss
  with respect to that zero is the layer's output gradient.

The ghost engine ``vmap``s that pass over the examples, so examples cannot interact (a network
that mixes the rows of its batch sees a batch of one, exactly as under ``both``).

Stock Haiku layers (exactly the classes of :data:`ablation.core.rules.STOCK`: every stock layer
with parameters but the refused ones of :data:`ablation.core.rules.REFUSED`; a subclass only
once :func:`register_equivalent` says it computes what its base computes) are tapped by method
interception, so any network built from them is tapped without changing it. A layer of the
per-example rule (``hk.Bias``, ``hk.GroupNorm``, depthwise and transposed convolutions, ...) is
only noted: the engine takes its per-example gradient from the backward pass. Each tapped call
runs inside a named *region*; :func:`parameter_violations` then reads the traced program and
finds every parameter consumed anywhere but inside its own layer's region (tied weights, a
second use through ``params_dict()``): refused, unless the fallback materialises it. A layer the
interceptor cannot see (the lstm's gate projection, whose recurrent half runs inside a scan)
opens its region with :func:`tap_region` and calls :func:`tap_output` and :func:`tap_input`
itself; all three do nothing outside a tapped pass. Parameter trees are never changed.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import re
from typing import Any, Callable, Iterator, Mapping

import haiku as hk
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp

from ablation.core.rules import REFUSED, RULES, STOCK
from ablation.core.rules.base import HIGHEST, GhostUnsupported, LayerApply, LayerTap
from ablation.core.rules.dense import dense_apply

PyTree = Any
__all__ = ["HIGHEST", "GhostUnsupported", "LayerApply", "LayerTap", "LayeredLoss", "Recorder",
           "dense_apply", "parameter_violations", "recording", "register_equivalent",
           "tap_input", "tap_output", "tap_region"]


_REGION = "ghost_tap_"
_REGION_PATTERN = re.compile(rf"{_REGION}(\d+)")


class Recorder:
    """Collects the taps of one traced pass.

    ``perturbations`` (scope → zeros shaped like the layer's output) are added at each
    output; with None the pass only records (shapes and regions are learned this way first).
    """

    def __init__(self, perturbations: Mapping[str, jax.Array] | None = None):
        self.perturbations = perturbations
        self.layers: dict[str, LayerTap] = {}
        self.inputs: dict[str, jax.Array] = {}
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.outputs: dict[str, jax.ShapeDtypeStruct] = {}
        self.regions: list[str] = []  # region i of the traced program is layer regions[i]
        self.frame: Any = None  # the Haiku frame of the tapped network (set when it starts)
        #: layers whose per-example gradients the engine materialises (the per-example rule)
        self.materialised: dict[str, LayerTap] = {}

    def materialise(self, scope: str, tap: LayerTap) -> None:
        """Note a layer of a materialised rule (called any number of times, anywhere)."""
        self.materialised.setdefault(scope, tap)

    def record(self, scope: str, tap: LayerTap, inputs: jax.Array) -> None:
        self.check_context(scope)
        if scope in self.layers:
            raise GhostUnsupported(f"ghost: layer {scope!r} is applied more than once in one "
                                   "forward pass (shared weights); its per-example gradient "
                                   "norm has cross terms no layer rule computes")
        self.layers[scope] = tap
        self.inputs[scope] = inputs
        self.input_shapes[scope] = tuple(jnp.shape(inputs))

    def perturb(self, scope: str, output: jax.Array) -> jax.Array:
        self.check_context(scope)
        self.outputs[scope] = jax.ShapeDtypeStruct(output.shape, output.dtype)
        if self.perturbations is None or scope not in self.perturbations:
            return output  # recording only, or a layer whose gradient is materialised instead
        return output + self.perturbations[scope]

    @contextlib.contextmanager
    def region(self, scope: str) -> Iterator[None]:
        """Mark every operation traced inside as belonging to layer ``scope``."""
        self.check_context(scope)
        self.regions.append(scope)
        with jax.named_scope(f"{_REGION}{len(self.regions) - 1}"):
            yield

    def check_context(self, scope: str) -> None:
        """Refuse a layer called where its taps would be wrong or invisible."""
        frame = _haiku_frame()
        if self.frame is not None and frame is not self.frame:
            raise GhostUnsupported(f"ghost: layer {scope!r} runs inside a Haiku transformation "
                                   "of the network (hk.remat, hk.scan, hk.dynamic_unroll, "
                                   "hk.vmap, hk.cond, ...), where its per-example inputs are "
                                   "not visible to the rules; apply layers to the batch "
                                   "directly, or tap them by hand (models/nets.py's LSTM)")
        if _custom_getters_active():
            raise GhostUnsupported(f"ghost: layer {scope!r} runs under hk.custom_getter, which "
                                   "may transform its parameters before use; the rules "
                                   "differentiate the stock layer of the raw parameters")


def _haiku_frame() -> Any:
    from haiku._src import base  # Haiku's frame stack: a lifted transform pushes a new frame
    return base.current_frame()


def _custom_getters_active() -> bool:
    from haiku._src import base
    return bool(base.param_getter_stack)


_ACTIVE: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("ghost_taps",
                                                                         default=None)


def _active() -> Recorder | None:
    return _ACTIVE.get()


def tap_output(scope: str, output: jax.Array) -> jax.Array:
    """A layer's output, with the tap's zero added in a tapped pass (identity otherwise)."""
    recorder = _active()
    return output if recorder is None else recorder.perturb(scope, output)


def tap_input(scope: str, tap: LayerTap, inputs: jax.Array) -> None:
    """Report a layer's input and kind in a tapped pass (nothing otherwise)."""
    recorder = _active()
    if recorder is not None:
        recorder.record(scope, tap, inputs)


def tap_region(scope: str) -> contextlib.AbstractContextManager:
    """The region of a hand-tapped layer: every use of its parameters must lie inside."""
    recorder = _active()
    return contextlib.nullcontext() if recorder is None else recorder.region(scope)


# ---------------------------------------------------------------------------------------------
# The stock Haiku layers: which rule taps each (the table is the rules' own).

_EQUIVALENT: dict[type, type] = {}


def register_equivalent(subclass: type, stock: type) -> None:
    """Declare that ``subclass`` computes exactly what the stock layer ``stock`` computes from
    the same parameters (e.g. a subclass that only adds a method), so the ghost engine taps it
    with ``stock``'s rule. The declaration is the user's: nothing checks the arithmetic."""
    if stock not in STOCK:
        raise ValueError(f"{stock.__name__} is not a tapped layer; tapped: "
                         f"{', '.join(t.__name__ for t in STOCK)}")
    if not (isinstance(subclass, type) and issubclass(subclass, stock)):
        raise ValueError(f"{subclass!r} is not a subclass of {stock.__name__}")
    _EQUIVALENT[subclass] = stock


def _stock_tap(module: hk.Module, args: tuple, kwargs: Mapping[str, Any]) -> LayerTap | None:
    """The tap of a stock layer's call (None: not a stock layer, or nothing to clip)."""
    kind = type(module)
    for refused, why in REFUSED.items():
        if isinstance(module, refused):
            raise GhostUnsupported(f"ghost: layer {module.module_name!r} is a {kind.__name__}: "
                                   f"{why}")
    stock = kind if kind in STOCK else _EQUIVALENT.get(kind)
    if stock is None:
        for base in STOCK:
            if isinstance(module, base):
                raise GhostUnsupported(
                    f"ghost: layer {module.module_name!r} is a {kind.__name__}, a subclass of "
                    f"hk.{base.__name__} that may compute something else; the {base.__name__} "
                    "rule covers the stock class (ablation.core.taps.register_equivalent("
                    f"{kind.__name__}, hk.{base.__name__}) if it computes the same)")
        return None
    return STOCK[stock](module, args, kwargs)


def _intercept(recorder: Recorder):
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        tap = _stock_tap(context.module, args, kwargs)
        if tap is None:
            return next_fun(*args, **kwargs)
        scope = context.module.module_name
        if RULES[tap.kind].materialised:  # its per-example gradient comes from the backward
            recorder.materialise(scope, tap)  # pass: exact for any use, so nothing to check
            return next_fun(*args, **kwargs)
        inputs = args[0] if args else kwargs.get("inputs", kwargs.get("ids"))
        with recorder.region(scope):
            output = next_fun(*args, **kwargs)
        recorder.record(scope, tap, inputs)
        return recorder.perturb(scope, output)
    return interceptor


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    """Tap every layer of the Haiku network called inside (use within ``hk.transform``)."""
    recorder.frame = _haiku_frame()
    token = _ACTIVE.set(recorder)
    try:
        with hk.intercept_methods(_intercept(recorder)):
            yield recorder
    finally:
        _ACTIVE.reset(token)


# ---------------------------------------------------------------------------------------------
# The structural check: every parameter is consumed only inside its own layer.


def _region_of(eqn: Any, regions: list[str]) -> str | None:
    """The layer whose region (innermost) an equation of the traced program belongs to."""
    found = _REGION_PATTERN.findall(str(eqn.source_info.name_stack))
    return regions[int(found[-1])] if found else None


def parameter_violations(closed_jaxpr: Any, param_paths: list[tuple[str, str] | None],
                         regions: list[str]) -> dict[str, str]:
    """``{scope: why}`` for every parameter the traced per-example loss consumes outside its
    own layer's region (tied weights, another layer's ``params_dict()``, a transform applied
    before the call).

    ``closed_jaxpr`` is the traced pass, whose first ``len(param_paths)`` inputs are the
    parameter leaves named ``(scope, name)`` in ``param_paths`` (None: a leaf not to check).
    The rules compute the gradient of a layer's parameters through that layer's output alone;
    a parameter read anywhere else would add a gradient no rule sees, so the per-example norm
    would be too small and the clipped example could count for more than C.
    """
    jaxpr = closed_jaxpr.jaxpr
    owner = {var: path for var, path in zip(jaxpr.invars, param_paths) if path is not None}
    found: dict[str, str] = {}
    for eqn in jaxpr.eqns:
        for var in eqn.invars:
            path = owner.get(var) if isinstance(var, jax_core.Var) else None
            if path is None or path[0] in found:
                continue
            scope, name = path
            region = _region_of(eqn, regions)
            if region != scope:
                where = (f"inside layer {region!r}" if region is not None else
                         f"outside any tapped layer ({eqn.primitive.name} at "
                         f"{str(eqn.source_info.name_stack) or 'the top level'})")
                found[scope] = (f"ghost: parameter {scope}/{name} is used by its layer {scope!r} "
                                f"and also {where}: tied or reused weights get a gradient from "
                                "both uses, which no layer rule adds up; untie the weights, use "
                                "engine.fallback=materialise, or another engine")
    return found


# ---------------------------------------------------------------------------------------------
# The loss the ghost engine takes: a per-example loss that also knows its network.


@dataclasses.dataclass(frozen=True)
class LayeredLoss:
    """A per-example loss whose network is a Haiku function, so its layers can be tapped.

    Called as ``loss(params, x1, y1)`` it is the usual per-example loss of
    :func:`ablation.clipped_grad_sum` (ONE example, no batch axis): the network sees a batch
    of one. The ghost engine evaluates exactly that loss, tapped (:meth:`tapped_example`).

    Attributes:
      network: the Haiku function ``inputs [B, ...] -> outputs [B, K]`` (untransformed).
      output_loss: ``(outputs [K], label) -> scalar``: the loss of one example's outputs.
    """

    network: Callable[[jax.Array], jax.Array]
    output_loss: Callable[[jax.Array, jax.Array], jax.Array]

    @property
    def transformed(self) -> hk.Transformed:
        return _transform(self.network)

    def __call__(self, params: PyTree, x1: jax.Array, y1: jax.Array) -> jax.Array:
        return self.output_loss(self.transformed.apply(params, x1[None])[0], y1)

    def batch_losses(self, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        """Per-example losses ``[B]``: :meth:`__call__` of every example (each a batch of one)."""
        return jax.vmap(self, in_axes=(None, 0, 0))(params, x, y)

    def tapped_example(self, params: PyTree, perturbations: Mapping[str, jax.Array] | None,
                       x1: jax.Array, y1: jax.Array
                       ) -> tuple[jax.Array, dict[str, jax.Array], Recorder]:
        """The loss of ONE example (a batch of one, as :meth:`__call__`), tapped: the loss, the
        layers' inputs, and the recorder (its layers, regions and output shapes are static:
        valid once traced)."""
        recorder = Recorder(perturbations)

        def fn(inputs):
            with recording(recorder):
                return self.network(inputs)

        outputs = hk.without_apply_rng(hk.transform(fn)).apply(params, x1[None])
        return self.output_loss(outputs[0], y1), dict(recorder.inputs), recorder


@functools.lru_cache(maxsize=64)
def _transform(fn: Callable) -> hk.Transformed:
    """One transform per network function, so repeated calls reuse it (and jit's caches)."""
    return hk.without_apply_rng(hk.transform(fn))
