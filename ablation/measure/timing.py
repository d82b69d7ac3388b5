"""Timing one cell honestly: compile apart, warm-up apart, every step ended on the device.

What is timed, exactly:

* ``compile_s`` — the ahead-of-time ``lower().compile()`` of the step's compiled functions
  (the whole step for ``both``/jit-unrolled/jit-scan; zeros + batch-1 accumulate + finish for
  jit-dispatch); None for ``vmap``/``none``, where nothing is compiled ahead.
* ``first_step_s`` — the first call after that (first-run allocation; for the eager engines also
  JAX's one-off compilation of each primitive's small kernel).
* steady state — each later step from just before the call until ``jax.block_until_ready`` on
  the returned parameters and optimizer state. The batch (drawn on the device by a compiled
  sampler) and the step's key are ready before the clock starts, so no input work is timed.

``budget`` mode runs up to ``max_steps`` steady steps or ``budget_s`` seconds (at least
``min_steps``) and estimates an epoch as ``steps_per_epoch × median step``; ``epochs`` mode
runs full passes, reports the first epoch apart and the median of the others. An epoch's time
is the sum of its steps' times.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ablation.core.dpsgd import DPConfig, make_step, sgd
from ablation.core.engines import get_engine
from ablation.data.samplers import (
    Batch,
    PoissonSampler,
    ShuffleSampler,
    load_training_set,
    poisson_capacity,
)
from ablation.measure.settings import CellConfig, TimingConfig
from models import count_params, get_model

EVAL_EXAMPLES = 1024


def robust_stats(times: list[float]) -> dict[str, float | None]:
    """Median and inter-quartile range of ``times`` (seconds)."""
    if not times:
        return {"median": None, "iqr": None}
    q1, q3 = np.percentile(times, [25, 75]) if len(times) > 1 else (times[0], times[0])
    return {"median": float(statistics.median(times)), "iqr": float(q3 - q1)}


class Progress:
    """A tqdm bar on stderr (or nothing), updated once per step."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, unit="step", mininterval=0.5, leave=False,
                             dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class StepClock:
    """Runs a step on prepared inputs and returns its wall time, blocked on the new state."""

    def __init__(self, step: Callable, state: tuple, sampler, base_key: jax.Array):
        self.step = step
        self.state = state
        self.sampler = sampler
        self.base_key = base_key
        self.index = 0

    def _prepare(self) -> tuple[Batch, jax.Array]:
        batch = self.sampler.batch(self.index)
        key = jax.random.fold_in(self.base_key, self.index)
        jax.block_until_ready((batch, key))
        return batch, key

    def tick(self) -> float:
        batch, key = self._prepare()
        start = time.perf_counter()
        state = self.step(*self.state, batch.x, batch.y, key, batch.mask)
        jax.block_until_ready(state)
        elapsed = time.perf_counter() - start
        self.state = state
        self.index += 1
        return elapsed


def run_timing_loop(tick: Callable[[], float], t: TimingConfig, steps_per_epoch: int,
                    desc: str) -> dict[str, Any]:
    """Drive ``tick`` (one timed step, returns seconds) as ``t`` says; the timing fields.

    Shared by every framework: the JAX engines and the PyTorch/Opacus reference rows.
    """
    spe = steps_per_epoch
    fields: dict[str, Any] = {}
    if t.mode == "budget":
        bar = Progress(1 + t.warmup_steps + t.max_steps, desc, t.progress)
        first_step_s = tick()
        bar.update()
        for _ in range(t.warmup_steps):
            tick()
            bar.update()
        steps: list[float] = []
        started = time.perf_counter()
        while len(steps) < t.max_steps and (len(steps) < t.min_steps
                                            or time.perf_counter() - started < t.budget_s):
            steps.append(tick())
            bar.update()
        bar.close()
        stats = robust_stats(steps)
        fields.update(first_step_s=first_step_s, step_times_s=steps, epoch_times_s=None,
                      first_epoch_s=None, median_epoch_s=spe * stats["median"],
                      epoch_estimated=True)
    else:
        bar = Progress(t.epochs * spe, desc, t.progress)
        epoch_times, steps, first_step_s = [], [], None
        for epoch in range(t.epochs):
            epoch_steps = []
            for i in range(spe):
                dt = tick()
                bar.update()
                epoch_steps.append(dt)
                if epoch == 0 and i == 0:
                    first_step_s = dt
                elif epoch > 0 or i > t.warmup_steps:
                    steps.append(dt)
            epoch_times.append(float(sum(epoch_steps)))
        bar.close()
        stats = robust_stats(steps)
        rest = epoch_times[1:] or epoch_times
        fields.update(first_step_s=first_step_s, step_times_s=steps, epoch_times_s=epoch_times,
                      first_epoch_s=epoch_times[0], median_epoch_s=float(statistics.median(rest)),
                      epoch_estimated=False)
    fields.update(median_step_s=stats["median"], iqr_step_s=stats["iqr"], steps_timed=len(steps))
    return fields


