"""Hydra callbacks: progress across a sweep, and the summary table when a run or sweep ends."""

from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def _report(folder: Path) -> None:
    from ablation.report.summary import sweep_records
    frame = sweep_records(folder)
    if frame.empty:
        return
    for kind in ("timing", "memory"):
        part = frame[frame["kind"] == kind]
        if not part.empty:
            _report_kind(folder, part, kind)


def _report_kind(folder: Path, frame, kind: str) -> None:
    from ablation.report.records import write_text
    from ablation.report.summary import format_summary, summary_table
    if kind == "timing":
        from ablation.report.benchmarks import format_cost
        text = format_summary(frame)
        write_text(folder / "summary.csv", summary_table(frame).to_csv(index=False))
        cost = format_cost(frame)
        if cost:  # a sweep with the ghost engine beside its baselines: the side-by-side table
            text += "\n\n=== the cost of privacy (ms per step, throughput) ===\n" + cost
        from ablation.report.analysis import timing_frame
        from ablation.report.scaling import format_scaling
        scaled = format_scaling(timing_frame(frame))
        if scaled:  # a sweep over process counts: each beside one process
            text += "\n\n=== scaling over processes ===\n" + scaled
    else:
        from ablation.report.summary import format_memory_summary
        text = format_memory_summary(frame)
    write_text(folder / f"summary_{kind}.txt", text + "\n")
    print(f"\n=== summary ({folder}) ===\n{text}\n", flush=True)


def sweep_cells(config: DictConfig) -> list[list[str]] | None:
    """The override list of every cell the basic sweeper will run (the product of the sweep's
    comma lists), or None for another sweeper."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        params = config.hydra.sweeper.get("params") or {}
        if not isinstance(params, dict):
            params = OmegaConf.to_container(params, resolve=False)
        overrides = [f"{k}={v}" for k, v in params.items()]
        overrides += list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides=overrides)
        return [list(cell) for batch in BasicSweeper.split_arguments(parsed, None)
                for cell in batch]
    except Exception:  # noqa: BLE001 - another sweeper or launcher: no count, no ETA
        return None


def sweep_size(config: DictConfig) -> int | None:
    """How many cells the basic sweeper will run."""
    cells = sweep_cells(config)
    return None if cells is None else len(cells)


def validate_sweep(cells: list[list[str]]) -> None:
    """Compose and validate every cell of a sweep before the first one runs: a bad value
    anywhere in the grid is one line and exit 2, not a sweep stopped halfway."""
    from hydra import compose

    from ablation.sweep.config import ConfigError, cell_from_dict
    from ablation.sweep.shell import exit_with_error
    for overrides in cells:
        try:
            cfg = compose(config_name="config", overrides=overrides)
            cell_from_dict(OmegaConf.to_container(cfg, resolve=True))
        except ConfigError as error:
            exit_with_error(f"{error} (in the sweep's cell {' '.join(overrides)}; nothing ran)")
        except Exception as error:  # noqa: BLE001 - Hydra's own complaint, in one line
            exit_with_error(f"{str(error).splitlines()[0]} (in the sweep's cell "
                            f"{' '.join(overrides)}; nothing ran)")


def eta_line(done: int, total: int | None, elapsed_s: float, now: _dt.datetime) -> str:
    """``[sweep] 3/12 cells done, 1.5 min so far, ~4.5 min left (ETA 11:42)``."""
    head = f"[sweep] {done}/{total if total else '?'} cells done, {elapsed_s / 60:.1f} min so far"
    if not total or not done or done >= total:
        return head
    left = elapsed_s / done * (total - done)
    eta = (now + _dt.timedelta(seconds=left)).strftime("%H:%M")
    return f"{head}, ~{left / 60:.1f} min left (ETA {eta})"


class SummaryCallback(Callback):
    """Shows progress across a sweep (cells done of all, time so far, time left) and prints
    the summary tables (timing and/or memory) of the run or sweep that ended."""

    def __init__(self) -> None:
        self._total: int | None = None
        self._done = 0
        self._started = time.perf_counter()
        self._pid = os.getpid()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ablation.sweep.folders import FolderBusy, hold_folder
        from ablation.sweep.shell import SWEEP_PID, exit_with_error
        os.environ[SWEEP_PID] = str(os.getpid())  # the jobs it launches watch this process
        cells = sweep_cells(config)
        self._total = None if cells is None else len(cells)
        try:
            self._lock = hold_folder(Path(config.hydra.sweep.dir), "sweep")
        except FolderBusy as error:
            exit_with_error(error)
        if cells:
            validate_sweep(cells)
        self._done = 0
        self._started = time.perf_counter()
        self._pid = os.getpid()
        if self._total:
            print(f"[sweep] {self._total} cells", flush=True)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if self._total is None or os.getpid() != self._pid:
            return  # a single run, or a job of a launcher's own process: nothing to count
        self._done += 1
        print(eta_line(self._done, self._total, time.perf_counter() - self._started,
                       _dt.datetime.now()), flush=True)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        _report(Path(config.hydra.runtime.output_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _report(Path(config.hydra.sweep.dir))
