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

The noise is drawn in the shared finishing code from the step's key (``core/noise.py``: the
values of ``jax.random.normal(key, (n_params,))`` laid over the leaves, computed in the loop
that adds them), so the same key gives the same noise in every engine.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ablation.core.engines import (DispatchLoop, Engine, LossFn, PyTree, check_batch,
                                   check_clip_norm, get_engine, traced_sum_strategy)
from ablation.core.noise import add_noise


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


class Step:
    """A DP-SGD (or plain SGD) step bound to one engine: ``step(params, opt_state, x, y, key)``.

    Calling it returns ``(params, opt_state)``. ``mask`` (optional, ``[B]``) drops padded slots
    of a fixed-capacity Poisson batch; the average then divides by ``expected_batch_size``.

    With ``devices=N > 1`` (``both`` and ``ghost``) the step is data-parallel: the batch is
    split over N devices (a mesh over the batch axis, ``shard_map``), each device clips its own
    examples, the clipped sums are added across devices (``psum``), and the noise is drawn once
    from the step's key, so the update equals the single-device one for the same key. The
    batch (the padded capacity under Poisson sampling) must divide by N.

    With ``steps_per_call=K > 1`` (compiled engines only) one call runs K DP-SGD steps in one
    compiled ``lax.scan``: ``x [K, B, ...]``, ``y [K, B]``, ``key [K]`` (one key per step) and
    ``mask [K, B]`` hold the K steps' inputs, and the result equals K single steps with the
    same inputs. Small models are dispatch-bound; this measures what the step itself costs.

    Attributes:
      engine, private: what this step runs.
      compiled_functions: how many distinct functions this engine compiles (0 for the eager
        engines, 1 for a compiled step, 3 for jit-dispatch: zeros, batch-1 accumulate, finish;
        jit-dispatch loops over examples in non-private steps too).
      n_compiles: how many times those functions were traced for compilation so far. A run
        with fixed shapes ends with ``n_compiles == compiled_functions``.
    """

    def __init__(self, engine: Engine | str, loss_fn: LossFn,
                 optimizer: optax.GradientTransformation,
                 dp: DPConfig | None, *, expected_batch_size: float | None = None,
                 donate: bool = False, steps_per_call: int = 1, devices: int = 1,
                 clipped_sum: Callable[..., PyTree] | None = None):
        self.engine = get_engine(engine)
        self._clipped_sum = clipped_sum
        if clipped_sum is not None and not self.engine.compiles_whole_step:
            raise ValueError("a custom clipped_sum needs an engine that compiles the whole step")
        self.private = dp is not None
        self.devices = int(devices)
        self._mesh = None
        if self.devices > 1:
            if not (self.engine.jit and self.engine.vectorized):
                raise ValueError(f"devices > 1 needs a compiled vectorised engine (both or "
                                 f"ghost), not {self.engine.name}")
            self._mesh = jax.sharding.Mesh(np.array(_mesh_devices(self.devices)), ("batch",))
        self.steps_per_call = int(steps_per_call)
        if self.steps_per_call < 1:
            raise ValueError(f"steps_per_call must be a positive integer, got {steps_per_call}")
        if self.steps_per_call > 1 and not self.engine.compiles_whole_step:
            raise ValueError(f"steps_per_call > 1 needs an engine that compiles the whole step "
                             f"(both, ghost, jit with loop=unrolled or scan), not "
                             f"{self.engine.name}" + (f"[{self.engine.loop}]"
                                                      if self.engine.uses_loop else ""))
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
            body = self._traced_step if self.steps_per_call == 1 else self._scanned_steps
            self._jitted = jax.jit(self._counted(body), donate_argnums=donate_state)
            self.compiled_functions = 1
            self._plan = "compiled"
        else:
            self.compiled_functions = 0
            self._plan = "eager"

    # -- the algorithm, written once --------------------------------------------------------

    def _denominator(self, x: jax.Array) -> float:
        return self._expected_batch_size or x.shape[0]  # x of one step: [B, ...]

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
        if self.private and self._clipped_sum is not None:
            strategy = self._clipped_sum
        if self._mesh is None:
            grad_sum = strategy(self._loss_fn, params, x, y, self._clip_norm, mask)
        else:
            grad_sum = self._sharded_sum(strategy, params, x, y, mask)
        return self._finish(params, opt_state, grad_sum, key, self._denominator(x))

    def _sharded_sum(self, strategy, params, x, y, mask):
        """The (clipped) gradient sum with the batch split over the mesh: each device sums its
        own examples, then the sums are added across devices (replicated result)."""
        from jax.sharding import PartitionSpec as P

        from ablation.core.compat import shard_map
        if x.shape[0] % self.devices:
            raise ValueError(f"a batch of {x.shape[0]} does not divide over "
                             f"engine.devices={self.devices}")
        clip, loss = self._clip_norm, self._loss_fn

        def local(p, xs, ys, *ms):
            part = strategy(loss, p, xs, ys, clip, ms[0] if ms else None)
            return _psum_as_one(part, "batch")

        batch = P("batch")
        args = (params, x, y) + (() if mask is None else (mask,))
        specs = (P(), batch, batch) + (() if mask is None else (batch,))
        return shard_map(local, mesh=self._mesh, in_specs=specs, out_specs=P())(*args)

    def input_sharding(self) -> Any:
        """Where a batch should live before the step (sharded over the mesh), or None."""
        if self._mesh is None:
            return None
        return jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec("batch"))

    def place_batch(self, tree: PyTree, stacked: bool = False) -> PyTree:
        """This process's part of a batch (``[B_local, ...]`` leaves; ``[K, B_local, ...]``
        with ``stacked``) as the step's sharded global batch (unchanged without a mesh)."""
        if self._mesh is None:
            return tree
        from ablation.core.distributed import global_array
        spec = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec(
            *((None,) if stacked else ()), "batch"))
        return jax.tree.map(lambda a: None if a is None else global_array(a, spec), tree)

    def place_state(self, tree: PyTree) -> PyTree:
        """The training state, the same on every process, replicated over the mesh where the
        step spans several processes (unchanged otherwise)."""
        from ablation.core.distributed import is_multi_process, replicated
        if self._mesh is None or not is_multi_process():
            return tree
        return replicated(tree, self._mesh)

    def _scanned_steps(self, params, opt_state, xs, ys, keys, masks):
        """``steps_per_call`` steps in one ``lax.scan``: the same step, K inputs."""
        def one(state, inputs):
            x, y, key, mask = inputs
            return self._traced_step(*state, x, y, key, mask), None

        (params, opt_state), _ = jax.lax.scan(one, (params, opt_state), (xs, ys, keys, masks))
        return params, opt_state

    def _check(self, x, y, mask) -> None:
        if self.steps_per_call == 1:
            check_batch(x, y, mask)
            return
        k = self.steps_per_call
        if x.shape[0] != k or y.shape[0] != k or (mask is not None and mask.shape[0] != k):
            raise ValueError(f"steps_per_call={k}: x, y (and mask) need a leading axis of {k} "
                             f"steps, got {x.shape[0]} and {y.shape[0]}")
        check_batch(x[0], y[0], None if mask is None else mask[0])

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
        self._check(x, y, mask)
        start = time.perf_counter()
        if self._plan == "eager":
            return None
        if self._plan == "compiled":
            lowered = self._jitted.lower(params, opt_state, x, y, key, mask)
            self._compiled["step"] = lowered.compile()
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
        self._check(x, y, mask)
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


