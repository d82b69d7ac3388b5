#!/usr/bin/env python3
"""The cost of privacy on the example network (examples/my_model.py), side by side in one run.

    scripts/bench_own_model.py [--batches 64 256] [--calls 30]

For each batch size, in one process and interleaved call by call (so a shared machine's drift
hits every row alike): the non-private jit + vmap step (the batched gradient), private jit +
vmap, private ghost with every layer by its rule, and private ghost with the layer norms'
parameters through the fallback (``engine.fallback=materialise``, as a layer no rule covers
would be). Prints median ms per step (steps dispatched back to back) and the ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_own_model.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--calls", type=int, default=30, help="timed calls per row")
    args = parser.parse_args(argv)

    import haiku as hk
    import jax
    import numpy as np
    from my_model import small_transformer

    from ablation import DPConfig, make_step, sgd
    from ablation.core import taps

    model = small_transformer()
    spec = model.dataset
    params = model.init(jax.random.key(0))
    optimizer = sgd(0.1)
    dp = DPConfig(1.0, 1.1)

    from ablation import get_engine
    for batch in args.batches:
        x = jax.random.randint(jax.random.key(1), (batch, *spec.input_shape), 0, spec.vocab_size)
        y = jax.random.randint(jax.random.key(2), (batch,), 0, spec.num_classes)
        rows = {"non-private both": make_step("both", model.loss, optimizer, None),
                "private both": make_step("both", model.loss, optimizer, dp),
                "private ghost (rules)": make_step("ghost", model.loss, optimizer, dp)}
        step = make_step(get_engine("ghost", fallback="materialise"), model.loss, optimizer, dp)
        # Compiled (so planned) while hk.LayerNorm and hk.RMSNorm are unknown to the rules:
        # their parameters then go through the fallback, as a layer no rule covers would.
        saved = dict(taps._STOCK)
        for layer in (hk.LayerNorm, hk.RMSNorm):
            taps._STOCK.pop(layer)
        try:
            state = (params, optimizer.init(params))
            step.compile(*state, x, y, jax.random.key(3))
        finally:
            taps._STOCK.update(saved)
        rows["private ghost (norms by fallback)"] = step
        times = {name: [] for name in rows}
        for name, step in rows.items():
            state = (params, optimizer.init(params))
            if not step.executables:
                step.compile(*state, x, y, jax.random.key(3))
            jax.block_until_ready(step(*state, x, y, jax.random.key(3)))
        for i in range(args.calls):
            for name, step in rows.items():
                state = (params, optimizer.init(params))
                start = time.perf_counter()
                for j in range(5):  # back to back, blocked once
                    state = step(*state, x, y, jax.random.key(i * 5 + j))
                jax.block_until_ready(state)
                times[name].append((time.perf_counter() - start) / 5)
        base = np.median(times["non-private both"])
        rules = np.median(times["private ghost (rules)"])
        print(f"\nB={batch}, {model.name} ({sum(p.size for p in jax.tree.leaves(params)):,} "
              f"parameters), median of {args.calls} x 5 steps")
        for name, values in times.items():
            median = np.median(values)
            print(f"  {name:36s} {1e3 * median:9.2f} ms   x{median / base:5.2f} of non-private "
                  f"both   x{median / rules:5.2f} of ghost (rules)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
