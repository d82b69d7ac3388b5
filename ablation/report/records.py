"""Result records: one ``result.json`` per job, with the provenance beside every number.

:func:`load` reads every record under a folder into one pandas DataFrame (one row per job).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    import pandas as pd

SCHEMA = "dpsgd-ablation/result/v1"
#: Records written before identities existed are read as well (the identity is derived).
SCHEMAS = (SCHEMA,)
RESULT_FILE = "result.json"
#: Written instead of a result when ``resume=true`` found an ok record of the same config.
SKIPPED_FILE = "skipped.json"
STATUSES = ("ok", "oom", "error", "timeout")
#: Config keys that do not change what a cell measures (left out of its identity hash).
VOLATILE_KEYS = ("resume", "hydra", "paths", "timing.progress", "timing.timeout_s",
                 "memory.timeout_s", "data.cache_dir", "data.download",
                 "distributed.coordinator", "distributed.process_id")
#: What a cell is within a sweep: a record's family is its config without these.
GRID_KEYS = ("engine", "model", "batch_size", "private", "memory.predict_only",
             "distributed.processes", "distributed.scaling")
#: The machine and code half of a record's identity (besides each framework's own versions).
MACHINE_KEYS = ("platform", "device_kind", "device_count", "cpu_model", "cpu_count", "xla_flags",
                "accelerator_runtime", "accelerator_plugin", "dp_accounting", "git_sha",
                "git_diff_sha")
#: Versions that change a framework's numbers; JAX engines use ``jax``.
FRAMEWORK_KEYS = {
    "jax": ("jax", "jaxlib", "haiku", "optax"),
    "jax_privacy": ("jax", "jaxlib", "haiku", "optax", "jax_privacy"),
    "opacus": ("torch", "opacus", "torch_threads"),
    "backpack": ("torch", "backpack", "torch_threads"),
    "pyvacy": ("torch", "torch_threads"),
    "tfp": ("tensorflow", "tensorflow_privacy", "tf_threads"),
}

REPO_ROOT = Path(__file__).resolve().parents[2]


def now_iso() -> str:
    """The current UTC time, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _git(*args: str, root: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=root or REPO_ROOT, capture_output=True, text=True,
                          timeout=30, check=True).stdout


#: What cannot change a number: records, figures, notebooks and prose. Changes there leave the
#: tree clean for :func:`code_version`, so a reference run that writes its records into
#: ``outputs/reference/`` (or a README edited while it runs) still names a clean commit.
NOT_CODE = (":(exclude)outputs", ":(exclude)docs", ":(exclude)notebooks",
            ":(exclude,glob)**/*.md")


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str | None]:
    """The code that runs: ``git_sha`` (``<commit>-dirty`` when tracked files have changes or
    untracked files are not ignored, outside :data:`NOT_CODE`) and ``git_diff_sha``, a hash of
    those uncommitted changes and files (None on a clean tree).

    On a dirty tree the hash is part of every record's identity, so ``resume=true`` and the
    figures only treat records as the same code when they ran with the very same uncommitted
    changes; records from a clean commit are what the committed references hold. Without git
    (a copy of the sources), ``git_sha`` is None and the hash covers the package's sources.
    """
    return _code_version_of(REPO_ROOT)


#: Set by the entry points to the configured ``paths.output_dir`` (workers inherit it): runs
#: written into a folder of the checkout other than ``outputs/`` are records, not code.
OUTPUT_DIR_VARIABLE = "DPSGD_OUTPUT_DIR"


def _not_code(root: Path) -> tuple[str, ...]:
    extra = os.environ.get(OUTPUT_DIR_VARIABLE)
    if extra:
        try:
            inside = Path(extra).resolve().relative_to(root.resolve())
        except ValueError:
            inside = None
        if inside is not None and str(inside) not in ("", "."):
            return NOT_CODE + (f":(exclude){inside.as_posix()}",)
    return NOT_CODE


def _code_version_of(root: Path) -> dict[str, str | None]:
    not_code = _not_code(root)
    try:
        sha = _git("rev-parse", "HEAD", root=root).strip()
        diff = _git("diff", "HEAD", "--binary", "--no-ext-diff", "--no-textconv", "--", ".",
                    *not_code, root=root)
        untracked = _git("ls-files", "--others", "--exclude-standard", "-z", "--", ".",
                         *not_code, root=root).split("\0")
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_diff_sha": _sources_hash()}
    digest = hashlib.sha256(diff.encode())
    for name in sorted(n for n in untracked if n):
        digest.update(name.encode())
        try:
            digest.update((root / name).read_bytes())
        except OSError:
            pass
    if not diff and not any(untracked):
        return {"git_sha": sha, "git_diff_sha": None}
    return {"git_sha": sha + "-dirty", "git_diff_sha": digest.hexdigest()[:16]}


