"""Analysis frames and figures on a fixture: panels, bar heights, missing cells."""

from __future__ import annotations

import numpy as np
import pytest

from ablation.report import analysis, figures
from ablation.report import records as results
from ablation.report.analysis import MissingCells
from tests.records import epoch_seconds, timing_record, write_fixture


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    root = write_fixture(tmp_path_factory.mktemp("results"))
    return analysis.load(root)


def _heights(ax):
    return sorted(round(p.get_height(), 6) for p in ax.patches if p.get_height() == p.get_height()
                  and p.get_height() > 0)


def test_timing_frame_is_one_row_per_cell(frames):
    timing, memory = frames
    assert len(timing) == 2 * 5 * 2 * 2
    assert set(timing["framework"]) == {"jax", "opacus", "pytorch"}
    assert set(timing["device"]) == {"cpu (2 cores)"}
    assert len(memory) == 4


def test_latest_record_of_a_cell_wins(tmp_path):
    old = timing_record("both", "ffnn", 64, True)
    new = dict(old, median_epoch_s=123.0, started_at="2026-12-01T00:00:00+00:00")
    results.write_json(tmp_path / "a" / "result.json", old)
    results.write_json(tmp_path / "b" / "result.json", new)
    timing, _ = analysis.load(tmp_path)
    assert list(timing["median_epoch_s"]) == [123.0]


def test_failed_cells_are_not_numbers(tmp_path):
    results.write_json(tmp_path / "a" / "result.json",
                       timing_record("both", "ffnn", 64, True, status="oom"))
    timing, _ = analysis.load(tmp_path)
    assert timing.empty
    with pytest.raises(MissingCells, match="both/ffnn/64"):
        analysis.require(timing, engine_label=["both"], model=["ffnn"], batch_size=[64])


def test_runtimes_figure_panels_and_bar_heights(frames):
    timing, _ = frames
    fig = figures.runtimes(timing, "cnn")
    private, public = fig.axes[:2]
    assert "private" in private.get_title() and "non-private" in public.get_title()
    expected = sorted(round(epoch_seconds(e, "cnn", b, True), 6)
                      for e in ("both", "jit", "vmap", "none", "opacus") for b in (16, 64))
    assert _heights(private) == expected
    labels = [t.get_text() for t in public.get_xticklabels()]
    assert labels == ["both", "jit", "vmap", "none", "pytorch"]  # Opacus non-private is PyTorch
    assert "s, log scale" in private.get_ylabel()


def test_runtimes_asked_for_a_missing_batch_size_raises(frames):
    timing, _ = frames
    with pytest.raises(MissingCells, match="256"):
        figures.runtimes(timing, "cnn", batch_sizes=[16, 256])


def test_ablation_figure_heights_and_speedups(frames):
    timing, _ = frames
    table = analysis.ablation_speedups(timing, batch_size=64)
    both = table[table.engine_label == "both"]
    assert (both["both_speedup"] == 1.0).all()
    none = table[(table.engine_label == "none") & (table.model == "ffnn")]
    assert none["both_speedup"].iloc[0] == pytest.approx(400.0)
    fig = figures.ablation(timing, batch_size=64)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    expected = sorted(round(epoch_seconds(e, m, 64, True), 6)
                      for e in ("both", "jit", "vmap", "none") for m in ("ffnn", "cnn"))
    assert _heights(ax) == expected
    texts = [t.get_text() for t in ax.texts]  # the bar labels
    assert "×400" in texts and "×1" in texts


def test_ablation_with_a_missing_engine_raises(frames):
    timing, _ = frames
    without_none = timing[~((timing.engine_label == "none") & (timing.model == "cnn"))]
    with pytest.raises(MissingCells, match="none/cnn/64"):
        figures.ablation(without_none, batch_size=64)


def test_compile_times_figure(frames):
    timing, _ = frames
    fig = figures.compile_times(timing)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["ffnn", "cnn"]
    ys = sorted({round(y, 6) for line in visible[0].lines for y in line.get_ydata()})
    assert ys == [0.66, 1.14]  # 0.5 + batch/100 for batches 16 and 64
    assert visible[0].get_ylabel() == "compile time (s)"


def test_max_batch_figure(frames):
    _, memory = frames
    fig = figures.max_batch(memory)
    assert _heights(fig.axes[0]) == [1024, 1024, 4096, 4096]
    with pytest.raises(MissingCells, match="lstm"):
        figures.max_batch(memory, models=["cnn", "lstm"])


def test_overhead_figure(frames):
    timing, _ = frames
    table = analysis.privacy_overhead(timing)
    row = table[(table.engine_label == "vmap") & (table.model == "ffnn") & (table.batch_size == 16)]
    assert row["overhead"].iloc[0] == pytest.approx(26.0)  # 20 × 1.3
    fig = figures.overhead(timing)
    assert np.allclose(_heights(fig.axes[0]), [1.3] * 4)


def test_draw_all_writes_png_and_pdf_per_device(tmp_path):
    root = write_fixture(tmp_path / "results")
    gpu = timing_record("both", "ffnn", 64, True, device_kind="NVIDIA H100 80GB HBM3")
    results.write_json(root / "gpu" / "result.json", gpu)
    written = figures.draw_all([root], tmp_path / "figs")
    names = {p.relative_to(tmp_path / "figs").as_posix() for p in written}
    for name in ("runtimes_ffnn", "runtimes_cnn", "ablation", "compile_times",
                 "privacy_overhead", "max_batch"):
        assert f"cpu-2-cores/{name}.png" in names and f"cpu-2-cores/{name}.pdf" in names
    assert "nvidia-h100-80gb-hbm3/runtimes_ffnn.png" in names
    assert all(p.stat().st_size > 1000 for p in written)


def test_committed_reference_results_draw():
    """The records in outputs/reference (what `make figures` draws on a fresh clone) load, hold
    the CPU grid and the H100 ablation, and give an ablation figure for each device."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "outputs" / "reference"
    timing, memory = analysis.load(root)
    assert {"cpu (2 cores)", "NVIDIA H100 80GB HBM3"} <= set(timing["device"])
    cpu = timing[timing["device"] == "cpu (2 cores)"]
    assert set(cpu["engine_label"]) >= {"both", "jit", "vmap", "none"}
    assert set(cpu["model"]) == set(analysis.MODEL_ORDER)
    for device in ("cpu (2 cores)", "NVIDIA H100 80GB HBM3"):
        part = timing[timing["device"] == device]
        batch, models = figures.best_ablation_batch(part)
        fig = figures.ablation(part, batch_size=batch, models=models)
        assert len(_heights(fig.axes[0])) == 4 * len(models)
        figures.plt.close(fig)
    assert (memory["max_batch_size"] > 0).all()
