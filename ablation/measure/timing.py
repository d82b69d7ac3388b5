"""Timing one cell honestly: compile apart, warm-up apart, latency and throughput apart.

What is timed, exactly:

* ``compile_s`` — the ahead-of-time ``lower().compile()`` of the step's compiled functions
  (the whole step for ``both``/jit-unrolled/jit-scan; zeros + batch-1 accumulate + finish for
  jit-dispatch); None for ``vmap``/``none``, where nothing is compiled ahead.
* ``first_step_s`` — the first call after that (first-run allocation; for the eager engines also
  JAX's one-off compilation of each primitive's small kernel).
* latency (``step_times_s``, ``median_step_s``, ``iqr_step_s``, ``steps_timed``) — steady-state
  steps after ``timing.warmup_steps``, each from just before the call until the returned state
  is ready on the device. What one step costs when nothing overlaps it.
* throughput (``throughput_step_s``) — runs of ``K`` steps dispatched back to back and ended
  once on the device, divided by ``K``: what a step costs inside a training loop, where the host
  dispatches the next step while the device still runs the last. On a GPU, where a small
  step is 0.1–0.3 ms, the two differ; ratios between engines use throughput.

Inputs (batches drawn on the device by a compiled sampler, and the step keys) are prepared
before each clock starts. ``budget`` mode runs up to ``max_steps`` latency steps or
``budget_s`` seconds (at least ``min_steps``), then three bursts of ``K`` steps within about the
same budget, and estimates an epoch as ``steps_per_epoch × throughput_step_s``
(``epoch_estimated``). ``epochs`` mode runs full passes: the first epoch holds the first
step, the warm-up and the latency steps (reported apart as ``first_epoch_s``); every later
epoch is one back-to-back burst of its steps, so its time is a real epoch's.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ablation.core import distributed
from ablation.core.dpsgd import DPConfig, Step, make_step, sgd
from ablation.core.engines import get_engine
from ablation.data.samplers import (Batch, PoissonSampler, ProcessRows, ShuffleSampler,
                                    poisson_capacity, process_poisson, run_keys)
from ablation.measure.clock import PreparedClock, run_timing_loop
from ablation.measure.cost_split import measure_cost_split, supports_cost_split
from ablation.measure.noise_floor import gaussian_rates, noise_floor_s
from ablation.measure.settings import CellConfig, model_of, training_set_of
from models import Model, count_params

EVAL_EXAMPLES = 1024


def step_keys(noise_key: jax.Array, call: int, steps_per_call: int = 1) -> jax.Array:
    """The noise keys of call ``call`` of a run: ``fold_in(noise_key, i)`` for its step ``i``
    (one key; with ``steps_per_call=K`` the ``[K]`` keys of steps ``call·K … call·K + K − 1``).
    The run's one key schedule: the clock and the audit (``ablation.measure.audit``) use it."""
    if steps_per_call == 1:
        return jax.random.fold_in(noise_key, call)
    first = call * steps_per_call
    return jax.vmap(lambda j: jax.random.fold_in(noise_key, j))(
        jnp.arange(first, first + steps_per_call))


