"""One grid cell as a job: privacy accounting, resume, the worker, and its record.

Hydra-free: the entry points (:mod:`ablation.run`) validate their config into a
:class:`~ablation.config.CellConfig` and call :func:`run_timing_job` with the job's folder.
The parent process never touches the accelerator; all device work happens in the worker.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Mapping

from ablation.config import CellConfig
from ablation.data import poisson_capacity
from ablation.launch import run_worker
from ablation.privacy import PrivacyReport, privacy_report
from ablation.results import (RESULT_FILE, SCHEMA, SKIPPED_FILE, config_hash, environment,
                              find_ok_record, now_iso, one_line, read_json, write_json)
from models import get_model

#: Measurement fields every timing record has (null until measured).
MEASUREMENT_FIELDS = (
    "n_params", "n_train", "steps_per_epoch", "compile_s", "first_step_s", "step_times_s",
    "median_step_s", "iqr_step_s", "epoch_times_s", "first_epoch_s", "median_epoch_s",
    "epoch_estimated", "steps_timed", "steps_run", "n_compiles", "compiled_functions",
    "loss_start", "loss_end", "test_accuracy", "device_peak_bytes")


def training_size(cell: CellConfig) -> int:
    """Examples the cell trains on (the dataset's size, or ``data.limit`` when smaller)."""
    n = get_model(cell.model).dataset.n_train
    return n if cell.data_limit is None else min(n, cell.data_limit)


@functools.lru_cache(maxsize=256)
def _cached_privacy(**kwargs: Any) -> PrivacyReport:
    return privacy_report(**kwargs)


def privacy_of(cell: CellConfig) -> PrivacyReport | None:
    """The guarantee of the configured training length (None for non-private cells)."""
    if not cell.private:
        return None
    n = training_size(cell)
    capacity = (poisson_capacity(cell.batch_size, n, cell.dp.capacity_sigmas)
                if cell.dp.sampling == "poisson" else None)
    return _cached_privacy(noise_multiplier=cell.dp.noise_multiplier, batch_size=cell.batch_size,
                           n_train=n, epochs=cell.epochs, delta=cell.dp.delta,
                           accountant=cell.dp.accountant, sampling=cell.dp.sampling,
                           capacity=capacity, target_epsilon=cell.dp.target_epsilon)


def _privacy_fields(report: PrivacyReport | None, cell: CellConfig) -> dict[str, Any]:
    if report is None:
        return {"epsilon": None, "delta": None, "accountant": None, "sampling": cell.dp.sampling,
                "sampling_rate": cell.batch_size / training_size(cell), "accounted_steps": None,
                "noise_multiplier": None, "accounting_note": None}
    return {"epsilon": report.epsilon, "delta": report.delta, "accountant": report.accountant,
            "sampling": report.sampling, "sampling_rate": report.sampling_rate,
            "accounted_steps": report.accounted_steps, "noise_multiplier": report.noise_multiplier,
            "accounting_note": report.note}


def base_record(cell: CellConfig, config: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The identity part of a record: what ran, with which config, when."""
    model = get_model(cell.model)
    n = training_size(cell)
    return {
        "schema": SCHEMA, "kind": kind, "status": None, "error": None,
        "engine": cell.engine, "loop": cell.loop if cell.engine == "jit" else None,
        "engine_mode": cell.engine_mode, "model": cell.model,
        "unroll": cell.unroll if cell.model == "lstm" else None,
        "dataset": model.dataset.name, "data": cell.data, "batch_size": cell.batch_size,
        "private": cell.private, "clip_norm": cell.dp.clip_norm, "lr": cell.lr,
        "seed": cell.seed, "epochs": cell.epochs, "timing_mode": cell.timing.mode,
        "n_params": model.paper_n_params, "n_train": n, "steps_per_epoch": n // cell.batch_size,
        "config": dict(config), "config_hash": config_hash(config), "started_at": now_iso(),
    }


def skip_if_done(digest: str, kind: str, job_dir: Path, resume_root: Path) -> dict | None:
    """With ``resume=true``: the earlier ok record of this config, after leaving a pointer."""
    found = find_ok_record(resume_root, digest, kind)
    if found is None:
        return None
    write_json(job_dir / SKIPPED_FILE, {"schema": SCHEMA, "config_hash": digest,
                                        "record": str(found.resolve())})
    print(f"[resume] skipped: an ok record of this config exists at {found}", flush=True)
    return read_json(found)


def run_timing_job(cell: CellConfig, config: Mapping[str, Any], job_dir: str | Path, *,
                   resume: bool = False, resume_root: str | Path = "outputs") -> dict[str, Any]:
    """Time one cell in a fresh worker process and write ``result.json`` into ``job_dir``.

    A cell that fails (exception, out of memory, timeout) still gets its record, with the
    status and a one-line error. Returns the record.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    record = base_record(cell, config, "timing")
    if resume:
        done = skip_if_done(record["config_hash"], "timing", job_dir, Path(resume_root))
        if done is not None:
            return done
    record.update({key: None for key in MEASUREMENT_FIELDS if key not in record})
    try:
        report = privacy_of(cell)
    except ValueError as error:
        report = None
        record.update(status="error", error=one_line(error))
    record.update(_privacy_fields(report, cell))
    if record["status"] is None and cell.data == "real":
        error = fetch_real_data(cell)
        if error:
            record.update(status="error", error=error)
    if record["status"] is None:
        sigma = report.noise_multiplier if report else cell.dp.noise_multiplier
        outcome = run_worker({"task": "timing", "cell": cell.to_dict(), "noise_multiplier": sigma},
                             job_dir, timeout_s=cell.timing.timeout_s)
        record.update(outcome.result)
        record["wall_s"] = outcome.wall_s
    if not record.get("env"):
        record["env"] = environment(devices=False)
    record["finished_at"] = now_iso()
    write_json(job_dir / RESULT_FILE, record)
    print(describe(record), flush=True)
    return record


def fetch_real_data(cell: CellConfig) -> str | None:
    """Download and verify the cell's real dataset in the parent; a one-line error or None."""
    from ablation.datasets import DatasetUnavailable, fetch_all
    try:
        fetch_all(get_model(cell.model).dataset.name, cell.data_cache_dir, download=cell.download)
    except DatasetUnavailable as error:
        return one_line(error)
    return None


def describe(record: Mapping[str, Any]) -> str:
    """One line per finished cell."""
    engine = record["engine"] + (f"[{record['loop']}]" if record.get("loop") not in (None, "dispatch")
                                 else "")
    head = (f"[{record['status']}] {engine} {record['model']} B={record['batch_size']} "
            f"{'private' if record['private'] else 'non-private'}")
    if record["status"] != "ok":
        return f"{head}: {record.get('error')}"
    parts = []
    if record.get("compile_s") is not None:
        parts.append(f"compile {record['compile_s']:.2f} s")
    parts.append(f"step {1e3 * record['median_step_s']:.2f} ms")
    est = " (est.)" if record.get("epoch_estimated") else ""
    parts.append(f"epoch {record['median_epoch_s']:.2f} s{est}")
    eps = record.get("epsilon")
    if eps is not None:
        parts.append(f"eps {eps:.2f}" if isinstance(eps, float) and math.isfinite(eps)
                     else f"eps {eps}")
    return f"{head}: " + ", ".join(parts)
