"""Side-by-side benchmark tables: the cost of privacy per engine, and the ghost engine's targets.

Printed after a sweep that holds the rows they compare (``experiment=ghost`` does), and by
``python -m ablation.summary DIR --cost``. Times are throughput per step (steps dispatched back
to back); a JAX engine's privacy overhead is its private step ÷ the non-private ``both`` step,
Opacus' is its private step ÷ plain PyTorch's.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ablation.report.labels import format_ratio, missing, timing_rows

#: Columns of the cost table, in order: (label, engine label, private).
SYSTEMS = (("both np", "both", False), ("both", "both", True), ("ghost", "ghost", True),
           ("ghost 2p", "ghost[two_pass]", True), ("pytorch", "opacus", False),
           ("opacus", "opacus", True), ("opacus ghost", "opacus[ghost]", True))
JAX_NONPRIVATE, TORCH_NONPRIVATE = "both np", "pytorch"
#: Every other framework's private rows (any mode): the fastest of them is ``others best``.
OTHER_FRAMEWORKS = ("jax_privacy", "tfp", "pyvacy", "backpack")
#: The networks of issue 24, whose targets are stricter than the paper models'.
ENCODERS = ("transformer", "vit")


def privacy_cost_table(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, batch): ms per step of each system present, and the ratios.

    Columns: model, batch, one ``<system> ms`` per system present, ``ghost best ms`` (the faster
    ghost mode), ``ghost / np`` (best ghost ÷ non-private both), ``both / ghost``,
    ``opacus best / ghost``, ``ghost overhead`` and ``opacus overhead`` (best Opacus mode ÷
    plain PyTorch), ``ghost compile / both``.
    """
    frame = timing_rows(records)
    if frame.empty:
        return pd.DataFrame()
    frame = frame[frame["status"] == "ok"]
    rows = []
    for (_, model, batch), cell in frame.groupby(["family", "model_label", "batch_size"],
                                                  sort=False):
        row: dict[str, Any] = {"model": model, "batch": int(batch)}
        compile_s = {}
        for label, engine, private in SYSTEMS:
            hit = cell[(cell["engine_label"] == engine) & (cell["private"] == private)]
            if len(hit):
                row[f"{label} ms"] = 1e3 * float(hit["throughput_step_s"].iloc[-1])
                compile_s[label] = hit["compile_s"].iloc[-1]
                if label == "ghost":
                    noise = _noise_seconds(hit.iloc[-1])
                    if noise is not None:
                        row["noise ms"] = 1e3 * noise
                    floor = pd.to_numeric(pd.Series([hit.iloc[-1].get("noise_floor_s")]),
                                          errors="coerce").iloc[0]
                    if not pd.isna(floor):
                        row["floor ms"] = 1e3 * float(floor)
        ghosts = [row[k] for k in ("ghost ms", "ghost 2p ms") if k in row]
        # Opacus' every mode (functorch and ew too, when the sweep has them) and the fastest
        # private row of each other framework, so "faster than every framework" is one ratio.
        private = cell[cell["private"] == True]  # noqa: E712 (a column of bools or objects)
        seconds = pd.to_numeric(private["throughput_step_s"], errors="coerce")
        private = private.assign(throughput_step_s=seconds)[seconds.notna()]
        opacus = [1e3 * float(t) for t in
                  private[private["engine"] == "opacus"]["throughput_step_s"]]
        others = private[private["engine"].isin(OTHER_FRAMEWORKS)]
        if len(others):
            fastest = others.loc[others["throughput_step_s"].idxmin()]
            row["others best ms"] = 1e3 * float(fastest["throughput_step_s"])
            row["others best"] = fastest["engine_label"]
        np_jax, np_torch = row.get("both np ms"), row.get("pytorch ms")
        if ghosts:
            best = min(ghosts)
            row["ghost best ms"] = best
            row["ghost / np"] = best / np_jax if np_jax else math.nan
            if "floor ms" in row and np_jax:  # against what no exact private step undercuts
                row["ghost / (np+floor)"] = best / (np_jax + row["floor ms"])
            if "noise ms" in row and np_jax:  # what clipping alone costs, noise aside
                row["ghost-noise / np"] = (best - row["noise ms"]) / np_jax
            row["both / ghost"] = row["both ms"] / best if "both ms" in row else math.nan
            row["opacus best / ghost"] = min(opacus) / best if opacus else math.nan
            if "others best ms" in row:
                row["others best / ghost"] = row["others best ms"] / best
            row["ghost overhead"] = row["ghost / np"]
            if compile_s.get("ghost") and compile_s.get("both"):
                row["ghost compile / both"] = compile_s["ghost"] / compile_s["both"]
        if opacus and np_torch:
            row["opacus overhead"] = min(opacus) / np_torch
        rows.append(row)
    table = pd.DataFrame(rows)
    order = {"logreg": 0, "ffnn": 1, "cnn": 2, "embed": 3, "lstm": 4, "cifar10": 5,
             "transformer": 6, "vit": 7}
    return (table.assign(_o=table["model"].map(lambda m: order.get(m, 9)))
            .sort_values(["_o", "batch"]).drop(columns="_o").reset_index(drop=True))


