"""How records are labelled and prepared for every table: engine and model labels, the engine
order, and a timing cell's relative spread. Shared by the summary, the benchmarks and the
analysis (so none of them imports another for a label)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

#: Engine order in tables and figures: the paper's four, then ours, then reference frameworks.
ENGINE_ORDER = ("both", "jit", "vmap", "none", "ghost", "opacus", "jax_privacy", "tfp",
                "backpack", "pyvacy")
#: The default mode of each engine that has modes (not shown in labels).
DEFAULT_MODES = {"opacus": "hooks", "ghost": "bookkeeping", "tfp": "vectorized",
                 "jax_privacy": "vmap"}
#: Fewer timed latency steps than this and an IQR says little: the cell is flagged.
MIN_STEPS_FOR_SPREAD = 5


def missing(value: Any) -> bool:
    """None or NaN: a field a record does not have."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def engine_label(row: Any) -> str:
    """``both``, ``jit`` (``jit[scan]`` for a non-default loop), ``opacus[ghost]``, …"""
    engine = row["engine"]
    loop = row.get("loop")
    mode = row.get("engine_mode")
    if engine == "jit" and not missing(loop) and loop != "dispatch":
        return f"jit[{loop}]"
    tags = []
    if engine in DEFAULT_MODES and not missing(mode) and mode != DEFAULT_MODES[engine]:
        size = row.get("microbatch_size")
        tags.append(f"{mode} {int(size)}" if mode == "microbatch" and not missing(size) else mode)
    if engine == "tfp" and row.get("xla") is True:
        tags.append("xla")
    if engine == "ghost" and row.get("ghost_fallback") == "materialise":
        tags.append("materialise")
    devices = row.get("devices")
    if not missing(devices) and devices and devices > 1:
        tags.append(f"{int(devices)} devices")
    processes = row.get("processes")
    if not missing(processes) and processes and processes > 1:
        tags.append(f"{int(processes)} processes")
    return f"{engine}[{','.join(tags)}]" if tags else engine


def model_label(row: Any) -> str:
    """``lstm[static]`` for the paper's unrolled lstm, ``cnn[xla]`` for the cnn with the
    paper's max-pool, ``transformer[tied]`` for the transformer with a tied classifier, else
    the model's name."""
    if row["model"] == "lstm" and row.get("unroll") == "static":
        return "lstm[static]"
    if row["model"] == "cnn" and row.get("pool") == "xla":
        return "cnn[xla]"
    if row["model"] == "transformer" and row.get("tied") is True:
        return "transformer[tied]"
    return row["model"]


def relative_spread(row: pd.Series) -> float | None:
    """How uncertain a cell's time is: the larger of the latency IQR ÷ median and the range
    of its throughput bursts ÷ their median. None when too few steps were timed."""
    steps = row.get("steps_timed")
    if missing(steps) or steps < MIN_STEPS_FOR_SPREAD:
        return None
    spreads = []
    if not missing(row.get("iqr_step_s")) and row.get("median_step_s"):
        spreads.append(row["iqr_step_s"] / row["median_step_s"])
    bursts = row.get("throughput_bursts_s")
    if isinstance(bursts, list) and len(bursts) > 1:
        mid = sorted(bursts)[len(bursts) // 2]
        spreads.append((max(bursts) - min(bursts)) / mid if mid else math.inf)
    return max(spreads) if spreads else None


def ratio_digits(*relative_spreads: float | None) -> int:
    """Significant figures a ratio supports, given each operand's relative spread.

    The spreads add in quadrature: 10–100 % supports 1 figure, 1–10 % 2, less 3 (never more).
    An unknown spread (too few steps) gives 2 figures, flagged elsewhere.
    """
    if any(missing(s) for s in relative_spreads):
        return 2
    spread = math.sqrt(sum(s * s for s in relative_spreads))
    if not math.isfinite(spread):
        return 1
    if spread <= 0:
        return 3
    return int(min(3, max(1, math.floor(-math.log10(spread)) + 1)))


def significant(value: float, digits: int) -> str:
    """``value`` with ``digits`` significant figures, without scientific notation."""
    if missing(value):
        return "-"
    if math.isinf(value):
        return "inf"
    if value == 0:
        return "0"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    rounded = round(value, decimals)
    if rounded:  # rounding up may add a digit (0.996 -> 1.0): count again from the result
        decimals = digits - 1 - math.floor(math.log10(abs(rounded)))
    return f"{round(value, decimals):,.{max(0, decimals)}f}"


def format_ratio(value: float, digits: int | None = None) -> str:
    """A ratio as every table and figure prints it: ``×`` and :func:`significant` figures
    (``digits`` from :func:`ratio_digits`; 3, the most any ratio shows, when unknown)."""
    if missing(value):
        return ""
    return "×" + significant(float(value), 3 if missing(digits) else int(digits))


def timing_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The timing records of ``frame`` with every column the tables read, their labels and
    their relative spread (``spread``)."""
    frame = frame[frame.get("kind", pd.Series("timing", index=frame.index)) == "timing"].copy()
    if frame.empty:
        return frame
    if "family" not in frame:
        frame["family"] = "one"
    for column in ("loop", "engine_mode", "unroll", "steps_timed", "iqr_step_s",
                   "median_step_s", "throughput_step_s", "throughput_bursts_s", "epoch_estimated",
                   "compile_s", "median_epoch_s", "epsilon", "delta", "accounted_steps",
                   "reused", "path", "data"):
        if column not in frame:
            frame[column] = None
    frame["engine_label"] = frame.apply(engine_label, axis=1)
    frame["model_label"] = frame.apply(model_label, axis=1)
    frame["spread"] = frame.apply(relative_spread, axis=1)
    return frame
