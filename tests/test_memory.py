"""The memory probe: search logic, real capped probes on the CPU, failure classification."""

from __future__ import annotations

import signal
import sys

import pytest

from ablation.data.samplers import poisson_capacity
from ablation.measure.probe import Try, gap_allowed, predicted_max, search
from ablation.measure.settings import CellConfig, PrivacyConfig, ProbeSettings
from ablation.report import records as results
from ablation.sweep.config import probe_settings_from_dict
from ablation.sweep.failures import is_out_of_memory, status_of_exit, xla_status_code
from ablation.sweep.jobs import PROBE_CPU_ENV, _verify, cap_plan, run_memory_job
from ablation.sweep.launch import run_process, run_worker
from tests.cli import run_cli

# -- the search, against a fake memory model ------------------------------------------------------


def fake(boundary: int, per_example: int = 1000, error_at: int | None = None, predict=True):
    """try_size for a step that fits up to ``boundary`` examples."""
    calls = []

    def try_size(b: int) -> Try:
        calls.append(b)
        if error_at is not None and b >= error_at:
            return Try(b, "error", error="ValueError: broken")
        pred = per_example * b if predict else None
        return Try(b, "ok" if b <= boundary else "oom", peak_bytes=pred, predicted_bytes=pred)
    return try_size, calls


@pytest.mark.parametrize("boundary", [1, 7, 16, 100, 1000, 12_345])
def test_search_finds_the_boundary_within_resolution(boundary):
    try_size, calls = fake(boundary, predict=False)
    out = search(try_size, ProbeSettings(start=16, resolution=1, limit_gb=None))
    assert out["status"] == "ok" and out["max_batch_size"] == boundary
    assert len(calls) == len(set(calls))  # never the same size twice


def test_relative_resolution_stops_early():
    try_size, calls = fake(10_000, predict=False)
    out = search(try_size, ProbeSettings(start=16, resolution=0.05, limit_gb=None))
    assert 10_000 * 0.95 <= out["max_batch_size"] <= 10_000
    assert gap_allowed(1000, ProbeSettings(resolution=0.05)) == 50
    assert gap_allowed(1000, ProbeSettings(resolution=8)) == 8


def test_predictions_guide_the_search():
    limit = 1 << 20  # per-example 1000 bytes: the cap holds 1048 examples
    blind, blind_calls = fake(1048, predict=False)
    guided, guided_calls = fake(1048)
    settings = ProbeSettings(start=16, resolution=1, limit_gb=limit / (1 << 30))
    assert search(blind, settings)["max_batch_size"] == 1048
    assert search(guided, settings)["max_batch_size"] == 1048
    assert len(guided_calls) < len(blind_calls) / 2


def test_predicted_max_solves_the_predictions_for_the_cap():
    # 1 MiB fixed + 1000 bytes per example: the cap of 2 MiB holds 1048 examples. Failed
    # tries count: their predictions are as good as those of the sizes that fit.
    tried = [Try(512, "ok", predicted_bytes=(1 << 20) + 512_000),
             Try(2048, "oom", predicted_bytes=(1 << 20) + 2_048_000)]
    assert predicted_max(tried, 2 << 20) == 1048
    assert predicted_max(tried, None) is None
    assert predicted_max(tried[:1], 2 << 20) is None  # one size gives no slope
    assert predicted_max([Try(8, "ok"), Try(16, "oom")], 2 << 20) is None  # eager: none


def test_nothing_fits_gives_zero_with_reason():
    try_size, calls = fake(0, predict=False)
    out = search(try_size, ProbeSettings(start=16, resolution=1, limit_gb=None))
    assert out["max_batch_size"] == 0 and "batch size 1 does not fit" in out["reason"]
    assert calls[-1] == 1


def test_an_error_stops_the_probe():
    try_size, _ = fake(10_000, error_at=64, predict=False)
    out = search(try_size, ProbeSettings(start=16, limit_gb=None))
    assert out["status"] == "error" and "batch size 64" in out["reason"]


def test_max_batch_size_caps_the_growth():
    try_size, _ = fake(10**9, predict=False)
    out = search(try_size, ProbeSettings(start=16, max_batch_size=100, limit_gb=None))
    assert out["max_batch_size"] == 100 and out["reached_max"]


def test_bad_memory_settings():
    from ablation.sweep.config import ConfigError
    with pytest.raises(ConfigError, match="memory.growth must be > 1"):
        probe_settings_from_dict({"growth": 1.0})
    with pytest.raises(ConfigError, match="memory.limit_gb must be > 0"):
        probe_settings_from_dict({"limit_gb": 0})


# -- classification of failures ------------------------------------------------------------------


