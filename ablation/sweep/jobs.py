"""One grid cell as a job: privacy accounting, resume, the worker, and its record.

Hydra-free: the entry points (:mod:`ablation.run`) validate their config into a
:class:`~ablation.measure.settings.CellConfig` and call :func:`run_timing_job` with the job's
folder.
The parent process never touches the accelerator; all device work happens in the worker.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from ablation.core.noise import GENERATOR as NOISE_GENERATOR
from ablation.core.privacy import PrivacyReport, privacy_report
from ablation.data.samplers import poisson_capacity
from ablation.measure.settings import REFERENCE_ENGINES, CellConfig, model_of, training_size
from ablation.report.labels import engine_label, model_label
from ablation.report.records import (REPO_ROOT, RESULT_FILE, SCHEMA, SKIPPED_FILE, config_hash,
                                     environment, find_ok_record, machine_identity, now_iso,
                                     one_line, read_json, record_identity, write_json)
from ablation.sweep.failures import CRASH
from ablation.sweep.folders import holding
from ablation.sweep.launch import ChildOutcome, Terminated, run_worker, run_workers
from ablation.sweep.processes import Launch, plan_launch, process_environments
from models.custom import source_digest

#: Rows whose framework draws its own noise (PyTorch's or TensorFlow's generator).
TORCH_OR_TF_ENGINES = ("opacus", "backpack", "pyvacy", "tfp")

#: Measurement fields every timing record has (null until measured).
MEASUREMENT_FIELDS = (
    "n_params", "n_train", "steps_per_epoch", "compile_s", "first_step_s", "step_times_s",
    "median_step_s", "iqr_step_s", "throughput_step_s", "throughput_steps",
    "throughput_bursts_s", "epoch_times_s", "first_epoch_s", "median_epoch_s",
    "epoch_estimated", "steps_timed", "steps_run", "inputs_reused", "noise_step_s", "n_compiles",
    "compiled_functions", "loss_start", "loss_end", "test_accuracy", "device_peak_bytes",
    "ghost_rules", "cost_split_s", "launched_by", "process_step_s",
    "gaussian_ns", "noise_floor_s", "process_throughput_s",
    "process_devices", "process_params_sha")


@functools.lru_cache(maxsize=256)
def _cached_privacy(**kwargs: Any) -> PrivacyReport:
    return privacy_report(**kwargs)


def privacy_of(cell: CellConfig) -> PrivacyReport | None:
    """The guarantee of the configured training length (None for non-private cells)."""
    if not cell.private:
        return None
    n, batch = training_size(cell), cell.batch_size
    if cell.dp.sampling == "poisson" and cell.processes > 1:
        # Each process samples its own shard (n // P examples, rate q = B / (P·shard)) and
        # truncates at its own capacity: a neighbouring dataset differs in one shard, whose
        # mechanism is the truncated subsampled Gaussian of that shard.
        n, batch = n // cell.processes, batch // cell.processes
    capacity = (poisson_capacity(batch, n, cell.dp.capacity_sigmas, cell.devices)
                if cell.dp.sampling == "poisson" else None)
    return _cached_privacy(noise_multiplier=cell.dp.noise_multiplier, batch_size=batch,
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


def _sharding(cell: CellConfig) -> str | None:
    if cell.processes > 1:
        return (f"batch split over {cell.global_devices} devices of {cell.processes} processes "
                f"({cell.devices} each; jax.distributed, shard_map, psum of clipped sums)")
    if cell.devices > 1:
        return f"batch split over {cell.devices} devices (shard_map, psum of clipped sums)"
    return None


def base_record(cell: CellConfig, config: Mapping[str, Any], kind: str,
                experiment: str | None = None) -> dict[str, Any]:
    """The identity part of a record: what ran, with which config, when.

    ``n_params`` is left to the measurement (a failed cell measured nothing); the paper's
    count is ``paper_n_params``.
    """
    model = model_of(cell)
    n = training_size(cell)
    custom = cell.model == "custom"
    return {
        "schema": SCHEMA, "kind": kind, "status": None, "error": None,
        "engine": cell.engine, "loop": cell.loop if cell.engine == "jit" else None,
        "engine_mode": cell.engine_mode, "xla": cell.xla if cell.engine == "tfp" else None,
        "microbatch_size": (cell.microbatch_size if cell.engine == "jax_privacy"
                            and cell.engine_mode == "microbatch" else None),
        "model": model.name if custom else cell.model,
        "model_factory": cell.factory if custom else None,
        "model_kwargs": json.loads(cell.model_kwargs) if custom else None,
        "model_source_sha": source_digest(cell.factory) if custom else None,
        "ghost_fallback": cell.ghost_fallback if cell.engine == "ghost" else None,
        # the toolkit's DP-SGD step draws the noise for its engines and jax_privacy's rows
        "noise_generator": (NOISE_GENERATOR if cell.private and cell.engine not in
                            TORCH_OR_TF_ENGINES else None),
        "unroll": cell.unroll if cell.model == "lstm" else None,
        "pool": cell.pool if cell.model == "cnn" else None,
        "tied": cell.tied if cell.model == "transformer" else None,
        "steps_per_call": cell.steps_per_call, "devices": cell.devices,
        "processes": cell.processes, "scaling": cell.scaling,
        "process_batch_size": cell.batch_size // cell.processes,
        "sharding": _sharding(cell),
        "dataset": model.dataset.name, "data": cell.data, "batch_size": cell.batch_size,
        "private": cell.private, "clip_norm": cell.dp.clip_norm, "lr": cell.lr,
        "seed": cell.seed, "epochs": cell.epochs, "timing_mode": cell.timing.mode,
        "n_params": None, "paper_n_params": model.paper_n_params, "n_train": n,
        "steps_per_epoch": n // cell.batch_size, "experiment": experiment,
        "config": dict(config), "config_hash": config_hash(config, kind), "started_at": now_iso(),
    }


@functools.lru_cache(maxsize=16)
def machine_env(engine: str) -> dict[str, Any]:
    """This machine's environment as ``engine``'s framework reports it (devices included).

    A worker reports it (the parent never touches the accelerator), once per framework and
    process, in a folder of its own (jobs that run at once never share files).
    """
    with tempfile.TemporaryDirectory(prefix="dpsgd-environment-") as folder:
        outcome = run_worker({"task": "environment", "engine": engine}, Path(folder),
                             name="environment", timeout_s=300, python=interpreter_for(engine),
                             env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    if outcome.result.get("status") != "ok":
        raise RuntimeError(f"could not query the machine: {outcome.result.get('error')}")
    # as its records carry it: the accountant is this process's (see run_job)
    return {**outcome.result["env"], "dp_accounting": _version("dp-accounting")}


def current_machine(engine: str) -> dict[str, Any]:
    """This machine's identity for ``engine``'s framework, as its records would carry it."""
    return machine_identity(machine_env(engine), engine)


def _failed_env(engine: str) -> dict[str, Any]:
    """The environment of a record whose worker died before reporting one: the framework's
    (so the record stays in its sweep's family and figures mark the cell), else what the
    parent knows without touching the devices."""
    try:
        return dict(machine_env(engine))
    except Exception:  # noqa: BLE001 - the framework may be what failed
        return environment(devices=False)


def skip_if_done(record: Mapping[str, Any], job_dir: Path, resume_root: Path) -> dict | None:
    """With ``resume=true``: the newest earlier ok record of this cell on this machine and
    code (outside committed ``reference`` folders), after leaving a pointer to it. Where the
    machine cannot be asked (a framework's environment is missing), nothing is reused."""
    try:
        machine = current_machine(record["engine"])
    except (RuntimeError, ValueError) as error:
        print(f"[resume] not reusing anything for {record['engine']}: {one_line(error)}",
              flush=True)
        return None
    found = find_ok_record(resume_root, record["config_hash"], record["kind"], machine,
                           record.get("concurrent_cells") or 1, record.get("model_source_sha"),
                           record.get("noise_generator"))
    if found is None:
        return None
    # Relative to the pointer, so a moved or synced outputs/ folder keeps its links.
    target = os.path.relpath(found.resolve(), job_dir.resolve())
    set_aside(job_dir / RESULT_FILE)  # an earlier run's record in this folder is not this job's
    write_json(job_dir / SKIPPED_FILE, {"schema": SCHEMA, "config_hash": record["config_hash"],
                                        "record": target})
    print(f"[resume] skipped: this cell already ran on this machine and code: {found}",
          flush=True)
    return read_json(found)


def open_job(cell: CellConfig, config: Mapping[str, Any], kind: str, job_dir: str | Path,
             resume: bool, resume_root: str | Path, experiment: str | None = None,
             **fields: Any) -> tuple[Path, dict[str, Any], dict | None]:
    """The job's folder (created), its base record (with ``fields``), and with ``resume`` the
    earlier ok record of the same cell, machine and code if there is one (then the job is
    done)."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    record = {**base_record(cell, config, kind, experiment), **fields}
    done = skip_if_done(record, job_dir, Path(resume_root)) if resume else None
    if done is None:  # this job runs: a pointer left by an earlier run of its folder is stale
        (job_dir / SKIPPED_FILE).unlink(missing_ok=True)
    return job_dir, record, done


def run_timing_job(cell: CellConfig, config: Mapping[str, Any], job_dir: str | Path,
                   **options: Any) -> dict[str, Any]:
    """Time one cell in a fresh worker process and write ``result.json`` into ``job_dir``.

    A cell that fails (exception, out of memory, timeout, an accounting failure) still gets
    its record, with the status and a one-line error. Returns the record. Options: ``resume``,
    ``resume_root``, ``experiment``, ``launcher``, ``concurrent_cells``.

    Raises:
      FolderBusy: another job is writing into ``job_dir`` (nothing was written).
    """
    launch, plan_error = None, None
    if cell.processes > 1:
        try:
            launch = plan_launch(cell)
        except ValueError as error:
            plan_error = one_line(error)
    if launch is not None and not launch.writes_record:
        return _follow_run(cell, job_dir, launch)
    with holding(Path(job_dir), "job"):
        return _timing_job(cell, config, job_dir, launch=launch, plan_error=plan_error,
                           **options)


def _follow_run(cell: CellConfig, job_dir: str | Path, launch: Launch) -> dict[str, Any]:
    """One process (rank > 0) of a run whose tasks a launcher started: it runs its worker and
    writes no record (process 0 writes the cell's); returns what its worker reported."""
    report = privacy_of(cell)
    spec = {"task": "timing", "cell": cell.to_dict(),
            "noise_multiplier": report.noise_multiplier if report else cell.dp.noise_multiplier,
            "dataset": dataclasses.asdict(model_of(cell).dataset), "process": launch.rank,
            "coordinator": launch.coordinator}
    folder = Path(job_dir) / f".process-{launch.rank}"
    folder.mkdir(parents=True, exist_ok=True)
    outcome = run_worker(spec, folder, timeout_s=cell.timing.timeout_s,
                         python=interpreter_for(cell.engine), name="cell")
    print(f"[process {launch.rank} of {cell.processes}] {outcome.result.get('status')}"
          + (f": {outcome.result.get('error')}" if outcome.result.get("error") else ""),
          flush=True)
    return {"status": outcome.result.get("status"), "error": outcome.result.get("error"),
            "process": launch.rank}


def _run_processes(cell: CellConfig, spec: Mapping[str, Any], job_dir: Path, launch: Launch,
                   python: str | None) -> ChildOutcome:
    """The worker processes of a run of several, as one outcome: process 0's result where
    every process ended ok, else the first failure, naming its process."""
    n = cell.processes
    if launch.rank is not None:  # a launcher started the other processes as their own tasks
        outcome = run_worker({**spec, "process": 0, "coordinator": launch.coordinator},
                             job_dir, timeout_s=cell.timing.timeout_s, python=python)
        outcome.result.setdefault("launched_by", launch.by)
        return outcome
    specs = [{**spec, "process": i, "coordinator": launch.coordinator} for i in range(n)]
    try:
        envs = process_environments(n, cell.devices)
    except ValueError as error:
        return ChildOutcome({"status": "error", "error": one_line(error),
                             "launched_by": launch.by}, 0, 0.0, False)
    outcomes = run_workers(specs, job_dir, timeout_s=cell.timing.timeout_s, python=python,
                           envs=envs)
    wall = max(o.wall_s for o in outcomes)
    failed = [(o.wall_s, o.timed_out, i, o) for i, o in enumerate(outcomes)
              if o.result.get("status") != "ok"]
    if not failed:
        return ChildOutcome({**outcomes[0].result, "launched_by": launch.by},
                            outcomes[0].returncode, wall, False)
    # The cause: a process that failed by itself (not one stopped here after it), earliest.
    _, _, i, first = min(failed, key=lambda f: (f[1], f[0]))
    env = next((o.result.get("env") for o in outcomes if o.result.get("env")), None)
    result = {"status": first.result.get("status") or "error",
              "error": f"process {i} of {n}: {first.result.get('error')}", "env": env,
              "launched_by": launch.by,
              "process_status": [o.result.get("status") for o in outcomes]}
    if "config_hash" in outcomes[0].result:
        result["config_hash"] = outcomes[0].result["config_hash"]
    return ChildOutcome(result, first.returncode, wall, first.timed_out)


def _timing_job(cell: CellConfig, config: Mapping[str, Any], job_dir: str | Path, *,
                resume: bool = False, resume_root: str | Path = "outputs",
                experiment: str | None = None, launcher: str = "basic",
                concurrent_cells: int = 1, launch: Launch | None = None,
                plan_error: str | None = None) -> dict[str, Any]:
    job_dir, record, done = open_job(cell, config, "timing", job_dir, resume, resume_root,
                                     experiment, launcher=launcher,
                                     concurrent_cells=concurrent_cells)
    if done is not None:
        return done
    record.update({key: None for key in MEASUREMENT_FIELDS if key not in record})
    try:
        report = privacy_of(cell)
    except Exception as error:  # noqa: BLE001 - no epsilon that does not hold: an error record
        report = None
        record.update(status="error", error=f"privacy accounting failed: {one_line(error)}")
    record.update(_privacy_fields(report, cell))
    if record["status"] is None and plan_error:
        record.update(status="error", error=plan_error)
    if record["status"] is None and cell.data == "real":
        error = fetch_real_data(cell)
        if error:
            record.update(status="error", error=error)
    python = None
    if record["status"] is None:
        try:
            python = interpreter_for(cell.engine)
        except ValueError as error:
            record.update(status="error", error=one_line(error))
    if record["status"] is None:
        if cell.engine == "opacus" and cell.private:
            note_once("[note] Opacus rows run with Opacus' secure RNG off (its default, as in the "
                      "paper): fine for timing, not for real private training")
        sigma = report.noise_multiplier if report else cell.dp.noise_multiplier
        started = time.perf_counter()
        spec = {"task": "timing", "cell": cell.to_dict(), "noise_multiplier": sigma,
                "dataset": dataclasses.asdict(model_of(cell).dataset),
                "config_hash": record["config_hash"]}
        try:
            if launch is not None:
                outcome = _run_processes(cell, spec, job_dir, launch, python)
            else:
                outcome = run_worker(spec, job_dir, timeout_s=cell.timing.timeout_s,
                                     python=python)
        except (Terminated, KeyboardInterrupt) as stop:
            # Stopped from outside (a scheduler's time limit or preemption, kill, Ctrl-C): the
            # cell still gets its record, so a resumed sweep knows to run it again.
            why = getattr(stop, "signal_name", "SIGINT")
            record.update(status="timeout" if why != "SIGINT" else "error",
                          error=f"stopped by {why} after {time.perf_counter() - started:.0f} s "
                                "(a scheduler's limit or preemption, kill, or Ctrl-C)",
                          wall_s=time.perf_counter() - started,
                          env=record.get("env") or environment(devices=False))
            finish(record, job_dir)
            print(describe(record), flush=True)
            if isinstance(stop, Terminated):
                stop.forward()  # e.g. submitit's requeue, now that the record is written
            raise
        ran = outcome.result.pop("config_hash", record["config_hash"])
        record.update(outcome.result)
        if ran != record["config_hash"]:  # the worker measured another cell: never file it here
            record.update(status="error", error=f"the worker's result is of another cell "
                          f"(config {ran}, not {record['config_hash']}): measurements discarded",
                          **{key: None for key in MEASUREMENT_FIELDS})
        record["wall_s"] = outcome.wall_s
        if record.get("env"):  # epsilon is accounted here, not in the worker's environment
            record["env"] = {**record["env"], "dp_accounting": _version("dp-accounting")}
    if not record.get("env"):
        record["env"] = _failed_env(cell.engine)
    finish(record, job_dir)
    print(describe(record), flush=True)
    return record


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def set_aside(path: Path) -> None:
    """Rename an earlier run's file out of the readers' way (kept, never read as current)."""
    if path.exists():
        path.rename(path.with_name(f"{path.stem}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                                   f"-{os.getpid()}{path.suffix}"))


def finish(record: dict[str, Any], job_dir: Path) -> Path:
    """Stamp the record (finish time, identity) and write ``result.json``; returns its path.

    Where the job folder cannot take it (a full disk, a folder made read-only or removed
    under the sweep), the record goes to a folder of the system's temporary directory
    instead, and a line says where: the measurement is never lost, and the sweep goes on.
    """
    record["finished_at"] = now_iso()
    record["identity"] = record_identity(record)
    try:
        return write_json(job_dir / RESULT_FILE, record)
    except OSError as error:
        spare = (Path(tempfile.gettempdir()) / "dpsgd-ablation-unsaved"
                 / f"{record.get('config_hash')}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
                 / RESULT_FILE)
        path = write_json(spare, record)
        print(f"[error] could not write {job_dir / RESULT_FILE} ({one_line(error)}); the record "
              f"is saved at {path}", flush=True)
        return path


#: Engines whose worker runs in an environment of its own (pins that conflict with ours).
OWN_ENVIRONMENTS = {"tfp": ("DPSGD_TF_PYTHON", ".venv-tf", "make tf")}


def interpreter_for(engine: str) -> str | None:
    """The Python that runs ``engine``'s worker: None for ours, else its own environment's
    (``$DPSGD_TF_PYTHON`` or ``.venv-tf/bin/python`` for TF Privacy).

    Raises:
      ValueError: that environment does not exist (with the command that makes it).
    """
    if engine not in OWN_ENVIRONMENTS:
        return None
    variable, folder, command = OWN_ENVIRONMENTS[engine]
    python = os.environ.get(variable) or str(REPO_ROOT / folder / "bin" / "python")
    if not Path(python).exists():
        raise ValueError(f"engine={engine} runs in its own environment, {python} is missing: "
                         f"`{command}` makes it (or set ${variable})")
    return python


@functools.lru_cache(maxsize=None)
def note_once(text: str) -> None:
    """Print a note once per process (per sweep)."""
    print(text, flush=True)


def fetch_real_data(cell: CellConfig) -> str | None:
    """Download and verify the cell's real dataset in the parent; a one-line error or None."""
    from ablation.data.datasets import DatasetUnavailable, fetch_all
    try:
        fetch_all(model_of(cell).dataset.name, cell.data_cache_dir, download=cell.download)
    except DatasetUnavailable as error:
        return one_line(error)
    return None


def describe(record: Mapping[str, Any]) -> str:
    """One line per finished cell, labelled as the tables label it (``tfp[xla]``, ``jit[scan]``)."""
    head = (f"[{record['status']}] {engine_label(record)} {model_label(record)} "
            f"B={record['batch_size']} "
            f"{'private' if record['private'] else 'non-private'}")
    if record["status"] != "ok":
        return f"{head}: {record.get('error')}"
    parts = []
    if record.get("compile_s") is not None:
        parts.append(f"compile {record['compile_s']:.2f} s")
    parts.append(f"step {1e3 * record['median_step_s']:.2f} ms")
    if record.get("throughput_step_s") is not None:
        parts.append(f"throughput {1e3 * record['throughput_step_s']:.2f} ms/step")
    est = " (est.)" if record.get("epoch_estimated") else ""
    parts.append(f"epoch {record['median_epoch_s']:.2f} s{est}")
    eps = record.get("epsilon")
    if eps is not None:
        parts.append(f"eps {eps:.2f}" if isinstance(eps, float) and math.isfinite(eps)
                     else f"eps {eps}")
    return f"{head}: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Memory probe jobs.


#: Environment of a CPU memory try. glibc: a fixed mmap threshold (no dynamic growth) makes
#: every large buffer its own mapping, returned on free, so the data size under the cap tracks
#: live buffers rather than heap fragmentation left by the warm-up step.
PROBE_CPU_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def device_info(job_dir: Path) -> dict[str, Any]:
    """Platform and memory of the accelerator, asked of a worker (the parent never touches it)."""
    outcome = run_worker({"task": "device_info"}, job_dir, name="device", timeout_s=300,
                         env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    if outcome.result.get("status") != "ok":
        raise RuntimeError(f"could not query the device: {outcome.result.get('error')}")
    return outcome.result


def _describe_try(cell: CellConfig, t: Any) -> str:
    parts = [t.status]
    if t.rows is not None and t.rows != t.batch_size:
        parts.append(f"{t.rows} slots")
    if t.peak_bytes is not None:
        parts.append(f"peak {format_bytes(t.peak_bytes)}")
    if t.predicted_bytes is not None:
        parts.append(f"predicted {format_bytes(t.predicted_bytes)}")
    if t.error and t.status != "ok":
        parts.append(t.error)
    return f"[memory] {cell.engine} {cell.model} B={t.batch_size}: " + ", ".join(parts)


#: The smallest cap a probe accepts (GPU, CPU): XLA's GPU client reserves workspace for cuBLAS
#: and cuDNN before the first buffer; on the CPU the parameters, optimizer state and one example
#: of the smallest model (logreg) already take tens of KiB, and a step's temporaries more.
MIN_CAP_BYTES = (64 << 20, 1 << 20)


def cap_plan(info: Mapping[str, Any], limit: int | None, predict_only: bool
             ) -> tuple[dict[str, str], str | None]:
    """How a cap is applied on this device: the worker's environment and what it limits.

    Raises:
      ValueError: a cap that cannot be enforced or exceeds the device, before any try runs.
    """
    total = info.get("total_bytes")
    floor = MIN_CAP_BYTES[info["platform"] == "cpu"]
    if limit is not None and limit < floor:
        raise ValueError(f"memory.limit_gb={limit / (1 << 30):.3g} ({format_bytes(limit)}) is "
                         f"below the {format_bytes(floor)} the {info['platform']} runtime needs "
                         "for itself; nothing could be measured under it")
    if limit is not None and total is not None and limit > total:
        raise ValueError(f"memory.limit_gb={limit / (1 << 30):.3g} exceeds this {info['platform']} "
                         f"device's {total / (1 << 30):.1f} GiB")
    if limit is None:
        return ({} if info["platform"] == "cpu" else {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
                None)
    if predict_only:
        return {}, "predicted peak of the compiled step (memory_analysis) against the cap"
    if info["platform"] == "cpu":
        from ablation.measure.probe import safety_limit
        return dict(PROBE_CPU_ENV), (
            "measured: the step's peak resident memory above the process before it (VmHWM - "
            f"VmRSS) must be at most the cap; RLIMIT_DATA stops a try at "
            f"{format_bytes(safety_limit(limit))} of growth")
    if not total:
        raise ValueError(f"memory.limit_gb cannot be enforced on this {info['platform']} device: "
                         "it reports no memory limit (memory.limit_gb=null probes the whole "
                         "device)")
    # The worker gets exactly the cap: XLA preallocates it and refuses anything beyond.
    fraction = f"{limit / total:.4f}"
    return ({"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "XLA_PYTHON_CLIENT_MEM_FRACTION": fraction},
            f"enforced: XLA's device allocator preallocated to the cap "
            f"(XLA_PYTHON_CLIENT_MEM_FRACTION={fraction})")


def run_memory_job(cell: CellConfig, settings: Any, config: Mapping[str, Any],
                   job_dir: str | Path, **options: Any) -> dict[str, Any]:
    """Probe the largest batch size of ``cell`` under ``settings``; writes ``result.json``.
    Options: ``resume``, ``resume_root``, ``experiment``.

    Raises:
      ValueError: the cap exceeds the machine's (or device's) memory, or cannot be enforced,
        before any try runs.
      FolderBusy: another job is writing into ``job_dir`` (nothing was written).
    """
    with holding(Path(job_dir), "job"):
        return _memory_job(cell, settings, config, job_dir, **options)


def _memory_job(cell: CellConfig, settings: Any, config: Mapping[str, Any],
                job_dir: str | Path, *, resume: bool = False,
                resume_root: str | Path = "outputs",
                experiment: str | None = None) -> dict[str, Any]:
    from ablation.measure.probe import Try, predicted_max, search

    job_dir, record, done = open_job(cell, config, "memory", job_dir, resume, resume_root,
                                     experiment)
    if done is not None:
        return done
    info = device_info(job_dir)
    limit = settings.limit_bytes
    env, cap_enforced = cap_plan(info, limit, settings.predict_only)
    on_cpu = info["platform"] == "cpu"
    uncapped_env = {} if on_cpu else {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    sigma = cell.dp.noise_multiplier
    last_env: dict[str, Any] = {}

    def run_try(batch_size: int, capped: bool, name: str) -> tuple[dict[str, Any], float]:
        # JAX on a GPU gets its cap from XLA's allocator (the env); PyTorch caps itself.
        torch_try = cell.engine in REFERENCE_ENGINES
        spec = {"task": "memory_try", "cell": cell.to_dict(), "noise_multiplier": sigma,
                "batch_size": batch_size, "predict_only": settings.predict_only,
                "n_train": training_size(cell),
                "cap_bytes": limit if capped and (on_cpu or torch_try) else None}
        outcome = run_worker(spec, job_dir, name=name, env=env if capped else uncapped_env,
                             timeout_s=settings.timeout_s, memory_capped=capped, quiet=True)
        last_env.update(outcome.result.get("env") or {})
        return outcome.result, outcome.wall_s

    def try_size(batch_size: int) -> Try:
        capped = limit is not None and not settings.predict_only
        result, wall_s = run_try(batch_size, capped, f"try_{batch_size}")
        verified = None
        if capped and result.get("status") in (CRASH, "error"):
            result, verified = _verify(result, run_try(batch_size, False,
                                                       f"verify_{batch_size}")[0], limit)
        t = Try(batch_size=batch_size, status=result.get("status", "error"),
                peak_bytes=result.get("peak_bytes"), predicted_bytes=result.get("predicted_bytes"),
                error=result.get("error"), wall_s=wall_s, rows=result.get("rows"),
                peak_scope=result.get("peak_scope"), verified=verified)
        if settings.predict_only and t.status == "ok" and limit is not None:
            if t.predicted_bytes is None:
                t.status, t.error = "error", "the compiled step gives no memory prediction"
            elif t.predicted_bytes > limit:
                t.status, t.error = "oom", "predicted peak exceeds the cap"
        print(_describe_try(cell, t), flush=True)
        done_tries.append(t)
        return t

    done_tries: list[Try] = []
    started = time.perf_counter()
    try:
        outcome = search(try_size, settings)
    except (Terminated, KeyboardInterrupt) as stop:
        # Stopped from outside: the probe still leaves its record, with the tries so far.
        why = getattr(stop, "signal_name", "SIGINT")
        record.update(status="timeout" if why != "SIGINT" else "error",
                      error=f"stopped by {why} after {time.perf_counter() - started:.0f} s",
                      tried=[t.as_dict() for t in done_tries], limit_bytes=limit,
                      cap_enforced=cap_enforced, predict_only=settings.predict_only,
                      max_batch_size=None, device=info,
                      env=last_env or environment(devices=False))
        finish(record, job_dir)
        if isinstance(stop, Terminated):
            stop.forward()
        raise
    tried = [t.as_dict() for t in outcome["tried"]]
    # Without running (predict_only) the search's answer is the prediction; otherwise the
    # predictions of every try, those that failed included, are solved for the cap.
    predicted = (outcome["max_batch_size"] if settings.predict_only
                 else predicted_max(outcome["tried"], limit))
    record.update(
        status=outcome["status"], error=outcome["reason"] if outcome["status"] != "ok" else None,
        max_batch_size=outcome["max_batch_size"], limit_bytes=limit, cap_enforced=cap_enforced,
        tried=tried, reached_max=outcome["reached_max"], reason=outcome["reason"],
        predict_only=settings.predict_only, predicted_max_batch_size=predicted,
        sampling=cell.dp.sampling,
        search={"start": settings.start, "growth": settings.growth,
                "resolution": settings.resolution, "max_batch_size": settings.max_batch_size},
        device=info, env=last_env or environment(devices=False))
    finish(record, job_dir)
    print(f"[{record['status']}] {engine_label(record)} {model_label(record)}"
          f"{'' if record['private'] else ' non-private'}: max batch size "
          f"{record['max_batch_size']} under "
          f"{'no cap' if limit is None else format_bytes(limit)}"
          + (f" ({record['reason']})" if record["reason"] else ""), flush=True)
    return record


def _verify(limited: dict[str, Any], unlimited: dict[str, Any], limit: int
            ) -> tuple[dict[str, Any], str]:
    """Decide a try that crashed or failed while limited, from the same try run unlimited.

    Out of memory only with evidence: the step runs without the limit (on the CPU with a
    measured peak above the cap). Otherwise the failure is an error, whatever killed it.
    """
    why = limited.get("error") or limited.get("status")
    if unlimited.get("status") == "ok" and unlimited.get("peak_bytes") is not None:
        peak = unlimited["peak_bytes"]
        if peak > limit:
            shown = "" if peak is None else f" (peak {format_bytes(peak)})"
            return ({**unlimited, "status": "oom",
                     "error": f"{why}; runs without the limit{shown}"}, "runs without the limit")
        return ({**limited, "status": "error",
                 "error": f"{why}; without the limit it runs within the cap"},
                "runs within the cap without the limit")
    if unlimited.get("status") == "ok":
        return ({**limited, "status": "error",
                 "error": f"{why}; runs without the limit but its peak is unknown"},
                "runs without the limit, peak unknown")
    return ({**limited, "status": "error",
             "error": f"{why}; also fails without the limit: {unlimited.get('error')}"},
            "fails without the limit too")


def format_bytes(n: int | float | None) -> str:
    """Bytes in the unit that shows them: ``512 MiB``, ``1.50 GiB``, ``96 KiB``."""
    if n is None:
        return "-"
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if abs(n) >= 1 << 20:
        return f"{n / (1 << 20):.0f} MiB"
    return f"{n / 1024:.0f} KiB"
