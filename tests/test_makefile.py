"""The Makefile's housekeeping: `make clean` removes what runs make and never the references."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_make_clean_removes_runs_but_keeps_the_committed_references(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    made = ["outputs/run/2026-11-28_10-00-00/result.json",
            "outputs/run-multirun/2026-11-28_10-00-00/0/result.json",
            "outputs/memory/x/result.json", "outputs/memory-multirun/x/0/result.json",
            "outputs/figures/cpu/ablation.png", "outputs/notebooks/01_runtimes.ipynb",
            "fake-venv/bin/python"]
    kept = ["outputs/reference/cpu/run-multirun/0/result.json", "README.md"]
    for name in made + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    proc = subprocess.run(["make", "clean", "VENV=fake-venv"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert all((tmp_path / name).exists() for name in kept)
    assert not any((tmp_path / name).exists() for name in made)
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["reference"]
