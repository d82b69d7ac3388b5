"""The DP-SGD step: limiting cases, noise statistics, keys, compilation, bad input."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablation import ENGINES, LOOPS, DPConfig, get_engine, make_step, sgd
from models import get_model
from tests.conftest import flatten, small_batch

ALL_ENGINES = [get_engine("jit", loop) for loop in LOOPS] + [
    ENGINES[name] for name in ("both", "vmap", "none")]
ENGINE_IDS = [f"{e.name}-{e.loop}" if e.uses_loop else e.name for e in ALL_ENGINES]
LR = 0.15


@pytest.fixture(scope="module")
def ffnn_case():
    model = get_model("ffnn")
    params = model.init(jax.random.key(0))
    x, y = small_batch(model, 8, seed=3)
    return model, params, x, y


def _run(engine, model, params, x, y, dp, key=jax.random.key(7), lr=LR):
    optimizer = sgd(lr)
    step = make_step(engine, model.loss, optimizer, dp)
    return step(params, optimizer.init(params), x, y, key)[0]


@pytest.mark.parametrize("engine", ALL_ENGINES, ids=ENGINE_IDS)
def test_no_clip_no_noise_is_plain_sgd(engine, ffnn_case):
    """C = +inf and σ = 0: the private step equals SGD on the mean gradient."""
    model, params, x, y = ffnn_case
    mean_grad = jax.grad(lambda p: jnp.mean(jax.vmap(model.loss, (None, 0, 0))(p, x, y)))(params)
    expected = jax.tree.map(lambda p, g: p - LR * g, params, mean_grad)
    private = _run(engine, model, params, x, y, DPConfig(math.inf, 0.0))
    nonprivate = _run(engine, model, params, x, y, None)
    np.testing.assert_allclose(flatten(private), flatten(expected), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(flatten(nonprivate), flatten(expected), rtol=1e-5, atol=1e-7)


def _zero_grad_loss(params, x1, y1):
    """Every per-example gradient is exactly zero: the update is pure noise."""
    return 0.0 * (jnp.sum(params["w"]) + jnp.sum(x1)) + 0.0 * y1


@pytest.mark.parametrize("batch_size", [4, 16])
@pytest.mark.parametrize("engine", ["both", "vmap"])
def test_noise_std_is_sigma_c_lr_over_b(engine, batch_size):
    sigma, clip = 1.1, 2.0
    params = {"w": jnp.zeros(200_000)}
    optimizer = sgd(LR)
    step = make_step(engine, _zero_grad_loss, optimizer, DPConfig(clip, sigma))
    x, y = jnp.zeros((batch_size, 1)), jnp.zeros(batch_size, jnp.int32)
    new, _ = step(params, optimizer.init(params), x, y, jax.random.key(11))
    update = np.asarray(new["w"], np.float64)
    expected = sigma * clip * LR / batch_size
    # 200k draws: the sample std is within ~0.3% (1 s.e.) of the truth; 2% is > 6 s.e. away,
    # and a wrong scale (e.g. off by sqrt(B) = 2 or 4) is far outside.
    assert np.std(update) == pytest.approx(expected, rel=0.02)
    assert abs(np.mean(update)) < 5 * expected / math.sqrt(update.size)
    # Gaussian: excess kurtosis near 0 (a uniform would give -1.2).
    z = (update - update.mean()) / update.std()
    assert abs(np.mean(z**4) - 3.0) < 0.1


def test_same_key_same_noise_across_engines():
    """All per-example gradients zero, so every engine's update is exactly its noise."""
    params = {"w": jnp.zeros(1000), "b": jnp.zeros((3, 7))}
    x, y = jnp.zeros((5, 2)), jnp.zeros(5, jnp.int32)
    dp = DPConfig(1.0, 1.1)
    results = {}
    for engine in ALL_ENGINES:
        results[engine] = flatten(_run(engine, _ZeroModel, params, x, y, dp, jax.random.key(3)))
    reference = results[ENGINES["both"]]
    assert np.abs(reference).max() > 0
    for engine, got in results.items():
        np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-9, err_msg=engine.name)
    other = flatten(_run("both", _ZeroModel, params, x, y, dp, jax.random.key(4)))
    assert np.abs(other - reference).max() > 1e-3