def _noise_seconds(record: pd.Series) -> float | None:
    """What the noise costs in a private ghost step: the cost split's part (the step with the
    draw against without it, fused as it runs) where the split resolves it (over twice the
    split's spread of the step), else the draw timed on its own (``noise_step_s``, which a
    fused draw can undercut)."""
    split = record.get("cost_split_s")
    if isinstance(split, dict) and split.get("noise") is not None:
        resolution = 2 * (split.get("spread") or 0.0) * (split.get("step") or 0.0)
        if split["noise"] > resolution:
            return float(split["noise"])
    noise = pd.to_numeric(pd.Series([record.get("noise_step_s")]), errors="coerce").iloc[0]
    return None if pd.isna(noise) else float(noise)


def ghost_verdicts(table: pd.DataFrame) -> list[str]:
    """Issue 14's speed targets, each met or not, with the numbers (from a cost table)."""
    if table.empty or "ghost best ms" not in table:
        return []
    lines = []

    def worst(column: str, pick=max) -> tuple[float, str]:
        part = table.dropna(subset=[column]) if column in table else table.iloc[0:0]
        if part.empty:
            return math.nan, "-"
        i = part[column].idxmax() if pick is max else part[column].idxmin()
        return float(part.loc[i, column]), f"{part.loc[i, 'model']} B={part.loc[i, 'batch']}"

    value, where = worst("ghost / np")
    if value == value:
        lines.append(f"private ghost / non-private both <= 2x on every model (goal 1.25x): "
                     f"{'met' if value <= 2 else 'NOT met'}, worst {value:.2f}x ({where})")
    else:
        lines.append("private ghost / non-private both: no non-private both rows to compare")
    value, where = worst("ghost / (np+floor)")
    if value == value:
        lines.append(f"private ghost <= 1.15x (non-private both + noise floor) on every model: "
                     f"{'met' if value <= 1.15 else 'NOT met'}, worst {value:.2f}x ({where}); "
                     "the floor is the parameter count at the fastest Gaussian generator timed "
                     "in the same cell")
    if "ghost-noise / np" in table:
        value, where = worst("ghost-noise / np")
        lines.append(f"  the same without drawing the noise (clipping alone): worst {value:.2f}x "
                     f"({where}); noise ms is what sigma*C*N(0,1) per parameter costs here")
    focus = (table[table["model"].isin(["embed", "lstm"])].dropna(subset=["both / ghost"])
             if "both / ghost" in table else table.iloc[0:0])
    if len(focus):
        low = focus["both / ghost"].min()
        lines.append(f"ghost >= 2x faster than both on embed and lstm: "
                     f"{'met' if low >= 2 else 'NOT met'}, least {low:.2f}x")
    value, where = worst("both / ghost", pick=min)
    if value == value:
        lines.append(f"ghost never more than 5% slower than both: "
                     f"{'met' if value >= 1 / 1.05 else 'NOT met'}, worst both/ghost "
                     f"{value:.2f} ({where})")
    value, where = worst("opacus best / ghost", pick=min)
    if value == value:
        lines.append(f"ghost faster than Opacus' best mode on every model: "
                     f"{'met' if value > 1 else 'NOT met'}, worst opacus/ghost {value:.2f} "
                     f"({where})")
    both = (table.dropna(subset=["ghost overhead", "opacus overhead"])
            if {"ghost overhead", "opacus overhead"} <= set(table) else table.iloc[0:0])
    if len(both):
        slower = both[both["ghost overhead"] >= both["opacus overhead"]]
        lines.append("ghost's privacy overhead below Opacus' best: "
                     + ("met on every cell" if slower.empty else
                        "NOT met on " + ", ".join(f"{m} B={b}" for m, b in
                                                  zip(slower["model"], slower["batch"]))))
    value, where = worst("ghost compile / both")
    if value == value:
        lines.append(f"ghost compile time <= 1.5x both's: {'met' if value <= 1.5 else 'NOT met'},"
                     f" worst {value:.2f}x ({where})")
    return lines + encoder_verdicts(table)


