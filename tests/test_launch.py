"""The child process of a cell never outlives a parent that is stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose; /proc says so on Linux.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_sigterm_to_the_parent_kills_the_child(tmp_path):
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = textwrap.dedent(f"""
        import sys
        from ablation.sweep.launch import run_process
        run_process([sys.executable, "-c", {child!r}], timeout_s=60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent],
                            cwd=Path(__file__).resolve().parent.parent)
    deadline = time.time() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline, "the child never started"
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    assert _alive(child_pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    deadline = time.time() + 5
    while _alive(child_pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid), "the child outlived its stopped parent"
