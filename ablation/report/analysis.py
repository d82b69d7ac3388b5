"""Results → tidy pandas frames: the numbers behind every figure and table.

Every function takes the frame of :func:`ablation.results.load` (or one of these frames) and
returns a new frame; nothing here plots. Cells are identified by :data:`CELL` plus the device
they ran on, so numbers from a laptop CPU and an H100 never mix. A cell the caller asks for
and the results lack raises :class:`MissingCells` naming it: a missing run is never a zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ablation.report import records
from ablation.report.summary import ENGINE_ORDER, engine_label

#: What identifies one cell of the grid (with the device).
CELL = ("engine_label", "model", "batch_size", "private", "data")
MODEL_ORDER = ("logreg", "ffnn", "cnn", "embed", "lstm", "cifar10")


class MissingCells(LookupError):
    """Cells asked for that no ok record holds; the message names them."""


def device_label(row: pd.Series) -> str:
    """``cpu (2 cores)``-style label of where a record ran: device kind, and host CPUs on CPU."""
    env = row.get("env") if isinstance(row.get("env"), dict) else {}
    kind = env.get("device_kind") or "unknown"
    if env.get("platform") == "cpu":
        return f"cpu ({env.get('cpu_count')} cores)"
    return str(kind)


def timing_frame(records: pd.DataFrame, *, ok_only: bool = True) -> pd.DataFrame:
    """One row per timing cell and device: the latest record of each, tidy columns.

    Columns: engine_label, engine, framework, model, batch_size, private, data, device,
    status, compile_s, first_step_s, first_epoch_s, median_step_s, median_epoch_s,
    epoch_estimated, epsilon, n_params, started_at, path.
    """
    if records.empty or "kind" not in records:
        return pd.DataFrame(columns=[*CELL, "device", "median_epoch_s"])
    frame = records[records["kind"] == "timing"].copy()
    if ok_only:
        frame = frame[frame["status"] == "ok"]
    if frame.empty:
        return pd.DataFrame(columns=[*CELL, "device", "median_epoch_s"])
    frame["engine_label"] = frame.apply(engine_label, axis=1)
    frame["framework"] = np.where(frame["engine"] == "opacus",
                                  np.where(frame["private"], "opacus", "pytorch"), "jax")
    frame["device"] = frame.apply(device_label, axis=1)
    for column in ("compile_s", "first_step_s", "first_epoch_s", "median_step_s",
                   "median_epoch_s", "epsilon"):
        if column not in frame:
            frame[column] = np.nan
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame = (frame.sort_values("started_at")
             .drop_duplicates(subset=[*CELL, "device"], keep="last"))
    columns = [*CELL, "engine", "framework", "device", "status", "compile_s", "first_step_s",
               "first_epoch_s", "median_step_s", "median_epoch_s", "epoch_estimated", "epsilon",
               "n_params", "started_at", "path"]
    return frame[[c for c in columns if c in frame]].reset_index(drop=True)


def memory_frame(records: pd.DataFrame) -> pd.DataFrame:
    """One row per memory probe (latest per engine, model, privacy, cap and device)."""
    if records.empty or "kind" not in records:
        return pd.DataFrame(columns=["engine", "model", "private", "max_batch_size"])
    frame = records[(records["kind"] == "memory") & (records["status"] == "ok")].copy()
    if frame.empty:
        return pd.DataFrame(columns=["engine", "model", "private", "max_batch_size"])
    frame["engine_label"] = frame.apply(engine_label, axis=1)
    frame["device"] = frame.apply(device_label, axis=1)
    frame["limit_gib"] = frame["limit_bytes"].map(
        lambda b: np.nan if b is None or b != b else b / (1 << 30))
    frame = (frame.sort_values("started_at")
             .drop_duplicates(subset=["engine_label", "model", "private", "limit_gib", "device"],
                              keep="last"))
    columns = ["engine_label", "engine", "model", "private", "device", "limit_gib",
               "max_batch_size", "predicted_max_batch_size", "reached_max", "predict_only"]
    return frame[[c for c in columns if c in frame]].reset_index(drop=True)


def require(frame: pd.DataFrame, **wanted: Iterable) -> pd.DataFrame:
    """The rows of ``frame`` for every combination of ``wanted`` values; raise if any is absent.

    ``require(f, engine_label=["both", "vmap"], model=["cnn"], batch_size=[128])`` returns those
    cells or raises :class:`MissingCells` listing the combinations no row holds.
    """
    keys = list(wanted)
    values = [list(v) for v in wanted.values()]
    index = pd.MultiIndex.from_product(values, names=keys)
    present = set(map(tuple, frame[keys].itertuples(index=False, name=None))) if len(frame) else set()
    missing = [combo for combo in index if combo not in present]
    if missing:
        shown = ", ".join("/".join(map(str, m)) for m in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise MissingCells(f"no ok result for {len(missing)} cell(s) ({'/'.join(keys)}): "
                           f"{shown}{more}")
    mask = pd.Series(True, index=frame.index)
    for key, vals in wanted.items():
        mask &= frame[key].isin(list(vals))
    return frame[mask]


def one_device(frame: pd.DataFrame, device: str | None = None) -> pd.DataFrame:
    """The rows of one device; with several present, ``device`` must say which."""
    devices = sorted(frame["device"].unique()) if len(frame) else []
    if device is None:
        if len(devices) > 1:
            raise ValueError(f"results from several devices ({', '.join(devices)}): pass device=")
        return frame
    if device not in devices:
        raise MissingCells(f"no results from device {device!r}; present: {', '.join(devices)}")
    return frame[frame["device"] == device]


def ablation_speedups(frame: pd.DataFrame, *, batch_size: int, private: bool = True,
                      models: Sequence[str] | None = None,
                      engines: Sequence[str] = ("both", "jit", "vmap", "none")) -> pd.DataFrame:
    """Per model: each engine's epoch time and how many times faster ``both`` is.

    Columns: model, engine_label, median_epoch_s, both_speedup (engine ÷ both; 1 for both).
    """
    frame = frame[(frame["private"] == private)]
    models = list(models) if models is not None else sorted(
        frame.loc[frame["batch_size"] == batch_size, "model"].unique(), key=_model_key)
    cells = require(frame, engine_label=engines, model=models, batch_size=[batch_size])
    both = cells[cells["engine_label"] == "both"].set_index("model")["median_epoch_s"]
    out = cells[["model", "engine_label", "median_epoch_s", "compile_s"]].copy()
    out["both_speedup"] = out["median_epoch_s"] / out["model"].map(both)
    return _ordered(out)


def privacy_overhead(frame: pd.DataFrame) -> pd.DataFrame:
    """Private ÷ non-private epoch time for the same engine, model, batch and device."""
    keys = ["engine_label", "model", "batch_size", "data", "device"]
    private = frame[frame["private"] == True].set_index(keys)["median_epoch_s"]  # noqa: E712
    public = frame[frame["private"] == False].set_index(keys)["median_epoch_s"]  # noqa: E712
    both = private.to_frame("private_s").join(public.to_frame("nonprivate_s"), how="inner")
    both["overhead"] = both["private_s"] / both["nonprivate_s"]
    return _ordered(both.reset_index())


def max_batch_sizes(memory: pd.DataFrame) -> pd.DataFrame:
    """Largest batch per engine and model (and cap), with the prediction where one exists."""
    return _ordered(memory[["engine_label", "model", "private", "limit_gib", "device",
                            "max_batch_size", "predicted_max_batch_size"]].copy())


def compile_times(frame: pd.DataFrame) -> pd.DataFrame:
    """Compile seconds per engine, model and batch size (engines that compile only)."""
    out = frame[frame["compile_s"].notna()]
    return _ordered(out[["engine_label", "model", "batch_size", "private", "device",
                         "compile_s", "first_step_s"]].copy())


def models_in(frame: pd.DataFrame) -> list[str]:
    """The paper's models that ``frame`` holds, in the paper's order."""
    present = set(frame["model"]) if len(frame) else set()
    return [m for m in MODEL_ORDER if m in present]


def _model_key(model: str) -> int:
    return MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER)


def _engine_key(label: str) -> int:
    base = str(label).split("[")[0]
    return ENGINE_ORDER.index(base) if base in ENGINE_ORDER else len(ENGINE_ORDER)


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("model", "engine_label", "batch_size") if c in frame]
    if not keys or frame.empty:
        return frame.reset_index(drop=True)
    order = frame.copy()
    order["_m"] = order["model"].map(_model_key) if "model" in order else 0
    order["_e"] = order["engine_label"].map(_engine_key) if "engine_label" in order else 0
    sort = ["_m", "_e"] + (["batch_size"] if "batch_size" in order else [])
    return order.sort_values(sort).drop(columns=["_m", "_e"]).reset_index(drop=True)


def load(root: str | Path = "outputs") -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(timing, memory)`` frames of every record under ``root``."""
    frame = records.load(root)
    return timing_frame(frame), memory_frame(frame)