def _mean_loss_fn(model):
    @jax.jit
    def mean_loss(params, x, y):
        return jnp.mean(jax.vmap(model.loss, in_axes=(None, 0, 0))(params, x, y))
    return mean_loss


def build_sampler(cell: CellConfig, data) -> ShuffleSampler | PoissonSampler:
    """The batch sampler of a cell: shuffled fixed-size batches or padded Poisson batches."""
    if cell.dp.sampling == "poisson":
        capacity = poisson_capacity(cell.batch_size, data.size, cell.dp.capacity_sigmas)
        return PoissonSampler(data, cell.batch_size, cell.seed, capacity)
    return ShuffleSampler(data, cell.batch_size, cell.seed)


def time_cell(cell: CellConfig, noise_multiplier: float) -> dict[str, Any]:
    """Time one JAX cell in this process; returns the record's measurement fields.

    ``noise_multiplier`` is the σ to train with (already calibrated when a target ε was set).
    """
    model = get_model(cell.model, unroll=cell.unroll)
    engine = get_engine(cell.engine, cell.loop)
    data = load_training_set(model.dataset, cell.data, seed=cell.seed, limit=cell.data_limit,
                             cache_dir=cell.data_cache_dir, download=cell.download)
    sampler = build_sampler(cell, data)
    poisson = isinstance(sampler, PoissonSampler)
    optimizer = sgd(cell.lr)
    dp = DPConfig(cell.dp.clip_norm, noise_multiplier) if cell.private else None
    step = make_step(engine, model.loss, optimizer, dp, donate=True,
                     expected_batch_size=cell.batch_size if poisson else None)

    init_key, step_key = jax.random.split(jax.random.key(cell.seed))
    params = model.init(init_key)
    state = (params, optimizer.init(params))
    n_params = count_params(params)
    mean_loss = _mean_loss_fn(model)
    eval_x, eval_y = data.x[:EVAL_EXAMPLES], data.y[:EVAL_EXAMPLES]
    loss_start = float(mean_loss(params, eval_x, eval_y))

    first = sampler.batch(0)
    jax.block_until_ready(first)
    compile_s = step.compile(*state, first.x, first.y, step_key, first.mask)

    clock = StepClock(step, state, sampler, step_key)
    fields = run_timing_loop(clock.tick, cell.timing, sampler.steps_per_epoch,
                             f"{engine.name} {cell.model} B={cell.batch_size}")

    params_end = clock.state[0]
    loss_end = float(mean_loss(params_end, eval_x, eval_y))
    if cell.data == "real":
        fields["test_accuracy"] = _test_accuracy(model, params_end, cell)
    fields.update(
        n_params=n_params, n_train=data.size, steps_per_epoch=sampler.steps_per_epoch,
        compile_s=compile_s, steps_run=clock.index, n_compiles=step.n_compiles,
        compiled_functions=step.compiled_functions, loss_start=loss_start, loss_end=loss_end,
        device_peak_bytes=_device_peak_bytes(),
    )
    if poisson:
        fields.update(sampler.stats())
    return fields


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
        correct += int(jnp.sum(predict(params, chunk) == jnp.asarray(y[start:start + EVAL_EXAMPLES])))
    return correct / len(x)


def _device_peak_bytes() -> int | None:
    """Peak bytes in use on the first device (GPUs report it; the CPU client does not)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")
