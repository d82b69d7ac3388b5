"""``python -m ablation.summary DIR [DIR ...] [--format text|markdown|csv]``: summary tables.

The table lives in :mod:`ablation.report.summary`; this is the entry point and public name.
"""

from ablation.report.summary import *  # noqa: F401,F403
from ablation.report.summary import format_summary, main, summary_table  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
