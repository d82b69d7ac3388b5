#!/usr/bin/env python3
"""Time the same cells with an earlier commit and with the working tree, interleaved, in one run.

    scripts/before_after.py --base 7cfef00 --out outputs/before-after \\
        engine=ghost model=logreg,ffnn,cnn,embed,lstm,cifar10 batch_size=64,256 \\
        timing.max_steps=20 timing.budget_s=3

The grid is the product of the comma lists. For each cell, the base commit (checked out once
into a temporary worktree) and the working tree each time it as ``python -m ablation.run`` in
its own process, one after the other, so slow drift of a shared machine hits both alike. The
records land in ``OUT/base`` and ``OUT/head``; at the end ``python -m ablation.summary OUT/base
OUT/head`` prints each cell's time in head ÷ base.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cells(overrides: list[str]) -> list[list[str]]:
    """The product of the overrides' comma lists, one override list per cell."""
    axes = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"error: overrides are key=value, got {item!r}")
        axes.append([f"{key}={v}" for v in value.split(",")])
    return [list(cell) for cell in itertools.product(*axes)]


def _run(tree: Path, out: Path, cell: list[str]) -> int:
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, "-m", "ablation.run", *cell, f"paths.output_dir={out}",
               "timing.progress=false"]
    return subprocess.run(command, cwd=tree, env=env).returncode


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/before_after.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--out", required=True, type=Path, help="folder for both sets of records")
    parser.add_argument("overrides", nargs="+", help="the grid, as ablation.run overrides")
    args = parser.parse_args(argv)
    cells = _cells(args.overrides)
    out = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="before-after-") as scratch:
        base = Path(scratch) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            for i, cell in enumerate(cells, 1):
                print(f"[before-after] {i}/{len(cells)}: {' '.join(cell)}", flush=True)
                _run(base, out / "base", cell)
                _run(ROOT, out / "head", cell)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                           capture_output=True)
    return subprocess.run([sys.executable, "-m", "ablation.summary", str(out / "base"),
                           str(out / "head")], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
