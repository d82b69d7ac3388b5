"""One audit as a job: the record of ``python -m ablation.audit`` (``kind: audit``).

Unlike a timing cell, an audit runs in the command's own process: it times nothing, so no
cell's numbers can leak into another's, and its trials are one compiled function anyway.
A cell it cannot audit, or one that fails, still gets its record (status ``error``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ablation.measure.settings import AuditSettings, CellConfig
from ablation.report.records import environment, machine_identity, one_line
from ablation.sweep.folders import holding
from ablation.sweep.jobs import _version, finish, open_job


def _machine(engine: str) -> dict[str, Any]:
    """This process's machine and versions, as a record carries them (the audit runs here)."""
    return machine_identity({**environment(), "dp_accounting": _version("dp-accounting")},
                            engine)


def run_audit_job(cell: CellConfig, settings: AuditSettings, config: Mapping[str, Any],
                  job_dir: str | Path, experiment: str | None = None) -> dict[str, Any]:
    """Audit ``cell`` under ``settings``, print the report, write ``result.json``; returns
    the record (``refused: true`` for a cell that cannot be audited, named in ``error``)."""
    from ablation.core.taps import GhostUnsupported
    from ablation.measure.audit import NotAuditable, audit_cell
    with holding(Path(job_dir), "job"):
        job_dir, record, _ = open_job(cell, config, "audit", job_dir, False, job_dir,
                                      experiment)
        record.update(audit_settings=settings.__dict__, refused=False)
        try:
            report = audit_cell(cell, settings, progress=lambda text: print(text, flush=True))
        except (NotAuditable, GhostUnsupported) as error:
            record.update(status="error", error=one_line(error), refused=True,
                          env=_machine(cell.engine))
            print(f"error: {one_line(error)}", flush=True)
        except Exception as error:  # noqa: BLE001 - a failed audit is a record, not a crash
            record.update(status="error", error=one_line(error),
                          env=_machine(cell.engine))
            print(f"error: {one_line(error)}", flush=True)
            finish(record, job_dir)
            raise
        else:
            record.update(status="ok", env=_machine(cell.engine), **report.to_record())
            print("\n".join(report.lines()), flush=True)
        finish(record, job_dir)
        return record