class _ZeroModel:
    loss = staticmethod(_zero_grad_loss)


def test_same_key_same_update_real_model(ffnn_case):
    model, params, x, y = ffnn_case
    dp = DPConfig(0.5, 1.1)
    updates = [flatten(_run(e, model, params, x, y, dp, jax.random.key(5))) for e in ALL_ENGINES]
    for got in updates[1:]:
        np.testing.assert_allclose(got, updates[0], rtol=1e-5, atol=1e-6)
    different = flatten(_run("both", model, params, x, y, dp, jax.random.key(6)))
    assert np.abs(different - updates[0]).max() > 1e-3


# -- compiled or not ----------------------------------------------------------------------------


class _CountingLoss:
    """A loss that counts how often its Python body runs (it runs whenever JAX traces it)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, params, x1, y1):
        self.calls += 1
        return jnp.sum(jnp.square(params["w"] - x1)) + 0.0 * y1


@pytest.mark.parametrize("private", [True, False])
@pytest.mark.parametrize("engine", ALL_ENGINES, ids=ENGINE_IDS)
def test_jit_engines_compile_and_eager_engines_do_not(engine, private):
    """A compiled step never runs the loss's Python again; an eager step runs it every call."""
    loss = _CountingLoss()
    params = {"w": jnp.ones(3)}
    optimizer = sgd(0.1)
    step = make_step(engine, loss, optimizer, DPConfig(1.0, 1.0) if private else None)
    x, y = jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)
    state = (params, optimizer.init(params))
    state = step(*state, x, y, jax.random.key(0))
    after_first = loss.calls
    for i in range(3):
        state = step(*state, x, y, jax.random.key(i))
    assert after_first > 0
    if engine.jit:
        assert loss.calls == after_first, "a jit engine re-ran Python: it did not compile"
        assert step.n_compiles == step.compiled_functions >= 1
    else:
        assert loss.calls == 4 * after_first, "an eager engine skipped Python: it compiled"
        assert step.n_compiles == step.compiled_functions == 0
        assert step.compile(*state, x, y, jax.random.key(0)) is None


@pytest.mark.parametrize("private", [True, False])
@pytest.mark.parametrize("engine", ALL_ENGINES, ids=ENGINE_IDS)
def test_non_private_steps_keep_the_engines_switches(engine, private):
    """Issue 12.4: a loop engine loops over examples also without privacy; a vectorised one
    takes the batched gradient. An eager step shows it directly: a per-example loop runs the
    loss's Python once per example, vmap or the batched gradient once per step."""
    loss = _CountingLoss()
    params = {"w": jnp.ones(3)}
    optimizer = sgd(0.1)
    step = make_step(engine, loss, optimizer, DPConfig(1.0, 1.0) if private else None)
    x, y = jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)
    step(params, optimizer.init(params), x, y, jax.random.key(0))
    if engine.jit:
        # jit-dispatch compiles its batch-1 body (3 functions) whatever the privacy.
        expected = 3 if engine.uses_loop and engine.loop == "dispatch" else 1
        assert step.compiled_functions == expected
        traced_per_example = engine.uses_loop and engine.loop == "unrolled"
        assert loss.calls == (4 if traced_per_example else 1)
    else:
        assert loss.calls == (1 if engine.vectorized else 4)


@pytest.mark.parametrize("private", [True, False])
@pytest.mark.parametrize("engine", ALL_ENGINES, ids=ENGINE_IDS)
def test_a_padded_slot_contributes_nothing_whatever_it_holds(engine, private, ffnn_case):
    """Issue 12.5: mask [1, 0] with inf in the padded input: the update is finite and equals
    the update of the one real example, in every engine, private or not."""
    model, params, x, y = ffnn_case
    x2 = jnp.stack([x[0], jnp.full_like(x[1], jnp.inf)])
    y2 = y[:2]
    mask = jnp.array([1.0, 0.0])
    dp = DPConfig(1.0, 0.0) if private else None
    optimizer = sgd(LR)
    step = make_step(engine, model.loss, optimizer, dp, expected_batch_size=1.0)
    got = step(params, optimizer.init(params), x2, y2, jax.random.key(0), mask)[0]
    alone = make_step(engine, model.loss, optimizer, dp)(
        params, optimizer.init(params), x[:1], y[:1], jax.random.key(0))[0]
    assert np.all(np.isfinite(flatten(got)))
    np.testing.assert_allclose(flatten(got), flatten(alone), rtol=1e-5, atol=1e-7)