def _psum_as_one(tree: PyTree, axis: str) -> PyTree:
    """``psum`` of a tree as one collective over its concatenated leaves (where they share a
    dtype). The sum of each element is the same; but XLA:CPU's gloo runs one all-reduce per
    leaf, and each costs its round trip: measured on 2 CPU processes, the ffnn's ghost step
    took 4.8 ms with a psum per leaf and 1.6 ms with one (the cnn's 26 and 12 ms)."""
    leaves = jax.tree.leaves(tree)
    if len(leaves) < 2 or len({leaf.dtype for leaf in leaves}) > 1:
        return jax.lax.psum(tree, axis)
    from jax.flatten_util import ravel_pytree
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.lax.psum(flat, axis))


def _mesh_devices(count: int) -> list[Any]:
    """The devices of a data-parallel step over ``count`` devices: the first ``count`` of this
    process's, or, in a run of several processes, the first ``count / processes`` of each
    process's, in process order (so each process holds its rows of every batch)."""
    processes = jax.process_count()
    if processes == 1:
        available = jax.devices()
        if len(available) < count:
            raise ValueError(f"devices={count} but JAX sees {len(available)} "
                             f"{available[0].platform} device(s) (on a CPU, XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={count} makes {count})")
        return available[:count]
    if count % processes:
        raise ValueError(f"devices={count} do not divide over the run's {processes} processes")
    per = count // processes
    by_process: dict[int, list[Any]] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    short = [p for p in range(processes) if len(by_process.get(p, ())) < per]
    if short:
        raise ValueError(f"process {short[0]} has {len(by_process.get(short[0], ()))} "
                         f"device(s), fewer than the {per} each process needs")
    return [d for p in range(processes) for d in sorted(by_process[p], key=lambda d: d.id)[:per]]


def make_step(engine: Engine | str, loss_fn: LossFn, optimizer: optax.GradientTransformation,
              dp: DPConfig | None, *, expected_batch_size: float | None = None,
              donate: bool = False, steps_per_call: int = 1, devices: int = 1,
              clipped_sum: Callable[..., PyTree] | None = None) -> Step:
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
      steps_per_call: K > 1 runs K steps per call in one compiled scan (see :class:`Step`).
      devices: N > 1 splits the batch over N devices (data parallel; see :class:`Step`).
      clipped_sum: the private step's clipped gradient sum from elsewhere (another library's
        ``sum(loss_fn, params, x, y, clip_norm, mask)``) instead of the engine's; noise,
        averaging and update stay this module's (reference rows such as jax_privacy's).
    """
    return Step(engine, loss_fn, optimizer, dp, expected_batch_size=expected_batch_size,
                donate=donate, steps_per_call=steps_per_call, devices=devices,
                clipped_sum=clipped_sum)
