"""Gradient engines: how the per-example clipped gradient sum is computed.

An engine is a value with two switches, ``jit`` (compile with XLA) and ``vectorized``
(per-example gradients by ``jax.vmap`` rather than a loop over examples). Every engine
computes the same quantity,

    clipped_grad_sum = Σ_i  g_i · min(1, C / ‖g_i‖₂),    g_i = ∇_θ loss(θ, x_i, y_i),

where ‖·‖₂ is the global L2 norm over all parameter leaves. They differ only in how the work
reaches the hardware:

* ``both``  – ``jax.jit`` of a function that ``vmap``s the per-example gradient;
* ``jit``   – a loop over batch-1 computations that are compiled; three variants
  (``Engine.loop``): ``dispatch`` calls one compiled batch-1 function per example from Python
  (the paper's "JAX with batch size 1"), ``unrolled`` traces the Python loop inside one
  ``jit`` (compile time grows with the batch), ``scan`` uses ``lax.scan`` inside ``jit``;
* ``vmap``  – the ``both`` computation run under ``jax.disable_jit()``: op-by-op dispatch with no
  whole-function compilation (JAX still runs each primitive as its own small kernel);
* ``none``  – a Python loop of eager per-example gradients.

Beyond the paper, ``ghost`` (``jax.jit``, vectorised by per-layer rules instead of vmap) computes
the same sum without any per-example gradient: each example's norm from its layers' inputs and
output gradients, then the clipped sum by book-keeping or a second backward pass
(:mod:`ablation.core.clipping`). It needs a model's :class:`~ablation.core.taps.LayeredLoss`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from ablation.core import clipping, masking

PyTree = Any
#: ``loss_fn(params, x1, y1) -> scalar`` for ONE example (no batch axis).
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]

LOOPS: tuple[str, ...] = ("dispatch", "unrolled", "scan")
GHOST_MODES: tuple[str, ...] = clipping.MODES


@dataclasses.dataclass(frozen=True)
class Engine:
    """How per-example gradients are computed: two switches and, for jit-only, a loop variant.

    Attributes:
      name: registry name (``both``, ``jit``, ``vmap``, ``none``).
      jit: compile with XLA.
      vectorized: per-example gradients with ``jax.vmap`` (else a loop over examples).
      loop: for ``jit=True, vectorized=False`` only: ``dispatch`` (default; a compiled batch-1
        function called once per example), ``unrolled`` (the loop traced inside one ``jit``;
        compile time and memory grow with the batch) or ``scan`` (``lax.scan`` inside ``jit``;
        compile time independent of the batch). Ignored by the other engines.
      ghost: None for the paper's engines; for ``ghost``, how the clipped sum is formed once
        the norms are known: ``bookkeeping`` (from the stored layer inputs and output
        gradients, in one pass) or ``two_pass`` (a second backward pass of Σ c_i ℓ_i).
      fallback: for ``ghost``, what happens to parameters no rule covers exactly (an unknown
        layer, tied weights): ``error`` (refused, naming them; the default) or ``materialise``
        (their per-example gradients, in the same backward pass, joined exactly with the rules).
    """

    name: str
    jit: bool
    vectorized: bool
    loop: str = "dispatch"
    ghost: str | None = None
    fallback: str = "error"

    def __post_init__(self) -> None:
        if self.loop not in LOOPS:
            raise ValueError(f"unknown engine loop {self.loop!r}; valid loops: {', '.join(LOOPS)}")
        if self.ghost is not None and self.ghost not in GHOST_MODES:
            raise ValueError(f"unknown ghost mode {self.ghost!r}; valid modes: "
                             f"{', '.join(GHOST_MODES)}")
        if self.fallback not in clipping.FALLBACKS:
            raise ValueError(f"unknown ghost fallback {self.fallback!r}; valid: "
                             f"{', '.join(clipping.FALLBACKS)}")

    @property
    def uses_loop(self) -> bool:
        """True when ``loop`` matters (the jit-only engine)."""
        return self.jit and not self.vectorized

    @property
    def compiles_whole_step(self) -> bool:
        """True when one XLA computation holds the whole private step."""
        return self.jit and (self.vectorized or self.loop != "dispatch")

    def with_loop(self, loop: str) -> "Engine":
        """This engine with another loop variant (validated)."""
        return dataclasses.replace(self, loop=loop)


ENGINES: Mapping[str, Engine] = MappingProxyType({
    "both": Engine("both", jit=True, vectorized=True),
    "jit": Engine("jit", jit=True, vectorized=False),
    "vmap": Engine("vmap", jit=False, vectorized=True),
    "none": Engine("none", jit=False, vectorized=False),
    "ghost": Engine("ghost", jit=True, vectorized=True, ghost="bookkeeping"),
})
#: The paper's 2x2 ablation (``ghost`` is beyond it).
ABLATION_ENGINES: tuple[str, ...] = ("both", "jit", "vmap", "none")


def get_engine(engine: Engine | str, loop: str | None = None,
               mode: str | None = None, fallback: str | None = None) -> Engine:
    """Resolve an engine name (or pass an ``Engine`` through), optionally setting its loop
    (``jit``), mode (``ghost``: ``bookkeeping`` or ``two_pass``) or fallback (``ghost``:
    ``error`` or ``materialise``).

    Raises:
      ValueError: unknown engine name, loop or mode; the message lists the valid names.
    """
    if isinstance(engine, str):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
        engine = ENGINES[engine]
    if not isinstance(engine, Engine):
        raise TypeError(f"engine must be an Engine or a name, got {type(engine).__name__}")
    if loop is not None:
        engine = engine.with_loop(loop)
    if mode is not None and engine.ghost is not None:
        engine = dataclasses.replace(engine, ghost=mode)
    if fallback is not None and engine.ghost is not None:
        engine = dataclasses.replace(engine, fallback=fallback)
    return engine


# --------------------------------------------------------------------------------------------
# Input checks shared by the public entry points (one-line messages).


#: The smallest clip norm accepted: well inside float32's normal range (whose smallest value is
#: ~1.2e-38), so that ``C`` reaches the device as itself and ``C / ‖g‖`` is never ``0 / 0``.
MIN_CLIP_NORM = 1e-30


def check_clip_norm(clip_norm: float) -> float:
    """``clip_norm`` as a float; it must be ≥ :data:`MIN_CLIP_NORM` (``inf``: no clipping)."""
    value = float(clip_norm)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"clip_norm must be a positive number or inf, got {clip_norm}")
    if value < MIN_CLIP_NORM:
        raise ValueError(f"clip_norm must be at least {MIN_CLIP_NORM:g} (a normal float32), "
                         f"got {clip_norm}")
    return value


def check_batch(x: Any, y: Any, mask: Any = None) -> int:
    """The batch size of ``x``/``y`` (and ``mask``), which must be equal and non-zero."""
    n_x, n_y = _leading_dim(x, "x"), _leading_dim(y, "y")
    if n_x != n_y:
        raise ValueError(f"x and y hold different numbers of examples: {n_x} vs {n_y}")
    if mask is not None and _leading_dim(mask, "mask") != n_x:
        raise ValueError(f"mask has {_leading_dim(mask, 'mask')} entries for a batch of {n_x}")
    if n_x == 0:
        raise ValueError("the batch is empty: x and y hold 0 examples")
    return n_x


def _leading_dim(a: Any, name: str) -> int:
    shape = getattr(a, "shape", None)
    if not shape:
        raise ValueError(f"{name} must be an array with a leading batch axis, got shape {shape}")
    return int(shape[0])


# --------------------------------------------------------------------------------------------
# The one per-example computation every engine shares.


def global_norm(tree: PyTree) -> jax.Array:
    """Global L2 norm over all leaves of ``tree`` (a scalar)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def clip_factor(norm: jax.Array, clip_norm: float | jax.Array) -> jax.Array:
    """``min(1, C / norm)``: 1 for a zero gradient or ``C = inf`` (no clipping)."""
    return jnp.minimum(1.0, clip_norm / norm)


