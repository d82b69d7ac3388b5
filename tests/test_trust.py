"""What a reader sees is right (issue 22): figures never average unlike records, every family
is drawn, summaries pair only like cells and count each record once, stale or damaged files are
never trusted, and bad values are refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ablation.report import analysis, figures, records
from ablation.report.records import SKIPPED_FILE, UnreadableRecords, write_json
from tests.cli import QUICK, REPO, run_cli
from tests.records import memory_record, timing_record, write_fixture

REFERENCE = REPO / "outputs" / "reference"


# -- figures ----------------------------------------------------------------------------------


def test_make_figures_draws_every_family_of_the_committed_reference(tmp_path):
    """Before: the palette lacked 'both[2 devices]' and every family after cpu-4-devices was
    not drawn. Each figure now has the CSV of its marks beside it, and index.md names the runs."""
    skipped: list[str] = []
    written = figures.draw_all([REFERENCE], tmp_path, skipped)
    assert not skipped, skipped
    pngs = [p for p in written if p.suffix == ".png"]
    for png in pngs:
        table = pd.read_csv(png.with_suffix(".csv"))
        assert len(table) and "path" in table, png
        paths = [q for p in table["path"].dropna() for q in str(p).split("; ")]
        assert paths and all(Path(q).exists() for q in paths), png
    devices = {p.relative_to(tmp_path).parts[0] for p in pngs}
    assert len(devices) >= 2  # the CPU and the H100 families
    assert "both[2 devices]" in "".join(p.read_text() for p in written if p.suffix == ".csv")
    index = (tmp_path / "index.md").read_text()
    assert "outputs/reference/cpu" in index and "records:" in index


def test_every_committed_reference_record_names_its_code_and_machine():
    """Issue 32: a committed TF Privacy error record had no git_sha (its worker's environment
    had failed); every record under outputs/reference now says which code and machine."""
    found = list(REFERENCE.rglob("result.json"))
    assert len(found) > 100
    nameless = [str(path.relative_to(REPO)) for path in found
                if not (json.loads(path.read_text()).get("env") or {}).get("git_sha")
                or not (json.loads(path.read_text()).get("env") or {}).get("cpu_count")]
    assert not nameless, nameless


def test_max_batch_draws_private_and_non_private_apart(tmp_path):
    """Before: ffnn's both bar was mean(6,870 private, 312,588 non-private) = 159,729."""
    write_json(tmp_path / "a" / "result.json", memory_record("both", "ffnn", 6870))
    public = memory_record("both", "ffnn", 312588)
    public["private"] = False
    public["config"] = dict(public["config"], private=False)
    write_json(tmp_path / "b" / "result.json", public)
    _, memory = analysis.load(tmp_path)
    fig = figures.max_batch(memory)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["private (DP-SGD)", "non-private (SGD)"]
    heights = [sorted(p.get_height() for p in ax.patches if p.get_height() > 0)
               for ax in fig.axes[:2]]
    assert heights == [[6870], [312588]]
    table = fig.ablation_marks.sort_values("max_batch_size")
    assert list(table["max_batch_size"]) == [6870, 312588]
    assert list(table["private"]) == [True, False]
    figures.plt.close(fig)


def test_a_figure_refuses_to_average_records_that_differ_in_a_setting():
    frame = pd.DataFrame({"model": ["ffnn", "ffnn"], "engine_label": ["both", "both"],
                          "median_epoch_s": [1.0, 2.0], "data": ["synthetic", "real"],
                          "path": ["a", "b"]})
    with pytest.raises(ValueError, match="differ in data"):
        figures.marks(frame, ["model", "engine_label"], ["median_epoch_s"], "test")


def test_labels_with_device_counts_or_modes_get_their_engines_colour():
    colours = figures.palette(["both[2 devices]", "ghost[4 devices]", "ghost (predicted)",
                               "somebody-else"])
    assert colours["both[2 devices]"] == figures.PALETTE["both"]
    assert colours["ghost[4 devices]"] == figures.PALETTE["ghost"]
    assert colours["ghost (predicted)"] == figures.PALETTE["ghost"]
    assert colours["somebody-else"] == figures.GREY


def test_a_figure_folder_name_never_leaves_the_output_folder(tmp_path):
    """Before: a record's experiment '../../..' wrote figures outside --out."""
    root = write_fixture(tmp_path / "results", models=("ffnn",), batches=(64,))
    for path in root.rglob("result.json"):
        record = json.loads(path.read_text())
        write_json(path, dict(record, experiment="../../../escape"))
    written = figures.draw_all([root], tmp_path / "figs")
    assert written and all((tmp_path / "figs") in p.parents for p in written)


