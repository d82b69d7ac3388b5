"""Privacy accounting: ε against dp-accounting's primitives and a published value,
calibration, Poisson batches without recompiles, and bad values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from ablation import ENGINES, LOOPS, clipped_grad_sum, get_engine
from ablation.core.privacy import calibrate_noise_multiplier, epsilon, privacy_report
from ablation.data.samplers import poisson_capacity
from ablation.measure.settings import CellConfig, PrivacyConfig, TimingConfig
from ablation.measure.timing import time_cell
from ablation.sweep.config import ConfigError, cell_from_dict
from ablation.sweep.jobs import privacy_of
from models import get_model
from tests.conftest import flatten, small_batch

SETTINGS = [  # (sigma, batch size, n, epochs)
    (1.1, 256, 60_000, 20),
    (1.1, 64, 45_220, 5),
    (0.8, 128, 25_000, 3),
]


def _steps(batch, n, epochs):
    return epochs * (n // batch)


@pytest.mark.parametrize("sigma, batch, n, epochs", SETTINGS)
def test_rdp_epsilon_equals_primitive_computation(sigma, batch, n, epochs):
    q, steps = batch / n, _steps(batch, n, epochs)
    orders = rdp_lib.DEFAULT_RDP_ORDERS
    curve = steps * np.array(rdp_lib._compute_rdp_poisson_subsampled_gaussian(q, sigma, orders))
    expected, _ = rdp_lib.compute_epsilon(orders, curve, 1e-5)
    got = epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=1e-5,
                  accountant="rdp")
    assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("sigma, batch, n, epochs", SETTINGS)
def test_pld_epsilon_equals_primitive_computation(sigma, batch, n, epochs):
    q, steps = batch / n, _steps(batch, n, epochs)
    expected = (pld_lib.from_gaussian_mechanism(standard_deviation=sigma, sampling_prob=q,
                                                value_discretization_interval=1e-4)
                .self_compose(steps).get_epsilon_for_delta(1e-5))
    got = epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=1e-5,
                  accountant="pld")
    assert got == pytest.approx(expected, rel=1e-6)
    # PLD is tight, RDP an upper bound.
    assert got <= epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=1e-5,
                          accountant="rdp")


def test_published_value_tf_privacy_mnist_tutorial():
    """TensorFlow Privacy, tutorials/README.md ("Select Parameters", first row): MNIST,
    n = 60,000, batch 256, noise multiplier 1.12, 60 epochs (steps = 60·60000//256) gives
    ε = 2.92 at δ = 1e-5 with the RDP (moments) accountant and the classic RDP→DP conversion
    ε = min_α RDP(α) + log(1/δ)/(α − 1) (Mironov 2017, Prop. 3) over TF Privacy's orders."""
    q, sigma, steps, delta = 256 / 60_000, 1.12, 60 * 60_000 // 256, 1e-5
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
    curve = steps * np.array(rdp_lib._compute_rdp_poisson_subsampled_gaussian(q, sigma, orders))
    classic = float(np.min(curve + np.log(1 / delta) / (orders - 1)))
    assert round(classic, 2) == 2.92
    ours = epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=delta,
                   accountant="rdp")
    # dp-accounting's conversion is tighter than the classic one, never looser.
    assert 2.0 < ours <= classic


@pytest.mark.parametrize("accountant, target", [
    ("pld", 1.0), ("rdp", 1.0), ("rdp", 8.0),
    pytest.param("pld", 8.0, marks=pytest.mark.slow)])  # PLD at a large epsilon: ~20 s
def test_calibration_round_trips(accountant, target):
    common = dict(sampling_rate=256 / 60_000, steps=20 * 234, delta=1e-5, accountant=accountant)
    sigma = calibrate_noise_multiplier(target_epsilon=target, **common)
    reached = epsilon(noise_multiplier=sigma, **common)
    assert reached <= target * (1 + 1e-6)
    assert reached == pytest.approx(target, rel=0.01)
    assert epsilon(noise_multiplier=sigma * 0.97, **common) > target  # the smallest such σ


