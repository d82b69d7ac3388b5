"""Analysis frames and figures on a fixture: panels, bar heights, missing cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ablation.report import analysis, figures
from ablation.report import records as results
from ablation.report.analysis import DuplicateRecords, MissingCells
from tests.records import CPU_LABEL, epoch_seconds, memory_record, timing_record, write_fixture


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
    assert set(timing["framework"]) == {"jax", "pytorch"}
    assert set(timing.loc[~timing["private"], "system"]) == {"both", "jit", "vmap", "none",
                                                             "pytorch"}
    assert set(timing["device"]) == {CPU_LABEL}  # the CPU's model, not only its cores
    assert timing["family"].nunique() == 1 and len(memory) == 4


def test_the_same_cell_twice_keeps_the_newest_and_says_so(tmp_path):
    old = timing_record("both", "ffnn", 64, True)
    new = dict(old, median_epoch_s=123.0, finished_at="2026-12-01T00:00:00+00:00")
    results.write_json(tmp_path / "a" / "result.json", old)
    results.write_json(tmp_path / "b" / "result.json", new)
    with pytest.warns(DuplicateRecords, match=r"keeping .*b/result.json, ignoring .*a/result.json"):
        timing, _ = analysis.load(tmp_path)
    assert list(timing["median_epoch_s"]) == [123.0]


def test_runs_with_other_settings_are_other_families_never_merged(tmp_path):
    """Issue 12.3: a quick run beside a reference sweep (another timing mode, seed, sampling,
    memory cap or machine) is its own family: figures refuse to mix them, draw_all keeps them
    in separate folders, and nothing is averaged."""
    root = write_fixture(tmp_path / "results", models=("ffnn",), batches=(64,))
    for i, config in enumerate([{"seed": 7}, {"timing": {"mode": "epochs"}},
                                {"dp": {"sampling": "poisson"}}, {"data": {"limit": 512}}]):
        quick = timing_record("both", "ffnn", 64, True, config=config)
        results.write_json(root / f"quick{i}" / "result.json", dict(quick, median_epoch_s=99.0))
    other_cpu = timing_record("both", "ffnn", 64, True)
    other_cpu["env"] = dict(other_cpu["env"], cpu_model="Another CPU")
    results.write_json(root / "other" / "result.json", other_cpu)
    timing, _ = analysis.load(root)
    assert timing["family"].nunique() == 6
    with pytest.raises(ValueError, match="different runs"):
        figures.ablation(timing, batch_size=64)
    sweep = next(part for _, _, part in analysis.groups(timing) if len(part) > 1)
    assert 99.0 not in set(sweep["median_epoch_s"])
    written = figures.draw_all([root], tmp_path / "figs")
    folders = {p.parent.relative_to(tmp_path / "figs").as_posix() for p in written
               if p.name != "index.md"}
    # six timing families and the fixture's memory records
    assert len(folders) == 6 + 1 and any(f.startswith("cpu-another-cpu") for f in folders)


def test_memory_caps_and_predictions_are_drawn_apart(tmp_path):
    """Issue 12.2/12.3: each cap its own figure; a prediction is a different record from a
    measurement and is drawn hatched, labelled as predicted."""
    results.write_json(tmp_path / "a" / "result.json", memory_record("both", "cnn", 1657))
    results.write_json(tmp_path / "b" / "result.json",
                       memory_record("both", "cnn", 5495, limit_bytes=2 << 30))
    results.write_json(tmp_path / "c" / "result.json",
                       memory_record("both", "cnn", 1986, predict_only=True))
    _, memory = analysis.load(tmp_path)
    assert len(memory) == 3 and memory["family"].nunique() == 2
    half = [part for _, _, part in analysis.groups(memory) if part["limit_gib"].iloc[0] == 0.5][0]
    fig = figures.max_batch(half)
    ax = fig.axes[0]
    assert _heights(ax) == [1657, 1986]  # never the mean over caps (3,576)
    hatched = [p.get_height() for p in ax.patches if p.get_hatch()]
    assert hatched == [1986]
    assert "512 MiB" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="different runs"):
        figures.max_batch(memory)


def test_failed_cells_are_not_numbers(tmp_path):
    results.write_json(tmp_path / "a" / "result.json",
                       timing_record("both", "ffnn", 64, True, status="oom"))
    timing, _ = analysis.load(tmp_path)
    assert timing.empty
    with pytest.raises(MissingCells, match="both/ffnn/64"):
        analysis.require(timing, engine_label=["both"], model=["ffnn"], batch_size=[64])


def test_unmeasured_cells_are_marked_where_their_bars_would_stand(tmp_path):
    """Guide item 2: a refused, crashed or out-of-memory cell never vanishes from a figure;
    it is named at its bar's slot and listed in the marks' CSV, and a cell with an ok record
    beside a failed one is measured, not marked."""
    root = write_fixture(tmp_path / "results", models=("cnn",), batches=(16, 64))
    failures = {"ghost16": timing_record("ghost", "cnn", 16, True, status="error"),
                "ghost64": timing_record("ghost", "cnn", 64, True, status="error"),
                "opacus64": timing_record("opacus", "cnn", 64, True, status="oom"),
                "both16": timing_record("both", "cnn", 16, True, status="error")}
    for record in (failures["ghost16"], failures["ghost64"]):
        record["error"] = "GhostUnsupported: ghost: parameter w is used twice"
    failures["both16"]["error"] = "worker killed by SIGSEGV"
    for name, record in failures.items():
        record.update(median_epoch_s=None, started_at="2020-01-01T00:00:00+00:00",
                      finished_at="2020-01-01T00:00:00+00:00")
        results.write_json(root / name / "result.json", record)
    frame = results.load([root])
    unmeasured = analysis.unmeasured_cells(frame)
    assert sorted(zip(unmeasured["engine_label"], unmeasured["batch_size"],
                      unmeasured["outcome"])) == [("ghost", 16, "refused"),
                                                  ("ghost", 64, "refused")]
    # the fixture's opacus cnn 64 and both cnn 16 are ok: those failures are not news
    timing = analysis.timing_frame(frame)
    fig = figures.runtimes(timing, "cnn", unmeasured=unmeasured)
    private = fig.axes[0]
    labels = [t.get_text() for t in private.get_xticklabels()]
    assert "ghost" in labels
    words = [t for t in private.texts if t.get_text() == "refused"]
    assert len(words) == 2
    slot = labels.index("ghost")
    assert sorted(round(t.get_position()[0] - slot, 3) for t in words) == [-0.2, 0.2]
    table = fig.ablation_marks
    assert set(table.loc[table["outcome"] == "refused", "batch_size"]) == {16, 64}
    figures.plt.close(fig)
    assert analysis.outcome("oom", None) == "out of memory"
    assert analysis.outcome("error", "worker killed by SIGKILL") == "crashed"
    assert analysis.outcome("error", "ValueError: bad") == "failed"


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
    assert "est." in private.get_ylabel()  # epochs derived from steps say so


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
    assert "×400" in texts and "×1.0" in texts  # the figures the spreads support


def test_decomposition_factors_and_bar_heights(frames):
    """Issue 15.9: the factor each ingredient contributes, with and without the other."""
    timing, _ = frames
    table = analysis.decomposition(timing, batch_size=64).set_index("model")
    ffnn = table.loc["ffnn"]
    # Fixture engine factors: both 1, jit 3, vmap 20, none 400.
    assert ffnn["jit, with vmap (vmap → both)"] == pytest.approx(20.0)
    assert ffnn["jit, without vmap (none → jit)"] == pytest.approx(400 / 3)
    assert ffnn["vmap, with jit (jit → both)"] == pytest.approx(3.0)
    assert ffnn["vmap, without jit (none → vmap)"] == pytest.approx(20.0)
    assert ffnn["interaction"] == pytest.approx(20 / (400 / 3))
    fig = figures.decomposition(timing, batch_size=64)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert np.allclose(_heights(ax), sorted([20.0, 400 / 3, 3.0, 20.0] * 2))


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


def test_draw_all_writes_png_and_pdf_per_device_and_family(tmp_path):
    root = write_fixture(tmp_path / "results")
    gpu = timing_record("both", "ffnn", 64, True, device_kind="NVIDIA H100 80GB HBM3")
    results.write_json(root / "gpu" / "result.json", gpu)
    written = figures.draw_all([root], tmp_path / "figs")
    names = {p.relative_to(tmp_path / "figs").as_posix() for p in written}
    cpu = {n.split("/", 2)[2] for n in names if n.startswith("cpu-test-cpu-2-cores/runs-")}
    for name in ("runtimes_ffnn", "runtimes_cnn", "ablation", "decomposition", "compile_times",
                 "privacy_overhead", "max_batch"):
        assert f"{name}.png" in cpu and f"{name}.pdf" in cpu
    assert any(n.startswith("nvidia-h100-80gb-hbm3/") and n.endswith("runtimes_ffnn.png")
               for n in names)
    assert all(p.stat().st_size > 1000 for p in written if p.suffix in (".png", ".pdf"))
    assert all(p.with_suffix(".csv").exists() for p in written if p.suffix == ".png")


def test_draw_all_draws_the_ghost_engines_cost_of_privacy_beside_boths(tmp_path):
    """Its non-private baseline is the stack's one plain step (both's), as in the summary."""
    root = write_fixture(tmp_path / "results", models=("ffnn",), batches=(16,))
    record = timing_record("ghost", "ffnn", 16, True)
    results.write_json(root / "ghost" / "result.json", dict(record, median_epoch_s=2.6))
    written = figures.draw_all([root], tmp_path / "figs")
    names = {p.name for p in written}
    assert {"privacy_overhead.png", "privacy_overhead_ghost.png"} <= names
    table = pd.read_csv(next(p for p in written if p.name == "privacy_overhead_ghost.csv"))
    baseline = epoch_seconds("both", "ffnn", 16, False)
    assert table["overhead"].tolist() == pytest.approx([2.6 / baseline])


def test_empty_or_missing_folder_says_so(tmp_path):
    """Issue 15.2: no records is an error that says where it looked, not empty frames."""
    with pytest.raises(analysis.NoRecords, match="no result records"):
        analysis.load(tmp_path)
    with pytest.raises(analysis.NoRecords, match="no such folder"):
        analysis.load(tmp_path / "absent")


def test_committed_reference_results_draw():
    """The records in outputs/reference (what `make figures` draws on a fresh clone) load, hold
    the CPU grid and the H100 ablation, and give an ablation figure for each of them."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "outputs" / "reference"
    timing, memory = analysis.load(root)
    devices = set(timing["device"])
    assert "NVIDIA H100 80GB HBM3" in devices and any(d.startswith("cpu") for d in devices)
    drawn = set()
    for device, _, part in analysis.groups(timing):
        choice = figures.best_ablation_batch(part)
        if choice is None:
            continue
        batch, models = choice
        fig = figures.ablation(part, batch_size=batch, models=models)
        assert len(_heights(fig.axes[0])) == 4 * len(models)
        figures.plt.close(fig)
        drawn.add("cpu" if device.startswith("cpu") else device)
    assert {"cpu", "NVIDIA H100 80GB HBM3"} <= drawn
    cpu = timing[timing["device"].str.startswith("cpu")]
    assert set(cpu["engine_label"]) >= {"both", "jit", "vmap", "none"}
    assert {"logreg", "ffnn", "cnn", "embed", "lstm", "cifar10"} <= set(cpu["model"])
    assert (memory["max_batch_size"] > 0).all()
