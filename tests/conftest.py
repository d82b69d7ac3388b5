"""Shared fixtures: small batches of each model's data, and a float64 reference oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablation.core.compat import enable_x64
from models import MODEL_NAMES, get_model

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
                          mask=None) -> np.ndarray:
    """Σ_i mask_i · g_i · min(1, C/‖g_i‖) in float64."""
    total = np.zeros_like(per_example[0])
    for i, g in enumerate(per_example):
        if mask is not None and not mask[i] > 0:
            continue
        norm = np.linalg.norm(g)
        total += g * (min(1.0, clip_norm / norm) if norm > 0 else 1.0)
    return total


def flatten(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(l, np.float64)) for l in jax.tree.leaves(tree)])


@pytest.fixture(scope="session", params=MODEL_NAMES)
def model_case(request):
    """(model, params, x, y) for every model, batch of 4."""
    model = get_model(request.param)
    params = model.init(jax.random.key(1))
    x, y = small_batch(model, 4, seed=2)
    return model, params, x, y