def encoder_verdicts(table: pd.DataFrame) -> list[str]:
    """Issue 24's targets on the transformer and the ViT at B=64 and 256, met or not."""
    part = table[table["model"].isin(ENCODERS) & table["batch"].isin([64, 256])]
    if part.empty:
        return []
    lines = []

    def check(column: str, text: str, ok, pick=max) -> None:
        rows = part.dropna(subset=[column]) if column in part else part.iloc[0:0]
        if rows.empty:
            return
        i = rows[column].idxmax() if pick is max else rows[column].idxmin()
        value = float(rows.loc[i, column])
        lines.append(f"{text}: {'met' if ok(value) else 'NOT met'}, worst {value:.2f}x "
                     f"({rows.loc[i, 'model']} B={rows.loc[i, 'batch']})")

    check("ghost / np", "encoders: private ghost / non-private both <= 1.25x",
          lambda v: v <= 1.25)
    check("opacus best / ghost", "encoders: ghost >= 1.5x faster than Opacus' fastest mode",
          lambda v: v >= 1.5, pick=min)
    check("others best / ghost", "encoders: ghost faster than every other framework's row",
          lambda v: v > 1, pick=min)
    check("ghost compile / both", "encoders: ghost compile time <= 1.5x both's",
          lambda v: v <= 1.5)
    return lines


#: Columns of the cost table that are ratios (printed as every ratio is, :func:`format_ratio`).
RATIO_COLUMNS = ("ghost / np", "ghost / (np+floor)", "ghost-noise / np", "both / ghost",
                 "opacus best / ghost", "others best / ghost", "ghost overhead", "opacus overhead",
                 "ghost compile / both")


def format_cost(records: pd.DataFrame, *, targets: bool = False) -> str:
    """The cost table as text: only rows where the ghost engine has a baseline beside it
    (empty otherwise, never a table of NaN), only columns with a number; then the cost split
    of the ghost cells that have one. ``targets`` adds the team's speed targets (``python -m
    ablation.summary DIR --targets``), met or not."""
    split = format_cost_split(records)
    split = f"the private ghost step, part by part (ms; timing.cost_split=true):\n{split}" \
        if split else ""
    table = privacy_cost_table(records)
    if table.empty or "ghost best ms" not in table:
        return split
    compared = [c for c in ("ghost / np", "both / ghost", "opacus best / ghost") if c in table]
    table = table.dropna(subset=compared, how="all") if compared else table.iloc[0:0]
    if table.empty:
        return split
    table = table.dropna(axis=1, how="all")
    shown = table.copy()
    for column in shown.columns:
        if column in RATIO_COLUMNS:
            shown[column] = [format_ratio(v) or "-" for v in shown[column]]
        elif column.endswith(" ms"):
            shown[column] = ["-" if missing(v) else f"{v:.3g}" for v in shown[column]]
    text = shown.to_string(index=False) + (f"\n\n{split}" if split else "")
    return text + ("\n\n" + "\n".join(ghost_verdicts(table)) if targets else "")


#: The cost split's columns: (heading, key in the record's ``cost_split_s``).
SPLIT_COLUMNS = (("non-private", "non_private"), ("clipped sum", "clipped_sum"),
                 ("norms", "norms"), ("noise", "noise"))


def cost_split_table(records: pd.DataFrame) -> pd.DataFrame:
    """One row per private ghost cell timed with ``timing.cost_split=true``: the parts of its
    step (ms), their sum (the split's own full step), the cell's measured step, and the two
    spreads (the split's rounds, the cell's bursts)."""
    frame = timing_rows(records)
    if frame.empty or "cost_split_s" not in frame:
        return pd.DataFrame()
    hits = frame[(frame["status"] == "ok") & (frame["engine"] == "ghost")
                 & frame["cost_split_s"].map(lambda v: isinstance(v, dict))]
    rows = []
    for _, r in hits.iterrows():
        split = r["cost_split_s"]
        row: dict[str, Any] = {"model": r["model_label"], "batch": int(r["batch_size"]),
                               "engine": r["engine_label"]}
        row.update({heading: 1e3 * split[key] for heading, key in SPLIT_COLUMNS})
        row["parts sum"] = 1e3 * sum(split[key] for _, key in SPLIT_COLUMNS)
        row["cell step"] = 1e3 * float(r["throughput_step_s"])
        row["split spread"] = split.get("spread")
        row["cell spread"] = r.get("spread")
        rows.append(row)
    return pd.DataFrame(rows)


def format_cost_split(records: pd.DataFrame) -> str:
    """:func:`cost_split_table` as text ("" when no record has a split)."""
    table = cost_split_table(records)
    if table.empty:
        return ""
    shown = table.copy()
    for column in shown.columns:
        if column.endswith("spread"):
            shown[column] = ["-" if missing(v) else f"{v:.0%}" for v in shown[column]]
        elif column not in ("model", "batch", "engine"):
            shown[column] = [f"{v:.3g}" for v in shown[column]]
    return shown.to_string(index=False)
