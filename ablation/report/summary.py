"""The summary table of a sweep: times, their spread, ε, and how many times faster ``both`` is.

Printed at the end of every run or sweep and written beside it (``summary.csv``,
``summary_timing.txt``); ``python -m ablation.summary DIR [DIR ...]`` prints it for any
folders of records (``--format text|markdown|csv``), and for two folders adds the ratio of
each cell's time in the second to the first (what changed between two commits or machines).

Every number says how far it can be trusted: the latency's IQR and the count of timed steps
(a cell with fewer than :data:`MIN_STEPS_FOR_SPREAD` is flagged), estimated epochs are marked
``~``, ratios carry the significant figures the spread supports, a cell that ``resume=true``
reused from an earlier run is marked, and ε is printed with its δ and the training length it
was accounted for.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ablation.report.analysis import timing_frame
from ablation.report.benchmarks import format_cost
from ablation.report.labels import (  # noqa: F401  (public names of the summary)
    DEFAULT_MODES, ENGINE_ORDER, MIN_STEPS_FOR_SPREAD, engine_label, missing, model_label,
    format_ratio, ratio_digits, significant, timing_rows)
from ablation.report.records import (OTHER_KIND_KEYS, VOLATILE_KEYS, config_hash,
                                     record_family, records_with_reused, warn_unreadable)
from ablation.report.scaling import format_scaling

FORMATS = ("text", "markdown", "csv")
CELL_KEYS = ("family", "model_label", "data", "batch_size", "private")
def sweep_records(root: str | Path) -> pd.DataFrame:
    """Records of one sweep folder, including those a ``resume=true`` run reused from earlier
    runs (``reused`` is True on those, and ``path`` points at the reused record); each record
    once, and unreadable files named in a warning."""
    problems: list[str] = []
    rows = [{**record, "path": str(path), "reused": reused}
            for path, record, reused in records_with_reused(root, problems)]
    warn_unreadable(problems)
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["family"] = [record_family(r) for r in rows]
    return frame


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per timing cell, as numbers (what ``summary.csv`` holds).

    Columns: engine, model, batch, private, status, compile s, step ms (median latency),
    iqr % (its spread), steps (latency steps timed), thru ms (throughput per step), epoch s,
    estimated (epoch derived from steps), eps, delta, eps steps (the training length ε is
    for), both x (this cell's epoch time ÷ ``both``'s on the same model, data, batch and
    privacy: how many times faster ``both`` is), both x digits (the significant figures it
    supports), reused (from an earlier run by ``resume=true``).
    """
    if frame.empty:
        return pd.DataFrame()
    frame = timing_rows(frame)
    if frame.empty:
        return pd.DataFrame()
    ok = frame["status"] == "ok"
    both = frame[ok & (frame["engine_label"] == "both")].drop_duplicates(list(CELL_KEYS),
                                                                         keep="last")
    both = both.set_index(list(CELL_KEYS))

    def versus_both(row: pd.Series) -> tuple[float | None, int | None]:
        key = tuple(row[k] for k in CELL_KEYS)
        if row["status"] != "ok" or key not in both.index:
            return None, None
        ref = both.loc[key]
        if not ref["median_epoch_s"]:
            return None, None
        return (float(row["median_epoch_s"]) / float(ref["median_epoch_s"]),
                ratio_digits(row["spread"], ref["spread"]))

    pairs = frame.apply(versus_both, axis=1, result_type="expand")
    frame["both_x"], frame["both_x_digits"] = pairs[0], pairs[1]
    order = {name: i for i, name in enumerate(ENGINE_ORDER)}
    frame["_order"] = frame["engine"].map(lambda e: order.get(e, len(order)))
    frame = frame.sort_values(["model_label", "private", "batch_size", "_order", "engine_label"],
                              ascending=[True, False, True, True, True])
    median = pd.to_numeric(frame["median_step_s"], errors="coerce")
    return pd.DataFrame({
        "engine": frame["engine_label"],
        "model": frame["model_label"],
        "batch": frame["batch_size"],
        "private": frame["private"],
        "status": frame["status"],
        "compile s": pd.to_numeric(frame["compile_s"], errors="coerce"),
        "step ms": median * 1e3,
        "iqr %": 100 * pd.to_numeric(frame["iqr_step_s"], errors="coerce") / median,
        "steps": frame["steps_timed"],
        "thru ms": pd.to_numeric(frame["throughput_step_s"], errors="coerce") * 1e3,
        "epoch s": pd.to_numeric(frame["median_epoch_s"], errors="coerce"),
        "estimated": frame["epoch_estimated"],
        "eps": pd.to_numeric(frame["epsilon"], errors="coerce"),
        "delta": frame["delta"],
        "eps steps": frame["accounted_steps"],
        "both x": frame["both_x"],
        "both x digits": frame["both_x_digits"],
        "reused": frame["reused"].fillna(False).astype(bool),
        "spread": frame["spread"],
        "config_hash": [h if isinstance(h, str) else config_hash(c or {}, "timing")
                        for h, c in zip(frame.get("config_hash", [None] * len(frame)),
                                        frame.get("config", [None] * len(frame)))],
        "path": frame["path"],
    }).reset_index(drop=True)


