"""The timing protocol every framework shares: latency, throughput, epochs, progress.

Framework-neutral (no JAX, no PyTorch): each framework supplies a :class:`Clock` (how to prepare
a step's inputs, launch a step and wait for the device), and :func:`run_timing_loop` measures
it the same way for all of them. What is measured is described in :mod:`ablation.measure.timing`.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ablation.measure.settings import TimingConfig

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
    """A tqdm bar on stderr when stderr is a terminal (a log file gets no carriage returns),
    else nothing; updated once per step."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self._bar = None
        if enabled and sys.stderr.isatty():
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


def _budget(clock: Clock, t: TimingConfig, spe: int, bar: Progress) -> dict[str, Any]:
    # A run of several processes takes process 0's decisions, so all run the same steps.
    agree = getattr(clock, "agree", lambda value: value)
    steps: list[float] = []
    started = time.perf_counter()
    while agree(bool(len(steps) < t.max_steps and (
            len(steps) < t.min_steps or time.perf_counter() - started < t.budget_s))):
        steps.append(clock.tick())
        bar.update()
    latency = robust_stats(steps)
    # Bursts within about the same budget: BURSTS runs of K back-to-back steps.
    k = agree(int(min(t.max_steps, max(1, t.budget_s / (BURSTS * latency["median"])))))
    per_step = []
    for _ in range(BURSTS):
        per_step.append(clock.burst(k, BURST_INPUT_BYTES) / k)
        bar.update(k)
    throughput = float(statistics.median(per_step))
    return {"step_times_s": steps, "throughput_step_s": throughput, "throughput_steps": k,
            "throughput_bursts_s": per_step, "epoch_times_s": None, "first_epoch_s": None,
            "median_epoch_s": spe * throughput, "epoch_estimated": True}


def _epochs(clock: Clock, t: TimingConfig, spe: int, before_s: float,
            bar: Progress) -> dict[str, Any]:
    # The first epoch: the first step and the warm-up (already run, ``before_s`` seconds),
    # latency steps, then the rest back to back. It is reported apart; later epochs are whole
    # bursts.
    done = 1 + t.warmup_steps
    steps = []
    while done < spe - 1 and len(steps) < t.min_steps:
        steps.append(clock.tick())
        bar.update()
        done += 1
    rest = spe - done
    first_epoch = before_s + sum(steps) + (clock.burst(rest, EPOCH_INPUT_BYTES) if rest > 0
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
    warmup_s = 0.0
    for _ in range(t.warmup_steps):
        warmup_s += clock.tick()
        bar.update()
    fields = (_budget(clock, t, spe, bar) if t.mode == "budget"
              else _epochs(clock, t, spe, first_step_s + warmup_s, bar))
    bar.close()
    stats = robust_stats(fields["step_times_s"])
    fields.update(first_step_s=first_step_s, median_step_s=stats["median"],
                  iqr_step_s=stats["iqr"], steps_timed=len(fields["step_times_s"]),
                  steps_run=clock.index, inputs_reused=bool(getattr(clock, "reused_inputs",
                                                                    False)))
    return fields
