"""The noise floor (issue 34's yardstick): each generator's rate is timed on the model's own
parameter count, and the floor is that count at the fastest one."""

from __future__ import annotations

import pandas as pd
import pytest

from ablation.measure.noise_floor import gaussian_rates, noise_floor_s


def test_the_floor_is_the_parameter_count_at_the_fastest_generator():
    rates = gaussian_rates(50_000)
    assert {"jax", "numpy"} <= set(rates) and all(0 < r < 1e4 for r in rates.values()), rates
    assert noise_floor_s(50_000, rates) == pytest.approx(50_000 * min(rates.values()) * 1e-9)
    assert noise_floor_s(1_000, {"a": 2.0, "b": 5.0}) == pytest.approx(2e-6)


def test_the_cost_table_divides_by_non_private_plus_the_floor():
    from ablation.report.benchmarks import format_cost, privacy_cost_table
    common = {"kind": "timing", "status": "ok", "model": "embed", "batch_size": 64,
              "family": "f", "compile_s": 1.0}
    frame = pd.DataFrame([
        {**common, "engine": "both", "private": False, "throughput_step_s": 0.4e-3},
        {**common, "engine": "ghost", "private": True, "throughput_step_s": 1.0e-3,
         "noise_floor_s": 0.4e-3, "noise_step_s": 0.5e-3}])
    table = privacy_cost_table(frame)
    assert table["ghost / np"].iloc[0] == pytest.approx(2.5)
    assert table["ghost / (np+floor)"].iloc[0] == pytest.approx(1.25)
    assert "×1.25" in format_cost(frame)
    assert any("noise floor" in line and "NOT met" in line
               for line in format_cost(frame, targets=True).splitlines())
