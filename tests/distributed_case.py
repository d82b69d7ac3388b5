"""One process of a test run over several (``tests/test_distributed.py`` starts them):

    python tests/distributed_case.py RANK COUNT PORT OUT.npz

Every process holds its rows of the same global batch of 16 (ffnn, padded slots holding NaN)
and the same parameters; it writes, per engine (both, ghost, ghost_two_pass): the clipped sum
(a step with σ = 0 whose optimizer keeps the averaged gradient as its state), the released
update of one private step (σ = 1.1, one key), and the parameters after 10 private steps with
their hash. COUNT = 1 runs without jax.distributed.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 16
ENGINES = ("both", "ghost", "ghost_two_pass")
LR = 0.15


def main(rank: int, count: int, port: int, out: str) -> None:
    from ablation.core.distributed import ProcessSet, initialize
    initialize(ProcessSet(count, rank, f"127.0.0.1:{port}" if count > 1 else None))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from ablation import get_engine
    from ablation.core.distributed import local_copy
    from ablation.core.dpsgd import DPConfig, make_step, sgd
    from models import get_model

    model = get_model("ffnn")
    params = model.init(jax.random.key(0))
    x = np.array(jax.random.uniform(jax.random.key(1), (BATCH, 104)))
    y = np.asarray(jax.random.randint(jax.random.key(2), (BATCH,), 0, 2))
    mask = np.ones(BATCH, np.float32)
    mask[[3, 10, 13]] = 0.0  # padded slots, holding garbage
    x[[3, 10, 13]] = np.nan
    rows = slice(rank * BATCH // count, (rank + 1) * BATCH // count)
    keep = optax.GradientTransformation(  # updates nothing; its state is the step's Σ / B
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda g, state, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    opt = sgd(LR)
    results = {}
    for name in ENGINES:
        engine = get_engine("ghost", mode="two_pass") if name == "ghost_two_pass" else name
        for sigma, steps, tag in ((0.0, 1, "sum"), (1.1, 1, "update"), (1.1, 10, "final")):
            optimizer = keep if tag == "sum" else opt
            step = make_step(engine, model.loss, optimizer, DPConfig(0.5, sigma),
                             expected_batch_size=BATCH, devices=count)
            batch = step.place_batch((x[rows], y[rows], mask[rows]))
            state = step.place_state((params, optimizer.init(params)))
            for i in range(steps):
                state = step(*state, *batch[:2], jax.random.fold_in(jax.random.key(7), i),
                             batch[2])
            new = np.concatenate([np.ravel(np.asarray(leaf)) for leaf in
                                  jax.tree.leaves(local_copy(state[0]))])
            old = np.concatenate([np.ravel(np.asarray(leaf)) for leaf in
                                  jax.tree.leaves(params)])
            if tag == "sum":
                results[f"{name}_sum"] = BATCH * np.concatenate(
                    [np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(local_copy(state[1]))])
            elif tag == "update":
                results[f"{name}_update"] = new - old
            else:
                results[f"{name}_final"] = new
                results[f"{name}_hash"] = np.frombuffer(
                    hashlib.sha256(new.tobytes()).digest(), np.uint8)
    np.savez(out, **results, devices=np.asarray(jax.device_count()))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
