#!/usr/bin/env python3
"""Where the encoders' non-private step goes, in XLA:CPU and in PyTorch, part by part.

    scripts/profile_encoders.py [--model vit|transformer] [--batch 64] [--calls 20]

Each row is one part of models/attention.py's network, run forward and backward (the gradient
of the sum of its output with respect to its parameters and its input) at the shapes it has in
the model, compiled with jax.jit and in eager PyTorch with the same threads, interleaved call by
call (medians). The whole network's gradient is the first row; the parts do not add up to it
exactly (the whole fuses across parts), but they say which part XLA:CPU loses on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/profile_encoders.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["vit", "transformer"], default="vit")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)

    import haiku as hk
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from ablation.reference import torch_nets
    from models import MODELS, attention

    config = attention.TRANSFORMER if args.model == "transformer" else attention.VIT
    width, heads, batch = config["width"], config["heads"], args.batch
    steps = 256 if args.model == "transformer" else 64
    model = MODELS[args.model]
    key = jax.random.key(0)
    x_full = (jax.random.randint(key, (batch, *model.dataset.input_shape), 0, 10_000)
              if model.dataset.vocab_size else
              jax.random.normal(key, (batch, *model.dataset.input_shape)))
    y_full = jax.random.randint(key, (batch,), 0, model.dataset.num_classes)
    h = jax.random.normal(key, (batch, steps, width))

    def jax_part(fn, x):
        net = hk.without_apply_rng(hk.transform(fn))
        params = net.init(key, x)
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(net.apply(p, x)), argnums=(0, 1)))
        return lambda: jax.block_until_ready(grad(params, x))

    def layer_norm(x):
        return hk.LayerNorm(-1, True, True)(x)

    def mha(x):
        return hk.MultiHeadAttention(heads, width // heads,
                                     w_init=hk.initializers.VarianceScaling(1.0))(x, x, x)

    def mlp(x):
        return hk.Linear(width)(jax.nn.gelu(hk.Linear(4 * width)(x)))

    def scores(x):  # the attention's core without projections: softmax(q kᵀ) v per head
        q = x.reshape(batch, steps, heads, width // heads)
        logits = jnp.einsum("bthd,bThd->bhtT", q, q) / np.sqrt(width // heads)
        return jnp.einsum("bhtT,bThd->bthd", jax.nn.softmax(logits), q)

    params = model.init(key)
    # the non-private jit + vmap gradient (engines.batched_sum)
    loss_grad = jax.jit(jax.grad(lambda p: jnp.sum(model.loss.batch_losses(p, x_full, y_full))))
    rows = {"whole network": (lambda: jax.block_until_ready(loss_grad(params)), None),
            "block": (jax_part(lambda x: attention.Block(width, heads)(x), h), None),
            "attention (4 projections)": (jax_part(mha, h), None),
            "softmax(q k^T) v": (jax_part(scores, h), None),
            "mlp (d -> 4d -> d, gelu)": (jax_part(mlp, h), None),
            "layer norm": (jax_part(layer_norm, h), None)}
    if args.model == "vit":
        rows["patches conv"] = (jax_part(lambda x: hk.Conv2D(width, 4, stride=4,
                                                             padding="VALID")(x), x_full), None)

    net = torch_nets.build(args.model)
    tx = torch.tensor(np.asarray(x_full))
    ty = torch.tensor(np.asarray(y_full)).long()
    th = torch.tensor(np.asarray(h), requires_grad=True)

    def torch_part(module, x):
        def run():
            module.zero_grad(set_to_none=True)
            out = module(x)
            out.sum().backward()
        return run

    block = torch_nets.TorchBlock(width, heads)
    attn = torch_nets.TorchAttention(width, heads)
    torch_mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width),
                                    torch.nn.GELU(approximate="tanh"),
                                    torch.nn.Linear(4 * width, width))

    def torch_scores(x):
        q = x.view(batch, steps, heads, width // heads).transpose(1, 2)
        w = torch.softmax(q @ q.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)
        return (w @ q).transpose(1, 2)

    class Fn(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x)

    def whole():
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(tx), ty, reduction="sum").backward()

    torch_rows = {"whole network": whole, "block": torch_part(block, th),
                  "attention (4 projections)": torch_part(attn, th),
                  "softmax(q k^T) v": torch_part(Fn(torch_scores), th),
                  "mlp (d -> 4d -> d, gelu)": torch_part(torch_mlp, th),
                  "layer norm": torch_part(torch.nn.LayerNorm(width), th)}
    if args.model == "vit":
        conv = torch.nn.Sequential(torch_nets.NHWCToNCHW(), torch.nn.Conv2d(3, width, 4, 4))
        torch_rows["patches conv"] = torch_part(conv, tx.requires_grad_(True))

    calls = {(name, "jax"): fn for name, (fn, _) in rows.items()}
    calls.update({(name, "torch"): fn for name, fn in torch_rows.items()})
    times = {k: [] for k in calls}
    for fn in calls.values():
        fn()
    for _ in range(args.calls):
        for k, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    print(f"{args.model}, B={batch}, forward + backward, median ms (jax {jax.__version__}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"{'part':<28} {'XLA:CPU':>9} {'PyTorch':>9} {'XLA / PyTorch':>14}")
    for name in rows:
        a, b = (1e3 * float(np.median(times[(name, s)])) for s in ("jax", "torch"))
        print(f"{name:<28} {a:>9.2f} {b:>9.2f} {a / b:>13.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
