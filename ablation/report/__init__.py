"""Reading records back: the records themselves, analysis frames, figures, summary tables.

Imports no runtime code (engines, data, measurement, sweeps); runtime code writes records
through :mod:`ablation.report.records`.
"""
