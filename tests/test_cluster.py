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


def test_a_cell_stopped_by_the_scheduler_still_leaves_its_record(tmp_path):
    """SIGTERM (a scheduler's time limit or preemption) while a cell runs: its record says so,
    the worker is gone, and resume=true runs that cell again (only that one)."""
    cmd = [sys.executable, "-m", "ablation.run", "engine=none", "model=cnn", "batch_size=64",
           "data.limit=512", "timing.progress=false", "hydra/job_logging=disabled",
           f"paths.output_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.rglob("cell.spec.json")):
        time.sleep(0.5)
    time.sleep(3)  # the worker is busy with its eager per-example loop
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    (_, record), = list(results.iter_records(tmp_path))
    assert record["status"] == "timeout" and "stopped by SIGTERM" in record["error"]


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
