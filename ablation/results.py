"""Public name of the result records: ``ablation.results.load(root)`` and friends.

The implementation lives in :mod:`ablation.report.records`; this module keeps the documented
import path working.
"""

from ablation.report.records import *  # noqa: F401,F403
from ablation.report.records import (  # noqa: F401
                                     RESULT_FILE,
                                     SCHEMA,
                                     SKIPPED_FILE,
                                     STATUSES,
                                     config_hash,
                                     environment,
                                     iter_records,
                                     load,
                                     read_json,
                                     write_json,
)
