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

import statistics
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ablation.core.dpsgd import DPConfig, Step, make_step, sgd
from ablation.core.engines import get_engine
from ablation.data.samplers import (Batch, PoissonSampler, ShuffleSampler, load_training_set,
                                    poisson_capacity, run_keys)
from ablation.measure.settings import CellConfig, TimingConfig
from models import Model, count_params, get_model

EVAL_EXAMPLES = 1024
#: Most bytes of inputs prepared ahead of one burst; beyond it, prepared batches are reused
#: (their values do not change a step's time). Epochs mode prepares a whole epoch when it fits.
BURST_INPUT_BYTES = 256 << 20
EPOCH_INPUT_BYTES = 1 << 30
#: Bursts of back-to-back steps in budget mode (the median over them is reported).
BURSTS = 3


def robust_stats(times: Sequence[float]) -> dict[str, float | None]:
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


class Clock(Protocol):
    """What the timing loop drives; one per framework (JAX here, PyTorch in the references)."""

    index: int

    def tick(self) -> float:
        """One step on prepared inputs, ended on the device: its wall seconds."""

    def burst(self, n: int, input_bytes: int) -> float:
        """``n`` steps back to back on inputs prepared before the clock starts, ended once on
        the device: their total wall seconds. At most ``input_bytes`` of inputs are held."""


