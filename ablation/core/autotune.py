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
    best = {name: float("inf") for name in compiled}
    start_all = time.perf_counter()
    for _ in range(ROUNDS):
        for name, fn in compiled.items():
            calls, start = 0, time.perf_counter()
            while True:
                jax.block_until_ready(fn(*inputs))
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= ROUND_S:
                    break
            best[name] = min(best[name], elapsed / calls)
        if time.perf_counter() - start_all > BUDGET_S:  # slow candidates: one round will do
            break
    name = min(best, key=best.get) if best else default
    _CHOSEN[key] = (name, best)
    return name


def choices() -> dict[Hashable, tuple[str, dict[str, float]]]:
    """Every choice made in this process: ``{key: (name, {candidate: seconds per call})}``."""
    return dict(_CHOSEN)


def forget() -> None:
    """Drop every cached choice (tests)."""
    _CHOSEN.clear()
