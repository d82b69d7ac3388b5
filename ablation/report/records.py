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
RESULT_FILE = "result.json"
#: Written instead of a result when ``resume=true`` found an ok record of the same config.
SKIPPED_FILE = "skipped.json"
STATUSES = ("ok", "oom", "error", "timeout")
#: Config keys that do not change what a cell measures (left out of its identity hash).
VOLATILE_KEYS = ("resume", "hydra", "timing.progress", "timing.timeout_s", "memory.predict_only")

REPO_ROOT = Path(__file__).resolve().parent.parent


def now_iso() -> str:
    """The current UTC time, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The checkout's commit (with ``-dirty`` when the tree has changes), or None."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


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
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "os": platform.platform(),
        "git_sha": git_sha(),
    }
    if devices:
        import jax
        devs = jax.devices()
        env.update(platform=devs[0].platform, device_kind=devs[0].device_kind,
                   device_count=len(devs))
    return env


def _drop(d: Mapping[str, Any], dotted: str) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    out = dict(d)
    if not rest:
        out.pop(head, None)
    elif isinstance(out.get(head), Mapping):
        out[head] = _drop(out[head], rest)
    return out


#: Sections that belong to the other kind of job (a timing cell ignores ``memory.*``).
OTHER_KIND_KEYS = {"timing": ("memory",), "memory": ("timing",)}


def config_hash(config: Mapping[str, Any], kind: str = "timing") -> str:
    """A stable identity of what a job measures: sha256 of its config without volatile keys."""
    for key in VOLATILE_KEYS + ("paths",) + OTHER_KIND_KEYS.get(kind, ()):
        config = _drop(config, key)
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _json_safe(value: Any) -> Any:
    """inf/nan become strings JSON can hold ("inf"), so files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` atomically (temp file + rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
        with os.fdopen(fd, "w") as f:
            json.dump(_json_safe(payload), f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def iter_records(root: str | os.PathLike) -> Iterable[tuple[Path, dict[str, Any]]]:
    """Every ``result.json`` under ``root`` (sorted by path) with its parsed record."""
    for path in sorted(Path(root).rglob(RESULT_FILE)):
        try:
            record = read_json(path)
        except (OSError, json.JSONDecodeError):
            continue  # a file being written by a live job, or foreign
        if isinstance(record, dict) and record.get("schema") == SCHEMA:
            yield path, record


def find_ok_record(root: str | os.PathLike, digest: str, kind: str) -> Path | None:
    """The path of an ok record of kind ``kind`` with config hash ``digest`` under ``root``."""
    if not Path(root).exists():
        return None
    for path, record in iter_records(root):
        if (record.get("config_hash") == digest and record.get("status") == "ok"
                and record.get("kind") == kind):
            return path
    return None


_FLOAT_FIELDS = ("compile_s", "first_step_s", "median_step_s", "median_epoch_s", "epsilon",
                 "delta", "first_epoch_s", "iqr_step_s")


def load(root: str | os.PathLike = "outputs") -> "pd.DataFrame":
    """All records under ``root`` as one DataFrame, one row per job.

    Nested ``env`` fields are flattened to ``env.<name>`` columns as well as kept whole;
    ``path`` holds each record's file. An empty frame (with the core columns) when none exist.
    """
    rows = []
    for path, record in iter_records(root):
        row = dict(record)
        for key, value in (record.get("env") or {}).items():
            row[f"env.{key}"] = value
        row["path"] = str(path)
        for key in _FLOAT_FIELDS:
            if isinstance(row.get(key), str):  # "inf" as written by write_json
                row[key] = float(row[key])
        rows.append(row)
    import pandas as pd

    columns = ["schema", "kind", "status", "engine", "loop", "model", "batch_size", "private"]
    frame = pd.DataFrame(rows)
    for col in columns:
        if col not in frame:
            frame[col] = pd.Series(dtype=object)
    return frame
