"""Issue 25: the private ghost step, part by part (``timing.cost_split=true``).

The split's variants must be what they say (the unclipped ghost sum is the plain gradient sum),
its parts must add up to its full step, and that full step must be the cell's own step within
the spread of the two measurements.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablation import clipped_grad_sum
from ablation.core.clipping import ghost_unclipped_sum
from ablation.report import records as results
from models import get_model
from tests.cli import QUICK, run_cli
from tests.conftest import flatten, small_batch


@pytest.mark.parametrize("mode", ["bookkeeping", "two_pass"])
@pytest.mark.parametrize("name", ["cnn", "embed",
                                  pytest.param("vit", marks=pytest.mark.slow)])  # ~20 s each
def test_the_unclipped_ghost_sum_is_the_plain_gradient_sum(name, mode):
    """The variant with the norms taken away weights every kept example by exactly 1."""
    model = get_model(name)
    params = model.init(jax.random.key(0))
    x, y = small_batch(model, 4, seed=3)
    mask = jnp.array([1.0, 0.0, 1.0, 1.0])
    for m in (None, mask):
        expected = flatten(clipped_grad_sum("both", model.loss, params, x, y, math.inf, mask=m))
        got = flatten(ghost_unclipped_sum(model.loss, params, x, y, m, mode=mode))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_cost_split_is_a_timing_option():
    from ablation.measure.cost_split import supports_cost_split
    from ablation.sweep.config import cell_from_dict
    cell = cell_from_dict({"engine": {"name": "ghost"}, "timing": {"cost_split": True}})
    assert cell.timing.cost_split and supports_cost_split(cell)
    assert not cell_from_dict({}).timing.cost_split
    assert not supports_cost_split(cell_from_dict({"engine": {"name": "both"}}))
    assert not supports_cost_split(cell_from_dict({"engine": {"name": "ghost"},
                                                   "private": False}))


def test_the_split_adds_up_to_the_cells_step(tmp_path):
    proc = run_cli("ablation.run", "-m", "engine=ghost,both", "model=cnn", "batch_size=32",
                   "data.limit=256", "timing.cost_split=true", "timing.budget_s=1.5",
                   *QUICK, output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    frame = results.load(tmp_path).set_index("engine")
    assert not isinstance(frame.loc["both"].get("cost_split_s"), dict)  # ghost cells only
    split = frame.loc["ghost", "cost_split_s"]
    parts = ("non_private", "clipped_sum", "norms", "noise")
    assert all(v > 0 for v in split["variants"].values())
    assert sum(split[p] for p in parts) == pytest.approx(split["step"], rel=1e-9)
    assert split["variants"]["full"] == split["step"]
    assert split["non_private"] == split["variants"]["non_private"]
    # The same compiled step, timed twice: equal within what both spreads allow.
    cell_step = frame.loc["ghost", "throughput_step_s"]
    bursts = frame.loc["ghost", "throughput_bursts_s"]
    cell_spread = (max(bursts) - min(bursts)) / cell_step
    allowed = max(0.5, 3 * (split["spread"] + cell_spread))
    assert abs(split["step"] / cell_step - 1) <= allowed, (split, cell_step)
    summary = run_cli("ablation.summary", str(tmp_path), "--cost", output_dir=tmp_path)
    assert summary.returncode == 0, summary.stderr
    assert "part by part" in summary.stdout and "norms" in summary.stdout


def test_the_cost_table_takes_the_noise_from_the_split_only_where_it_resolves_it():
    import pandas as pd

    from ablation.report.benchmarks import _noise_seconds
    resolved = {"noise": 0.3e-3, "spread": 0.05, "step": 2e-3}
    unresolved = {"noise": 0.3e-3, "spread": 0.2, "step": 2e-3}  # 0.3 < 2 x 0.2 x 2 ms
    assert _noise_seconds(pd.Series({"cost_split_s": resolved, "noise_step_s": 1e-3})) == 0.3e-3
    assert _noise_seconds(pd.Series({"cost_split_s": unresolved, "noise_step_s": 1e-3})) == 1e-3
    assert _noise_seconds(pd.Series({"noise_step_s": None})) is None


def test_a_missing_clip_norm_never_means_unclipped():
    """None marks the timing variant inside the module; the private sum refuses it."""
    from ablation.core.clipping import ghost_clipped_sum
    model = get_model("ffnn")
    params = model.init(jax.random.key(0))
    x, y = small_batch(model, 2)
    with pytest.raises(ValueError, match="needs a clip norm"):
        ghost_clipped_sum(model.loss, params, x, y, None)