def _sources_hash() -> str:
    """A hash of the toolkit's own sources and configs (where git cannot say what runs)."""
    digest = hashlib.sha256()
    for folder in ("ablation", "models", "conf"):
        for path in sorted((REPO_ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".yaml"):
                digest.update(str(path.relative_to(REPO_ROOT)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def git_sha() -> str | None:
    """The checkout's commit (with ``-dirty`` when the tree has changes), or None."""
    return code_version()["git_sha"]


@functools.lru_cache(maxsize=1)
def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``), e.g. ``AMD EPYC 7B13``; None where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or None


def cpu_count() -> int | None:
    """CPUs this process may run on (its affinity; what a cgroup or taskset leaves it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001 - a missing package simply has no version
        return None


def environment(devices: bool = True) -> dict[str, Any]:
    """Library versions and the machine: jax, jaxlib, haiku, optax, platform, device, git."""
    env: dict[str, Any] = {
        "jax": _version("jax"), "jaxlib": _version("jaxlib"), "haiku": _version("dm-haiku"),
        "optax": _version("optax"), "dp_accounting": _version("dp-accounting"),
        "python": platform.python_version(), "host": socket.gethostname(),
        "cpu_count": cpu_count(), "cpu_model": cpu_model(), "machine": platform.machine(),
        "os": platform.platform(), "xla_flags": os.environ.get("XLA_FLAGS") or None,
        **code_version(),
    }
    if devices:  # this process's (a run of several processes: the machine of process 0)
        import jax
        devs = jax.local_devices()
        env.update(platform=devs[0].platform, device_kind=devs[0].device_kind,
                   device_count=len(devs), **accelerator_stack(devs[0]))
    return env


def accelerator_stack(device: Any) -> dict[str, str | None]:
    """What runs an accelerator besides JAX (None on a CPU): the runtime the device's client
    reports (on a GPU its CUDA and driver versions) and the PJRT plugin package's version."""
    if device.platform == "cpu":
        return {"accelerator_runtime": None, "accelerator_plugin": None}
    runtime = getattr(getattr(device, "client", None), "platform_version", None)
    plugins = [f"{name} {_version(name)}" for name in (
        "jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda12-pjrt", "jax-cuda13-pjrt",
        "jax-rocm60-plugin", "libtpu") if _version(name)]
    return {"accelerator_runtime": " ".join(str(runtime).split()) if runtime else None,
            "accelerator_plugin": ", ".join(plugins) or None}


def _drop(d: Mapping[str, Any], dotted: str) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    out = dict(d)
    if not rest:
        out.pop(head, None)
    elif isinstance(out.get(head), Mapping):
        out[head] = _drop(out[head], rest)
    return out


#: Sections that belong to the other kinds of job (a timing cell ignores ``memory.*``).
OTHER_KIND_KEYS = {"timing": ("memory", "audit"), "memory": ("timing", "audit"),
                   "audit": ("timing", "memory")}


def config_hash(config: Mapping[str, Any], kind: str = "timing") -> str:
    """A stable identity of what a job measures: sha256 of its config without volatile keys."""
    for key in VOLATILE_KEYS + OTHER_KIND_KEYS.get(kind, ()):
        config = _drop(config, key)
    distributed = config.get("distributed")
    if isinstance(distributed, Mapping) and (distributed.get("processes") or 1) == 1:
        # One process is what every cell was before runs over several: the same identity.
        config = _drop(config, "distributed")
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def framework_of(engine: str | None) -> str:
    """The framework whose versions a record's numbers depend on (``jax`` for our engines)."""
    return engine if engine in FRAMEWORK_KEYS else "jax"


def machine_identity(env: Mapping[str, Any], engine: str | None,
                     framework_versions: bool = True) -> dict[str, Any]:
    """The part of ``env`` that changes a record's numbers: device, CPU, code, and (with
    ``framework_versions``) the versions of the framework that ran the cell."""
    keys = MACHINE_KEYS + (FRAMEWORK_KEYS[framework_of(engine)] if framework_versions else ())
    ident = {key: env.get(key) for key in keys}
    if ident.get("platform") == "cuda":  # PyTorch's name for what JAX calls gpu
        ident["platform"] = "gpu"
    return ident


def _record_machine(record: Mapping[str, Any], framework_versions: bool = True,
                    accountant: bool = True) -> dict[str, Any]:
    """A record's machine identity. The accountant's version (``dp_accounting``) only matters
    where there is an epsilon: a non-private record's is left out (the parent accounts for
    epsilon, while a framework's worker, e.g. TF Privacy's own environment, may have another),
    and so is everyone's without ``accountant``."""
    ident = machine_identity(record.get("env") or {}, record.get("engine"), framework_versions)
    if record.get("private") is False or not accountant:
        ident.pop("dp_accounting", None)
    return ident


def _digest(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def record_identity(record: Mapping[str, Any]) -> str:
    """What makes two records the same measurement: the config (:func:`config_hash`), the
    machine, the code (a custom model's module too) and the framework's versions. Resume and
    the figures match on it."""
    kind = record.get("kind") or "timing"
    digest = record.get("config_hash") or config_hash(record.get("config") or {}, kind)
    ident = {"config": digest, "kind": kind,
             "machine": _record_machine(record),
             # cells timed several at a time on one machine are another measurement
             "concurrent_cells": record.get("concurrent_cells") or 1}
    if record.get("model_source_sha"):  # your own model's code is part of what ran
        ident["model_source"] = record["model_source_sha"]
    if record.get("noise_generator"):  # how the noise was drawn
        ident["noise"] = record["noise_generator"]
    return _digest(ident)


def record_family(record: Mapping[str, Any]) -> str:
    """The sweep a record belongs to: its identity without the grid's axes (engine, model,
    batch size, privacy) and without framework versions. Figures draw one family at a time,
    so runs with other settings, machines or code never share a panel."""
    kind = record.get("kind") or "timing"
    config = dict(record.get("config") or {})
    for key in GRID_KEYS:
        config = _drop(config, key)
    # Times do not depend on the accountant, and a family holds private and non-private rows
    # alike: its version (in each record's identity, beside its epsilon) is left out here.
    machine = _record_machine(record, framework_versions=False, accountant=False)
    return _digest({"config": config_hash(config, kind), "kind": kind, "machine": machine,
                    "concurrent_cells": record.get("concurrent_cells") or 1})


def _json_safe(value: Any) -> Any:
    """inf/nan become strings JSON can hold ("inf"), so files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically (temp file + rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as strict JSON, atomically (see :func:`write_text`)."""
    return write_text(path, json.dumps(_json_safe(payload), indent=1, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def one_line(error: BaseException | str) -> str:
    """``Type: first line of the message`` (what a record's ``error`` field holds)."""
    if isinstance(error, BaseException):
        text = str(error).strip().splitlines()
        head = text[0] if text else ""
        return f"{type(error).__name__}: {head}" if head else type(error).__name__
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


class UnreadableRecords(UserWarning):
    """``result.json`` files that could not be read as records (named in the message)."""


def iter_records(root: str | os.PathLike, *, skip_reference: bool = False,
                 problems: list[str] | None = None) -> Iterable[tuple[Path, dict[str, Any]]]:
    """Every ``result.json`` under ``root`` (sorted by path) with its parsed record.

    ``skip_reference`` leaves out folders named ``reference`` below ``root`` (the committed
    results), unless ``root`` itself is one of them or inside one. Records are written
    atomically, so a file that does not parse, or is not a record of a known schema, is
    damaged or foreign: it is skipped, and named in ``problems`` when a list is given.
    """
    root = Path(root)
    for path in sorted(root.rglob(RESULT_FILE)):
        if skip_reference and "reference" in path.relative_to(root).parts[:-1]:
            continue
        try:
            record = read_json(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            if problems is not None:
                problems.append(f"{path} ({one_line(error)})")
            continue
        if isinstance(record, dict) and record.get("schema") in SCHEMAS:
            yield path, record
        elif problems is not None:
            problems.append(f"{path} (not a record of schema {SCHEMA})")


def iter_pointers(root: str | os.PathLike) -> Iterable[tuple[Path, Path, dict[str, Any]]]:
    """The ``resume=true`` pointers under ``root`` that still hold: ``(pointer, record path,
    record)``. A pointer holds when its job folder has no ``result.json`` of its own (a later
    run of the job replaced it) and the record it names exists with the pointer's config hash
    (the job's config). Anything else is stale and ignored."""
    for pointer in sorted(Path(root).rglob(SKIPPED_FILE)):
        if (pointer.parent / RESULT_FILE).exists():
            continue
        try:
            note = read_json(pointer)
            target = (pointer.parent / note["record"]).resolve()
            record = read_json(target)
        except (OSError, KeyError, TypeError, ValueError):
            continue
        if isinstance(record, dict) and record.get("config_hash") == note.get("config_hash"):
            yield pointer, target, record


def records_with_reused(root: str | os.PathLike, problems: list[str] | None = None
                        ) -> list[tuple[Path, dict[str, Any], bool]]:
    """``(path, record, reused)`` for every record of ``root``: its own, then those its
    ``resume=true`` pointers reuse from earlier runs (each record once, however many point at
    it or whether it also lies under ``root``)."""
    out, seen = [], set()
    for path, record in iter_records(root, problems=problems):
        seen.add(path.resolve())
        out.append((path, record, False))
    for _, target, record in iter_pointers(root):
        if target not in seen:
            seen.add(target)
            out.append((target, record, True))
    return out


def warn_unreadable(problems: list[str]) -> None:
    """One warning naming the result files that could not be read (never a silent drop)."""
    if problems:
        import warnings
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        warnings.warn(f"{len(problems)} result file(s) could not be read and are left out: "
                      f"{shown}", UnreadableRecords, stacklevel=3)


def _newest_first(record: Mapping[str, Any]) -> str:
    return str(record.get("finished_at") or record.get("started_at") or "")


def find_ok_record(root: str | os.PathLike, digest: str, kind: str,
                   machine: Mapping[str, Any] | None = None,
                   concurrent_cells: int = 1, model_source: str | None = None,
                   noise_generator: str | None = None) -> Path | None:
    """The newest ok record of kind ``kind``, config hash ``digest``, (when given) this
    ``machine`` identity (:func:`machine_identity`), the same custom model source and noise
    generator under ``root``, outside committed ``reference`` folders (see
    :func:`iter_records`); None if there is none."""
    if not Path(root).exists():
        return None
    found = [(path, record) for path, record in iter_records(root, skip_reference=True)
             if record.get("config_hash") == digest and record.get("status") == "ok"
             and record.get("kind") == kind
             and (record.get("concurrent_cells") or 1) == concurrent_cells
             and record.get("model_source_sha") == model_source
             and record.get("noise_generator") == noise_generator
             and (machine is None or machine_identity(record.get("env") or {},
                                                       record.get("engine")) == dict(machine))]
    if not found:
        return None
    return max(found, key=lambda item: _newest_first(item[1]))[0]


_FLOAT_FIELDS = ("compile_s", "first_step_s", "median_step_s", "median_epoch_s", "epsilon",
                 "delta", "first_epoch_s", "iqr_step_s")


def load(root: str | os.PathLike | Iterable[str | os.PathLike] = "outputs") -> "pd.DataFrame":
    """All records under ``root`` (a folder, or several: sweeps synced back from a cluster and
    from other machines merge into one frame) as one DataFrame, one row per job.

    Nested ``env`` fields are flattened to ``env.<name>`` columns as well as kept whole;
    ``path`` holds each record's file; ``identity`` and ``family`` are
    :func:`record_identity` and :func:`record_family`; ``reused`` is True for a record that a
    ``resume=true`` pointer under ``root`` reused from an earlier run (:func:`iter_pointers`).
    Files that cannot be read are named in an :class:`UnreadableRecords` warning. An empty
    frame (with the core columns) when none exist.
    """
    roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
    rows, problems, seen = [], [], set()
    for path, record, reused in (item for r in roots for item in records_with_reused(r, problems)):
        if path.resolve() in seen:  # the same record reached from two roots or pointers
            continue
        seen.add(path.resolve())
        row = dict(record)
        row["identity"] = record_identity(record)
        row["family"] = record_family(record)
        for key, value in (record.get("env") or {}).items():
            row[f"env.{key}"] = value
        row["path"] = str(path)
        row["reused"] = reused
        for key in _FLOAT_FIELDS:
            if isinstance(row.get(key), str):  # "inf" as written by write_json
                row[key] = float(row[key])
        rows.append(row)
    warn_unreadable(problems)
    import pandas as pd

    columns = ["schema", "kind", "status", "engine", "loop", "model", "batch_size", "private",
               "identity", "family", "path"]
    frame = pd.DataFrame(rows)
    for col in columns:
        if col not in frame:
            frame[col] = pd.Series(dtype=object)
    return frame