class JaxClock(PreparedClock):
    """The clock of a JAX step. Every step gets a fresh noise key, ``fold_in(noise_key, i)``;
    ``state`` holds the training state after the steps run so far.

    With ``steps_per_call=K`` one tick is one call of K steps: the inputs of steps
    ``i·K … i·K + K − 1`` stacked (batches and keys), prepared before the clock starts.
    """

    def __init__(self, step: Callable, state: tuple, sampler, noise_key: jax.Array,
                 steps_per_call: int = 1):
        self.step, self.state, self.sampler, self.noise_key = step, state, sampler, noise_key
        self.steps_per_call = steps_per_call
        super().__init__(self._inputs, self._launch, self._wait, self._input_bytes)

    def _inputs(self, i: int) -> tuple[Batch, jax.Array]:
        k = self.steps_per_call
        place = getattr(self.step, "place_batch", lambda tree, stacked=False: tree)
        if k == 1:  # split over the devices (of every process) before the clock starts
            batch = place(self.sampler.batch(i))
            return jax.block_until_ready((batch, step_keys(self.noise_key, i, 1)))
        batches = [self.sampler.batch(i * k + j) for j in range(k)]
        stacked = Batch(*(None if parts[0] is None else jnp.stack(parts)
                          for parts in zip(*batches)))
        stacked = place(stacked, stacked=True)  # [K, B, ...]: the steps whole, each batch split
        return jax.block_until_ready((stacked, step_keys(self.noise_key, i, k)))

    @staticmethod
    def agree(value):
        """Process 0's decision (how many steps), so every process of a run takes it."""
        return distributed.agree(value)

    def _launch(self, inputs: tuple[Batch, jax.Array]) -> None:
        batch, key = inputs
        self.state = self.step(*self.state, batch.x, batch.y, key, batch.mask)

    def _wait(self) -> None:
        jax.block_until_ready(self.state)

    @staticmethod
    def _input_bytes(inputs: tuple[Batch, jax.Array]) -> int:
        return sum(leaf.nbytes for leaf in jax.tree.leaves(inputs[0]))


def _mean_loss_fn(model):
    @jax.jit
    def mean_loss(params, x, y):
        return jnp.mean(jax.vmap(model.loss, in_axes=(None, 0, 0))(params, x, y))
    return mean_loss


def build_sampler(cell: CellConfig, data, key: jax.Array
                  ) -> ShuffleSampler | PoissonSampler | ProcessRows:
    """The batch sampler of a cell: shuffled fixed-size batches or padded Poisson batches;
    in a run of several processes, this process's part of each
    (:class:`ablation.data.samplers.ProcessRows`, :func:`ablation.data.samplers.process_poisson`).

    Split over ``cell.global_devices``: a fixed batch must divide by them (else a one-line
    error); a Poisson batch's padded capacity is rounded up to a multiple of each process's
    devices (more masked slots).
    """
    n = cell.global_devices
    index, count = jax.process_index(), cell.processes
    if cell.dp.sampling == "poisson":
        if count > 1:
            return process_poisson(data, cell.batch_size, key, index, count,
                                   cell.dp.capacity_sigmas, cell.devices)
        capacity = poisson_capacity(cell.batch_size, data.size, cell.dp.capacity_sigmas, n)
        return PoissonSampler(data, cell.batch_size, key, capacity)
    if cell.batch_size % n:
        raise ValueError(f"batch_size {cell.batch_size} does not divide over {n} devices")
    sampler = ShuffleSampler(data, cell.batch_size, key)
    return ProcessRows(sampler, index, count) if count > 1 else sampler


def build_step(cell: CellConfig, model: Model, noise_multiplier: float, *,
               clipped_sum: Callable | None = None, engine: str | None = None,
               donate: bool = True, lr: float | None = None) -> tuple[Step, Any]:
    """The cell's step and its optimizer (SGD at ``lr``, the cell's unless given; ``donate``
    lets the compiled step reuse the state's buffers, for runs that never read them again).

    Under Poisson sampling the clipped sum is divided by the EXPECTED batch size ``B = q·n``
    (the DP-SGD estimator whose noise the accountant assumes), never by the padded capacity.
    """
    optimizer = sgd(cell.lr if lr is None else lr)
    dp = DPConfig(cell.dp.clip_norm, noise_multiplier) if cell.private else None
    poisson = cell.dp.sampling == "poisson"
    resolved = get_engine(engine or cell.engine, cell.loop,
                          None if engine else cell.engine_mode, cell.ghost_fallback)
    step = make_step(resolved, model.loss, optimizer, dp, donate=donate,
                     expected_batch_size=cell.batch_size if poisson else None,
                     steps_per_call=cell.steps_per_call, devices=cell.global_devices,
                     clipped_sum=clipped_sum)
    return step, optimizer


