"""What a private ghost step costs, part by part, measured by taking the parts away.

The private step is timed beside three steps built from it, each with one more part removed,
all on the same batches, interleaved round by round so that a slow moment falls on every
variant alike:

========================  =========================================================
``full``                  the private step: norms, clipped sum, noise, update
``clipped``               the same without the noise draw (σ = 0)
``unclipped``             the same without the norms: every example weighted by 1
                          (:func:`~ablation.core.clipping.ghost_unclipped_sum`)
``non_private``           the engine's non-private step (the plain batch gradient)
========================  =========================================================

The parts are the differences: ``non_private``, ``clipped_sum = unclipped − non_private``
(the tapped pass and the weighted sums beyond the plain backward pass), ``norms = clipped −
unclipped``, ``noise = full − clipped``. They add up to ``full`` by construction; the test is
that ``full`` agrees with the cell's own throughput within its spread. Work a rule shares
between its norms and its sum (the embedding rule's grouping of repeated ids) counts as the
clipped sum. A part smaller than the spread can come out slightly negative: it is reported as
measured, not clamped.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import jax

from ablation.core.clipping import ghost_unclipped_sum
from ablation.core.dpsgd import DPConfig, make_step
from ablation.core.engines import get_engine
from ablation.measure.clock import robust_stats
from ablation.measure.settings import CellConfig
from models import Model

#: The variants, in the order the parts are taken from them.
VARIANTS = ("non_private", "unclipped", "clipped", "full")
#: The parts of a private step, in the order a reader adds them.
PARTS = ("non_private", "clipped_sum", "norms", "noise")
#: Interleaved rounds; each variant's time is its median over them.
ROUNDS = 5
#: Distinct batches the variants cycle through (prepared before the clock starts).
BATCHES = 4


def supports_cost_split(cell: CellConfig) -> bool:
    """A private, compiled, single-device ghost cell (the engine whose parts have names)."""
    return (cell.engine == "ghost" and cell.private and cell.devices == 1
            and cell.steps_per_call == 1)


def _steps(cell: CellConfig, model: Model, noise_multiplier: float, optimizer,
           expected_batch_size: int | None) -> dict[str, Callable]:
    engine = get_engine("ghost", mode=cell.engine_mode, fallback=cell.ghost_fallback)
    clip = cell.dp.clip_norm
    unclipped = functools.partial(_unclipped, mode=engine.ghost, fallback=cell.ghost_fallback)

    def step(dp, clipped_sum=None):
        return make_step(engine, model.loss, optimizer, dp, donate=False,
                         expected_batch_size=expected_batch_size, clipped_sum=clipped_sum)

    return {"non_private": step(None),
            "unclipped": step(DPConfig(clip, 0.0), clipped_sum=unclipped),
            "clipped": step(DPConfig(clip, 0.0)),
            "full": step(DPConfig(clip, noise_multiplier))}


def _unclipped(loss, params, x, y, clip_norm, mask, *, mode: str, fallback: str):
    del clip_norm  # the point: no norms, no clip factors
    return ghost_unclipped_sum(loss, params, x, y, mask, mode=mode, fallback=fallback)


def measure_cost_split(cell: CellConfig, model: Model, noise_multiplier: float, optimizer,
                       state: tuple, sampler, noise_key: jax.Array, *, budget_s: float,
                       expected_batch_size: int | None = None) -> dict[str, Any]:
    """``{part: seconds per step}`` for the parts of :data:`PARTS`, with ``step`` (the full
    step as timed here), ``variants`` (each variant's median), ``spread`` (the largest
    inter-quartile range over the rounds ÷ its median) and ``steps`` per burst.

    ``budget_s`` bounds the timed work (all variants and rounds together), after compiling.
    """
    steps = _steps(cell, model, noise_multiplier, optimizer, expected_batch_size)
    batches = [sampler.batch(i) for i in range(BATCHES)]
    keys = [jax.random.fold_in(noise_key, 10_000 + i) for i in range(BATCHES)]
    params, opt_state = state
    for step in steps.values():
        b = batches[0]
        step.compile(params, opt_state, b.x, b.y, keys[0], b.mask)
        jax.block_until_ready(step(params, opt_state, b.x, b.y, keys[0], b.mask))

    def burst(step, n: int) -> float:
        out = None
        start = time.perf_counter()
        for i in range(n):
            b = batches[i % BATCHES]
            out = step(params, opt_state, b.x, b.y, keys[i % BATCHES], b.mask)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / n

    once = burst(steps["full"], 1)
    n = max(1, min(2000, int(budget_s / (ROUNDS * len(VARIANTS) * max(once, 1e-6)))))
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(ROUNDS):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for variant in order:
            times[variant].append(burst(steps[variant], n))
    median = {v: statistics.median(t) for v, t in times.items()}
    spread = max(robust_stats(t)["iqr"] / median[v] for v, t in times.items() if median[v] > 0)
    return {"non_private": median["non_private"],
            "clipped_sum": median["unclipped"] - median["non_private"],
            "norms": median["clipped"] - median["unclipped"],
            "noise": median["full"] - median["clipped"],
            "step": median["full"], "variants": median, "spread": spread, "steps": n}