def test_ratios_are_printed_alike_in_tables_and_figures(tmp_path):
    """Before: the run table said 1,000 where the figure said ×1,430 for the same cell."""
    from ablation.report.summary import format_summary, sweep_records
    root = write_fixture(tmp_path / "results", models=("ffnn",), batches=(64,))
    timing, _ = analysis.load(root)
    fig = figures.ablation(timing, batch_size=64)
    drawn = {t.get_text() for t in fig.axes[0].texts}
    figures.plt.close(fig)
    table = format_summary(sweep_records(root))
    row = next(line for line in table.splitlines() if line.split()[:3] == ["none", "ffnn", "64"]
               and " yes " in line)
    assert f"×{row.split()[-1]}" in drawn


# -- records: pointers, duplicates, damaged files ---------------------------------------------


def _pointer(job: Path, target: Path, config_hash: str) -> None:
    import os
    write_json(job / SKIPPED_FILE, {"schema": records.SCHEMA, "config_hash": config_hash,
                                    "record": os.path.relpath(target, job)})


def test_resume_pointers_are_followed_once_and_stale_ones_ignored(tmp_path):
    """Before: summary printed 265 rows from 257 records (pointers counted twice), trusted a
    pointer whose config differed, and figures did not follow pointers at all."""
    from ablation.report.summary import sweep_records
    earlier = timing_record("both", "ffnn", 64, True)
    earlier["config_hash"] = "aaaa"
    write_json(tmp_path / "old" / "0" / "result.json", earlier)
    target = tmp_path / "old" / "0" / "result.json"
    _pointer(tmp_path / "sweep" / "0", target, "aaaa")  # valid: reused
    _pointer(tmp_path / "sweep" / "1", target, "bbbb")  # another config: stale
    _pointer(tmp_path / "sweep" / "2", target, "aaaa")  # valid, same record again
    stale = tmp_path / "sweep" / "3"
    _pointer(stale, target, "aaaa")  # a later run of this job wrote its own record
    write_json(stale / "result.json", timing_record("vmap", "ffnn", 64, True))
    frame = sweep_records(tmp_path / "sweep")
    assert sorted(zip(frame["engine"], frame["reused"])) == [("both", True), ("vmap", False)]
    everything = sweep_records(tmp_path)
    assert len(everything) == 2  # the reused record once, though three pointers name it
    timing, _ = analysis.load(tmp_path / "sweep")  # what the figures read
    assert set(timing["engine_label"]) == {"both", "vmap"}


def test_a_job_that_runs_removes_its_folders_stale_pointer(tmp_path):
    from ablation.measure.settings import CellConfig
    from ablation.sweep.jobs import open_job
    job = tmp_path / "job"
    _pointer(job, tmp_path / "elsewhere.json", "0")
    open_job(CellConfig(), {"model": {"name": "ffnn"}}, "timing", job, resume=False,
             resume_root=tmp_path)
    assert not (job / SKIPPED_FILE).exists()


def test_damaged_result_files_are_named_not_silently_dropped(tmp_path):
    from ablation.report.summary import main
    write_fixture(tmp_path, models=("ffnn",), batches=(64,))
    (tmp_path / "t0" / "result.json").write_text('{"schema": "dpsgd-ablation/res')
    (tmp_path / "t1" / "result.json").write_text("[1, 2]")
    with pytest.warns(UnreadableRecords, match=r"2 result file\(s\) could not be read"):
        records.load(tmp_path)
    with pytest.warns(UnreadableRecords, match="t0/result.json"):
        assert main([str(tmp_path)]) == 0


def test_summary_pairs_two_sweeps_only_on_identical_settings(tmp_path, capsys):
    """Before: a full-data record was divided by a data.limit=640 optim.lr=0.3 one, and 266 of
    268 ratio rows were NaN."""
    from ablation.report.summary import main
    a = timing_record("both", "ffnn", 64, True)
    a["config_hash"] = "same"
    b = dict(a, median_epoch_s=2 * a["median_epoch_s"])
    other = dict(timing_record("both", "ffnn", 64, True, config={"data": {"limit": 640}}),
                 config_hash="other")
    write_json(tmp_path / "A" / "0" / "result.json", a)
    write_json(tmp_path / "B" / "0" / "result.json", b)
    write_json(tmp_path / "B" / "1" / "result.json", other)
    assert main([str(tmp_path / "A"), str(tmp_path / "B")]) == 0
    out = capsys.readouterr().out.split("=== b / a")[1]
    assert "×2.0" in out and "NaN" not in out
    assert "1 of b have no counterpart with the same settings" in out
    assert " yes " in out and "True" not in out


