"""Public name of the analysis frames: ``ablation.analysis.load(root)`` and friends.

The implementation lives in :mod:`ablation.report.analysis`.
"""

from ablation.report.analysis import *  # noqa: F401,F403
from ablation.report.analysis import MissingCells, load  # noqa: F401
