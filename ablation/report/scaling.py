"""How a step scales over processes (``experiment=scaling``): each cell's throughput beside the
one-process cell of the same family, system and model.

Strong scaling keeps the global batch (``batch_size``) and splits it over more processes; weak
scaling keeps each process's batch, so the global batch grows with them. Either way the number
that matters is examples per second, and its ratio to one process in the same run: on one
machine the processes share its cores, so the absolute figures are the cores' and the ratios
say what the runtime's collectives and the split cost.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ablation.report.labels import format_ratio, missing

#: The scaling table's columns that are ratios.
RATIO_COLUMNS = ("× 1 process", "per process")


def scaling_table(timing: pd.DataFrame) -> pd.DataFrame:
    """One row per (family, system, model, scaling, processes) of ``timing`` (rows of
    :func:`ablation.report.analysis.timing_frame`), for families with a cell of more than one
    process: ms per step (the slowest process's throughput), examples per second, and that
    rate ÷ the one-process cell's (``× 1 process``; for strong scaling the global batch is the
    one-process cell's, for weak its per-process batch) and ÷ processes too (``per process``:
    1 is perfect scaling). Empty when no family has a multi-process cell."""
    if timing.empty or "processes" not in timing:
        return pd.DataFrame()
    frame = timing.assign(processes=pd.to_numeric(timing["processes"], errors="coerce")
                          .fillna(1).astype(int))
    frame = frame[frame["status"] == "ok"] if "status" in frame else frame
    frame = frame.assign(scaling=frame["scaling"].where(frame["scaling"].notna(), "strong"),
                         base=frame.apply(_base_system, axis=1),
                         process_batch=frame["batch_size"] // frame["processes"])
    families = set(frame.loc[frame["processes"] > 1, "family"])
    rows: list[dict[str, Any]] = []
    for (family, base, model), cell in frame[frame["family"].isin(families)].groupby(
            ["family", "base", "model"], sort=False):
        single = cell[cell["processes"] == 1]
        for scaling in ("strong", "weak"):
            many = cell[(cell["processes"] > 1) & (cell["scaling"] == scaling)]
            if many.empty:
                continue
            key = "batch_size" if scaling == "strong" else "process_batch"
            for _, r in pd.concat([single[single["batch_size"].isin(set(many[key]))],
                                   many]).sort_values(["processes", "batch_size"]).iterrows():
                one = single[single["batch_size"] == r[key]]
                rate = r["batch_size"] / r["throughput_step_s"]
                ratio = (rate * float(one["throughput_step_s"].iloc[0]) / float(
                    one["batch_size"].iloc[0])) if len(one) else float("nan")
                rows.append({"model": model, "system": base, "scaling": scaling,
                             "processes": int(r["processes"]), "batch": int(r["batch_size"]),
                             "batch/process": int(r["process_batch"]),
                             "ms/step": 1e3 * float(r["throughput_step_s"]),
                             "examples/s": rate, "× 1 process": ratio,
                             "per process": ratio / r["processes"],
                             "slowest/fastest": _imbalance(r.get("process_step_s"))})
    return pd.DataFrame(rows)


def _base_system(row: pd.Series) -> str:
    """The system without its process count (``ghost[2 processes]`` → ``ghost``), private or
    not (``both np`` for the non-private step)."""
    system = str(row.get("system", row.get("engine_label")))
    head, _, tags = system.partition("[")
    kept = [t for t in tags.rstrip("]").split(",") if t and not t.endswith("processes")]
    label = f"{head}[{','.join(kept)}]" if kept else head
    return label if row["private"] else f"{label} np"


def _imbalance(step_s: Any) -> float:
    """The slowest process's median step ÷ the fastest's (1 = balanced)."""
    if not isinstance(step_s, (list, tuple)) or not step_s or any(missing(v) for v in step_s):
        return float("nan")
    return max(step_s) / min(step_s)


def format_scaling(timing: pd.DataFrame) -> str:
    """:func:`scaling_table` as text, with what the ratios mean ("" without multi-process
    cells)."""
    table = scaling_table(timing)
    if table.empty:
        return ""
    shown = table.copy()
    for column in (*RATIO_COLUMNS, "slowest/fastest"):
        shown[column] = [format_ratio(v) or "-" for v in shown[column]]
    shown["ms/step"] = [f"{v:.3g}" for v in shown["ms/step"]]
    shown["examples/s"] = [f"{v:,.0f}" for v in shown["examples/s"]]
    return (shown.to_string(index=False) + "\n(× 1 process: examples/s ÷ the one-process cell's "
            "in the same run, at the same global batch (strong) or per-process batch (weak); "
            "per process: that ÷ processes. Processes on one machine share its cores.)")
