"""What a record says about the code that ran: a commit, and "-dirty" only for changes that can
change a number (records, figures, notebooks and prose cannot)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ablation.report.records import _code_version_of


def _repo(root: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)
    (root / "ablation").mkdir()
    (root / "ablation" / "step.py").write_text("LR = 0.15\n")
    (root / "README.md").write_text("# toolkit\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")


def test_records_and_prose_leave_the_tree_clean_code_does_not(tmp_path):
    _repo(tmp_path)
    clean = _code_version_of(tmp_path)
    assert clean["git_diff_sha"] is None and not clean["git_sha"].endswith("-dirty")
    # A reference run writing its records, a README edit, a regenerated figure: still clean.
    (tmp_path / "outputs" / "reference" / "cpu").mkdir(parents=True)
    (tmp_path / "outputs" / "reference" / "cpu" / "result.json").write_text("{}")
    (tmp_path / "README.md").write_text("# toolkit, with results\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "figure.png").write_bytes(b"png")
    assert _code_version_of(tmp_path) == clean
    # A changed source file is dirty, and another change is another hash.
    (tmp_path / "ablation" / "step.py").write_text("LR = 0.1\n")
    first = _code_version_of(tmp_path)
    assert first["git_sha"] == clean["git_sha"] + "-dirty" and first["git_diff_sha"]
    (tmp_path / "ablation" / "extra.py").write_text("X = 1\n")  # an untracked source file too
    second = _code_version_of(tmp_path)
    assert second["git_sha"].endswith("-dirty") and second["git_diff_sha"] != first["git_diff_sha"]