def test_zero_noise_has_no_guarantee():
    assert epsilon(noise_multiplier=0.0, sampling_rate=0.01, steps=10, delta=1e-5) == math.inf


def test_report_accounts_the_configured_training_length():
    report = privacy_report(noise_multiplier=1.1, batch_size=256, n_train=60_000, epochs=20,
                            delta=1e-5)
    assert report.accounted_steps == 20 * (60_000 // 256)
    assert report.sampling_rate == 256 / 60_000 and report.accountant == "pld"
    assert "approximation" in report.note


def test_target_epsilon_records_the_sigma_used():
    cell = CellConfig(model="cnn", batch_size=256, dp=PrivacyConfig(target_epsilon=2.0))
    report = privacy_of(cell)
    assert report.epsilon == pytest.approx(2.0, rel=0.01)
    assert report.noise_multiplier != cell.dp.noise_multiplier


def test_truncation_at_the_capacity_is_charged():
    n, batch = 60_000, 256
    common = dict(noise_multiplier=1.1, sampling_rate=batch / n, steps=2000, delta=1e-5)
    plain = epsilon(**common, sampling="poisson", accountant="pld")

    def truncated(sigmas):
        return epsilon(**common, sampling="poisson", accountant="pld", n_train=n,
                       capacity=poisson_capacity(batch, n, sigmas))
    # At the default 5 standard deviations truncation costs nothing visible; a tight capacity
    # overflows often and the accountant charges for it.
    assert truncated(5.0) == pytest.approx(plain, rel=0.01)
    assert truncated(3.0) > 1.5 * plain


# -- Poisson batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", [get_engine("jit", loop) for loop in LOOPS] +
                         [ENGINES[n] for n in ("both", "vmap", "none")],
                         ids=[f"jit-{l}" for l in LOOPS] + ["both", "vmap", "none"])
def test_padded_batch_gives_the_same_clipped_sum(engine):
    model = get_model("ffnn")
    params = model.init(jax.random.key(0))
    x, y = small_batch(model, 5, seed=1)
    pad_x = jnp.concatenate([x, x[:3]])  # padded slots hold real examples ...
    pad_y = jnp.concatenate([y, y[:3]])
    mask = jnp.array([1.0] * 5 + [0.0] * 3)  # ... with mask 0
    unpadded = flatten(clipped_grad_sum(engine, model.loss, params, x, y, 0.5))
    padded = flatten(clipped_grad_sum(engine, model.loss, params, pad_x, pad_y, 0.5, mask=mask))
    np.testing.assert_allclose(padded, unpadded, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("engine", ["both", "jit"])
def test_fifty_step_poisson_run_compiles_once(engine):
    cell = CellConfig(engine=engine, model="logreg", batch_size=32, data_limit=2_000,
                      dp=PrivacyConfig(sampling="poisson"),
                      timing=TimingConfig(max_steps=48, warmup_steps=1, budget_s=600,
                                          progress=False))
    record = time_cell(cell, noise_multiplier=1.1)
    # first + warm-up + 48 latency steps + three bursts of back-to-back steps
    assert record["steps_run"] == 50 + 3 * record["throughput_steps"]
    assert record["n_compiles"] == record["compiled_functions"]  # each function compiled once
    assert record["capacity"] == poisson_capacity(32, 2_000, 5.0)
    assert 24 < record["poisson_mean_batch"] < 40  # Binomial(2000, 0.016): mean 32, sd 5.6
    assert record["poisson_overflow_steps"] == 0


def test_poisson_sampler_masks_and_overflow():
    from ablation.data.samplers import PoissonSampler, synthetic
    from models import DATASETS
    data = synthetic(DATASETS["adult"], jax.random.key(0), n=1_000)
    # A capacity equal to the expected batch overflows about half the time.
    sampler = PoissonSampler(data, batch_size=100, key=jax.random.key(3), capacity=100)
    masks = [np.asarray(sampler.batch(i).mask) for i in range(40)]
    stats = sampler.stats()
    assert 5 < stats["poisson_overflow_steps"] < 35
    for mask in masks:
        assert set(np.unique(mask)) <= {0.0, 1.0}
        k = int(mask.sum())  # sampled examples fill the first slots
        assert mask[:k].all() and not mask[k:].any()


def test_padded_slots_are_not_the_same_examples_every_step():
    """Issue 12.5: padding is drawn from the unsampled examples at random, not the lowest ids."""
    from ablation.data.samplers import PoissonSampler, TrainingSet
    n = 1_000
    data = TrainingSet(jnp.arange(n, dtype=jnp.float32)[:, None], jnp.zeros(n, jnp.int32))
    sampler = PoissonSampler(data, batch_size=20, key=jax.random.key(1), capacity=60)
    padded = set()
    for i in range(10):
        batch = sampler.batch(i)
        ids = np.asarray(batch.x[:, 0]).astype(int)
        padded |= set(ids[np.asarray(batch.mask) == 0].tolist())
    assert len(padded) > 300  # ~40 fresh padding ids per step, not the same low ids


# -- what a run accounts and how its keys and denominators are derived (issue 12) ------------


def test_rdp_with_truncated_poisson_batches_is_refused():
    """Issue 12.6: RDP has no truncated event; an epsilon that ignores truncation would not
    hold, so the combination is a one-line error (config and accountant alike)."""
    with pytest.raises(ConfigError, match="dp.accountant=rdp cannot account Poisson") as info:
        cell_from_dict({"dp": {"accountant": "rdp", "sampling": "poisson"}})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="use dp.accountant=pld"):
        privacy_report(noise_multiplier=1.1, batch_size=16, n_train=45_220, epochs=20,
                       delta=1e-5, accountant="rdp", sampling="poisson",
                       capacity=poisson_capacity(16, 45_220, 5.0))
    # Without truncation (the capacity holds everything) RDP accounts plain Poisson sampling.
    assert privacy_report(noise_multiplier=1.1, batch_size=16, n_train=100, epochs=1,
                          delta=1e-5, accountant="rdp", sampling="poisson",
                          capacity=100).epsilon > 0
    # Non-private cells account nothing, so the combination is harmless there.
    cell_from_dict({"private": False, "dp": {"accountant": "rdp", "sampling": "poisson"}})