def time_cell(cell: CellConfig, noise_multiplier: float, *, clipped_sum: Callable | None = None,
              engine: str | None = None) -> dict[str, Any]:
    """Time one JAX cell in this process; returns the record's measurement fields.

    ``noise_multiplier`` is the σ to train with (already calibrated when a target ε was set).
    A reference row of another JAX library passes its ``clipped_sum`` and the ``engine`` whose
    compiled step it runs in (see :func:`ablation.core.dpsgd.make_step`).
    """
    model = model_of(cell)
    keys = run_keys(cell.seed)
    data = training_set_of(cell, model, keys.data)
    sampler = build_sampler(cell, data, keys.sampler)
    step, optimizer = build_step(cell, model, noise_multiplier, clipped_sum=clipped_sum,
                                 engine=engine)

    params = model.init(keys.init)  # the same on every process: the same key
    state = step.place_state((params, optimizer.init(params)))
    n_params = count_params(params)
    mean_loss = _mean_loss_fn(model)
    eval_x, eval_y = data.x[:EVAL_EXAMPLES], data.y[:EVAL_EXAMPLES]
    loss_start = float(mean_loss(params, eval_x, eval_y))

    k = cell.steps_per_call
    if k > sampler.steps_per_epoch:
        raise ValueError(f"train.steps_per_call={k} exceeds the {sampler.steps_per_epoch} steps "
                         "of an epoch")
    if k > 1 and cell.timing.mode == "epochs" and sampler.steps_per_epoch % k:
        raise ValueError(f"timing.mode=epochs needs train.steps_per_call={k} to divide the "
                         f"{sampler.steps_per_epoch} steps of an epoch")
    clock = JaxClock(step, state, sampler, keys.noise, steps_per_call=k)
    first, first_keys = clock._inputs(0)
    compile_s = step.compile(*state, first.x, first.y, first_keys, first.mask)
    fields = run_timing_loop(clock, cell.timing, sampler.steps_per_epoch // k,
                             f"{cell.engine} {cell.model} B={cell.batch_size}")
    if k > 1:
        fields = per_step(fields, k, sampler.steps_per_epoch)

    if cell.timing.cost_split and supports_cost_split(cell):
        fields["cost_split_s"] = measure_cost_split(
            cell, model, noise_multiplier, optimizer, clock.state, sampler, keys.noise,
            budget_s=cell.timing.budget_s,
            expected_batch_size=cell.batch_size if cell.dp.sampling == "poisson" else None)
    if cell.processes > 1:
        fields.update(_across_processes(fields, clock.state[0]))
    params_end = distributed.local_copy(clock.state[0])
    if cell.private and noise_multiplier > 0:
        fields["noise_step_s"] = noise_seconds(params_end, keys.noise, noise_multiplier)
        # The yardstick: no exact private step goes below non-private + this draw.
        rates = gaussian_rates(n_params)
        fields.update(gaussian_ns=rates, noise_floor_s=noise_floor_s(n_params, rates))
    loss_end = float(mean_loss(params_end, eval_x, eval_y))
    if cell.data == "real":
        fields["test_accuracy"] = _test_accuracy(model, params_end, cell)
    fields.update(
        n_params=n_params, n_train=data.size, steps_per_epoch=sampler.steps_per_epoch,
        compile_s=compile_s, n_compiles=step.n_compiles,
        compiled_functions=step.compiled_functions, loss_start=loss_start, loss_end=loss_end,
        device_peak_bytes=_device_peak_bytes(),
    )
    if isinstance(sampler, PoissonSampler):
        fields.update(sampler.stats())
    if step.engine.ghost is not None and cell.private:  # how each layer was clipped
        from ablation.core.clipping import layer_rules
        rows = first.x.shape[first.x.ndim - data.x.ndim] // cell.global_devices  # a device's
        fields["ghost_rules"] = layer_rules(model.loss, params, data.x[0], data.y[0],
                                            cell.ghost_fallback, batch_size=rows)
    return fields