def test_ahead_of_time_compile_is_reused():
    loss = _CountingLoss()
    params = {"w": jnp.ones(3)}
    optimizer = sgd(0.1)
    for engine in ("both", get_engine("jit", "dispatch")):
        step = make_step(engine, loss, optimizer, DPConfig(1.0, 1.0))
        x, y = jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)
        seconds = step.compile(params, optimizer.init(params), x, y, jax.random.key(0))
        assert seconds > 0 and step.n_compiles == step.compiled_functions
        step(params, optimizer.init(params), x, y, jax.random.key(1))
        assert step.n_compiles == step.compiled_functions  # no second compile
        # Another batch size: a new compile, counted.
        step(params, optimizer.init(params), jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32),
             jax.random.key(1))
        assert step.n_compiles > step.compiled_functions


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(clip_norm=float("nan"), noise_multiplier=1.0), "clip_norm must be a positive number"),
    (dict(clip_norm=1.0, noise_multiplier=-0.5), "noise_multiplier must be a finite number >= 0, got -0.5"),
    (dict(clip_norm=1.0, noise_multiplier=float("nan")), "noise_multiplier"),
    (dict(clip_norm=math.inf, noise_multiplier=1.0), "noise_multiplier must be 0 when clip_norm is inf"),
])
def test_bad_dp_config(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        DPConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_infinite_clip_is_allowed_without_noise():
    assert DPConfig(math.inf, 0.0).noise_std == 0.0


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf")])
def test_bad_learning_rate(lr):
    with pytest.raises(ValueError, match="learning rate must be a finite number >= 0"):
        sgd(lr)


def test_step_rejects_bad_batches(ffnn_case):
    model, params, x, y = ffnn_case
    optimizer = sgd(LR)
    step = make_step("both", model.loss, optimizer, DPConfig(1.0, 1.0))
    with pytest.raises(ValueError, match="different numbers of examples: 8 vs 7"):
        step(params, optimizer.init(params), x, y[:7], jax.random.key(0))
    with pytest.raises(ValueError, match="empty"):
        step(params, optimizer.init(params), x[:0], y[:0], jax.random.key(0))


@pytest.mark.parametrize("engine", ["both", "ghost", get_engine("jit", "scan")],
                         ids=["both", "ghost", "jit-scan"])
def test_k_steps_per_call_equal_k_single_steps(engine, ffnn_case):
    """Issue 14.4: one compiled call of K steps = K single steps with the same inputs."""
    model, params, x, y = ffnn_case
    k = 3
    xs = jnp.stack([x] * k) + jnp.arange(k, dtype=x.dtype)[:, None, None] * 0.1
    ys = jnp.stack([y] * k)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(k))
    optimizer = sgd(LR)
    dp = DPConfig(1.0, 1.1)
    multi = make_step(engine, model.loss, optimizer, dp, steps_per_call=k)
    got = multi(params, optimizer.init(params), xs, ys, keys)[0]
    single = make_step(engine, model.loss, optimizer, dp)
    state = (params, optimizer.init(params))
    for i in range(k):
        state = single(*state, xs[i], ys[i], keys[i])
    np.testing.assert_allclose(flatten(got), flatten(state[0]), rtol=1e-5, atol=1e-7)
    assert multi.compiled_functions == 1


def test_k_steps_per_call_needs_a_compiled_step():
    model = get_model("logreg")
    with pytest.raises(ValueError, match="steps_per_call > 1 needs an engine that compiles"):
        make_step("vmap", model.loss, sgd(LR), None, steps_per_call=2)