@pytest.mark.parametrize("sigmas", [3.0, pytest.param(1.0, marks=pytest.mark.slow)])
def test_calibration_brackets_with_truncation(sigmas):
    """Issue 12.7: a low capacity needs more noise than untruncated Poisson sampling; the
    search brackets from the accountant actually used instead of failing in brentq."""
    n, batch = 400, 20
    capacity = poisson_capacity(batch, n, sigmas)
    common = dict(sampling_rate=batch / n, steps=n // batch, delta=1e-5,
                  sampling="poisson", n_train=n, capacity=capacity)
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, accountant="pld", **common)
    assert epsilon(noise_multiplier=sigma, accountant="pld", **common) <= 2.0 + 1e-6
    assert epsilon(noise_multiplier=0.97 * sigma, accountant="pld", **common) > 2.0


def test_reference_rows_refuse_poisson_sampling():
    """Issue 12.8: Opacus rows sample shuffled fixed-size batches; they never claim Poisson."""
    with pytest.raises(ConfigError, match="engine=opacus trains on shuffled fixed-size"):
        cell_from_dict({"engine": {"name": "opacus"}, "dp": {"sampling": "poisson"}})


def test_every_random_stream_has_its_own_key():
    """Issue 12.9: data, initialisation, sampling and noise never share a key."""
    from ablation.data.samplers import run_keys
    keys = run_keys(42)
    # Every key a run uses: its four streams and the two the synthetic data splits off its own
    # (inputs, labels); the root seed's key itself is used for nothing.
    used = [*keys, *jax.random.split(keys.data), jax.random.key(42)]
    raw = {np.asarray(jax.random.key_data(k)).tobytes() for k in used}
    assert len(raw) == len(used)


