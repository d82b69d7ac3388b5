#!/usr/bin/env python3
"""Where private `ghost` loses to plain PyTorch's non-private step, part by part, on the cnn,
the cifar10 net and the lstm.

    scripts/profile_ghost_step.py [--model cnn cifar10 lstm] [--batch 256] [--calls 7]

Rows, each compiled with jax.jit (XLA) or run eagerly in PyTorch with the same threads, timed
interleaved call by call (medians, ms):

* ``forward``: the summed loss of the batch.
* ``non-private gradient``: its gradient (``both`` / ``loss.backward()``).
* ``ghost: tapped pass``: what the ghost engine's backward pass computes, every tapped layer's
  input and output gradient per example, without any weight gradient.
* ``ghost: clipped sum``: the tapped pass, every layer's norms and the clipped sum (the
  private step without its noise and update).
* one row per layer (conv layers; the lstm's recurrence): the layer alone at its shapes in the
  model, forward and backward (the gradient of its output's sum with respect to its
  parameters and its input), in both stacks.

The parts do not add up to the whole (XLA fuses across them); they say which part XLA:CPU
loses on, and what the ghost engine adds over XLA's own gradient.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/profile_ghost_step.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["cnn", "cifar10", "lstm"],
                        choices=["cnn", "cifar10", "lstm"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--calls", type=int, default=7)
    args = parser.parse_args(argv)

    import jax

    from ablation.core.autotune import medians_ms
    import torch

    print(f"jax {jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; B={args.batch}; median ms")
    for name in args.model:
        rows = _rows(name, args.batch)
        calls = {(part, stack): fn for part, fns in rows.items()
                 for stack, fn in fns.items() if fn is not None}
        ms = medians_ms(calls, rounds=args.calls, round_s=0.0)  # one call per round
        print(f"\n{name}")
        print(f"{'part':<44} {'XLA:CPU':>9} {'PyTorch':>9} {'XLA / PyTorch':>14}")
        for part, fns in rows.items():
            a, b = ms.get((part, "xla")), ms.get((part, "torch"))
            ratio = f"{a / b:>13.2f}x" if a is not None and b is not None else ""
            fmt = lambda v: f"{v:>9.2f}" if v is not None else f"{'':>9}"  # noqa: E731
            print(f"{part:<44} {fmt(a)} {fmt(b)} {ratio}")
    return 0


def _rows(name: str, batch: int) -> dict[str, dict]:
    """``{part: {"xla": call, "torch": call or None}}`` for one model."""
    import haiku as hk
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from ablation.core import clipping
    from ablation.reference import torch_nets
    from models import get_model, nets

    model = get_model(name)
    key = jax.random.key(0)
    spec = model.dataset
    x = (jax.random.randint(key, (batch, *spec.input_shape), 0, 10_000) if spec.vocab_size
         else jax.random.uniform(key, (batch, *spec.input_shape)))
    y = jax.random.randint(key, (batch,), 0, spec.num_classes)
    params = model.init(key)

    def run(fn, *a):
        compiled = jax.jit(fn).lower(*a).compile()
        return lambda: jax.block_until_ready(compiled(*a))

    # The batch is an argument, never a closed-over constant: XLA would fold everything that
    # depends on it alone (the conv patches) into the executable and flatter the ghost rows.
    total = lambda p, x, y: jnp.sum(model.loss.batch_losses(p, x, y))  # noqa: E731
    tapped = lambda p, x, y: clipping._tapped_pass(model.loss, p, x, y)[1:3]  # noqa: E731
    clipped = lambda p, x, y: clipping.ghost_clipped_sum(model.loss, p, x, y, 1.0)  # noqa: E731

    net = torch_nets.build(name, dp_lstm=False)
    if name != "lstm":  # values do not change the time; nn.LSTM's layout differs from DPLSTM's
        torch_nets.load_haiku_params(net, params, name)
    tx = torch.tensor(np.asarray(x))
    tx = tx.long() if spec.vocab_size else tx
    ty = torch_nets.targets_for(name, torch.tensor(np.asarray(y)).long())
    criterion = torch_nets.criterion_for(name)

    def torch_forward():
        with torch.no_grad():
            criterion(net(tx), ty)

    def torch_grad():
        net.zero_grad(set_to_none=True)
        criterion(net(tx), ty).backward()

    rows = {"forward": {"xla": run(total, params, x, y), "torch": torch_forward},
            "non-private gradient": {"xla": run(jax.grad(total), params, x, y), "torch": torch_grad},
            "ghost: tapped pass (no weight gradients)": {"xla": run(tapped, params, x, y),
                                                         "torch": None},
            "ghost: clipped sum (tapped pass, norms, sum)": {"xla": run(clipped, params, x, y),
                                                             "torch": None}}

    def layer_rows(fn, x_layer, module, tx_layer):
        net_ = hk.without_apply_rng(hk.transform(fn))
        p = net_.init(key, x_layer)
        grad = jax.grad(lambda p, a: jnp.sum(net_.apply(p, a)), argnums=(0, 1))
        tx_layer = tx_layer.detach().requires_grad_(True)

        def torch_call():
            module.zero_grad(set_to_none=True)
            tx_layer.grad = None
            out = module(tx_layer)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
        return {"xla": run(grad, p, x_layer), "torch": torch_call}

    plan = clipping._plan(model.loss, params, x[0], y[0], "error")
    for scope, tap in plan.layers.items():
        shape = (batch, *plan.input_shapes[scope][1:])
        a = jax.random.normal(key, shape)
        if tap.kind == "conv":
            o = tap.options
            out = plan.output_shapes[scope].shape[-1]
            k, s = o["filter_shape"], o["window_strides"]
            conv = lambda v, k=k, s=s, out=out, pad=o["padding"]: hk.Conv2D(  # noqa: E731
                out, k, stride=s, padding=pad)(v)
            pads = (jax.lax.padtype_to_pads(shape[1:-1], k, s, o["padding"])
                    if isinstance(o["padding"], str) else o["padding"])
            tpad = tuple(lo for lo, _ in pads)  # the paper's layers pad symmetrically
            module = torch.nn.Sequential(torch_nets.NHWCToNCHW(),
                                         torch.nn.Conv2d(shape[-1], out, k, s, tpad))
            rows[f"{scope} {shape[1:]} -> {out}, k={k[0]}, s={s[0]}"] = layer_rows(
                conv, a, module, torch.tensor(np.asarray(a)))
        elif name == "lstm" and scope.startswith("lstm"):
            features = 100
            seq = jax.random.normal(key, (batch, x.shape[1], features))
            rows["lstm recurrence (256 steps, 100 -> 100)"] = layer_rows(
                lambda v: nets.LSTM(100, name="lstm")(v), seq,
                torch.nn.LSTM(features, 100, batch_first=True), torch.tensor(np.asarray(seq)))
    return rows


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
