"""Helpers to run the command-line entry points in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Small, quick settings for real end-to-end runs in tests.
QUICK = ["timing.max_steps=3", "timing.warmup_steps=1", "timing.min_steps=2",
         "timing.progress=false", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def run_cli(module: str, *args: str, output_dir: Path, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> <args> paths.output_dir=<output_dir>``, captured."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0", **(env or {}))
    hydra_entry = module in ("ablation.run", "ablation.memory", "ablation.audit")
    args = list(args)
    if hydra_entry:  # among the overrides: argparse takes them as one run, before ``--cfg ...``
        flags = [i for i, arg in enumerate(args) if arg.startswith("--")]
        args.insert(flags[0] if flags else len(args), f"paths.output_dir={output_dir}")
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
