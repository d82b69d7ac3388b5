"""Results → tidy pandas frames: the numbers behind every figure and table.

Every function takes the frame of :func:`ablation.results.load` (or one of these frames) and
returns a new frame; nothing here plots. A record belongs to a *family* (its sweep: the same
machine, code and settings, only the grid's engine × model × batch × privacy varying;
:func:`ablation.report.records.record_family`) and is a *cell* of it. Figures and tables take
one family at a time (:func:`groups`), so a quick run never lands in a reference figure and
nothing is averaged across caps, seeds or timing modes. Two records of the same cell of a
family are the same measurement twice: the newest is kept and a warning names both files.
A cell the caller asks for and the results lack raises :class:`MissingCells` naming it: a
missing run is never a zero.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from ablation.report import records
from ablation.report.labels import (ENGINE_ORDER, engine_label, model_label, ratio_digits,
                                   relative_spread)

#: What identifies one cell of a family.
CELL = ("engine_label", "model", "batch_size", "private", "data")
MODEL_ORDER = ("logreg", "ffnn", "cnn", "cnn[xla]", "embed", "lstm", "lstm[static]", "cifar10")


class MissingCells(LookupError):
    """Cells asked for that no ok record holds; the message names them."""


class DuplicateRecords(UserWarning):
    """Two records of the same cell of the same family: the newest is kept."""


class NoRecords(LookupError):
    """A folder holds no result records."""


def device_label(row: pd.Series) -> str:
    """Where a record ran: ``NVIDIA H100 80GB HBM3``, or ``cpu: AMD EPYC 7B13 (2 cores)``."""
    env = row.get("env") if isinstance(row.get("env"), dict) else {}
    if env.get("platform") == "cpu":
        model = env.get("cpu_model")
        cores = f"{env.get('cpu_count')} cores"
        return f"cpu: {model} ({cores})" if model else f"cpu ({cores})"
    return str(env.get("device_kind") or "unknown")


def family_label(frame: pd.DataFrame) -> str:
    """A readable name of one family's folder: its experiment (or ``runs``) and a short hash."""
    experiments = sorted({e for e in frame.get("experiment", pd.Series(dtype=object)).dropna()})
    name = experiments[0] if len(experiments) == 1 else "runs"
    # A record's field becomes a folder name: one path component, nothing that climbs out.
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip(".-") or "runs"
    family = str(frame["family"].iloc[0]) if "family" in frame and len(frame) else "family"
    return f"{name}-{family[:6]}"


def _dedupe(frame: pd.DataFrame, cell: Sequence[str]) -> pd.DataFrame:
    """One record per cell of each family: the newest, with a warning naming the others."""
    keys = ["family", *cell]
    frame = frame.assign(_when=frame.get("finished_at", frame["started_at"]).fillna(
        frame["started_at"])).sort_values("_when")
    dup = frame.duplicated(subset=keys, keep="last")
    for _, row in frame[dup].iterrows():
        kept = frame[~dup]
        match = kept
        for key in keys:
            match = match[match[key] == row[key]]
        keep_path = match["path"].iloc[0] if len(match) else "?"
        warnings.warn(f"two records of the same cell ({'/'.join(str(row[k]) for k in cell)}), "
                      f"same machine, code and settings: keeping {keep_path}, ignoring "
                      f"{row['path']}", DuplicateRecords, stacklevel=3)
    return frame[~dup].drop(columns="_when")


#: What each engine is written in (its non-private rows are that framework's plain SGD).
FRAMEWORKS = {"opacus": "pytorch", "backpack": "pytorch", "pyvacy": "pytorch", "tfp": "tensorflow",
              "jax_privacy": "jax"}


def system_of(row: Mapping[str, Any]) -> str:
    """What a row measures, as drawn: a private row its engine; a non-private row its
    framework's plain step where engines share one (``pytorch`` for Opacus, BackPACK and
    PyVacy, ``keras`` / ``keras[xla]`` for TF Privacy, ``both`` for ghost and jax_privacy,
    whose non-private step is the batched gradient), else its engine (the loops differ)."""
    if row["private"]:
        return row["engine_label"]
    engine = row["engine"]
    if FRAMEWORKS.get(engine) == "pytorch":
        return "pytorch"
    if engine == "tfp":
        return "keras[xla]" if row.get("xla") is True else "keras"
    if engine in ("ghost", "jax_privacy"):  # both's label, with the same layout tags
        return engine_label({**dict(row), "engine": "both", "engine_mode": None,
                             "ghost_fallback": None})
    return row["engine_label"]


