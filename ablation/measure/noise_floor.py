"""The noise floor: what no exact DP-SGD step can go below.

Every private step draws one Gaussian value per parameter. However fast its clipping, a step
costs at least the non-private step plus that draw at the fastest Gaussian generator the
machine has; so the fair yardstick of a private step is ``non-private + floor``, not the
non-private step alone (for a model of 160k parameters and a 0.4 ms step, the draw is as much
again). :func:`gaussian_rates` times, on the model's own parameter count and in the same
process as the cell, each generator at hand: the fused threefry draw the step uses
(:func:`ablation.core.noise.add_noise`, added to a sum as in the step), NumPy's
``standard_normal`` (float32, one thread) and, where PyTorch is installed, ``torch.randn``
(one thread, its fastest). :func:`noise_floor_s` is the parameter count at the fastest.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Callable

import numpy as np

#: Rounds per generator; the median is kept (each round draws every parameter once).
ROUNDS = 7


def _median_s(draw: Callable[[], object], rounds: int = ROUNDS) -> float:
    draw()  # warm: compile, allocate
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        draw()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def gaussian_rates(n: int) -> dict[str, float]:
    """Nanoseconds per Gaussian value of each generator at hand, drawing ``n`` float32 values
    (``n`` = the model's parameter count): ``jax`` (the step's fused draw), ``numpy`` and
    ``torch`` (where installed)."""
    import jax
    import jax.numpy as jnp

    from ablation.core.noise import add_noise
    n = max(int(n), 1)
    rates: dict[str, float] = {}
    zeros = jnp.zeros((n,), jnp.float32)
    fused = jax.jit(lambda s, k: add_noise(s, k, 1.0))
    key = jax.random.key(0)
    rates["jax"] = _median_s(lambda: fused(zeros, key).block_until_ready()) / n * 1e9
    rng = np.random.default_rng(0)
    rates["numpy"] = _median_s(lambda: rng.standard_normal(n, dtype=np.float32)) / n * 1e9
    if importlib.util.find_spec("torch") is not None:
        import torch
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            out = torch.empty(n)
            rates["torch"] = _median_s(lambda: torch.randn(n, out=out)) / n * 1e9
        finally:
            torch.set_num_threads(threads)
    return rates


def noise_floor_s(n_params: int, rates: dict[str, float]) -> float:
    """Seconds a step's noise takes at the fastest of ``rates`` (ns per value)."""
    return n_params * min(rates.values()) * 1e-9
