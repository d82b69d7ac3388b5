"""One private run over several processes (jax.distributed, gloo, local CPU processes): the
step equals the one-process step, Poisson sampling keeps its meaning over shards, a dead
process ends the cell with an error record and no orphans, and the launchers start it."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ablation import results
from ablation.sweep.launch import free_port
from tests.cli import QUICK, REPO, run_cli

CASE = REPO / "tests" / "distributed_case.py"


def _run_case(count: int, folder) -> list[dict[str, np.ndarray]]:
    """``tests/distributed_case.py`` as ``count`` processes of one run; each one's results."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(CASE), str(rank), str(count), str(port),
                               str(folder / f"{count}-{rank}.npz")], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(count)]
    try:
        logs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    return [dict(np.load(folder / f"{count}-{rank}.npz")) for rank in range(count)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    (result,) = _run_case(1, tmp_path_factory.mktemp("one"))
    return result


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("count", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_processes_release_what_one_process_releases(tmp_path, one_process, count):
    """The clipped sum and the released update of 2 (4) processes, each holding its rows of
    the batch (padded slots holding NaN among them), equal one process's on the same global
    batch and key to float32 rounding; after 10 steps every process holds the same
    parameters bit for bit."""
    every = _run_case(count, tmp_path)
    assert int(every[0]["devices"]) == count  # one global device per process
    for engine in ("both", "ghost", "ghost_two_pass"):
        for part in ("sum", "update"):
            mine, reference = every[0][f"{engine}_{part}"], one_process[f"{engine}_{part}"]
            assert np.isfinite(mine).all(), (engine, part)
            assert _relative(mine, reference) <= 1e-6, (engine, part, _relative(mine, reference))
        assert _relative(every[0][f"{engine}_final"], one_process[f"{engine}_final"]) <= 1e-5
        for other in every[1:]:  # bit-identical on every process
            assert np.array_equal(other[f"{engine}_hash"], every[0][f"{engine}_hash"]), engine
            for part in ("sum", "update", "final"):
                assert np.array_equal(other[f"{engine}_{part}"], every[0][f"{engine}_{part}"])


def test_poisson_over_processes_includes_every_example_at_rate_q():
    """Four processes, each sampling its own shard from its own key: every example of the
    run's 4·100 is in a step with probability q = 0.1, independently of the other shards; no
    example is in two shards (the 3 left over are in none); each shard's capacity is the
    Poisson capacity of its own expected batch.

    The test: each example's count over S steps against Binomial(S, q), two-sided, at a
    per-example level of 1e-3 / 400 (Bonferroni: a correct sampler fails with probability at
    most 1e-3), and the pooled count at 1e-4.
    """
    import jax
    from scipy import stats

    from ablation.data.samplers import TrainingSet, poisson_capacity, process_poisson
    count, per, batch, steps, sigmas = 4, 100, 40, 1000, 4.0
    n = count * per + 3
    data = TrainingSet(jax.numpy.arange(n, dtype=jax.numpy.float32)[:, None],
                       jax.numpy.zeros(n, jax.numpy.int32))
    q = batch / (count * per)
    seen = np.zeros(n, np.int64)
    included = []  # per process: [steps, per] 0/1
    for index in range(count):
        sampler = process_poisson(data, batch, jax.random.key(3), index, count, sigmas)
        assert sampler.sampling_rate == pytest.approx(q)
        assert sampler.capacity == poisson_capacity(batch / count, per, sigmas)
        hits = np.zeros((steps, per), np.int8)
        for i in range(steps):
            x, _, mask = sampler.batch(i)
            ids = np.asarray(x)[np.asarray(mask) > 0, 0].astype(np.int64)
            assert len(set(ids)) == len(ids)  # once per step
            assert ((ids >= index * per) & (ids < (index + 1) * per)).all()  # its own shard
            hits[i, ids - index * per] = 1
        assert sampler.stats()["poisson_overflow_steps"] == 0
        seen[index * per:(index + 1) * per] += hits.sum(0)
        included.append(hits)
    assert (seen[count * per:] == 0).all()
    alpha = 1e-3 / (count * per)
    low, high = stats.binom.ppf(alpha / 2, steps, q), stats.binom.isf(alpha / 2, steps, q)
    counts = seen[:count * per]
    assert ((counts >= low) & (counts <= high)).all(), (counts.min(), counts.max(), low, high)
    pooled = stats.binomtest(int(counts.sum()), steps * count * per, q)
    assert pooled.pvalue > 1e-4, pooled
    # Independent shards (keys that do not collide): per-step batch sizes uncorrelated.
    sizes = np.stack([h.sum(1) for h in included])
    corr = np.corrcoef(sizes)[np.triu_indices(count, 1)]
    assert np.abs(corr).max() < 5 / math.sqrt(steps), corr


def test_a_multi_process_cells_epsilon_is_the_one_process_cells(tmp_path):
    """Each shard is its own subsampled Gaussian at the global q for the global number of
    steps: ε matches the one-process cell's (up to the per-shard capacity's truncation)."""
    from ablation.sweep.config import cell_from_dict
    from ablation.sweep.jobs import privacy_of
    base = {"model": {"name": "ffnn"}, "engine": {"name": "ghost"}, "batch_size": 256,
            "private": True, "dp": {"sampling": "poisson"}, "data": {"limit": 8192}}
    one = privacy_of(cell_from_dict(base))
    two = privacy_of(cell_from_dict({**base, "distributed": {"processes": 2}}))
    assert two.epsilon == pytest.approx(one.epsilon, rel=0.02), (one, two)


def _cell(*extra: str) -> list[str]:
    return ["model=ffnn", "engine=ghost", "batch_size=32", "data.limit=1024", "private=true",
            *QUICK, *extra]


def test_distributed_settings_are_refused_by_name():
    from ablation.sweep.config import ConfigError, cell_from_dict
    base = {"model": {"name": "ffnn"}, "engine": {"name": "ghost"}, "batch_size": 64}
    bad = [({"engine": {"name": "vmap"}, "distributed": {"processes": 2}}, "engine=both or ghost"),
           ({"distributed": {"processes": 2, "coordinator": "nohost"}}, "host:port"),
           ({"distributed": {"processes": 2, "process_id": 2}}, "must be below"),
           ({"batch_size": 66, "distributed": {"processes": 4}}, "does not divide"),
           ({"distributed": {"processes": 2, "scaling": "sideways"}}, "distributed.scaling"),
           ({"distributed": {"processes": 2}, "timing": {"cost_split": True}}, "cost_split")]
    for override, message in bad:
        with pytest.raises(ConfigError, match=message):
            cell_from_dict({**base, **override})
    weak = cell_from_dict({**base, "distributed": {"processes": 2, "scaling": "weak"}})
    assert weak.batch_size == 128 and weak.global_devices == 2


def test_a_two_process_cell_writes_one_record(tmp_path):
    proc = run_cli("ablation.run", "distributed.processes=2", *_cell(), output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (_, record), = list(results.iter_records(tmp_path))
    assert record["status"] == "ok", record.get("error")
    assert record["processes"] == 2 and record["launched_by"] == "this job"
    assert len(set(record["process_params_sha"])) == 1, record["process_params_sha"]
    assert record["process_devices"] == [1, 1]
    assert record["median_step_s"] == max(record["process_step_s"])
    assert "2 processes" in record["sharding"]


def _processes_of(tmp_path) -> list:
    import psutil
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(tmp_path) in part for part in proc.info["cmdline"] or []):
                mine.append(proc)
        except psutil.Error:
            pass
    return mine


def test_a_killed_process_ends_the_cell_with_an_error_record_and_no_orphans(tmp_path):
    """SIGKILL to process 1 of 2 while it runs: the cell's record is an error naming it, and
    its peer (blocked in a collective with a dead process) is stopped, not left running."""
    import psutil
    cmd = [sys.executable, "-m", "ablation.run", "distributed.processes=2", "model=ffnn",
           "engine=ghost", "batch_size=32", "data.limit=1024", "timing.max_steps=100000",
           "timing.budget_s=600", "timing.timeout_s=300", "timing.progress=false",
           "hydra/job_logging=disabled", f"paths.output_dir={tmp_path}"]
    run = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    victim = None
    deadline = time.time() + 180
    while victim is None and time.time() < deadline:
        for proc in _processes_of(tmp_path):
            if any("process-1.spec.json" in part for part in proc.cmdline()):
                victim = proc
        time.sleep(0.5)
    assert victim is not None, "process 1 never started"
    time.sleep(8)  # past joining the run, into its steps
    victim.send_signal(signal.SIGKILL)
    _, err = run.communicate(timeout=240)
    (_, record), = list(results.iter_records(tmp_path))
    assert record["status"] == "error", record
    assert "process 1 of 2" in record["error"] and "SIGKILL" in record["error"], record["error"]
    _, alive = psutil.wait_procs(_processes_of(tmp_path), timeout=20)
    assert not alive, [p.cmdline() for p in alive]


@pytest.mark.parametrize("launcher", ["basic", "local"])
def test_the_launchers_start_a_two_process_cell(tmp_path, launcher):
    """The basic launcher (this job starts both processes) and submitit's local executor with
    two tasks (each task one process of the run) each give one ok record."""
    extra = (["hydra/launcher=local", "hydra.launcher.tasks_per_node=2"]
             if launcher == "local" else [])
    proc = run_cli("ablation.run", "-m", *extra, "distributed.processes=2", *_cell(),
                   output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (_, record), = list(results.iter_records(tmp_path))
    assert record["status"] == "ok", record.get("error")
    assert record["launched_by"] == ("submitit local" if launcher == "local" else "this job")
    assert len(set(record["process_params_sha"])) == 1


def test_the_scaling_table_divides_by_the_right_one_process_cell():
    """Strong scaling compares with the one-process cell of the same global batch, weak with
    the one of the same per-process batch; the slowest process sets a cell's time."""
    import pandas as pd

    from ablation.report.scaling import format_scaling, scaling_table

    def row(processes, batch, step_ms, scaling="strong", private=True):
        label = "ghost" + (f"[{processes} processes]" if processes > 1 else "")
        return {"family": "f", "model": "cnn", "engine_label": label, "engine": "ghost",
                "system": label if private else label.replace("ghost", "both"),
                "private": private, "batch_size": batch, "processes": processes,
                "scaling": scaling, "status": "ok", "throughput_step_s": step_ms / 1e3,
                "process_step_s": [step_ms / 1e3, step_ms / 2e3] if processes > 1 else None}
    frame = pd.DataFrame([row(1, 128, 10.0), row(1, 256, 18.0), row(2, 128, 8.0),
                          row(2, 256, 12.0, "weak"), row(2, 256, 9.0, private=False)])
    table = scaling_table(frame).set_index(["system", "scaling", "processes"])
    assert table.loc[("ghost", "strong", 2), "× 1 process"] == pytest.approx(10.0 / 8.0)
    assert table.loc[("ghost", "weak", 2), "× 1 process"] == pytest.approx(
        (256 / 12.0) / (128 / 10.0))
    assert table.loc[("ghost", "weak", 2), "per process"] == pytest.approx(
        (256 / 12.0) / (128 / 10.0) / 2)
    assert table.loc[("ghost", "strong", 2), "slowest/fastest"] == pytest.approx(2.0)
    # the non-private cell has no one-process cell beside it: shown, without a ratio
    assert math.isnan(table.loc[("both np", "strong", 2), "× 1 process"])
    assert "×1.25" in format_scaling(frame)
    assert scaling_table(frame[frame["processes"] == 1]).empty
