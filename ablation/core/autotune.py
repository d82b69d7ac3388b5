"""Pick the fastest of several exact forms of a computation by timing them on this machine.

The ghost engine's conv rule has several exact forms (Gram or materialised, patches written out
or kept as views) whose relative cost on XLA:CPU follows no flop count: the same batched
product runs at 10 to 60 GFLOP/s depending on its shapes (``scripts/bench_conv_rules.py``). So
where it matters the rule times its candidates once, for the shapes at hand, while the step is
being traced, and keeps the fastest; every candidate is exact, so the choice moves only time.

Each candidate is compiled on its own (``jit(...).lower(specs).compile()``, which runs eagerly
even inside an outer trace), fed seeded normal inputs, and timed in interleaved rounds; the
least time of the rounds decides (the least is what a drifting machine distorts least). The
answer is cached for the process by ``key``, so a step traced twice chooses the same way, and
:func:`choices` lists what was chosen (the record's ``ghost_rules`` says it).
"""

from __future__ import annotations

import time
from typing import Callable, Hashable, Mapping, Sequence

import jax
import numpy as np

#: Interleaved rounds per candidate.
ROUNDS = 3
#: A round runs a candidate until this many seconds have passed (at least once).
ROUND_S = 0.02
#: No further rounds once a choice has taken this long (the candidates are slow, so their
#: differences are large next to the machine's drift).
BUDGET_S = 2.0

_CHOSEN: dict[Hashable, tuple[str, dict[str, float]]] = {}


def fastest(key: Hashable, candidates: Mapping[str, Callable[..., object]],
            specs: Sequence[jax.ShapeDtypeStruct], default: str) -> str:
    """The name of the fastest of ``candidates`` (functions of arrays shaped like ``specs``),
    measured once per ``key`` in this process. A candidate that fails to compile or run (out
    of memory, say) is out; if every one is, ``default``."""
    if key in _CHOSEN:
        return _CHOSEN[key][0]
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s.shape).astype(s.dtype) for s in specs]
    compiled = {}
    for name, fn in candidates.items():
        try:
            compiled[name] = jax.jit(fn).lower(*specs).compile()
            jax.block_until_ready(compiled[name](*inputs))  # first calls allocate
        except Exception:  # noqa: BLE001 (any failure just rules the candidate out)
            compiled.pop(name, None)
    rounds = interleaved_rounds(
        {name: (lambda fn=fn: jax.block_until_ready(fn(*inputs))) for name, fn in compiled.items()},
        rounds=ROUNDS, round_s=ROUND_S, budget_s=BUDGET_S)
    best = {name: min(times) for name, times in rounds.items()}
    name = min(best, key=best.get) if best else default
    _CHOSEN[key] = (name, best)
    return name


def interleaved_rounds(calls: Mapping[str, Callable[[], object]], *, rounds: int,
                       round_s: float, budget_s: float | None = None) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls`` (each blocks until its work is done), in
    ``rounds`` interleaved rounds: a round runs each call until ``round_s`` seconds have passed
    (at least once), so a drifting machine slows every candidate alike. No new round starts
    once ``budget_s`` seconds have passed. Warm the calls up (compile) first."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    start_all = time.perf_counter()
    for _ in range(rounds):
        for name, call in calls.items():
            count, start = 0, time.perf_counter()
            while True:
                call()
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= round_s:
                    break
            times[name].append(elapsed / count)
        if budget_s is not None and time.perf_counter() - start_all > budget_s:
            break
    return times


def medians_ms(calls: Mapping[str, Callable[[], object]], *, rounds: int,
               round_s: float = 0.05) -> dict[str, float]:
    """Milliseconds per call of each of ``calls`` (blocking), after one warm-up call each:
    the median of :func:`interleaved_rounds` (the benchmark scripts' timer)."""
    for call in calls.values():
        call()
    times = interleaved_rounds(calls, rounds=rounds, round_s=round_s)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def median_ms(fn: Callable[..., object], *args: object, rounds: int = 5,
              round_s: float = 0.05) -> float:
    """:func:`medians_ms` of ``jit(fn)(*args)`` alone."""
    compiled = jax.jit(fn)
    return medians_ms({"f": lambda: jax.block_until_ready(compiled(*args))}, rounds=rounds,
                      round_s=round_s)["f"]


def choices() -> dict[Hashable, tuple[str, dict[str, float]]]:
    """Every choice made in this process: ``{key: (name, {candidate: seconds per call})}``."""
    return dict(_CHOSEN)


def forget() -> None:
    """Drop every cached choice (tests)."""
    _CHOSEN.clear()
