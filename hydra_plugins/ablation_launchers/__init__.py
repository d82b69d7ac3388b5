"""Hydra launcher plugins of the toolkit (Hydra finds plugins only in ``hydra_plugins``).

``SerialSubmititLauncher``: submitit's local executor, but at most ``array_parallelism`` cells
(default 1) running at once: concurrent timing on one machine corrupts the numbers. The
SLURM launcher is submitit's own (``hydra/launcher=slurm`` configures it).
"""

from __future__ import annotations

from typing import Any, Sequence

from hydra.core.utils import JobReturn

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher
except ImportError:  # pragma: no cover - the cluster extra is not installed
    LocalLauncher = None  # type: ignore[assignment,misc]

if LocalLauncher is not None:

    class SerialSubmititLauncher(LocalLauncher):
        """submitit's local launcher, running the sweep's cells ``array_parallelism`` at a time.

        Each chunk is submitted, waited for and only then the next: every cell still runs in
        its own submitit process (and its own worker below that), with submitit's timeout.
        """

        def __init__(self, array_parallelism: int = 1, **params: Any) -> None:
            super().__init__(**params)
            self.array_parallelism = max(1, int(array_parallelism))

        def launch(self, job_overrides: Sequence[Sequence[str]],
                   initial_job_idx: int) -> Sequence[JobReturn]:
            results: list[JobReturn] = []
            step = self.array_parallelism
            for start in range(0, len(job_overrides), step):
                chunk = job_overrides[start:start + step]
                results += super().launch(chunk, initial_job_idx + start)
            return results