def test_before_and_after_pair_across_a_setting_only_the_newer_code_records(tmp_path, capsys):
    """scripts/before_after.py compares an older commit with the tree: a key the newer code
    added with its default (engine.fallback) must not stop the cells pairing, and is named;
    a setting both record and that differs still keeps them apart."""
    from ablation.report.summary import main
    old = timing_record("both", "ffnn", 64, True, config={"seed": 1})
    new = timing_record("both", "ffnn", 64, True, config={"seed": 1})
    new["config"]["engine"]["fallback"] = "error"
    new["median_epoch_s"] = 0.5 * old["median_epoch_s"]
    other = timing_record("both", "ffnn", 64, True, config={"seed": 2})
    other["config"]["engine"]["fallback"] = "error"
    for record in (old, new, other):
        record.pop("config_hash", None)
    write_json(tmp_path / "A" / "0" / "result.json", old)
    write_json(tmp_path / "B" / "0" / "result.json", new)
    write_json(tmp_path / "B" / "1" / "result.json", other)
    assert main([str(tmp_path / "A"), str(tmp_path / "B")]) == 0
    out = capsys.readouterr().out.split("=== b / a")[1]
    assert "not compared: engine.fallback" in out
    assert "×0.5" in out and "1 of b have no counterpart" in out


def test_a_non_private_record_is_not_set_apart_by_its_workers_accountant_version():
    """TF Privacy's worker runs in its own environment (dp-accounting 0.4.3): a non-private
    Keras record has no epsilon, so that version must not put it in a family of its own (it
    did: the reference's Keras rows were drawn apart from every other row). Private and
    non-private rows share a family; a private record's identity, beside its epsilon, still
    names the accountant."""
    from ablation.report.records import record_family, record_identity
    jax_row = timing_record("both", "ffnn", 64, False)
    keras = timing_record("both", "ffnn", 64, False)
    keras["engine"] = "tfp"
    jax_row["env"] = {**jax_row["env"], "dp_accounting": "0.6.0"}
    keras["env"] = {**keras["env"], "dp_accounting": "0.4.3"}
    private = dict(jax_row, private=True)
    assert record_family(keras) == record_family(jax_row) == record_family(private)
    assert record_identity(jax_row) == record_identity(dict(jax_row, env=keras["env"]))
    assert record_identity(private) != record_identity(dict(private, env=keras["env"]))


# -- the cost table and the team's targets ----------------------------------------------------


def test_a_lone_ghost_cell_prints_no_cost_table_and_targets_need_asking(tmp_path):
    from ablation.report.benchmarks import format_cost
    lone = timing_record("both", "ffnn", 64, True)
    lone["engine"] = "ghost"
    assert format_cost(pd.DataFrame([lone])) == ""  # before: a row of NaN
    base = timing_record("both", "ffnn", 64, False)
    table = format_cost(pd.DataFrame([lone, base]))
    assert "ghost / np" in table and "NaN" not in table and "met" not in table
    assert ": met" in format_cost(pd.DataFrame([lone, base]), targets=True) or \
        "NOT met" in format_cost(pd.DataFrame([lone, base]), targets=True)


def test_the_cost_table_holds_every_frameworks_fastest_row_and_the_encoder_targets():
    """Issue 24: Opacus' fastest mode of any (functorch too) and the fastest private row of the
    other frameworks, each against ghost, and the encoders' own targets, met or not."""
    from ablation.report.benchmarks import encoder_verdicts, privacy_cost_table

    def row(engine, private, ms, mode=None, **extra):
        record = timing_record("both", "cifar10", 64, private)  # then made this row
        record.update(engine=engine, model="transformer", engine_mode=mode,
                      throughput_step_s=ms / 1e3, compile_s=1.0, **extra)
        return record
    frame = pd.DataFrame([row("both", False, 100.0), row("ghost", True, 110.0),
                          row("opacus", True, 400.0, "hooks"),
                          row("opacus", True, 150.0, "functorch"),
                          row("tfp", True, 300.0, "vectorized", xla=False),
                          row("jax_privacy", True, 200.0, "vmap"),
                          row("pyvacy", True, float("nan"))])  # a row without a time is skipped
    table = privacy_cost_table(frame)
    (cost,) = table.to_dict("records")
    assert cost["opacus best / ghost"] == pytest.approx(150 / 110)  # functorch, not hooks
    assert cost["others best"] == "jax_privacy" and cost["others best ms"] == pytest.approx(200)
    assert cost["others best / ghost"] == pytest.approx(200 / 110)
    verdicts = "\n".join(encoder_verdicts(table))
    assert "<= 1.25x: met, worst 1.10x (transformer B=64)" in verdicts
    assert "Opacus' fastest mode: NOT met, worst 1.36x" in verdicts
    assert "every other framework's row: met, worst 1.82x" in verdicts


# -- identity ---------------------------------------------------------------------------------