class PreparedClock:
    """A :class:`Clock` from three callables, shared by every framework.

    ``prepare(i)`` makes the inputs of step ``i`` (and waits for them), ``run(inputs)`` launches
    one step without waiting, ``sync()`` waits until everything launched has finished.
    ``nbytes(inputs)`` sizes a prepared input, to bound what a burst holds.
    """

    def __init__(self, prepare: Callable[[int], Any], run: Callable[[Any], None],
                 sync: Callable[[], None], nbytes: Callable[[Any], int]):
        self._prepare, self._run, self._sync, self._nbytes = prepare, run, sync, nbytes
        self.index = 0
        self.reused_inputs = False

    def tick(self) -> float:
        inputs = self._prepare(self.index)
        self._sync()
        start = time.perf_counter()
        self._run(inputs)
        self._sync()
        elapsed = time.perf_counter() - start
        self.index += 1
        return elapsed

    def burst(self, n: int, input_bytes: int) -> float:
        first = self._prepare(self.index)
        pool = [first]
        room = max(1, input_bytes // max(1, self._nbytes(first)))
        for i in range(1, min(n, room)):
            pool.append(self._prepare(self.index + i))
        self.reused_inputs |= len(pool) < n
        inputs = [pool[i % len(pool)] for i in range(n)]
        self._sync()
        start = time.perf_counter()
        for item in inputs:
            self._run(item)
        self._sync()
        elapsed = time.perf_counter() - start
        self.index += n
        return elapsed


class JaxClock(PreparedClock):
    """The clock of a JAX step. Every step gets a fresh noise key, ``fold_in(noise_key, i)``;
    ``state`` holds the training state after the steps run so far."""

    def __init__(self, step: Callable, state: tuple, sampler, noise_key: jax.Array):
        self.step, self.state, self.sampler, self.noise_key = step, state, sampler, noise_key
        super().__init__(self._inputs, self._launch, self._wait, self._input_bytes)

    def _inputs(self, i: int) -> tuple[Batch, jax.Array]:
        return jax.block_until_ready((self.sampler.batch(i),
                                      jax.random.fold_in(self.noise_key, i)))

    def _launch(self, inputs: tuple[Batch, jax.Array]) -> None:
        batch, key = inputs
        self.state = self.step(*self.state, batch.x, batch.y, key, batch.mask)

    def _wait(self) -> None:
        jax.block_until_ready(self.state)

    @staticmethod
    def _input_bytes(inputs: tuple[Batch, jax.Array]) -> int:
        return sum(leaf.nbytes for leaf in jax.tree.leaves(inputs[0]))


def _budget(clock: Clock, t: TimingConfig, spe: int, bar: Progress) -> dict[str, Any]:
    steps: list[float] = []
    started = time.perf_counter()
    while len(steps) < t.max_steps and (len(steps) < t.min_steps
                                        or time.perf_counter() - started < t.budget_s):
        steps.append(clock.tick())
        bar.update()
    latency = robust_stats(steps)
    # Bursts within about the same budget: BURSTS runs of K back-to-back steps.
    k = int(min(t.max_steps, max(1, t.budget_s / (BURSTS * latency["median"]))))
    per_step = []
    for _ in range(BURSTS):
        per_step.append(clock.burst(k, BURST_INPUT_BYTES) / k)
        bar.update(k)
    throughput = float(statistics.median(per_step))
    return {"step_times_s": steps, "throughput_step_s": throughput, "throughput_steps": k,
            "throughput_bursts_s": per_step, "epoch_times_s": None, "first_epoch_s": None,
            "median_epoch_s": spe * throughput, "epoch_estimated": True}


def _epochs(clock: Clock, t: TimingConfig, spe: int, first_step_s: float,
            bar: Progress) -> dict[str, Any]:
    # The first epoch: the first step and warm-up (already run), latency steps, then the rest
    # back to back. It is reported apart; later epochs are whole bursts.
    done = 1 + t.warmup_steps
    steps = []
    while done < spe - 1 and len(steps) < t.min_steps:
        steps.append(clock.tick())
        bar.update()
        done += 1
    rest = spe - done
    first_epoch = first_step_s + sum(steps) + (clock.burst(rest, EPOCH_INPUT_BYTES) if rest > 0
                                               else 0.0)
    bar.update(max(rest, 0))
    epochs = [first_epoch]
    for _ in range(1, t.epochs):
        epochs.append(clock.burst(spe, EPOCH_INPUT_BYTES))
        bar.update(spe)
    later = epochs[1:]
    median_epoch = float(statistics.median(later)) if later else first_epoch
    return {"step_times_s": steps, "throughput_step_s": median_epoch / spe,
            "throughput_steps": spe if later else rest,
            "throughput_bursts_s": [e / spe for e in later], "epoch_times_s": epochs,
            "first_epoch_s": first_epoch, "median_epoch_s": median_epoch,
            "epoch_estimated": False}


def run_timing_loop(clock: Clock, t: TimingConfig, steps_per_epoch: int,
                    desc: str) -> dict[str, Any]:
    """Drive ``clock`` as ``t`` says; returns the record's timing fields.

    Shared by every framework: the JAX engines and the PyTorch/Opacus reference rows.
    """
    spe = steps_per_epoch
    if t.mode == "epochs" and spe < 2 + t.warmup_steps:
        raise ValueError(f"timing.mode=epochs needs more than {1 + t.warmup_steps} steps per "
                         f"epoch (the first and warm-up steps), got {spe}")
    total = (1 + t.warmup_steps + t.max_steps * (1 + BURSTS) if t.mode == "budget"
             else t.epochs * spe)
    bar = Progress(total, desc, t.progress)
    first_step_s = clock.tick()
    bar.update()
    for _ in range(t.warmup_steps):
        clock.tick()
        bar.update()
    fields = (_budget(clock, t, spe, bar) if t.mode == "budget"
              else _epochs(clock, t, spe, first_step_s, bar))
    bar.close()
    stats = robust_stats(fields["step_times_s"])
    fields.update(first_step_s=first_step_s, median_step_s=stats["median"],
                  iqr_step_s=stats["iqr"], steps_timed=len(fields["step_times_s"]),
                  steps_run=clock.index, inputs_reused=bool(getattr(clock, "reused_inputs",
                                                                    False)))
    return fields


def _mean_loss_fn(model):
    @jax.jit
    def mean_loss(params, x, y):
        return jnp.mean(jax.vmap(model.loss, in_axes=(None, 0, 0))(params, x, y))
    return mean_loss


def build_sampler(cell: CellConfig, data, key: jax.Array) -> ShuffleSampler | PoissonSampler:
    """The batch sampler of a cell: shuffled fixed-size batches or padded Poisson batches."""
    if cell.dp.sampling == "poisson":
        capacity = poisson_capacity(cell.batch_size, data.size, cell.dp.capacity_sigmas)
        return PoissonSampler(data, cell.batch_size, key, capacity)
    return ShuffleSampler(data, cell.batch_size, key)


def build_step(cell: CellConfig, model: Model, noise_multiplier: float) -> tuple[Step, Any]:
    """The cell's step and its optimizer.

    Under Poisson sampling the clipped sum is divided by the EXPECTED batch size ``B = q·n``
    (the DP-SGD estimator whose noise the accountant assumes), never by the padded capacity.
    """
    optimizer = sgd(cell.lr)
    dp = DPConfig(cell.dp.clip_norm, noise_multiplier) if cell.private else None
    poisson = cell.dp.sampling == "poisson"
    step = make_step(get_engine(cell.engine, cell.loop), model.loss, optimizer, dp, donate=True,
                     expected_batch_size=cell.batch_size if poisson else None)
    return step, optimizer


def time_cell(cell: CellConfig, noise_multiplier: float) -> dict[str, Any]:
    """Time one JAX cell in this process; returns the record's measurement fields.

    ``noise_multiplier`` is the σ to train with (already calibrated when a target ε was set).
    """
    model = get_model(cell.model, unroll=cell.unroll)
    keys = run_keys(cell.seed)
    data = load_training_set(model.dataset, cell.data, key=keys.data, limit=cell.data_limit,
                             cache_dir=cell.data_cache_dir, download=cell.download)
    sampler = build_sampler(cell, data, keys.sampler)
    step, optimizer = build_step(cell, model, noise_multiplier)

    params = model.init(keys.init)
    state = (params, optimizer.init(params))
    n_params = count_params(params)
    mean_loss = _mean_loss_fn(model)
    eval_x, eval_y = data.x[:EVAL_EXAMPLES], data.y[:EVAL_EXAMPLES]
    loss_start = float(mean_loss(params, eval_x, eval_y))

    first = sampler.batch(0)
    jax.block_until_ready(first)
    compile_s = step.compile(*state, first.x, first.y, keys.noise, first.mask)

    clock = JaxClock(step, state, sampler, keys.noise)
    fields = run_timing_loop(clock, cell.timing, sampler.steps_per_epoch,
                             f"{cell.engine} {cell.model} B={cell.batch_size}")

    params_end = clock.state[0]
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