def _one_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Non-private rows that repeat another engine's plain step (Opacus', BackPACK's and
    PyVacy's PyTorch SGD; ghost's and jax_privacy's batched gradient) are one system: keep the
    row of the first engine in the usual order, so nothing is drawn twice or averaged."""
    order = {name: i for i, name in enumerate(ENGINE_ORDER)}
    frame = frame.assign(_rank=frame["engine"].map(lambda e: order.get(e, len(order))))
    keys = ["family", "system", "model", "batch_size", "private", "data"]
    frame = frame.sort_values(["_rank", "engine_label"])
    return frame.drop_duplicates(subset=keys, keep="first").drop(columns="_rank")


def timing_frame(records_frame: pd.DataFrame, *, ok_only: bool = True) -> pd.DataFrame:
    """One row per timing cell of each family, tidy columns.

    Columns: engine_label, system (:func:`system_of`), engine, framework, model
    (``lstm[static]`` for the paper's unroll),
    batch_size, private, data, device, family, identity, experiment, status, compile_s,
    first_step_s, first_epoch_s, median_step_s, iqr_step_s, steps_timed, throughput_step_s,
    median_epoch_s, epoch_estimated, epsilon, n_params, started_at, path.
    """
    empty = pd.DataFrame(columns=[*CELL, "device", "family", "median_epoch_s"])
    if records_frame.empty or "kind" not in records_frame:
        return empty
    frame = records_frame[records_frame["kind"] == "timing"].copy()
    if ok_only:
        frame = frame[frame["status"] == "ok"]
    if frame.empty:
        return empty
    for column in ("loop", "engine_mode", "unroll", "pool", "tied", "ghost_fallback",
                   "experiment", "finished_at", "xla", "devices", "microbatch_size",
                   "processes", "scaling", "process_step_s"):
        if column not in frame:
            frame[column] = None
    frame["engine_label"] = frame.apply(engine_label, axis=1)
    frame["model"] = frame.apply(model_label, axis=1)
    frame["framework"] = frame["engine"].map(lambda e: FRAMEWORKS.get(e, "jax"))
    frame["system"] = frame.apply(system_of, axis=1)
    frame["device"] = frame.apply(device_label, axis=1)
    for column in ("compile_s", "first_step_s", "first_epoch_s", "median_step_s", "iqr_step_s",
                   "throughput_step_s", "median_epoch_s", "epsilon", "steps_timed"):
        if column not in frame:
            frame[column] = np.nan
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    if "epoch_estimated" not in frame:
        frame["epoch_estimated"] = True
    frame["spread"] = frame.apply(relative_spread, axis=1)
    frame = _one_baseline(_dedupe(frame, CELL))
    columns = [*CELL, "system", "engine", "framework", "device", "family", "identity", "experiment",
               "status", "compile_s", "first_step_s", "first_epoch_s", "median_step_s",
               "iqr_step_s", "steps_timed", "throughput_step_s", "median_epoch_s",
               "epoch_estimated", "spread", "epsilon", "n_params", "started_at", "error",
               "processes", "scaling", "process_step_s", "path"]
    return frame[[c for c in columns if c in frame]].reset_index(drop=True)


#: How a figure names a cell that has records but no ok one, by the newest record's status.
OUTCOMES = {"oom": "out of memory", "timeout": "timed out", "crash": "crashed"}


def outcome(status: Any, error: Any) -> str:
    """A short word for why a cell has no measurement: ``refused`` (the engine declined the
    network: an ``...Unsupported`` error), ``out of memory``, ``timed out``, ``crashed`` (a
    worker killed by a signal) or ``failed``."""
    text = "" if error is None or error != error else str(error)
    if status in OUTCOMES:
        return OUTCOMES[status]
    if re.match(r"^\w*Unsupported\b", text):
        return "refused"
    if "killed by SIG" in text:
        return "crashed"
    return "failed"


def unmeasured_cells(records_frame: pd.DataFrame) -> pd.DataFrame:
    """The timing cells of each family that have records but no ok one (refused, failed, out
    of memory, timed out), one row each with the newest record's ``status``, ``error`` and
    :func:`outcome`; figures mark them where their bar would stand, so that no cell vanishes
    without a word."""
    with warnings.catch_warnings():  # an ok record beside a failed one is not news here
        warnings.simplefilter("ignore", DuplicateRecords)
        every = timing_frame(records_frame, ok_only=False)
    if every.empty:
        return every.assign(outcome=pd.Series(dtype=str))
    ok = timing_frame(records_frame)
    # by what a bar shows (system), so a non-private cell whose plain step another engine
    # measured is not marked failed beside that bar
    keys = ["family", "system", *CELL[1:]]
    measured = set(map(tuple, ok[keys].astype(str).values)) if len(ok) else set()
    failed = every[every["status"] != "ok"]
    unmatched = np.array([tuple(row) not in measured for row in failed[keys].astype(str).values],
                         dtype=bool)  # (an empty list would select no columns)
    failed = failed[unmatched]
    return failed.assign(outcome=[outcome(s, e) for s, e in
                                  zip(failed["status"], failed.get("error", [None] * len(failed)))]
                         ).reset_index(drop=True)


def memory_frame(records_frame: pd.DataFrame) -> pd.DataFrame:
    """One row per memory probe of each family; a prediction (``predict_only``) and a
    measurement of the same cell are different rows (``measured`` tells them apart)."""
    empty = pd.DataFrame(columns=["engine_label", "model", "private", "max_batch_size",
                                  "device", "family"])
    if records_frame.empty or "kind" not in records_frame:
        return empty
    frame = records_frame[(records_frame["kind"] == "memory")
                          & (records_frame["status"] == "ok")].copy()
    if frame.empty:
        return empty
    for column in ("loop", "engine_mode", "unroll", "pool", "tied", "ghost_fallback",
                   "experiment", "finished_at", "cap_enforced", "predict_only"):
        if column not in frame:
            frame[column] = None
    frame["engine_label"] = frame.apply(engine_label, axis=1)
    frame["model"] = frame.apply(model_label, axis=1)
    frame["device"] = frame.apply(device_label, axis=1)
    frame["measured"] = ~frame["predict_only"].fillna(False).astype(bool)
    frame["limit_gib"] = frame["limit_bytes"].map(
        lambda b: np.nan if b is None or b != b else b / (1 << 30))
    frame = _dedupe(frame, ["engine_label", "model", "private", "measured"])
    columns = ["engine_label", "engine", "model", "private", "measured", "device", "family",
               "identity", "experiment", "limit_gib", "cap_enforced", "max_batch_size",
               "predicted_max_batch_size", "reached_max", "path"]
    return frame[[c for c in columns if c in frame]].reset_index(drop=True)


def audit_frame(records_frame: pd.DataFrame) -> pd.DataFrame:
    """One row per test of each audited mechanism (``python -m ablation.audit``): the engine's
    own and each control's, tidy columns: model, mechanism, control (the control's name or
    None), test (``one step``, ``masked slot``, ``noise schedule``, ``whole run``), mu,
    mu_se, claim_mu, epsilon_lower, claim_epsilon (the accountant's for the whole run),
    passed, device, identity, path. The newest record of each model and engine label counts."""
    columns = ["model", "mechanism", "control", "test", "mu", "mu_se", "claim_mu",
               "epsilon_lower", "claim_epsilon", "passed", "device", "identity", "path"]
    if records_frame.empty or "kind" not in records_frame:
        return pd.DataFrame(columns=columns)
    frame = records_frame[(records_frame["kind"] == "audit")
                          & (records_frame["status"] == "ok")].copy()
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame["device"] = frame.apply(device_label, axis=1)
    frame = frame.sort_values("finished_at").drop_duplicates(
        ["device", "model", "audited_engine"], keep="last")
    rows = []
    for _, record in frame.iterrows():
        audits = [(record["audited_engine"], None, record["audit"])]
        audits += [(f"control: {name}", name, found)
                   for name, found in (record.get("controls") or {}).items()]
        for mechanism, control, found in audits:
            common = {"model": record["model"], "mechanism": mechanism, "control": control,
                      "device": record["device"], "identity": record.get("identity"),
                      "path": record.get("path")}
            for test in found["tests"]:
                rows.append({**common, "test": test["name"], "mu": test["mu"],
                             "mu_se": test["mu_se"], "claim_mu": test["claim_mu"],
                             "epsilon_lower": test["epsilon_lower"],
                             "claim_epsilon": test["claim_epsilon"], "passed": test["passed"]})
            run = found.get("whole_run")
            if run:
                rows.append({**common, "test": "whole run", "mu": None, "mu_se": None,
                             "claim_mu": None, "epsilon_lower": run["epsilon_lower"],
                             "claim_epsilon": run["epsilon"], "passed": run["passed"]})
    return pd.DataFrame(rows, columns=columns)


def groups(frame: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """``(device, family label, rows)`` for each family in ``frame``, devices sorted."""
    if frame.empty:
        return
    for (device, _), part in sorted(frame.groupby(["device", "family"], sort=False),
                                    key=lambda item: (item[0][0], family_label(item[1]))):
        yield device, family_label(part), part


def one_family(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` itself when it holds one family; a clear error when it mixes several."""
    families = frame["family"].dropna().unique() if "family" in frame and len(frame) else []
    if len(families) > 1:
        labels = sorted(family_label(frame[frame["family"] == f]) for f in families)
        raise ValueError(f"results from {len(families)} different runs (machines, code or "
                         f"settings): {', '.join(labels)}; draw each apart (analysis.groups)")
    return frame


def require(frame: pd.DataFrame, **wanted: Iterable) -> pd.DataFrame:
    """The rows of ``frame`` for every combination of ``wanted`` values; raise if any is absent.

    ``require(f, engine_label=["both", "vmap"], model=["cnn"], batch_size=[128])`` returns those
    cells or raises :class:`MissingCells` listing the combinations no row holds.
    """
    keys = list(wanted)
    values = [list(v) for v in wanted.values()]
    index = pd.MultiIndex.from_product(values, names=keys)
    present = (set(map(tuple, frame[keys].itertuples(index=False, name=None))) if len(frame)
               else set())
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


def ablation_speedups(frame: pd.DataFrame, *, batch_size: int, private: bool = True,
                      models: Sequence[str] | None = None,
                      engines: Sequence[str] = ("both", "jit", "vmap", "none")) -> pd.DataFrame:
    """Per model: each engine's epoch time and how many times faster ``both`` is.

    Columns: model, engine_label, median_epoch_s, both_speedup (engine ÷ both; 1 for both),
    ratio_digits (the significant figures the two cells' spreads support), path.
    """
    frame = frame[(frame["private"] == private)]
    models = list(models) if models is not None else sorted(
        frame.loc[frame["batch_size"] == batch_size, "model"].unique(), key=_model_key)
    cells = require(frame, engine_label=engines, model=models, batch_size=[batch_size])
    if "spread" not in cells:
        cells = cells.assign(spread=None)
    both = cells[cells["engine_label"] == "both"].set_index("model")
    out = cells[["model", "engine_label", "median_epoch_s", "compile_s", "spread",
                 *(["path"] if "path" in cells else [])]].copy()
    out["both_speedup"] = out["median_epoch_s"] / out["model"].map(both["median_epoch_s"])
    out["ratio_digits"] = [ratio_digits(s, both.loc[m, "spread"])
                           for m, s in zip(out["model"], out["spread"])]
    return _ordered(out)


#: The four factors of the 2x2 ablation: (name, slower engine, faster engine).
FACTORS = (("jit, with vmap (vmap → both)", "vmap", "both"),
           ("jit, without vmap (none → jit)", "none", "jit"),
           ("vmap, with jit (jit → both)", "jit", "both"),
           ("vmap, without jit (none → vmap)", "none", "vmap"))


def decomposition(frame: pd.DataFrame, *, batch_size: int, private: bool = True,
                  models: Sequence[str] | None = None) -> pd.DataFrame:
    """What each ingredient contributes, per model: the 2×2 ablation as factors.

    Columns: model, one column per :data:`FACTORS` entry (how many times faster adding that
    ingredient makes the step), and ``interaction`` = (jit with vmap) ÷ (jit without vmap)
    = (vmap with jit) ÷ (vmap without jit): 1 when the two multiply, above 1 when together
    they do more than the product of their effects alone.
    """
    table = ablation_speedups(frame, batch_size=batch_size, private=private, models=models)
    epoch = table.pivot(index="model", columns="engine_label", values="median_epoch_s")
    out = pd.DataFrame(index=epoch.index)
    for name, slow, fast in FACTORS:
        out[name] = epoch[slow] / epoch[fast]
    out["interaction"] = out[FACTORS[0][0]] / out[FACTORS[1][0]]
    return _ordered(out.reset_index())


def privacy_overhead(frame: pd.DataFrame) -> pd.DataFrame:
    """Private ÷ non-private epoch time of the same engine (its framework's plain step where
    engines share one, :func:`system_of`), model, batch and family: the cost of clipping and
    noise alone (non-private steps keep the engine's switches)."""
    keys = ["model", "batch_size", "data", "device", "family"]
    if "path" not in frame:
        frame = frame.assign(path=None)
    private = frame[frame["private"] == True].copy()  # noqa: E712
    private["baseline"] = private.apply(lambda r: system_of({**r.to_dict(), "private": False}),
                                        axis=1)
    public = frame[frame["private"] == False]  # noqa: E712
    public = public.rename(columns={"system": "baseline", "median_epoch_s": "nonprivate_s",
                                    "path": "nonprivate_path"})
    both = private.rename(columns={"median_epoch_s": "private_s"}).merge(
        public[[*keys, "baseline", "nonprivate_s", "nonprivate_path"]], on=[*keys, "baseline"],
        how="inner")
    both["overhead"] = both["private_s"] / both["nonprivate_s"]
    both["path"] = [f"{a}; {b}" for a, b in zip(both["path"], both["nonprivate_path"])]
    return _ordered(both[["engine_label", *keys, "private_s", "nonprivate_s", "overhead",
                          "path"]])


def max_batch_sizes(memory: pd.DataFrame) -> pd.DataFrame:
    """Largest batch per engine and model (and cap), with the prediction where one exists."""
    columns = ["engine_label", "model", "private", "measured", "limit_gib", "device", "family",
               "max_batch_size", "predicted_max_batch_size", "path"]
    return _ordered(memory[[c for c in columns if c in memory]].copy())


def compile_times(frame: pd.DataFrame) -> pd.DataFrame:
    """Compile seconds per engine, model and batch size (engines that compile only)."""
    out = frame[frame["compile_s"].notna()]
    return _ordered(out[["engine_label", "model", "batch_size", "private", "device",
                         "compile_s", "first_step_s", *(["path"] if "path" in out else [])]].copy())


def models_in(frame: pd.DataFrame) -> list[str]:
    """The models that ``frame`` holds: the paper's in the paper's order, then any others
    (your own, the transformers) by name."""
    present = set(frame["model"]) if len(frame) else set()
    return [m for m in MODEL_ORDER if m in present] + sorted(present - set(MODEL_ORDER))


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


def load(root: str | Path | Iterable[str | Path] = "outputs"
         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(timing, memory)`` frames of every record under ``root`` (a run, a sweep, a folder of
    them, or several such folders: records from many machines merge, kept apart by family).

    Raises:
      NoRecords: a folder does not exist, or none holds result records.
    """
    roots = [Path(root)] if isinstance(root, (str, Path)) else [Path(r) for r in root]
    for folder in roots:
        if not folder.exists():
            raise NoRecords(f"no such folder: {folder}")
    frame = records.load(roots)
    if frame.empty:
        raise NoRecords(f"no result records (result.json) under {', '.join(map(str, roots))}")
    return timing_frame(frame), memory_frame(frame)
