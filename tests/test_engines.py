"""Every engine computes the same clipped gradient sum as a naive float64 reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablation import ENGINES, LOOPS, Engine, clipped_grad_sum, get_engine
from ablation.core.engines import clipped_grad, global_norm
from tests.conftest import flatten, reference_clipped_sum, reference_per_example_grads

ENGINE_VARIANTS = [get_engine("jit", loop) for loop in LOOPS] + [
    ENGINES[name] for name in ("both", "vmap", "none")]
ENGINE_IDS = [f"{e.name}-{e.loop}" if e.uses_loop else e.name for e in ENGINE_VARIANTS]

# Engines run in float32 and the oracle in float64: float32 rounding through up to ~10 layers
# (cifar10) stays well inside these.
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def oracle(model_case):
    model, params, x, y = model_case
    per_example = reference_per_example_grads(model.loss, params, x, y)
    norms = [np.linalg.norm(g) for g in per_example]
    # C between the smallest and largest per-example norm: some examples are clipped, some not.
    clip = float(np.median(norms))
    return per_example, norms, clip


@pytest.mark.parametrize("engine", ENGINE_VARIANTS, ids=ENGINE_IDS)
def test_engine_matches_float64_reference(engine, model_case, oracle):
    model, params, x, y = model_case
    per_example, norms, clip = oracle
    assert min(norms) < clip < max(norms) or len(set(norms)) == 1
    expected = reference_clipped_sum(per_example, clip)
    got = flatten(clipped_grad_sum(engine, model.loss, params, x, y, clip))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("engine", ENGINE_VARIANTS, ids=ENGINE_IDS)
def test_masked_slots_contribute_nothing(engine, model_case, oracle):
    model, params, x, y = model_case
    per_example, _, clip = oracle
    mask = jnp.array([1.0, 0.0, 1.0, 0.0])
    expected = reference_clipped_sum(per_example, clip, mask=np.asarray(mask))
    got = flatten(clipped_grad_sum(engine, model.loss, params, x, y, clip, mask=mask))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * max(1.0, np.abs(expected).max()))


def test_infinite_clip_norm_is_plain_gradient_sum(model_case, oracle):
    model, params, x, y = model_case
    per_example, _, _ = oracle
    got = flatten(clipped_grad_sum("both", model.loss, params, x, y, math.inf))
    expected = np.sum(per_example, axis=0)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * max(1.0, np.abs(expected).max()))


def _quadratic_loss(params, x1, y1):
    """loss = ½‖w − x‖²: its gradient w − x has an exactly known norm."""
    return 0.5 * jnp.sum(jnp.square(params["w"] - x1)) + 0.0 * y1


@pytest.mark.parametrize("norm, clip", [(5.0, 1.0), (0.5, 1.0), (3.0, 3.0), (0.0, 1.0)])
def test_clipped_gradient_norm_is_at_most_c(norm, clip):
    params = {"w": jnp.zeros(4)}
    direction = jnp.array([1.0, -2.0, 2.0, 4.0]) / 5.0  # unit vector
    x1 = -norm * direction  # gradient w - x = norm * direction
    g = clipped_grad(_quadratic_loss, params, x1, jnp.int32(0), clip)
    got = float(global_norm(g))
    assert got <= clip * (1 + 1e-6)
    if norm <= clip:  # a gradient already below C is unchanged
        np.testing.assert_array_equal(np.asarray(g["w"]), np.asarray(params["w"] - x1))
    else:
        assert got == pytest.approx(clip, rel=1e-6)


def test_each_engine_clips_each_example():
    """Examples with norms 0.5, 2, 10: summed clipped norms equal 0.5 + 1 + 1 along one axis."""
    params = {"w": jnp.zeros(3)}
    x = -jnp.array([[0.5, 0, 0], [2.0, 0, 0], [10.0, 0, 0]])
    y = jnp.zeros(3, jnp.int32)
    for engine in ENGINE_VARIANTS:
        total = clipped_grad_sum(engine, _quadratic_loss, params, x, y, 1.0)
        np.testing.assert_allclose(np.asarray(total["w"]), [2.5, 0, 0], rtol=1e-6)


# -- bad input ---------------------------------------------------------------------------------


def test_unknown_engine_lists_valid_names():
    with pytest.raises(ValueError, match="both, jit, vmap, none"):
        get_engine("fast")
    with pytest.raises(ValueError, match="dispatch, unrolled, scan"):
        Engine("jit", True, False, loop="while")


@pytest.mark.parametrize("x_len, y_len, clip, message", [
    (0, 0, 1.0, "empty"),
    (3, 2, 1.0, "different numbers of examples: 3 vs 2"),
    (3, 3, float("nan"), "clip_norm must be a positive number or inf, got nan"),
    (3, 3, 0.0, "clip_norm must be a positive number"),
    (3, 3, -1.0, "clip_norm must be a positive number"),
])
def test_bad_batch_or_clip_is_a_one_line_error(x_len, y_len, clip, message):
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match=message) as info:
        clipped_grad_sum("both", _quadratic_loss, params, jnp.zeros((x_len, 3)),
                         jnp.zeros((y_len,), jnp.int32), clip)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("unroll", [pytest.param("static", marks=pytest.mark.slow), "dynamic"])
def test_full_length_lstm_engines_agree(unroll):
    """The lstm at its real 256 tokens (the other tests shorten sequences to keep compiles
    short): compiled, scanned and eager per-example sums agree with the oracle. The default
    (dynamic) unroll runs in the default suite; the paper's static unroll, minutes to
    compile, is a slow test."""
    from models import get_model
    model = get_model("lstm", unroll=unroll)
    params = model.init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (3, 256), 0, 10_000)
    y = jnp.array([0, 1, 1])
    per_example = reference_per_example_grads(model.loss, params, x, y)
    clip = float(np.median([np.linalg.norm(g) for g in per_example]))
    expected = reference_clipped_sum(per_example, clip)
    for engine in (ENGINES["both"], get_engine("jit", "scan"), ENGINES["vmap"]):
        got = flatten(clipped_grad_sum(engine, model.loss, params, x, y, clip))
        np.testing.assert_allclose(got, expected, rtol=RTOL,
                                   atol=ATOL * max(1.0, np.abs(expected).max()), err_msg=engine.name)