def _across_processes(fields: dict[str, Any], params: Any) -> dict[str, Any]:
    """A run's timing is its slowest process's: each process's median and throughput per
    step (``process_step_s``, ``process_throughput_s``), the run's the largest of them. And
    the parameters' hash on every process (``process_params_sha``), which must agree: the
    noise is drawn from one key on every device."""
    import hashlib

    import numpy as np
    own = [fields.get("median_step_s") or np.nan, fields.get("throughput_step_s") or np.nan,
           jax.local_device_count()]
    every = distributed.gather(own)  # [processes, 3]
    leaves = jax.tree.leaves(distributed.local_copy(params))
    digest = hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in leaves)).digest()
    hashes = distributed.gather(np.frombuffer(digest[:8], np.uint16).astype(np.float64))
    out = {"process_step_s": [float(v) for v in every[:, 0]],
           "process_throughput_s": [float(v) for v in every[:, 1]],
           "process_devices": [int(v) for v in every[:, 2]],
           "process_params_sha": ["".join(f"{int(h):04x}" for h in row) for row in hashes],
           "median_step_s": float(np.nanmax(every[:, 0])),
           "throughput_step_s": float(np.nanmax(every[:, 1]))}
    if fields.get("epoch_estimated"):
        out["median_epoch_s"] = fields["median_epoch_s"] / fields["throughput_step_s"] * \
            out["throughput_step_s"]
    return out


def noise_seconds(params, key: jax.Array, noise_multiplier: float, calls: int = 20) -> float:
    """Seconds per step that drawing the Gaussian noise alone takes (compiled, back to back):
    the part of a private step no clipping method can remove."""
    from ablation.core.noise import add_noise
    draw = jax.jit(lambda p, k, i: add_noise(p, jax.random.fold_in(k, i), noise_multiplier))
    jax.block_until_ready(draw(params, key, 0))
    start = time.perf_counter()
    out = None
    for i in range(calls):
        out = draw(params, key, i)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def per_step(fields: dict[str, Any], k: int, steps_per_epoch: int) -> dict[str, Any]:
    """Timing fields of calls of ``k`` steps, restated per step (``steps_timed`` stays the count
    of timed calls, ``steps_per_call`` says so; an estimated epoch is ``steps_per_epoch`` steps).
    """
    out = dict(fields)
    for key in ("first_step_s", "median_step_s", "iqr_step_s", "throughput_step_s"):
        if out.get(key) is not None:
            out[key] = out[key] / k
    for key in ("step_times_s", "throughput_bursts_s"):
        if out.get(key) is not None:
            out[key] = [v / k for v in out[key]]
    out["steps_run"] = fields["steps_run"] * k
    if out.get("epoch_estimated"):
        out["median_epoch_s"] = steps_per_epoch * out["throughput_step_s"]
    return out


def _test_accuracy(model, params, cell: CellConfig) -> float | None:
    """Accuracy on the real test split (None where the dataset has none, e.g. Adult)."""
    from ablation.data import datasets
    try:
        x, y = datasets.load(model.dataset.name, split="test", cache_dir=cell.data_cache_dir,
                             download=cell.download)
    except datasets.DatasetUnavailable:
        return None
    predict = jax.jit(model.predict)
    correct = 0
    for start in range(0, len(x), EVAL_EXAMPLES):
        chunk = jax.device_put(x[start:start + EVAL_EXAMPLES])
        labels = jnp.asarray(y[start:start + EVAL_EXAMPLES])
        correct += int(jnp.sum(predict(params, chunk) == labels))
    return correct / len(x)


def _device_peak_bytes() -> int | None:
    """Peak bytes in use on this process's first device (GPUs report it; CPUs do not)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")
