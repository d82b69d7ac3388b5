#!/usr/bin/env python3
"""The Gaussian noise draw, side by side in one process: ours, JAX's, and PyTorch's.

    scripts/bench_noise.py [--sizes 5352 160370 605226] [--calls 300]

Rows, each a compiled function of the parameters and a key, timed interleaved call by call
(median, so a shared machine's drift hits every row alike):
  jax.random.normal   the draw as the toolkit made it before: split the key per leaf, then
                      jax.random.normal (threefry with rolled loops on a CPU)
  threefry bits       jax.random.bits alone (the part of that draw that is the hash)
  ours                ablation.core.noise: the same values, the hash written out and fused
  ours + sum          what a step pays: add_noise(g, key, std) on a gradient of that size
  torch.randn         single-thread PyTorch (torch.set_num_threads(1)), the draw alone
  torch add           g + std * randn, what Opacus' optimizer does
Then the fixed cost: a one-value draw less an empty compiled call of the same signature, and
a 20-leaf tree of one value each (the cost per leaf).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_seconds(calls: dict[str, callable], n: int) -> dict[str, float]:
    """One call per round (the noise draws are short next to a round's bookkeeping)."""
    from ablation.core.autotune import medians_ms
    return {name: ms / 1e3 for name, ms in medians_ms(calls, rounds=n, round_s=0.0).items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_noise.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5352, 160370, 605226],
                        help="values per draw (default: ffnn, embed, cifar10 parameters)")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    from ablation.core.noise import GENERATOR, add_noise, gaussian_like
    torch.set_num_threads(1)
    block = jax.block_until_ready

    def old_draw(tree, key):  # the pre-issue-25 add_noise's draw: a key per leaf
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [jax.random.normal(k, g.shape, g.dtype)
                                            for k, g in zip(keys, leaves)])

    print(f"noise generator: {GENERATOR}; jax {jax.__version__}, torch {torch.__version__} "
          f"(1 thread)\n")
    print(f"{'values':>9}  {'row':<18} {'us':>9} {'ns/value':>9}  {'÷ torch.randn':>13}")
    key = jax.random.key(0)
    generator = torch.Generator().manual_seed(0)
    for n in args.sizes:
        g = {"w": jnp.ones(n)}
        tg = torch.ones(n)
        fns = {
            "jax.random.normal": jax.jit(old_draw),
            "threefry bits": jax.jit(lambda t, k: jax.random.bits(k, t["w"].shape, jnp.uint32)),
            "ours": jax.jit(gaussian_like),
            "ours + sum": jax.jit(lambda t, k: add_noise(t, k, 1.1)),
        }
        calls = {name: (lambda f=f: block(f(g, key))) for name, f in fns.items()}
        calls["torch.randn"] = lambda: torch.randn(n, generator=generator)
        calls["torch add"] = lambda: tg + 1.1 * torch.randn(n, generator=generator)
        seconds = _median_seconds(calls, args.calls)
        for name, s in seconds.items():
            print(f"{n:>9,}  {name:<18} {s * 1e6:>9.1f} {s / n * 1e9:>9.2f}  "
                  f"{s / seconds['torch.randn']:>12.2f}x")
        print()

    one = {"w": jnp.ones(1)}
    many = {f"leaf{i:02d}": jnp.ones(1) for i in range(20)}
    empty, noised = jax.jit(lambda t, k: t), jax.jit(lambda t, k: add_noise(t, k, 1.1))
    calls = {"empty call": lambda: block(empty(one, key)),
             "1 value": lambda: block(noised(one, key)),
             "empty 20 leaves": lambda: block(empty(many, key)),
             "20 leaves": lambda: block(noised(many, key))}
    seconds = _median_seconds(calls, args.calls)
    print(f"fixed cost of a draw: {(seconds['1 value'] - seconds['empty call']) * 1e6:.1f} us; "
          f"per leaf: {(seconds['20 leaves'] - seconds['empty 20 leaves']) / 20 * 1e6:.2f} us "
          f"(one-value leaves, less an empty call of the same tree)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