def test_oom_is_recognised_by_type_and_status_code():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes."))
    assert xla_status_code(RuntimeError("INTERNAL: boom")) == "INTERNAL"
    assert not is_out_of_memory(ValueError("INTERNAL: something RESOURCE_EXHAUSTED later"))
    assert not is_out_of_memory(ValueError("shapes differ"))
    # Death by a signal under a limit is only a crash until a re-run gives evidence.
    assert status_of_exit(-signal.SIGKILL, memory_capped=True)[0] == "crash"
    assert status_of_exit(-signal.SIGABRT, memory_capped=True)[0] == "crash"
    assert status_of_exit(-signal.SIGKILL, memory_capped=False)[0] == "error"
    assert status_of_exit(3, memory_capped=True)[0] == "error"


def test_child_that_dies_under_the_cap_is_a_crash_and_one_that_raises_is_an_error(tmp_path):
    die = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGABRT)"]
    assert run_process(die, timeout_s=60, memory_capped=True).result["status"] == "crash"
    raises = [sys.executable, "-c", "raise ValueError('not memory')"]
    outcome = run_process(raises, timeout_s=60, memory_capped=True)
    assert outcome.result["status"] == "error" and outcome.returncode == 1
    # A worker whose task raises an ordinary error reports it as such, under a cap too.
    spec = {"task": "memory_try", "cell": {**CellConfig().to_dict(), "model": "nope"},
            "noise_multiplier": 1.0, "batch_size": 4, "cap_bytes": 1 << 28}
    outcome = run_worker(spec, tmp_path, timeout_s=120, memory_capped=True)
    assert outcome.result["status"] == "error" and "nope" in outcome.result["error"]


# -- real probes on the CPU ------------------------------------------------------------------------


def _probe(tmp_path, model, engine="both", **memory):
    cell = CellConfig(engine=engine, model=model, dp=PrivacyConfig())
    settings = ProbeSettings(**{"limit_gb": 0.05, **memory})
    return cell, settings, run_memory_job(cell, settings, {"model": {"name": model}}, tmp_path)


def _retry(tmp_path, cell, settings, batch_size):
    spec = {"task": "memory_try", "cell": cell.to_dict(), "noise_multiplier": 1.1,
            "batch_size": batch_size, "cap_bytes": settings.limit_bytes}
    return run_worker(spec, tmp_path, name=f"recheck_{batch_size}", timeout_s=300,
                      env=PROBE_CPU_ENV, memory_capped=True).result


# -- what a cap means, and evidence for out of memory (issue 12.16-18) ---------------------------


def test_a_cap_that_cannot_be_enforced_is_refused_not_recorded():
    gpu = {"platform": "gpu", "device_kind": "H", "total_bytes": None}
    with pytest.raises(ValueError, match="cannot be enforced on this gpu device"):
        cap_plan(gpu, 1 << 30, predict_only=False)
    env, how = cap_plan({**gpu, "total_bytes": 80 << 30}, 8 << 30, predict_only=False)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.1000" and how.startswith("enforced")
    env, how = cap_plan({"platform": "cpu", "total_bytes": 24 << 30}, 1 << 29, False)
    assert how.startswith("measured") and "RLIMIT_DATA stops a try at 1.50 GiB" in how


@pytest.mark.parametrize("unlimited, status", [
    ({"status": "ok", "peak_bytes": 3 << 20, "peak_scope": "step"}, "oom"),  # evidence
    ({"status": "ok", "peak_bytes": 1 << 10, "peak_scope": "step"}, "error"),  # fits: not memory
    ({"status": "error", "error": "INTERNAL: check failed"}, "error"),  # fails anyway
])
def test_a_crash_is_out_of_memory_only_with_evidence(unlimited, status):
    crashed = {"status": "crash", "error": "worker killed by SIGABRT under the memory limit"}
    decided, how = _verify(crashed, unlimited, 1 << 20)
    assert decided["status"] == status and "SIGABRT" in decided["error"] and how


def test_probe_runs_the_padded_capacity_of_a_poisson_step(tmp_path):
    cell = CellConfig(engine="both", model="logreg", dp=PrivacyConfig(sampling="poisson"))
    spec = {"task": "memory_try", "cell": cell.to_dict(), "noise_multiplier": 1.1,
            "batch_size": 64, "cap_bytes": None, "n_train": 45_220}
    result = run_worker(spec, tmp_path, timeout_s=300, env=PROBE_CPU_ENV).result
    assert result["status"] == "ok", result.get("error")
    assert result["batch_size"] == 64 and result["rows"] == poisson_capacity(64, 45_220, 5.0)


