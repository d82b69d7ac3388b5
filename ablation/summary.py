"""Public name of the summary table (:mod:`ablation.report.summary`)."""

from ablation.report.summary import *  # noqa: F401,F403
from ablation.report.summary import format_summary, summary_table  # noqa: F401
