"""Shared fixtures: small batches of each model's data, and a float64 reference oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablation.core.compat import enable_x64
from models import PAPER_MODEL_NAMES, get_model

#: Token sequences are shortened in the engine tests: the architecture (and every parameter
#: shape) is unchanged, but the lstm's 256 unrolled steps would make each compile take minutes.
TEST_SEQ_LEN = 12


def small_batch(model, batch_size: int, seed: int = 0):
    """A deterministic batch ``(x, y)`` with the model's input dtype (short token sequences)."""
    spec = model.dataset
    kx, ky = jax.random.split(jax.random.key(seed))
    if spec.input_dtype == "int32":
        x = jax.random.randint(kx, (batch_size, TEST_SEQ_LEN), 0, spec.vocab_size, jnp.int32)
    else:
        x = jax.random.uniform(kx, (batch_size, *spec.input_shape), jnp.float32)
    y = jax.random.randint(ky, (batch_size,), 0, spec.num_classes, jnp.int32)
    return x, y


def reference_per_example_grads(loss_fn, params, x, y) -> list[np.ndarray]:
    """Naive oracle: a Python loop of float64 per-example gradients, each flattened."""
    flat = []
    with enable_x64():
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        x_np = np.asarray(x)
        x64 = x_np.astype(np.float64) if x_np.dtype.kind == "f" else x_np
        grad_fn = jax.jit(jax.grad(loss_fn))  # one example at a time, in float64
        for i in range(x_np.shape[0]):
            g = grad_fn(p64, jnp.asarray(x64[i]), jnp.asarray(np.asarray(y)[i]))
            flat.append(np.concatenate([np.ravel(np.asarray(l, np.float64))
                                        for l in jax.tree.leaves(g)]))
    return flat


def reference_clipped_sum(per_example: list[np.ndarray], clip_norm: float,
                          mask=None, norms=None) -> np.ndarray:
    """Σ_i mask_i · g_i · min(1, C/‖g_i‖) in float64 (with ``norms`` in place of ‖g_i‖)."""
    total = np.zeros_like(per_example[0])
    for i, g in enumerate(per_example):
        if mask is not None and not mask[i] > 0:
            continue
        norm = np.linalg.norm(g) if norms is None else norms[i]
        total += g * (min(1.0, clip_norm / norm) if norm > 0 else 1.0)
    return total


def expected_clipped_sum(engine, loss, params, x, y, per_example, clip_norm, mask=None):
    """The oracle's clipped sum for ``engine``: clip factors from the true norms, or, for the
    ghost engine, from the rules' own norms, which may over-estimate by the Gram form's
    rounding bound (``test_ghost_norms_bound_the_true_norms`` holds them to it)."""
    from ablation import get_engine
    from ablation.core.clipping import per_example_sq_norms
    from ablation.core.masking import fill_padded
    norms = None
    if get_engine(engine).ghost is not None:
        if mask is not None:
            x, y = fill_padded(x, y, jnp.asarray(mask) > 0)
        norms = np.sqrt(np.asarray(per_example_sq_norms(loss, params, x, y), np.float64))
    return reference_clipped_sum(per_example, clip_norm, mask=mask, norms=norms)


def contributions(loss, params, x, y, clip) -> np.ndarray:
    """The norm of what ghost's released sum adds for each example alone (the others padded)."""
    from ablation import clipped_grad_sum
    out = []
    for i in range(x.shape[0]):
        mask = jnp.zeros(x.shape[0]).at[i].set(1.0)
        out.append(np.linalg.norm(flatten(clipped_grad_sum("ghost", loss, params, x, y, clip,
                                                           mask=mask))))
    return np.array(out)


def flatten(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(l, np.float64)) for l in jax.tree.leaves(tree)])


@pytest.fixture(scope="session", params=PAPER_MODEL_NAMES)
def model_case(request):
    """(model, params, x, y) for every model, batch of 4."""
    model = get_model(request.param)
    params = model.init(jax.random.key(1))
    x, y = small_batch(model, 4, seed=2)
    return model, params, x, y


#: ``make check``: the quick loop for contributors (< 3 minutes on 2 cores): every module
#: imports and the layout holds, every engine against the oracle on two small models, the
#: ghost engine's refusals and bad inputs, and a one-cell sweep through the command line.
CHECK = ("tests/test_layout.py::", "tests/test_engines.py::test_engine_matches_float64_reference[ffnn-",
         "tests/test_engines.py::test_engine_matches_float64_reference[embed-",
         "tests/test_ghost_safety.py::test_tied", "tests/test_ghost_safety.py::test_a_sub",
         "tests/test_ghost_safety.py::test_a_network_that_mixes",
         "tests/test_ghost_safety.py::test_a_gram_layer", "tests/test_ghost_safety.py::test_out_of",
         "tests/test_sweep.py::test_tiny_multirun")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(CHECK):
            item.add_marker(pytest.mark.check)