def _keep(grads: PyTree, keep: jax.Array) -> PyTree:
    """``grads`` where ``keep`` (a bool ``[B]`` or scalar), exact zeros elsewhere.

    A select, never a multiplication: a padded slot whose gradient is ``inf`` or NaN still
    contributes exactly nothing (``0 · inf`` would be NaN).
    """
    def select(g):
        k = jnp.reshape(keep, keep.shape + (1,) * (g.ndim - keep.ndim))
        return jnp.where(k, g, jnp.zeros_like(g))
    return jax.tree.map(select, grads)


def clipped_grad(loss_fn: LossFn, params: PyTree, x1: jax.Array, y1: jax.Array,
                 clip_norm: float | jax.Array | None, weight: jax.Array | None = None) -> PyTree:
    """The gradient of ONE example, scaled to global norm ≤ ``clip_norm``.

    ``clip_norm=None`` leaves the gradient as it is (the non-private loops). ``weight`` is the
    example's mask entry: ``weight <= 0`` (a padded Poisson slot) gives exact zeros.
    """
    grads = jax.grad(loss_fn)(params, x1, y1)
    if clip_norm is not None:
        scale = clip_factor(global_norm(grads), clip_norm)
        grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
    return grads if weight is None else _keep(grads, weight > 0)