def _text_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The table as display strings, with the marks the notes explain."""
    def fmt(value: Any, spec: str) -> str:
        if missing(value):
            return "-"
        if isinstance(value, float) and math.isinf(value):
            return "inf"
        return format(value, spec)

    out = pd.DataFrame({
        "engine": table["engine"] + ["*" if r else "" for r in table["reused"]],
        "model": table["model"],
        "batch": table["batch"],
        "private": ["yes" if p else "no" for p in table["private"]],
        "status": table["status"],
        "compile s": [fmt(v, ".2f") for v in table["compile s"]],
        "step ms": [fmt(v, ".3g") for v in table["step ms"]],
        "iqr %": [fmt(v, ".0f") for v in table["iqr %"]],
        "steps": [("-" if missing(n) else f"{int(n)}" + ("!" if n < MIN_STEPS_FOR_SPREAD else ""))
                  for n in table["steps"]],
        "thru ms": [fmt(v, ".3g") for v in table["thru ms"]],
        "epoch s": [("~" if est and not missing(v) else "") + fmt(v, ".3g")
                    for v, est in zip(table["epoch s"], table["estimated"])],
        "eps": [fmt(v, ".2f") for v in table["eps"]],
        "both x": [("-" if missing(x) else significant(x, int(d)))
                   for x, d in zip(table["both x"], table["both x digits"])],
    })
    return out


def notes(table: pd.DataFrame) -> list[str]:
    """The lines under the table that explain its marks."""
    lines = []
    if table["estimated"].fillna(False).astype(bool).any():
        lines.append("~ epoch estimated as steps per epoch x throughput per step (thru ms)")
    steps = pd.to_numeric(table["steps"], errors="coerce")
    if (steps < MIN_STEPS_FOR_SPREAD).any():
        lines.append(f"! fewer than {MIN_STEPS_FOR_SPREAD} latency steps timed: the spread is "
                     "unknown and ratios are shown to 2 figures")
    if table["reused"].any():
        lines.append("* reused by resume=true from an earlier run on this machine and code:")
        lines += [f"    {e} {m} B={b}: {p}" for e, m, b, p, r in zip(
            table["engine"], table["model"], table["batch"], table["path"], table["reused"]) if r]
    eps = table[table["eps"].notna()]
    if len(eps):
        deltas = sorted({f"{d:g}" for d in eps["delta"] if not missing(d)})
        lengths = sorted({int(s) for s in eps["eps steps"] if not missing(s)})
        lines.append(f"eps at delta={', '.join(deltas)}: for the configured training "
                     f"({', '.join(f'{s:,}' for s in lengths)} steps), not for the steps timed")
    lines.append("step ms: median latency of one step; thru ms: per step, dispatched back to "
                 "back; both x: epoch time / both's")
    return lines


def concurrency_warning(frame: pd.DataFrame) -> str | None:
    """A warning when cells of these records ran several at a time on one machine."""
    if "concurrent_cells" not in frame:
        return None
    most = pd.to_numeric(frame["concurrent_cells"], errors="coerce").max()
    if not most or most != most or most <= 1:
        return None
    return (f"WARNING: up to {int(most)} cells ran at once on one machine "
            "(hydra.launcher.array_parallelism > 1): their times disturb each other")


def format_summary(frame: pd.DataFrame, fmt: str = "text") -> str:
    """The summary table of ``frame`` (records) as aligned text, markdown or CSV."""
    table = summary_table(frame)
    if table.empty:
        return "(no timing records)"
    if fmt == "csv":
        return table.to_csv(index=False).rstrip("\n")
    text = _text_columns(table)
    warning = concurrency_warning(frame)
    if fmt == "markdown":
        head = "| " + " | ".join(text.columns) + " |"
        rule = "|" + "|".join("---" if c in ("engine", "model", "status", "private") else "---:"
                              for c in text.columns) + "|"
        body = ["| " + " | ".join(str(v) for v in row) + " |"
                for row in text.itertuples(index=False)]
        lines = notes(table) + ([warning] if warning else [])
        return "\n".join([head, rule, *body, "", *(f"{line}  " for line in lines)])
    return (text.to_string(index=False) + "\n\n"
            + "\n".join(notes(table) + ([warning] if warning else [])))


def _settings(config: Any) -> dict[str, str]:
    """A timing config as ``{dotted key: value}``, without the keys that do not change what a
    cell measures."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = json.dumps(node, sort_keys=True, default=str)
    walk(config if isinstance(config, dict) else {}, "")
    dropped = VOLATILE_KEYS + OTHER_KIND_KEYS["timing"]
    return {k: v for k, v in flat.items()
            if not any(k == d or k.startswith(d + ".") for d in dropped)}


