"""Past one machine: sweeps through submitit (local and SLURM configs), records that survive a
scheduler, and the data-parallel private step on forced CPU devices."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ablation import results
from tests.cli import QUICK, REPO, run_cli

TINY = ["model=logreg", "batch_size=16", "data.limit=512", *QUICK]
submitit = pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                               reason="the cluster extra is not installed (make test installs it)")


def test_two_cell_sweep_through_the_local_launcher(tmp_path):
    proc = run_cli("ablation.run", "-m", "hydra/launcher=local", "engine=both,vmap", *TINY,
                   output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    frame = results.load(tmp_path)
    assert sorted(frame["engine"]) == ["both", "vmap"] and set(frame["status"]) == {"ok"}
    assert set(frame["launcher"]) == {"local"} and set(frame["concurrent_cells"]) == {1}
    assert len(list(tmp_path.rglob("summary.csv"))) == 1
    assert "=== summary" in proc.stdout and "WARNING" not in proc.stdout


def test_more_cells_at_once_are_recorded_and_warned_about(tmp_path):
    proc = run_cli("ablation.run", "-m", "hydra/launcher=local",
                   "hydra.launcher.array_parallelism=2", "engine=both,vmap", *TINY,
                   output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert set(results.load(tmp_path)["concurrent_cells"]) == {2}
    assert "WARNING: up to 2 cells ran at once on one machine" in proc.stdout


SLOW_CELL = ["engine=none", "model=cnn", "batch_size=64", "data.limit=512",
             "timing.progress=false", "hydra/job_logging=disabled"]


def _start(tmp_path, *args, **popen):
    cmd = [sys.executable, "-m", "ablation.run", *args, f"paths.output_dir={tmp_path}"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), **popen)


def _worker_running(tmp_path, timeout_s: float = 120) -> "psutil.Process":
    """The worker process once its cell has started (it is busy with an eager loop)."""
    import psutil
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "ablation.sweep.worker" in cmd and any(str(tmp_path) in c for c in cmd):
                time.sleep(3)
                return proc
        time.sleep(0.5)
    raise AssertionError("the worker never started")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2])
def test_a_cell_stopped_by_the_scheduler_still_leaves_its_record(tmp_path, sig):
    """SIGTERM (a time limit or preemption), SIGHUP (the terminal went), SIGUSR2 (submitit's
    and SLURM's warning) while a cell runs: its record says so, the worker is gone, and
    resume=true runs that cell again (only that one)."""
    proc = _start(tmp_path, *SLOW_CELL)
    worker = _worker_running(tmp_path)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    (_, record), = list(results.iter_records(tmp_path))
    assert record["status"] == "timeout", record
    assert f"stopped by {signal.Signals(sig).name}" in record["error"]
    assert not worker.is_running() or worker.status() == "zombie"


def test_a_worker_dies_with_its_parent_even_by_sigkill(tmp_path):
    """Before: a parent killed by SIGKILL left its worker running, re-parented, with no time
    limit. The kernel now ends the worker with it (PR_SET_PDEATHSIG)."""
    import psutil
    proc = _start(tmp_path, *SLOW_CELL)
    worker = _worker_running(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    gone, alive = psutil.wait_procs([worker], timeout=20)
    assert not alive, "the worker outlived its parent"


def test_a_local_launchers_job_stops_with_its_sweep_and_leaves_a_timeout_record(tmp_path):
    """Before: SIGTERM to the sweep returned 143 while its submitit job ran on, unwatched, and
    wrote an ok record ~40 s later."""
    import psutil
    proc = _start(tmp_path, "-m", "hydra/launcher=local", *SLOW_CELL)
    worker = _worker_running(tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    psutil.wait_procs([worker], timeout=30)
    deadline = time.time() + 60
    while time.time() < deadline and not list(results.iter_records(tmp_path)):
        time.sleep(0.5)
    (_, record), = list(results.iter_records(tmp_path))
    assert record["status"] == "timeout" and "stopped by SIGTERM" in record["error"], record
    assert not worker.is_running() or worker.status() == "zombie"


def test_submitits_time_limit_signal_leaves_a_timeout_record(tmp_path):
    """Before: submitit's SIGUSR2 handler raised through the job and left only cell.spec.json.
    The signal goes to the submitit job process (the worker's parent)."""
    import psutil
    proc = _start(tmp_path, "-m", "hydra/launcher=local", *SLOW_CELL)
    worker = _worker_running(tmp_path)
    job = worker.parent()
    job.send_signal(signal.SIGUSR2)
    deadline = time.time() + 90
    while time.time() < deadline and not list(results.iter_records(tmp_path)):
        time.sleep(0.5)
    everything = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for process in everything:  # submitit may requeue the job: end the whole tree
        process.kill()
    psutil.wait_procs(everything, timeout=30)
    proc.communicate(timeout=60)
    (_, record), = list(results.iter_records(tmp_path))
    assert record["status"] == "timeout" and "stopped by SIGUSR2" in record["error"], record


def test_a_second_sweep_into_a_held_folder_is_refused(tmp_path):
    """Before: two sweeps started 0.2 s apart into one folder swapped measurements (vmap's
    step filed under both's name)."""
    folder = tmp_path / "sweep"
    first = _start(tmp_path, "-m", *SLOW_CELL, f"hydra.sweep.dir={folder}")
    _worker_running(tmp_path)
    second = subprocess.run([sys.executable, "-m", "ablation.run", "-m", "engine=vmap",
                             "model=logreg", f"hydra.sweep.dir={folder}",
                             f"paths.output_dir={tmp_path}"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    first.terminate()
    first.communicate(timeout=60)
    assert second.returncode == 2, second.stderr
    assert "is in use by a sweep" in second.stderr and second.stderr.count("\n") == 1
    engines = {r["engine"] for _, r in results.iter_records(tmp_path)}
    assert engines == {"none"}  # nothing of the second sweep was written


def test_resume_after_a_partial_sweep_runs_only_the_missing_cells(tmp_path):
    first = run_cli("ablation.run", "-m", "engine=both", *TINY, "resume=true",
                    output_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli("ablation.run", "-m", "hydra/launcher=local", "engine=both,vmap", *TINY,
                     "resume=true", output_dir=tmp_path)
    assert second.returncode == 0, second.stderr
    frame = results.load(tmp_path)
    assert sorted(frame["engine"]) == ["both", "vmap"]  # both reused, vmap run
    assert len(list(tmp_path.rglob(results.SKIPPED_FILE))) == 1


def test_slurm_config_renders_the_submitit_parameters(tmp_path):
    proc = run_cli("ablation.run", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                   "timing.timeout_s=1800", "--cfg", "hydra", "--package", "hydra.launcher",
                   output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for line in ("_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher."
                 "SlurmLauncher", "tasks_per_node: 1", "gpus_per_node: 1", "partition: gpu",
                 "timeout_min: ${ablation_minutes:${timing.timeout_s}}"):
        assert line in text, line
    from ablation.sweep.shell import launcher_minutes
    assert launcher_minutes(1800) == 35  # the cell's 30 minutes plus 5 of start-up


SHARDED = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from ablation import DPConfig, make_step, sgd
from models import get_model
from tests.conftest import flatten, small_batch
worst = 0.0
MASK = jnp.array([1.0, 0, 1, 1, 0, 1, 1, 1])
# ffnn: both engines, each with and without a mask, on 2 or 4 devices; cnn: the conv rules of
# the ghost engine and vmap's grouped convolutions, masked, on 4 devices.
CASES = [("ffnn", "both", None, 2), ("ffnn", "both", MASK, 4), ("ffnn", "ghost", None, 4),
         ("ffnn", "ghost", MASK, 2)]
CASES += [("cnn", e, MASK, 4) for e in ("both", "ghost")]
for name, engine, mask, devices in CASES:
    model = get_model(name)
    params = model.init(jax.random.key(0))
    x, y = small_batch(model, 8, seed=1)
    opt = sgd(0.1)
    ref = make_step(engine, model.loss, opt, DPConfig(1.0, 1.1))(
        params, opt.init(params), x, y, jax.random.key(3), mask)[0]
    got = make_step(engine, model.loss, opt, DPConfig(1.0, 1.1), devices=devices)(
        params, opt.init(params), x, y, jax.random.key(3), mask)[0]
    worst = max(worst, float(np.abs(flatten(got) - flatten(ref)).max()))
try:
    make_step("both", model.loss, sgd(0.1), DPConfig(1.0, 1.1), devices=3)(
        params, opt.init(params), x, y, jax.random.key(3))
except ValueError as error:
    print("ERROR", error)
print("WORST", worst)
"""


def test_the_sharded_step_equals_the_single_device_step():
    proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    worst = float(proc.stdout.split("WORST")[1])
    assert worst < 1e-6, worst  # same key, same noise: only float summation order differs
    assert "ERROR a batch of 8 does not divide over engine.devices=3" in proc.stdout


def test_a_sharded_cell_runs_and_records_its_devices(tmp_path):
    proc = run_cli("ablation.run", "engine=ghost", "engine.devices=2", "model=ffnn",
                   "batch_size=64", "data.limit=512", "dp.sampling=poisson", *QUICK,
                   output_dir=tmp_path,
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert proc.returncode == 0, proc.stderr
    (_, record), = list(results.iter_records(tmp_path))
    assert record["devices"] == 2 and record["env"]["device_count"] == 2
    assert record["capacity"] % 2 == 0 and "shard_map" in record["sharding"]
    one_device = run_cli("ablation.run", "engine=both", "engine.devices=2", *TINY,
                         output_dir=tmp_path / "one")
    assert one_device.returncode == 1
    (_, failed), = list(results.iter_records(tmp_path / "one"))
    assert "JAX sees 1 cpu device" in failed["error"]