def _tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


# --------------------------------------------------------------------------------------------
# Summation strategies. Each has the signature (loss_fn, params, x, y, clip_norm, mask) and
# returns the clipped sum; whether it is compiled is decided by the caller, not here.


def vmap_sum(loss_fn: LossFn, params: PyTree, x: jax.Array, y: jax.Array,
             clip_norm: float | jax.Array | None, mask: jax.Array | None = None) -> PyTree:
    """Vectorised: per-example gradients ``[B, ...]`` by ``vmap``, then one weighted reduction.

    The scales ``min(1, C/‖g_i‖)`` form a ``[B]`` vector and the sum is ``tensordot(scale, g)``
    per leaf, which XLA fuses with the scaling: the clipped per-example gradients are never
    stored, only the raw ones. Padded slots are selected away before anything is summed.
    """
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, x, y)
    if mask is not None:
        grads = _keep(grads, mask > 0)
    if clip_norm is None:
        return jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
    leaves = jax.tree.leaves(grads)
    sq_norms = sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in leaves)
    scale = clip_factor(jnp.sqrt(sq_norms), clip_norm)  # [B]
    return jax.tree.map(lambda g: jnp.tensordot(scale.astype(g.dtype), g, axes=1), grads)


def batched_sum(loss_fn: LossFn, params: PyTree, x: jax.Array, y: jax.Array,
                clip_norm: None = None, mask: jax.Array | None = None) -> PyTree:
    """The non-private vectorised gradient: one backward pass of the batch's summed loss.

    No per-example gradients exist, so there is nothing to clip (``clip_norm`` must be None).
    Padded slots hold a copy of a kept example (:func:`ablation.core.masking.fill_padded`) and
    their losses are selected away, so their contribution is exactly zero whatever the slot
    held, even where the network is NaN at a zero input.
    """
    if clip_norm is not None:
        raise ValueError("batched_sum computes no per-example gradients and cannot clip them")
    if mask is None:
        return jax.grad(lambda p: jnp.sum(jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, x, y)))(
            params)
    keep = mask > 0
    x, y = masking.fill_padded(x, y, keep)

    def total_loss(p):
        losses = jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, x, y)
        return jnp.sum(jnp.where(keep, losses, 0.0))

    return masking.zero_unless_any(keep, jax.grad(total_loss)(params))


def ghost_sum(loss_fn: LossFn, params: PyTree, x: jax.Array, y: jax.Array,
              clip_norm: float | jax.Array, mask: jax.Array | None = None,
              mode: str = "bookkeeping", fallback: str = "error") -> PyTree:
    """The ghost engine's clipped sum: per-layer norm rules, no per-example gradients
    (:func:`ablation.core.clipping.ghost_clipped_sum`)."""
    return clipping.ghost_clipped_sum(loss_fn, params, x, y, clip_norm, mask, mode=mode,
                                      fallback=fallback)


def unrolled_sum(loss_fn: LossFn, params: PyTree, x: jax.Array, y: jax.Array,
                 clip_norm: float | jax.Array | None, mask: jax.Array | None = None) -> PyTree:
    """A Python loop over examples: eager for ``none``, traced into one program for jit-unrolled."""
    total = None
    for i in range(x.shape[0]):
        weight = None if mask is None else mask[i]
        g = clipped_grad(loss_fn, params, x[i], y[i], clip_norm, weight)
        total = g if total is None else _tree_add(total, g)
    return total