# Resolution a few percent: at a gap of one example the CPU boundary is within the noise of
# the process' own allocations (a size that fit once can fail on a re-run).
# The start is a few doublings below each boundary (ffnn ~1,240, cnn ~170 examples).
# Measured ÷ predicted peak: ffnn 1.001-1.008 and cnn 1.07-1.18 on the development machine
# (jax 0.10.2). The known gap: the cnn's convolutions take scratch memory outside XLA's buffer
# plan (what memory_analysis() reports), so its measured peak runs up to 18 % above the plan,
# and the prediction solved for the cap overshoots the measured maximum by about as much.
@pytest.mark.parametrize("model, resolution, start, peak_ratio", [
    ("ffnn", 0.04, 256, (0.98, 1.05)),
    pytest.param("cnn", 0.1, 32, (0.98, 1.25), marks=pytest.mark.slow)])  # 35-65 s
def test_probe_finds_a_maximum_that_fits_and_the_next_size_does_not(tmp_path, model, resolution,
                                                                     start, peak_ratio):
    cell, settings, record = _probe(tmp_path, model, resolution=resolution, start=start)
    assert record["status"] == "ok", record["reason"]
    best = record["max_batch_size"]
    assert best > 16 and not record["reached_max"]
    failed = min(t["batch_size"] for t in record["tried"] if t["status"] == "oom")
    gap = gap_allowed(best, settings)
    assert failed - best <= gap
    # Checked again, each in a fresh worker: the maximum fits (to the run-to-run noise of a
    # CPU process' peak: a fraction of a percent for ffnn, up to 1 % for the cnn, whose
    # convolution scratch varies), the next size up (one resolution step above it) does not.
    again = _retry(tmp_path, cell, settings, best)
    assert again["status"] == "ok" or again["peak_bytes"] <= 1.02 * settings.limit_bytes
    assert _retry(tmp_path, cell, settings, max(failed, best + gap))["status"] == "oom"
    # Predicted and measured peak agree at every size (XLA's buffer plan is the memory), to
    # what the measurements support (see above); a prediction bug of 2x cannot hide in it.
    low, high = peak_ratio
    for t in record["tried"]:
        assert t["predicted_bytes"] > 0 and t["peak_bytes"] > 0 and t["peak_scope"] == "step"
        assert low < t["peak_bytes"] / t["predicted_bytes"] < high, t
    assert record["cap_enforced"].startswith("measured")
    # The sizes that did not fit keep their prediction, and the record solves them for the cap.
    assert 1 / high < record["predicted_max_batch_size"] / best < 1.1 * high / low
    frame = results.load(tmp_path)
    assert list(frame["kind"]) == ["memory"] and frame["max_batch_size"].iloc[0] == best


@pytest.mark.slow  # ~20 s; the compiled probe stays in the default suite
def test_non_jit_engine_probe(tmp_path):
    _, _, record = _probe(tmp_path, "ffnn", engine="vmap", start=512, resolution=0.5)
    assert record["status"] == "ok" and record["max_batch_size"] >= 256
    assert all(t["predicted_bytes"] is None for t in record["tried"])


def test_predict_only_runs_nothing(tmp_path):
    _, _, record = _probe(tmp_path, "ffnn", predict_only=True, resolution=0.05)
    assert record["status"] == "ok" and record["max_batch_size"] > 100
    assert all(t["peak_bytes"] is None for t in record["tried"])
    assert record["predicted_max_batch_size"] == record["max_batch_size"]


def test_cap_too_small_for_one_example(tmp_path):
    # embed: 160k parameters (0.6 MiB, three times over with gradient and update) and 1.5 MiB.
    _, _, record = _probe(tmp_path, "embed", limit_gb=1.5 / 1024, start=2)
    assert record["status"] == "ok" and record["max_batch_size"] == 0
    assert "batch size 1 does not fit" in record["reason"]


def test_a_cap_below_what_the_runtime_needs_is_refused_in_mib(tmp_path):
    """Issue 15.7: caps print in the unit that shows them, and a meaningless one is refused."""
    proc = run_cli("ablation.memory", "memory.limit_gb=0.0001", "hydra/job_logging=disabled",
                   output_dir=tmp_path)
    assert proc.returncode == 2
    assert "memory.limit_gb=0.0001 (105 KiB) is below the 1 MiB the cpu runtime needs" \
        in proc.stderr
    assert not list(tmp_path.rglob("try_*.spec.json"))


def test_cap_above_the_machine_is_refused_before_anything_runs(tmp_path):
    proc = run_cli("ablation.memory", "memory.limit_gb=1000000", "hydra/job_logging=disabled",
                   output_dir=tmp_path)
    assert proc.returncode == 2
    assert "memory.limit_gb=1e+06 exceeds this cpu device's" in proc.stderr
    assert "[memory]" not in proc.stdout and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("try_*.spec.json"))
