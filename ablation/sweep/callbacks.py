"""Hydra callbacks: print (and save) the summary table when a run or sweep ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


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
        text = format_summary(frame)
        write_text(folder / "summary.csv", summary_table(frame).to_csv(index=False))
    else:
        from ablation.report.summary import format_memory_summary
        text = format_memory_summary(frame)
    write_text(folder / f"summary_{kind}.txt", text + "\n")
    print(f"\n=== summary ({folder}) ===\n{text}\n", flush=True)


class SummaryCallback(Callback):
    """Prints the summary tables (timing and/or memory) of the run or sweep that ended."""

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        _report(Path(config.hydra.runtime.output_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _report(Path(config.hydra.sweep.dir))
