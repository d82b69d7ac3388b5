"""The table printed at the end of a sweep: times, ε, and how many times faster ``both`` is."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from ablation.report.records import SKIPPED_FILE, iter_records, read_json

#: Engine order in tables and figures: the paper's four, then reference frameworks.
ENGINE_ORDER = ("both", "jit", "vmap", "none", "opacus")
CELL_KEYS = ("model", "data", "batch_size", "private")


def engine_label(row: Any) -> str:
    """``both``, ``jit`` (``jit[scan]`` for a non-default loop), ``opacus[ghost]``, …"""
    engine = row["engine"]
    loop = row.get("loop")
    mode = row.get("engine_mode")
    if engine == "jit" and loop not in (None, "dispatch") and not _isnan(loop):
        return f"jit[{loop}]"
    if engine == "opacus" and mode not in (None, "hooks") and not _isnan(mode):
        return f"opacus[{mode}]"
    return engine


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def sweep_records(root: str | Path) -> pd.DataFrame:
    """Records of one sweep folder, including those a ``resume=true`` run skipped."""
    rows = [record for _, record in iter_records(root)]
    for pointer in sorted(Path(root).rglob(SKIPPED_FILE)):
        try:
            rows.append(read_json(read_json(pointer)["record"]))
        except (OSError, KeyError, ValueError):
            continue
    return pd.DataFrame(rows)


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: engine, model, batch, private, compile s, step ms, epoch s, ε, both ×.

    ``both ×`` is this engine's epoch time over ``both``'s for the same model, data, batch size
    and privacy: how many times faster ``both`` is (1.0 on ``both``'s own row; blank when
    ``both`` was not run or a cell failed).
    """
    if frame.empty:
        return pd.DataFrame()
    frame = frame[frame.get("kind", "timing") == "timing"].copy()
    if frame.empty:
        return pd.DataFrame()
    frame["engine_label"] = frame.apply(engine_label, axis=1)
    both = (frame[(frame["engine_label"] == "both") & (frame["status"] == "ok")]
            .groupby(list(CELL_KEYS))["median_epoch_s"].median())

    def speedup(row: pd.Series) -> float | None:
        if row["status"] != "ok":
            return None
        key = tuple(row[k] for k in CELL_KEYS)
        ref = both.get(key)
        return None if ref is None or not ref else float(row["median_epoch_s"]) / float(ref)

    frame["both_x"] = frame.apply(speedup, axis=1)
    order = {name: i for i, name in enumerate(ENGINE_ORDER)}
    frame["_order"] = frame["engine"].map(lambda e: order.get(e, len(order)))
    frame = frame.sort_values(["model", "private", "batch_size", "_order", "engine_label"],
                              ascending=[True, False, True, True, True])
    table = pd.DataFrame({
        "engine": frame["engine_label"],
        "model": frame["model"],
        "batch": frame["batch_size"],
        "private": frame["private"],
        "status": frame["status"],
        "compile s": frame.get("compile_s"),
        "step ms": frame.get("median_step_s") * 1e3 if "median_step_s" in frame else None,
        "epoch s": frame.get("median_epoch_s"),
        "eps": frame.get("epsilon"),
        "both x": frame["both_x"],
    })
    return table.reset_index(drop=True)


def format_summary(frame: pd.DataFrame) -> str:
    """The summary table as aligned text (failed cells show their status)."""
    table = summary_table(frame)
    if table.empty:
        return "(no timing records)"

    def fmt(value: Any, spec: str) -> str:
        if value is None or _isnan(value):
            return "-"
        if isinstance(value, str):
            return value
        if isinstance(value, float) and math.isinf(value):
            return "inf"
        return format(value, spec)

    formats = {"compile s": ".2f", "step ms": ".3f", "epoch s": ".2f", "eps": ".2f",
               "both x": ".1f"}
    text = table.copy().astype(object)
    for col, spec in formats.items():
        text[col] = [fmt(v, spec) for v in table[col]]
    text["private"] = ["yes" if p else "no" for p in table["private"]]
    return text.to_string(index=False)


def format_memory_summary(frame) -> str:
    """The table printed after a probe: max batch per engine and model, with the cap."""
    if frame.empty:
        return "(no memory records)"
    rows = []
    for _, r in frame.iterrows():
        tried = r.get("tried") or []
        at_max = next((t for t in tried if t["batch_size"] == r.get("max_batch_size")), {})
        limit = r.get("limit_bytes")
        rows.append({
            "engine": r["engine"], "model": r["model"],
            "private": "yes" if r["private"] else "no",
            "cap GiB": "-" if limit is None or limit != limit else f"{limit / (1 << 30):.2f}",
            "status": r["status"],
            "max batch": r.get("max_batch_size"),
            "peak MiB": _mib(at_max.get("peak_bytes")),
            "predicted MiB": _mib(at_max.get("predicted_bytes")),
            "predicted max": r.get("predicted_max_batch_size"),
            "tries": len(tried),
        })
    table = pd.DataFrame(rows).sort_values(["model", "engine"])
    return table.to_string(index=False)


def _mib(value) -> str:
    return "-" if value is None else f"{value / (1 << 20):.0f}"