def scan_sum(loss_fn: LossFn, params: PyTree, x: jax.Array, y: jax.Array,
             clip_norm: float | jax.Array | None, mask: jax.Array | None = None) -> PyTree:
    """``lax.scan`` over examples, carrying the running sum (one loop body in the program)."""
    def body(total, example):
        x1, y1, w = example  # w is None without a mask (scan carries no leaf for it)
        return _tree_add(total, clipped_grad(loss_fn, params, x1, y1, clip_norm, w)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, _ = lax.scan(body, zeros, (x, y, mask))
    return total


def accumulate_one(loss_fn: LossFn, total: PyTree, params: PyTree, x: jax.Array, y: jax.Array,
                   index: jax.Array, clip_norm: float | jax.Array | None,
                   mask: jax.Array | None = None) -> PyTree:
    """``total`` plus the clipped gradient of example ``index``: the jit-dispatch batch-1 body.

    The example is picked inside the compiled function so that each example costs exactly one
    dispatch (slicing outside would add an eager gather per example).
    """
    x1 = lax.dynamic_index_in_dim(x, index, keepdims=False)
    y1 = lax.dynamic_index_in_dim(y, index, keepdims=False)
    w = None if mask is None else lax.dynamic_index_in_dim(mask, index, keepdims=False)
    return _tree_add(total, clipped_grad(loss_fn, params, x1, y1, clip_norm, w))


def traced_sum_strategy(engine: Engine, private: bool = True) -> Callable[..., PyTree] | None:
    """The traceable summation an engine runs, or None for jit-dispatch (a Python loop).

    Private steps sum clipped per-example gradients. Non-private steps keep the engine's
    switches: a vectorised engine takes the batched gradient (:func:`batched_sum`), a loop
    engine runs the same loop as its private step without clipping (``clip_norm=None``).
    """
    if engine.ghost is not None:
        return (functools.partial(ghost_sum, mode=engine.ghost, fallback=engine.fallback)
                if private else batched_sum)
    if engine.vectorized:
        return vmap_sum if private else batched_sum
    if not engine.jit:
        return unrolled_sum  # run eagerly: the "none" engine
    return {"unrolled": unrolled_sum, "scan": scan_sum, "dispatch": None}[engine.loop]


# --------------------------------------------------------------------------------------------
# Public one-shot API.


class DispatchLoop:
    """The jit-dispatch per-example loop: one compiled batch-1 function called B times.

    ``zeros`` makes the running sum, ``accumulate`` adds one example's clipped gradient (its
    ``total`` buffer is donated, so the sum is updated in place).
    """

    def __init__(self, loss_fn: LossFn, on_trace: Callable[[], None] = lambda: None):
        def zeros(params):
            on_trace()
            return jax.tree.map(jnp.zeros_like, params)

        def accumulate(total, params, x, y, index, clip_norm, mask):
            on_trace()
            return accumulate_one(loss_fn, total, params, x, y, index, clip_norm, mask)

        self.zeros = jax.jit(zeros)
        self.accumulate = jax.jit(accumulate, donate_argnums=(0,))

    def __call__(self, params: PyTree, x: jax.Array, y: jax.Array,
                 clip_norm: float | jax.Array | None, mask: jax.Array | None = None) -> PyTree:
        total = self.zeros(params)
        for i in range(x.shape[0]):
            total = self.accumulate(total, params, x, y, i, clip_norm, mask)
        return total


@functools.lru_cache(maxsize=64)
def _cached_sum_fn(engine: Engine, loss_fn: LossFn) -> Callable[..., PyTree]:
    """One callable per (engine, loss) so repeated calls reuse the compiled code."""
    strategy = traced_sum_strategy(engine)
    if strategy is None:
        return DispatchLoop(loss_fn)
    fn = functools.partial(strategy, loss_fn)
    if engine.jit:
        return jax.jit(fn)

    def eager(*args):
        with jax.disable_jit():
            return fn(*args)

    return eager


def clipped_grad_sum(engine: Engine | str, loss_fn: LossFn, params: PyTree, x: jax.Array,
                     y: jax.Array, clip_norm: float, mask: jax.Array | None = None) -> PyTree:
    """Sum over the batch of per-example gradients, each clipped to global L2 norm ``clip_norm``.

    Args:
      engine: an :class:`Engine` or its name.
      loss_fn: ``loss_fn(params, x1, y1) -> scalar`` for ONE example (no batch axis).
      params: parameter pytree.
      x: inputs ``[B, ...]``; y: labels ``[B]``.
      clip_norm: C > 0; ``inf`` disables clipping.
      mask: optional ``[B]`` weights; examples with ``mask <= 0`` contribute exactly nothing,
        whatever their values (padded slots of a fixed-capacity Poisson batch).

    Returns:
      A pytree shaped like ``params``: ``Σ_i mask_i · g_i · min(1, C / ‖g_i‖₂)``.

    Raises:
      ValueError: unknown engine, empty batch, x/y length mismatch, NaN or non-positive C.
    """
    engine = get_engine(engine)
    check_batch(x, y, mask)
    clip = check_clip_norm(clip_norm)
    return _cached_sum_fn(engine, loss_fn)(params, x, y, jnp.float32(clip), mask)