def _paired(frames: Sequence[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The two sweeps' ok cells, each with the key they pair on: the config hash over the
    settings *both* sweeps record. A setting that only one version of the code has (a key a
    newer version added with its default, e.g. ``engine.fallback``) cannot tell their cells
    apart, so it is left out (and returned, to be said); every shared setting must agree."""
    a, b = (summary_table(f) for f in frames)
    a, b = a[a["status"] == "ok"].copy(), b[b["status"] == "ok"].copy()
    configs = [dict(zip(f["path"], f["config"])) if "config" in f else {} for f in frames]
    settings = [[_settings(config.get(path)) for path in t["path"]]
                for t, config in zip((a, b), configs)]
    anywhere = [set().union(*map(set, rows)) if rows else set() for rows in settings]
    everywhere = [set.intersection(*map(set, rows)) if rows else set() for rows in settings]
    # one version always records it and the other never does: a key the code added or removed
    one_sided = (everywhere[0] - anywhere[1]) | (everywhere[1] - anywhere[0])
    compared = sorted((anywhere[0] | anywhere[1]) - one_sided)
    for table, rows in zip((a, b), settings):
        table["pair_key"] = [config_hash({k: row.get(k) for k in compared}) for row in rows]
    return a, b, sorted(one_sided)


def compare(frames: Sequence[pd.DataFrame], names: Sequence[str]) -> pd.DataFrame:
    """Two sweeps side by side: each cell's epoch time in both and the second ÷ the first.

    Cells pair only when every setting is the same (engine, model, batch, privacy, data,
    timing, seed, dp.*, ...), whatever the machine or code; settings only one of the two
    versions records are left out (:func:`unpaired` names them), and cells without a
    counterpart are left out (:func:`unpaired` counts them). The ratio carries the
    significant figures the two cells' spreads support.
    """
    a, b, _ = _paired(frames)
    merged = a.merge(b, on="pair_key", how="inner", suffixes=(" a", " b"))
    out = pd.DataFrame({
        "engine": merged["engine a"], "model": merged["model a"], "batch": merged["batch a"],
        "private": ["yes" if p else "no" for p in merged["private a"]],
        f"epoch s {names[0]}": merged["epoch s a"], f"epoch s {names[1]}": merged["epoch s b"],
    })
    ratio = merged["epoch s b"] / merged["epoch s a"]
    digits = [ratio_digits(x, y) for x, y in zip(merged["spread a"], merged["spread b"])]
    out[f"{names[1]} / {names[0]}"] = [format_ratio(r, d) or "-" for r, d in zip(ratio, digits)]
    return out.reset_index(drop=True)


def unpaired(frames: Sequence[pd.DataFrame]) -> tuple[int, int, list[str]]:
    """How many ok cells of each sweep have no counterpart with the same settings, and the
    settings only one of the two records (not compared)."""
    a, b, one_sided = _paired(frames)
    keys_a, keys_b = set(a["pair_key"]), set(b["pair_key"])
    return len(keys_a - keys_b), len(keys_b - keys_a), one_sided


def format_memory_summary(frame: pd.DataFrame) -> str:
    """The table printed after a probe: max batch per engine and model, with the cap."""
    if frame.empty:
        return "(no memory records)"
    rows = []
    for _, r in frame.iterrows():
        tried = r.get("tried") or []
        at_max = next((t for t in tried if t["batch_size"] == r.get("max_batch_size")), {})
        limit = r.get("limit_bytes")
        rows.append({
            "engine": engine_label(r), "model": model_label(r),
            "private": "yes" if r["private"] else "no",
            "cap": "-" if missing(limit) else _bytes(limit),
            "how": "predicted" if r.get("predict_only") else "measured",
            "status": r["status"],
            "max batch": r.get("max_batch_size"),
            "peak": _bytes(at_max.get("peak_bytes")),
            "predicted": _bytes(at_max.get("predicted_bytes")),
            "predicted max": r.get("predicted_max_batch_size"),
            "tries": len(tried),
        })
    table = pd.DataFrame(rows).sort_values(["model", "engine"])
    return table.to_string(index=False)


def _bytes(value: Any) -> str:
    if missing(value):
        return "-"
    if value >= 1 << 30:
        return f"{value / (1 << 30):.2f} GiB"
    return f"{value / (1 << 20):.0f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ablation.summary",
        description="Print the summary table of one or more folders of records; with two "
                    "folders, also each cell's time in the second divided by the first.")
    parser.add_argument("folders", nargs="+", help="sweep or run folders (searched recursively)")
    parser.add_argument("--format", choices=FORMATS, default="text")
    parser.add_argument("--cost", action="store_true",
                        help="also the cost-of-privacy table (ghost beside its baselines)")
    parser.add_argument("--targets", action="store_true",
                        help="with --cost: also the team's speed targets for the ghost engine")
    args = parser.parse_args(argv)
    frames = []
    for folder in args.folders:
        if not Path(folder).exists():
            print(f"error: no such folder: {folder}", file=sys.stderr)
            return 2
        frame = sweep_records(folder)
        if frame.empty:
            print(f"error: no result records under {folder}", file=sys.stderr)
            return 1
        frames.append(frame)
        if len(args.folders) > 1 and args.format == "text":
            print(f"=== {folder}")
        print(format_summary(frame, args.format))
        if args.cost or args.targets:
            cost = format_cost(frame, targets=args.targets)
            print("\n=== the cost of privacy (ms per step, throughput) ===\n"
                  + (cost or "(no ghost rows beside their baselines)"))
        scaled = format_scaling(timing_frame(frame))
        if scaled:
            print("\n=== scaling over processes ===\n" + scaled)
        if len(args.folders) > 1:
            print()
    if len(frames) == 2:
        table = compare(frames, ["a", "b"])
        print(f"=== b / a  (a = {args.folders[0]}, b = {args.folders[1]})")
        only_a, only_b, one_sided = unpaired(frames)
        if one_sided:
            print(f"(settings only one side records, not compared: {', '.join(one_sided)})")
        if only_a or only_b:
            print(f"({only_a} cell(s) of a and {only_b} of b have no counterpart with the same "
                  "settings: not compared)")
        if args.format == "csv":
            print(table.to_csv(index=False).rstrip("\n"))
        elif args.format == "markdown":
            print(table.to_markdown(index=False) if _has_tabulate()
                  else table.to_string(index=False))
        else:
            print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}")
                  if len(table) else "(no cell of a has a counterpart with the same settings in b)")
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
