"""DP-SGD, written once: clip, sum, add Gaussian noise, average, optax update.

``make_step(engine, loss_fn, optimizer, dp)`` binds that algorithm to an engine. The engine
only decides how the clipped gradient sum is computed and what gets compiled:

=========================  =================================================================
plan                       engines
=========================  =================================================================
one compiled step          ``both`` (vmap sum), ``jit`` with ``loop=unrolled`` or ``scan``
eager step                 ``vmap`` (vmap sum), ``none`` (Python loop), under ``disable_jit``
compiled pieces + loop     ``jit`` with ``loop=dispatch``: B calls of a compiled batch-1
                           function, then one compiled noise-and-update function
=========================  =================================================================

A non-private step (``dp=None``) keeps the engine's two switches: a vectorised engine takes the
batched gradient, a loop engine runs the same loop without clipping, and no noise is added. So
private ÷ non-private of one engine is the cost of clipping and noise alone.

The noise is drawn in the shared finishing code from the step's key, one normal draw per leaf
(``jax.random.split(key, n_leaves)``), so the same key gives the same noise in every engine.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ablation.core.engines import (
    DispatchLoop,
    Engine,
    LossFn,
    PyTree,
    check_batch,
    check_clip_norm,
    get_engine,
    traced_sum_strategy,
)


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """DP-SGD's two knobs.

    Attributes:
      clip_norm: C, the per-example global L2 bound; ``inf`` means no clipping (then the noise
        multiplier must be 0, since the noise std σ·C would be infinite).
      noise_multiplier: σ ≥ 0; each leaf of the clipped sum gets N(0, σ²C²) noise.
    """

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        clip = check_clip_norm(self.clip_norm)
        sigma = float(self.noise_multiplier)
        if math.isnan(sigma) or sigma < 0 or math.isinf(sigma):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got "
                             f"{self.noise_multiplier}")
        if math.isinf(clip) and sigma > 0:
            raise ValueError("noise_multiplier must be 0 when clip_norm is inf (the noise std "
                             "sigma*C would be infinite)")
        object.__setattr__(self, "clip_norm", clip)
        object.__setattr__(self, "noise_multiplier", sigma)

    @property
    def noise_std(self) -> float:
        """σ·C, the std of the noise added to the clipped sum (0 when σ = 0, even if C = inf)."""
        return 0.0 if self.noise_multiplier == 0 else self.noise_multiplier * self.clip_norm


def sgd(learning_rate: float) -> optax.GradientTransformation:
    """Plain SGD (the paper's optimizer) with a validated learning rate (≥ 0, finite)."""
    lr = float(learning_rate)
    if math.isnan(lr) or lr < 0 or math.isinf(lr):
        raise ValueError(f"learning rate must be a finite number >= 0, got {learning_rate}")
    return optax.sgd(lr)


def add_noise(grad_sum: PyTree, key: jax.Array, noise_std: float) -> PyTree:
    """``grad_sum`` plus N(0, noise_std²) on every coordinate, one key per leaf."""
    if noise_std == 0:
        return grad_sum
    leaves, treedef = jax.tree.flatten(grad_sum)
    keys = jax.random.split(key, len(leaves))
    noised = [g + noise_std * jax.random.normal(k, g.shape, g.dtype) for k, g in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noised)


class Step:
    """A DP-SGD (or plain SGD) step bound to one engine: ``step(params, opt_state, x, y, key)``.

    Calling it returns ``(params, opt_state)``. ``mask`` (optional, ``[B]``) drops padded slots
    of a fixed-capacity Poisson batch; the average then divides by ``expected_batch_size``.

    Attributes:
      engine, private: what this step runs.
      compiled_functions: how many distinct functions this engine compiles (0 for the eager
        engines, 1 for a compiled step, 3 for jit-dispatch: zeros, batch-1 accumulate, finish;
        jit-dispatch loops over examples in non-private steps too).
      n_compiles: how many times those functions were traced for compilation so far. A run
        with fixed shapes ends with ``n_compiles == compiled_functions``.
    """

    def __init__(self, engine: Engine | str, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                 dp: DPConfig | None, *, expected_batch_size: float | None = None,
                 donate: bool = False):
        self.engine = get_engine(engine)
        self.private = dp is not None
        self.dp = dp
        self.n_compiles = 0
        if expected_batch_size is not None and not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self._expected_batch_size = expected_batch_size
        self._loss_fn = loss_fn
        self._optimizer = optimizer
        self._compiled: dict[str, Any] = {}
        donate_state = (0, 1) if donate else ()

        if self.engine.jit and not self.engine.compiles_whole_step:
            self._loop = DispatchLoop(loss_fn, on_trace=self._count_trace)
            self._finish = jax.jit(self._counted(self._finish), donate_argnums=donate_state)
            self.compiled_functions = 3
            self._plan = "dispatch"
        elif self.engine.jit:
            self._jitted = jax.jit(self._counted(self._traced_step), donate_argnums=donate_state)
            self.compiled_functions = 1
            self._plan = "compiled"
        else:
            self.compiled_functions = 0
            self._plan = "eager"

    # -- the algorithm, written once --------------------------------------------------------

    def _denominator(self, x: jax.Array) -> float:
        return self._expected_batch_size or x.shape[0]

    def _apply(self, params, opt_state, grads):
        updates, opt_state = self._optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @property
    def _clip_norm(self) -> float | None:
        """C for a private step; None for a non-private one (its loops do not clip)."""
        return self.dp.clip_norm if self.private else None

    def _finish(self, params, opt_state, grad_sum, key, denominator):
        """Noise (private steps only), average, update: the part every engine shares."""
        if self.private:
            grad_sum = add_noise(grad_sum, key, self.dp.noise_std)
        grads = jax.tree.map(lambda g: g / denominator, grad_sum)
        return self._apply(params, opt_state, grads)

    def _traced_step(self, params, opt_state, x, y, key, mask):
        """The whole step as one traceable function (compiled, or run under disable_jit)."""
        strategy = traced_sum_strategy(self.engine, self.private)
        grad_sum = strategy(self._loss_fn, params, x, y, self._clip_norm, mask)
        return self._finish(params, opt_state, grad_sum, key, self._denominator(x))

    # -- compilation bookkeeping -------------------------------------------------------------

    def _count_trace(self) -> None:
        self.n_compiles += 1

    def _counted(self, fn: Callable) -> Callable:
        def traced(*args):
            self._count_trace()  # runs only while jax traces ``fn`` for compilation
            return fn(*args)
        return traced

    def compile(self, params, opt_state, x, y, key, mask=None) -> float | None:
        """Compile ahead of time for these argument shapes; returns the seconds it took.

        Returns None for the eager engines (nothing compiles). Later calls with the same shapes
        run the compiled executables without further tracing.
        """
        check_batch(x, y, mask)
        start = time.perf_counter()
        if self._plan == "eager":
            return None
        if self._plan == "compiled":
            self._compiled["step"] = self._jitted.lower(params, opt_state, x, y, key, mask).compile()
        else:
            clip = self._clip_norm
            zeros = self._loop.zeros.lower(params).compile()
            total = jax.eval_shape(lambda p: jax.tree.map(jnp.zeros_like, p), params)
            self._compiled["zeros"] = zeros
            self._compiled["accumulate"] = self._loop.accumulate.lower(
                total, params, x, y, 0, clip, mask).compile()
            self._compiled["finish"] = self._finish.lower(
                params, opt_state, total, key, self._denominator(x)).compile()
        return time.perf_counter() - start

    @property
    def executables(self) -> list[Any]:
        """The ahead-of-time compiled executables (empty before :meth:`compile`)."""
        return list(self._compiled.values())

    # -- running -----------------------------------------------------------------------------

    def __call__(self, params: PyTree, opt_state: PyTree, x: jax.Array, y: jax.Array,
                 key: jax.Array, mask: jax.Array | None = None) -> tuple[PyTree, PyTree]:
        check_batch(x, y, mask)
        if self._plan == "compiled":
            return self._call_compiled("step", self._jitted, params, opt_state, x, y, key, mask)
        if self._plan == "eager":
            with jax.disable_jit():
                return self._traced_step(params, opt_state, x, y, key, mask)
        return self._dispatch_step(params, opt_state, x, y, key, mask)

    def _call_compiled(self, name: str, fallback: Callable, *args):
        compiled = self._compiled.get(name)
        if compiled is not None:
            try:
                return compiled(*args)
            except TypeError:  # other shapes than compiled for: let jit compile (and count) it
                self._compiled.pop(name)
        return fallback(*args)

    def _dispatch_step(self, params, opt_state, x, y, key, mask):
        clip = self._clip_norm
        total = self._call_compiled("zeros", self._loop.zeros, params)
        accumulate = self._compiled.get("accumulate")
        for i in range(x.shape[0]):
            if accumulate is not None:
                try:
                    total = accumulate(total, params, x, y, i, clip, mask)
                    continue
                except TypeError:  # other shapes than compiled for
                    self._compiled.pop("accumulate", None)
                    accumulate = None
            total = self._loop.accumulate(total, params, x, y, i, clip, mask)
        return self._call_compiled("finish", self._finish, params, opt_state, total, key,
                                   self._denominator(x))


def make_step(engine: Engine | str, loss_fn: LossFn, optimizer: optax.GradientTransformation,
              dp: DPConfig | None, *, expected_batch_size: float | None = None,
              donate: bool = False) -> Step:
    """A training step ``step(params, opt_state, x, y, key[, mask]) -> (params, opt_state)``.

    Args:
      engine: an :class:`~ablation.core.engines.Engine` or its name.
      loss_fn: ``loss_fn(params, x1, y1) -> scalar`` for ONE example.
      optimizer: an optax transformation (e.g. :func:`sgd`).
      dp: a :class:`DPConfig` for DP-SGD, or None for non-private SGD on the batch's mean loss
        (compiled when the engine's ``jit`` is on, eager otherwise; vectorised engines take the
        batched gradient, loop engines loop over examples without clipping).
      expected_batch_size: divide by this instead of the batch size (Poisson sampling with
        padded batches divides by the expected batch size q·n).
      donate: let the compiled step reuse the input parameter/optimizer buffers (faster, less
        memory; the arrays passed in are invalidated).
    """
    return Step(engine, loss_fn, optimizer, dp, expected_batch_size=expected_batch_size,
                donate=donate)
