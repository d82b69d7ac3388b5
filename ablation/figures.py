"""``python -m ablation.figures [ROOT ...] --out DIR``: every figure the records support.

The figures live in :mod:`ablation.report.figures`; this is the entry point and public name.
"""

from ablation.report.figures import *  # noqa: F401,F403
from ablation.report.figures import draw_all, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