def test_poisson_steps_divide_by_the_expected_batch_not_the_capacity():
    """Issue 12.10: under Poisson sampling the clipped sum is divided by B = q·n."""
    from ablation.measure.timing import build_step
    model = get_model("logreg")
    cell = CellConfig(model="logreg", batch_size=4, lr=1.0,
                      dp=PrivacyConfig(clip_norm=math.inf, noise_multiplier=0.0,
                                       sampling="poisson"))
    step, optimizer = build_step(cell, model, noise_multiplier=0.0)
    params = model.init(jax.random.key(0))
    x, y = small_batch(model, 10, seed=5)  # capacity 10, four sampled
    mask = jnp.array([1.0] * 4 + [0.0] * 6)
    donated = jax.tree.map(jnp.copy, params)  # the timed step donates its state
    new = step(donated, optimizer.init(donated), x, y, jax.random.key(0), mask)[0]
    grads = jax.vmap(jax.grad(model.loss), in_axes=(None, 0, 0))(params, x[:4], y[:4])
    expected = jax.tree.map(lambda p, g: p - g.sum(0) / 4, params, grads)
    np.testing.assert_allclose(flatten(new), flatten(expected), rtol=1e-5, atol=1e-7)


def test_every_timed_step_gets_a_fresh_noise_key():
    """Issue 12.10: a regression that reused one key would repeat the same noise each step."""
    from ablation.data.samplers import ShuffleSampler, synthetic
    from ablation.measure.timing import JaxClock
    from models import DATASETS
    seen = []

    def step(params, opt_state, x, y, key, mask):
        seen.append(np.asarray(jax.random.key_data(key)).tobytes())
        return params, opt_state

    data = synthetic(DATASETS["adult"], jax.random.key(0), n=256)
    clock = JaxClock(step, ({"w": jnp.zeros(1)}, ()), ShuffleSampler(data, 16, jax.random.key(1)),
                     jax.random.key(2))
    clock.tick()
    clock.burst(5, 1 << 20)
    clock.tick()
    assert len(seen) == 7 and len(set(seen)) == 7


def test_an_accounting_failure_becomes_an_error_record(tmp_path, monkeypatch):
    """Issue 12.11: a failing accountant (e.g. an old dp-accounting without the truncated
    event) leaves an error record, not a dead cell without one."""
    from ablation.report.records import read_json
    from ablation.sweep import jobs

    def broken(**kwargs):
        raise AttributeError("module 'dp_accounting.dp_event' has no attribute "
                             "'TruncatedSubsampledGaussianDpEvent'")

    monkeypatch.setattr(jobs, "privacy_report", broken)
    jobs._cached_privacy.cache_clear()
    cell = CellConfig(model="logreg", batch_size=16, data_limit=256,
                      dp=PrivacyConfig(sampling="poisson"))
    record = jobs.run_timing_job(cell, {"seed": 1}, tmp_path / "job")
    jobs._cached_privacy.cache_clear()
    on_disk = read_json(tmp_path / "job" / "result.json")
    assert record["status"] == on_disk["status"] == "error"
    assert "TruncatedSubsampledGaussianDpEvent" in on_disk["error"]
    assert on_disk["epsilon"] is None and on_disk["n_params"] is None


# -- bad values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(delta=1.0), "dp.delta must be in (0, 1), got 1.0"),
    (dict(delta=0.0), "dp.delta must be in (0, 1)"),
    (dict(sampling_rate=1.5), "sampling rate q = batch_size / n_train must be in (0, 1], got 1.5"),
    (dict(accountant="moments"), "dp.accountant must be one of pld, rdp"),
])
def test_bad_privacy_values_are_one_line_errors(kwargs, message):
    args = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=10, delta=1e-5) | kwargs
    with pytest.raises(ValueError) as info:
        epsilon(**args)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_target_epsilon():
    with pytest.raises(ValueError, match="dp.target_epsilon must be a finite number > 0, got -1"):
        calibrate_noise_multiplier(target_epsilon=-1, sampling_rate=0.01, steps=10, delta=1e-5)
    with pytest.raises(ConfigError, match="dp.target_epsilon must be > 0"):
        cell_from_dict({"dp": {"target_epsilon": 0}})


def test_batch_larger_than_dataset_is_reported_before_running():
    cell = CellConfig(model="ffnn", batch_size=100, data_limit=50)
    with pytest.raises(ValueError, match=r"in \(0, 1\], got 2.0"):
        privacy_of(cell)