def test_records_in_an_output_folder_inside_the_checkout_are_not_code(tmp_path, monkeypatch):
    """Before: paths.output_dir=runs made every record -dirty with its own diff hash."""
    import subprocess
    repo = tmp_path / "repo"
    repo.mkdir()
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"],
                    ["git", "config", "user.name", "t"]):
        subprocess.run(command, cwd=repo, check=True)
    (repo / "code.py").write_text("x = 1\n")
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "c"], cwd=repo, check=True)
    write_json(repo / "runs" / "run" / "result.json", {"a": 1})
    monkeypatch.delenv(records.OUTPUT_DIR_VARIABLE, raising=False)
    assert records._code_version_of(repo)["git_sha"].endswith("-dirty")
    monkeypatch.setenv(records.OUTPUT_DIR_VARIABLE, str(repo / "runs"))
    assert records._code_version_of(repo)["git_diff_sha"] is None


def test_the_dp_accounting_version_and_accelerator_stack_are_part_of_the_identity():
    base = timing_record("both", "ffnn", 64, True)
    other = dict(base, env=dict(base["env"], dp_accounting="0.4.3"))
    assert records.record_identity(base) != records.record_identity(other)
    gpu = dict(base, env=dict(base["env"], accelerator_runtime="cuda 12.8"))
    assert records.record_identity(base) != records.record_identity(gpu)


def test_asking_an_opacus_cells_machine_does_not_need_backpack(monkeypatch):
    pytest.importorskip("opacus")
    from importlib import metadata

    from ablation.sweep import worker
    real = metadata.version

    def version(name):
        if name == "backpack-for-pytorch":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    env = worker._environment({"engine": "opacus"})["env"]
    assert env["opacus"] and "backpack" not in env


def test_a_failed_cell_of_another_framework_still_names_its_code_and_machine():
    from ablation.sweep import worker
    env = worker._environment_or_less({"task": "timing", "cell": {"engine": "tfp"}})
    assert env.get("git_sha") is not None or "git_diff_sha" in env
    assert env.get("cpu_model") is not None or env.get("cpu_count")


# -- bad values, refused before anything runs -------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["resume=no"], "resume must be true or false"),
    (["batch_size=nan"], "batch_size must be an integer"),
    (["epochs=inf"], "epochs must be an integer"),
    (["batch_size=50000"], "batch_size=50,000 exceeds the training set (45,220 examples"),
    (["engine.devices=3"], "batch_size=64 does not divide over engine.devices=3"),
    (["paths.output_dir=/proc/version/runs"], "is a file, not a folder"),
])
def test_bad_values_are_one_line_and_exit_2(tmp_path, overrides, message):
    proc = run_cli("ablation.run", *overrides, *QUICK, output_dir=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not list(tmp_path.rglob("result.json"))


def test_a_sweep_with_one_bad_value_is_refused_before_its_first_cell(tmp_path):
    """Before: ``-m batch_size=64,0,32`` ran the first cell, then stopped with no summary."""
    proc = run_cli("ablation.run", "-m", "model=logreg", "batch_size=64,0,32", *QUICK,
                   output_dir=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "batch_size must be a positive integer, got 0" in proc.stderr
    assert "nothing ran" in proc.stderr and not list(tmp_path.rglob("result.json"))


def test_check_command_line_help_names_the_keys():
    proc = run_cli("ablation.run", "--help", output_dir=Path("/tmp"))
    assert "model.unroll=dynamic|static" in proc.stdout and "engine.mode=" in proc.stdout
    for module in ("ablation.figures", "ablation.datasets"):
        text = run_cli(module, "--help", output_dir=Path("/tmp")).stdout
        assert text.startswith(f"usage: python -m {module}")


# -- nothing lost, nothing misfiled -----------------------------------------------------------


def test_a_record_that_cannot_be_written_in_its_folder_is_saved_elsewhere(tmp_path, capsys):
    from ablation.sweep.jobs import finish
    blocked = tmp_path / "job"
    blocked.write_text("a file where the job folder should be")
    path = finish({"config_hash": "abc", "kind": "timing", "env": {}}, blocked)
    assert path.exists() and json.loads(path.read_text())["config_hash"] == "abc"
    assert f"is saved at {path}" in capsys.readouterr().out


def test_a_worker_result_of_another_cell_is_never_filed_under_this_one(tmp_path, monkeypatch):
    """Two jobs sharing worker files could swap measurements; the worker now names its cell."""
    from ablation.measure.settings import CellConfig
    from ablation.sweep import jobs
    from ablation.sweep.launch import ChildOutcome

    def worker(spec, workdir, **kwargs):
        return ChildOutcome({"status": "ok", "median_step_s": 0.01, "config_hash": "another"},
                            0, 1.0, False)

    monkeypatch.setattr(jobs, "run_worker", worker)
    record = jobs.run_timing_job(CellConfig(model="logreg"), {"model": {"name": "logreg"}},
                                 tmp_path / "job")
    assert record["status"] == "error" and "of another cell" in record["error"]
    assert record["median_step_s"] is None
