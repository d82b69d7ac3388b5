#!/usr/bin/env python3
"""The conv rule's forms for every conv layer of the paper's cnn and cifar10 nets, timed side
by side (interleaved rounds, medians) in one process, then the whole ghost clipped sum with the
flop model's forms against the measured ones.

    scripts/bench_conv_rules.py [--batch 64 256] [--rounds 5]

Each form computes what a step needs from the layer: the per-example squared norms and the
clipped sum (the materialised form from its per-example gradients, the Gram form by the
book-keeping VJP). ``written`` writes the patches out, ``views`` keeps one strided view per
kernel offset (:mod:`ablation.core.rules.patches`). ``model`` marks the form the flop count picks
(what the rule did before it measured), ``best`` the fastest here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_conv_rules.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    import jax

    from ablation.core.autotune import medians_ms
    import jax.numpy as jnp

    from ablation.core import clipping
    from ablation.core.clipping import ghost_clipped_sum
    from ablation.core.rules import conv, dense
    from models import get_model

    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; median ms per call")
    for name in ("cnn", "cifar10"):
        model = get_model(name)
        params = model.init(jax.random.key(0))
        for batch in args.batch:
            x = jax.random.uniform(jax.random.key(1), (batch, *model.dataset.input_shape))
            y = jnp.zeros(batch, jnp.int32)
            os.environ[conv.CONV_FORMS_ENV] = "model"
            plan = clipping._plan(model.loss, params, x[0], y[0], "error")
            for scope, tap in plan.layers.items():
                if tap.kind != "conv":
                    continue
                ins = (batch, *plan.input_shapes[scope])
                outs = (batch, *plan.output_shapes[scope].shape)
                _, model_form, _ = conv.conv_form(tap, ins, outs)
                calls = {}
                for layout in conv.LAYOUTS:
                    for form in dense.FORMS:
                        run = _layer_call(conv, tap, ins, outs, layout, form)
                        calls[f"{layout}/{form}"] = run
                ms = medians_ms(calls, rounds=args.rounds, round_s=0.05)
                best = min(ms, key=ms.get)
                cells = "  ".join(f"{k}={v:.2f}" for k, v in ms.items())
                print(f"{name} B={batch} {scope} in {ins[2:]} out {outs[2:]}: {cells}  "
                      f"model=written/{model_form} best={best} "
                      f"(model/best {ms[f'written/{model_form}'] / ms[best]:.2f}x)", flush=True)
            steps = {}
            for choice in conv.CONV_FORM_CHOICES:
                os.environ[conv.CONV_FORMS_ENV] = choice
                compiled = jax.jit(lambda p, x, y: ghost_clipped_sum(model.loss, p, x, y, 1.0)
                                   ).lower(params, x, y).compile()
                steps[choice] = (lambda c: lambda: jax.block_until_ready(c(params, x, y)))(
                    compiled)
            ms = medians_ms(steps, rounds=args.rounds, round_s=0.05)
            print(f"{name} B={batch} whole clipped sum: model {ms['model']:.2f}, measured "
                  f"{ms['measured']:.2f} (measured/model {ms['measured'] / ms['model']:.2f}x)",
                  flush=True)
    return 0


def _layer_call(conv, tap, ins, outs, layout, form):
    """A compiled call of one layer's norms and clipped sum in the given layout and form."""
    import jax
    import jax.numpy as jnp

    inputs = jax.random.normal(jax.random.key(2), ins)
    grads = jax.random.normal(jax.random.key(3), outs)
    c = jnp.linspace(0.1, 1.0, ins[0])

    def run(inputs, grads, c):
        return conv.conv_layer_work(tap, inputs, grads, c, layout, form)

    compiled = jax.jit(run)
    return lambda: jax.block_until_ready(compiled(inputs, grads, c))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
