"""The privacy audit (issue 36): canaries against the released update of each engine.

The audit must pass a correct step and catch every broken one (its controls); its bounds must
be valid (below the true ε of exact Gaussian scores) and its pass rule's false alarms rare."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ablation.core import audit_bounds as ab
from ablation.measure.audit import CONTROLS, audit_cell
from ablation.measure.settings import AuditSettings, CellConfig
from tests.cli import run_cli

#: Small but powered: 400 trials a side, a whole run of 50 steps with 200 canaries.
QUICK = AuditSettings(trials=400, schedule_trials=100, run_steps=50, run_canaries=200,
                      run_examples=500)


def test_gdp_epsilon_of_one_gaussian_step():
    # μ = 1 (σ = 1): ε = 4.38 at δ = 1e-5; δ(ε) is that mechanism's exact tradeoff
    assert ab.epsilon_of_gdp(1.0, 1e-5) == pytest.approx(4.3772, abs=1e-3)
    assert ab.gdp_delta(1.0, ab.epsilon_of_gdp(1.0, 1e-5)) == pytest.approx(1e-5, rel=1e-6)
    assert ab.epsilon_of_gdp(0.0, 1e-5) == 0.0
    assert ab.epsilon_of_gdp(2.0, 1e-5) > ab.epsilon_of_gdp(1.0, 1e-5)


def test_mu_estimate_recovers_the_separation_and_flags_noise_free_scores():
    rng = np.random.default_rng(0)
    est = ab.gdp_mu(rng.normal(1.0, 2.0, 4000) * 1, rng.normal(0.0, 2.0, 4000))
    assert est.mu == pytest.approx(0.5, abs=4 * est.se) and est.std == pytest.approx(2, rel=0.05)
    exact = ab.gdp_mu(np.full(10, 1.0), np.zeros(10))
    assert math.isinf(exact.mu) and exact.above(1.0)
    assert ab.gdp_mu(np.ones(10), np.ones(10)).mu == 0.0


def test_lower_bounds_stay_below_the_true_epsilon_and_the_pass_rule_rarely_alarms():
    """On exact μ = 1 Gaussian scores (true ε = 4.38): the Clopper–Pearson bound never above
    it, μ̂ − 3 SE above 1 in about 0.13 % of audits (the stated false-alarm rate)."""
    rng = np.random.default_rng(1)
    true_eps = ab.epsilon_of_gdp(1.0, 1e-5)
    bounds, alarms = [], 0
    for i in range(200):
        a, b = rng.normal(1.0, 1.0, 1000), rng.normal(0.0, 1.0, 1000)
        bounds.append(ab.epsilon_lower_bound(a, b, 1e-5, seed=i).epsilon)
        alarms += ab.gdp_mu(a, b).above(1.0)
    assert max(bounds) <= true_eps and np.median(bounds) > 0
    assert alarms <= 3  # expected 0.27 of 200
    # the rule with its confirmation on fresh trials: 0.024 % per μ test, by simulation too
    z1, z2 = rng.normal(size=(2, 2_000_000))
    alarms = (z1 > 6) | ((z1 > 3) & ((z1 + z2) / math.sqrt(2) > 3))
    assert ab.false_alarm_rate() == pytest.approx(2.38e-4, rel=0.02)
    assert alarms.mean() == pytest.approx(ab.false_alarm_rate(), rel=0.15)


def test_scores_that_are_not_numbers_fail_and_noise_off_its_std_fails():
    nan = ab.gdp_mu(np.array([np.nan, 1.0, 2.0]), np.zeros(3) + [0, 1, 2])
    assert nan.above(1.0)  # NaN released: nothing private is shown
    assert ab.epsilon_one_run(np.array([np.nan] * 10), np.ones(10, bool), 1e-5, 4).epsilon == \
        math.inf
    from ablation.measure.audit import Test
    fine = ab.MuEstimate(0.9, 0.05, 1000, 1000, 1.0)
    assert Test("one step", 0.909, fine, 1.0, None, None).passed
    # a key reused inside a call of 4 steps: noise 4σ instead of 2σ, μ̂ halves, the std shows it
    assert not Test("one step", 1.818, ab.MuEstimate(0.9, 0.05, 1000, 1000, 2.2), 2.0, None,
                    None).passed


def test_one_run_bound_is_zero_without_signal_and_positive_with_it():
    rng = np.random.default_rng(2)
    included = rng.random(1000) < 0.5
    assert ab.epsilon_one_run(rng.normal(size=1000), included, 1e-5, 200).epsilon == 0.0
    strong = ab.epsilon_one_run(np.where(included, 5.0, 0.0) + rng.normal(size=1000),
                                included, 1e-5, 200)
    assert strong.correct == 200 and 3 < strong.epsilon < 5
    # a larger ε explains more correct guesses: the p-value of the same count rises with it
    assert ab.one_run_p_value(100, 20, 18, 0.5, 1e-5) < ab.one_run_p_value(100, 20, 18, 2.0, 1e-5)


@pytest.mark.parametrize("engine", ["both", "ghost"])
def test_the_audit_passes_a_correct_engine_and_catches_every_control(engine):
    report = audit_cell(CellConfig(model="ffnn", engine=engine, batch_size=16), QUICK)
    tests = {t.name: t for t in report.audit.tests}
    assert set(tests) == {"one step", "masked slot", "noise schedule"}
    assert report.passed, "\n".join(report.lines())
    one = tests["one step"]
    assert one.claim_mu == pytest.approx(1 / 1.1)
    assert abs(one.estimate.mu - one.claim_mu) < 4 * one.estimate.se
    assert 0.9 < one.noise_ratio < 1.1  # the noise std along the canary is σC
    assert one.bound.epsilon <= one.claim_epsilon
    assert report.audit.whole_run.epsilon_lower <= report.audit.whole_run.epsilon
    assert set(report.controls) == set(CONTROLS)
    assert report.powered, "\n".join(report.lines())
    caught = {name: [t.name for t in c.tests if not t.passed]
              for name, c in report.controls.items()}
    assert "one step" in caught["noise halved"] and "one step" in caught["clipping off"]
    assert "masked slot" in caught["leaky mask"]
    assert "noise schedule" in caught["one noise key"]


def test_steps_per_call_claims_the_composition_of_its_steps():
    settings = AuditSettings(trials=300, schedule_trials=60, run_steps=0, controls=False)
    report = audit_cell(CellConfig(model="logreg", engine="both", batch_size=16,
                                   steps_per_call=4), settings)
    one = report.audit.tests[0]
    assert one.claim_mu == pytest.approx(2 / 1.1)  # √K/σ
    assert report.passed, "\n".join(report.lines())


def test_a_bounded_gradient_lowers_the_audits_clip_norm_and_says_so():
    settings = AuditSettings(trials=100, schedule_trials=20, run_steps=0, controls=False)
    report = audit_cell(CellConfig(model="embed", engine="ghost", batch_size=16), settings)
    assert report.canary == "repeated"
    assert report.canary_norm >= 100 * report.clip_norm * (1 - 1e-6)
    assert report.clip_note is None or "clips at" in report.clip_note
    assert report.passed, "\n".join(report.lines())


def test_cells_it_cannot_audit_are_refused_by_name():
    with pytest.raises(ValueError, match="private"):
        audit_cell(CellConfig(private=False), QUICK)
    with pytest.raises(ValueError, match="noise"):
        audit_cell(CellConfig(dp=CellConfig().dp.__class__(noise_multiplier=0.0)), QUICK)
    with pytest.raises(ValueError, match="token"):
        audit_cell(CellConfig(model="ffnn"), AuditSettings(canary="repeated"))


def test_the_command_writes_an_audit_record_and_refuses_bad_input(tmp_path):
    done = run_cli("ablation.audit", "model=logreg", "batch_size=16", "audit.trials=100",
                   "audit.schedule_trials=20", "audit.run_steps=20", "audit.run_canaries=50",
                   "audit.run_examples=200", "hydra/job_logging=disabled",
                   "hydra/hydra_logging=disabled", output_dir=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every control caught" in done.stdout
    record = json.loads(next(tmp_path.rglob("result.json")).read_text())
    assert record["kind"] == "audit" and record["status"] == "ok" and record["audit_passed"]
    assert record["audit"]["whole_run"]["epsilon"] > 0
    assert record["env"]["git_sha"] is not None or record["env"].get("code_sha")
    refused = run_cli("ablation.audit", "private=false", output_dir=tmp_path / "np")
    assert refused.returncode == 2 and "private" in refused.stdout
    bad = run_cli("ablation.audit", "audit.canary=loud", output_dir=tmp_path / "bad")
    assert bad.returncode == 2 and "audit.canary" in bad.stderr


def test_the_audit_figure_draws_engines_and_controls(tmp_path):
    import pandas as pd

    from ablation.report import figures
    from ablation.report.analysis import audit_frame
    test = {"name": "one step", "claim_mu": 0.909, "mu": 0.95, "mu_se": 0.05,
            "epsilon_lower": 0.3, "claim_epsilon": 3.9, "passed": True}
    control = {**test, "mu": 1.9, "passed": False}
    run = {"epsilon_lower": 0.2, "epsilon": 3.0, "passed": True}
    record = {"kind": "audit", "status": "ok", "model": "ffnn", "audited_engine": "both",
              "finished_at": "2026", "env": {"platform": "cpu", "cpu_count": 2},
              "audit": {"tests": [test], "whole_run": run},
              "controls": {"noise halved": {"tests": [control], "whole_run": None}}}
    table = audit_frame(pd.DataFrame([record]))
    assert set(table["mechanism"]) == {"both", "control: noise halved"}
    assert set(table["test"]) == {"one step", "whole run"}
    paths = figures.save(figures.audit(table), tmp_path, "audit")
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in paths)
