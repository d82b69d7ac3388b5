"""The sweep runner end to end: records, failures, resume, independence, config errors."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from ablation.report import records as results
from ablation.report.summary import format_summary, summary_table
from ablation.run import CONF_DIR
from ablation.sweep.config import ConfigError, cell_from_dict
from ablation.sweep.jobs import MEASUREMENT_FIELDS
from tests.cli import QUICK, run_cli

#: Fields DESIGN.md promises in every timing record.
DESIGN_FIELDS = ("schema", "kind", "status", "error", "engine", "loop", "model", "dataset", "data",
                 "batch_size", "private", "n_params", "steps_per_epoch", "compile_s",
                 "first_step_s", "step_times_s", "median_step_s", "epoch_times_s",
                 "median_epoch_s", "epoch_estimated", "epsilon", "delta", "env", "config",
                 "started_at")
ENV_FIELDS = ("jax", "jaxlib", "haiku", "optax", "platform", "device_kind", "device_count",
              "git_sha")
TINY = ["model=logreg", "batch_size=16", "data.limit=512", *QUICK]
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def _compose(overrides: list[str], hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("group, options", [
    ("engine", ["both", "jit", "vmap", "none", "ghost", "opacus"]),
    ("model", ["logreg", "ffnn", "cnn", "embed", "lstm", "cifar10"]),
    ("data", ["synthetic", "real"]),
])
def test_every_group_option_composes_and_validates(group, options):
    from omegaconf import OmegaConf
    for option in options:
        cfg = _compose([f"{group}={option}"])
        cell = cell_from_dict(OmegaConf.to_container(cfg, resolve=True))
        assert getattr(cell, group) == option


@pytest.mark.parametrize("option, engine, mode", [
    ("ghost", "ghost", "bookkeeping"), ("ghost_two_pass", "ghost", "two_pass"),
    ("opacus", "opacus", "hooks"), ("opacus_ghost", "opacus", "ghost"),
    ("opacus_functorch", "opacus", "functorch"), ("both", "both", None)])
def test_engine_options_carry_their_mode(option, engine, mode):
    from omegaconf import OmegaConf
    cell = cell_from_dict(OmegaConf.to_container(_compose([f"engine={option}"]), resolve=True))
    assert (cell.engine, cell.engine_mode) == (engine, mode)


def test_model_options_and_steps_per_call_validate():
    from omegaconf import OmegaConf

    def cell(*overrides):
        return cell_from_dict(OmegaConf.to_container(_compose(list(overrides)), resolve=True))

    assert cell("model=lstm").unroll == "dynamic"  # the default; static is the paper's
    assert cell("model=cnn").pool == "fast" and cell("model=cnn", "model.pool=xla").pool == "xla"
    assert cell("train.steps_per_call=4").steps_per_call == 4
    with pytest.raises(ConfigError, match="model.pool must be one of fast, xla"):
        cell("model=cnn", "model.pool=avg")
    with pytest.raises(ConfigError, match="train.steps_per_call=4 needs an engine that compiles"):
        cell("engine=vmap", "train.steps_per_call=4")


def test_defaults_are_the_papers():
    from omegaconf import OmegaConf
    cell = cell_from_dict(OmegaConf.to_container(_compose([]), resolve=True))
    assert (cell.engine, cell.model, cell.data, cell.batch_size, cell.private) == (
        "both", "ffnn", "synthetic", 64, True)
    assert (cell.lr, cell.dp.noise_multiplier, cell.dp.clip_norm, cell.dp.delta) == (
        0.15, 1.1, 1.0, 1e-5)
    assert (cell.epochs, cell.seed, cell.timing.mode) == (20, 42, "budget")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_a_sweep(experiment):
    from omegaconf import OmegaConf
    cfg = _compose([f"experiment={experiment}"], hydra_cfg=True)
    params = cfg.hydra.sweeper.params
    assert params, f"experiment {experiment} defines no grid"
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra")
    cell_from_dict(OmegaConf.to_container(OmegaConf.create(plain), resolve=True))
    header = (Path(CONF_DIR) / "experiment" / f"{experiment}.yaml").read_text()
    assert "python -m ablation." in header and "Takes about" in header


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "batch_size must be a positive integer, got 0"),
    ("timing.max_steps=0", "timing.max_steps must be a positive integer"),
    ("timing.budget_s=-1", "timing.budget_s must be > 0"),
    ("optim.lr=-0.1", "optim.lr must be >= 0"),
    ("dp.noise_multiplier=-1", "dp.noise_multiplier must be >= 0"),
    ("dp.delta=1.5", "dp.delta must be in (0, 1)"),
    ("dp.target_epsilon=0", "dp.target_epsilon must be > 0"),
])
def test_bad_values_raise_one_line_config_errors(override, message):
    from omegaconf import OmegaConf
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        cell_from_dict(OmegaConf.to_container(_compose([override]), resolve=True))
    assert "\n" not in str(info.value)


def test_bad_value_on_the_command_line_exits_without_traceback(tmp_path):
    proc = run_cli("ablation.run", "batch_size=-4", output_dir=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: batch_size must be a positive integer, got -4"
    assert "Traceback" not in proc.stdout + proc.stderr


def test_unknown_engine_lists_the_options_in_one_line(tmp_path):
    proc = run_cli("ablation.run", "-m", "engine=both,fastest", output_dir=tmp_path)
    assert proc.returncode == 2
    engines = sorted(path.stem for path in (Path(CONF_DIR) / "engine").glob("*.yaml"))
    assert {"both", "jit", "vmap", "none", "ghost", "opacus", "tfp"} <= set(engines)
    assert proc.stderr.strip().splitlines() == [
        f"error: unknown engine 'fastest'; valid: {', '.join(engines)}"]


@pytest.mark.parametrize("override, message", [
    ("+foo=1", "unknown config key 'foo'; valid keys: engine"),
    ("+timing.max_step=3", "unknown config key 'timing.max_step'; did you mean "
                           "'timing.max_steps'?"),
    ("timing.max_step=3", "unknown config key 'timing.max_step'; did you mean "
                          "'timing.max_steps'?"),
])
def test_unknown_keys_are_refused_naming_the_nearest(tmp_path, override, message):
    """Issue 15.6: a stray or misspelled key is never accepted silently (nor with a page)."""
    proc = run_cli("ablation.run", override, output_dir=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {message}" or (
        message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1)


def test_tiny_multirun_records_every_field_and_prints_summary(tmp_path):
    proc = run_cli("ablation.run", "-m", "engine=both,vmap", *TINY, output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    frame = results.load(tmp_path)
    assert len(frame) == 2 and set(frame["engine"]) == {"both", "vmap"}
    for _, record in results.iter_records(tmp_path):
        assert record["status"] == "ok", record["error"]
        for field in DESIGN_FIELDS + MEASUREMENT_FIELDS:
            assert field in record, field
        for field in ENV_FIELDS:
            assert field in record["env"], field
        assert record["steps_per_epoch"] == 512 // 16
        assert len(record["step_times_s"]) >= 2 and record["median_step_s"] > 0
        assert record["epoch_estimated"] is True
        # Epochs are estimated from throughput (steps dispatched back to back), not latency.
        assert record["throughput_steps"] >= 1 and len(record["throughput_bursts_s"]) == 3
        assert record["median_epoch_s"] == pytest.approx(32 * record["throughput_step_s"])
        assert record["steps_timed"] == len(record["step_times_s"])
        assert record["n_params"] == record["paper_n_params"] == 105
        assert record["identity"] and record["env"]["cpu_model"] is not None
        assert record["epsilon"] > 0 and record["delta"] == 1e-5
        assert record["config"]["engine"]["name"] == record["engine"]
    both = frame.set_index("engine").loc["both"]
    vmap = frame.set_index("engine").loc["vmap"]
    assert both["compile_s"] > 0 and pd.isna(vmap["compile_s"])
    assert "=== summary" in proc.stdout and "both x" in proc.stdout
    assert "[sweep] 2 cells" in proc.stdout and "[sweep] 2/2 cells done" in proc.stdout
    assert "\r" not in proc.stderr  # no progress bar when stderr is not a terminal
    table = summary_table(frame)
    assert list(table.loc[table.engine == "both", "both x"]) == [1.0]
    assert table.loc[table.engine == "vmap", "both x"].iloc[0] > 1.0


def test_epochs_mode_reports_first_epoch_apart(tmp_path):
    proc = run_cli("ablation.run", "engine=both", "timing.mode=epochs", "timing.epochs=3",
                   "model=logreg", "batch_size=64", "data.limit=256", *QUICK,
                   output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (_, record), = list(results.iter_records(tmp_path))
    assert record["epoch_estimated"] is False and len(record["epoch_times_s"]) == 3
    assert record["first_epoch_s"] == record["epoch_times_s"][0]
    # The median is over the epochs after the first (exactly, not by timing tolerance).
    assert record["median_epoch_s"] == pytest.approx(statistics.median(record["epoch_times_s"][1:]))
    assert record["throughput_step_s"] == pytest.approx(record["median_epoch_s"] / 4)
    # 4 steps per epoch, 3 epochs: the first epoch holds the first step, one warm-up step and
    # one latency step before the rest of it runs back to back; later epochs are whole bursts.
    assert record["steps_run"] == 12 and len(record["step_times_s"]) == 1


def test_failing_cell_does_not_stop_the_sweep(tmp_path):
    # The middle cell asks for 2 devices where JAX sees one: only its worker can know.
    proc = run_cli("ablation.run", "-m", "engine=both", "engine.devices=1,2,1",
                   "batch_size=16", "private=false",
                   *[a for a in TINY if not a.startswith("batch_size")], output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    frame = results.load(tmp_path)
    assert sorted(frame["status"]) == ["error", "ok", "ok"]
    failed = frame[frame["status"] == "error"].iloc[0]
    assert "JAX sees 1 cpu device" in failed["error"] and "\n" not in failed["error"]
    assert pd.isna(failed["median_step_s"])


def test_timeout_becomes_a_record(tmp_path):
    proc = run_cli("ablation.run", "engine=both", *TINY, "timing.timeout_s=0.5",
                   output_dir=tmp_path)
    assert proc.returncode == 1  # a single failed cell fails the command
    (_, record), = list(results.iter_records(tmp_path))
    assert record["status"] == "timeout" and "0.5 s limit" in record["error"]


def test_resume_skips_finished_cells(tmp_path):
    args = ["-m", "engine=both,vmap", *TINY, "resume=true"]
    first = run_cli("ablation.run", *args, output_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    assert len(results.load(tmp_path)) == 2
    second = run_cli("ablation.run", *args, output_dir=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("[resume] skipped") == 2
    assert len(results.load(tmp_path)) == 2  # no new records
    assert len(list(tmp_path.rglob(results.SKIPPED_FILE))) == 2
    assert "both x" in second.stdout  # the summary still shows the skipped cells
    assert "* reused by resume=true" in second.stdout  # ... and says they are reused
    # A changed config is a different cell: it runs.
    third = run_cli("ablation.run", "-m", "engine=both", *TINY, "resume=true", "seed=7",
                    output_dir=tmp_path)
    assert "[resume] skipped" not in third.stdout
    assert len(results.load(tmp_path)) == 3


def test_same_cell_twice_in_one_sweep_compiles_twice(tmp_path):
    """Each cell runs in a fresh process: the second copy pays the same compile."""
    proc = run_cli("ablation.run", "-m", "engine=both", "model=ffnn", "seed=1,2",
                   "data.limit=256", "batch_size=32", *QUICK, output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    compiles = list(results.load(tmp_path)["compile_s"])
    assert len(compiles) == 2 and min(compiles) > 0.2
    assert max(compiles) / min(compiles) < 2.0, compiles


def test_summary_marks_failed_cells():
    frame = pd.DataFrame([
        dict(kind="timing", status="ok", engine="both", loop=None, model="ffnn", data="synthetic",
             batch_size=64, private=True, compile_s=1.0, median_step_s=0.001, median_epoch_s=0.7,
             epsilon=1.0),
        dict(kind="timing", status="oom", engine="vmap", loop=None, model="ffnn", data="synthetic",
             batch_size=64, private=True, compile_s=None, median_step_s=None,
             median_epoch_s=None, epsilon=1.0)])
    text = format_summary(frame)
    assert "oom" in text and "both" in text


# -- record identity (issue 12.1, 12.2) ----------------------------------------------------------


def _ok(config_hash="abc", finished="2026-11-27T00:00:00+00:00", **env):
    from tests.records import ENV
    return {"schema": results.SCHEMA, "kind": "timing", "status": "ok", "engine": "both",
            "config_hash": config_hash, "finished_at": finished, "env": {**ENV, **env}}


def test_resume_never_reaches_into_reference_folders_and_takes_the_newest(tmp_path):
    from ablation.report.records import find_ok_record, machine_identity, write_json
    from tests.records import ENV
    here = machine_identity(ENV, "both")
    write_json(tmp_path / "reference" / "cpu" / "1" / "result.json", _ok())
    assert find_ok_record(tmp_path, "abc", "timing", here) is None
    # Asked for by path, the reference folder is searched.
    assert find_ok_record(tmp_path / "reference" / "cpu", "abc", "timing", here) is not None
    write_json(tmp_path / "runs" / "b" / "result.json", _ok(finished="2026-11-27T00:00:00+00:00"))
    write_json(tmp_path / "runs" / "a" / "result.json", _ok(finished="2026-11-28T00:00:00+00:00"))
    assert find_ok_record(tmp_path, "abc", "timing", here).parent.name == "a"  # newest, not first


@pytest.mark.parametrize("changed", [dict(device_kind="NVIDIA H100 80GB HBM3", platform="gpu"),
                                     dict(device_count=8), dict(cpu_model="Other CPU"),
                                     dict(jax="9.9"), dict(git_sha="other"),
                                     dict(git_diff_sha="other-uncommitted-change")])
def test_resume_only_reuses_records_of_this_machine_and_code(tmp_path, changed):
    from ablation.report.records import find_ok_record, machine_identity, write_json
    from tests.records import ENV
    write_json(tmp_path / "1" / "result.json", _ok(**changed))
    assert find_ok_record(tmp_path, "abc", "timing", machine_identity(ENV, "both")) is None
    assert find_ok_record(tmp_path, "abc", "timing",
                          machine_identity({**ENV, **changed}, "both")) is not None


def test_reference_experiment_with_resume_runs_instead_of_reusing_committed_cpu_records(tmp_path):
    """Issue 12.1 as reported: the committed 2-core CPU record must not be handed back."""
    import shutil
    reference = Path(CONF_DIR).parent / "outputs" / "reference" / "cpu"
    shutil.copytree(reference, tmp_path / "reference" / "cpu")
    proc = run_cli("ablation.run", "experiment=reference_cpu", "engine=both", "model=logreg",
                   "batch_size=16", "resume=true", "data.limit=512", *QUICK, output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[resume] skipped" not in proc.stdout and "[ok] both logreg" in proc.stdout


def test_predictions_and_measurements_are_different_cells():
    from ablation.report.records import config_hash
    measured = {"memory": {"limit_gb": 0.5, "predict_only": False}}
    predicted = {"memory": {"limit_gb": 0.5, "predict_only": True}}
    assert config_hash(measured, "memory") != config_hash(predicted, "memory")
    # What does not change the numbers stays out of the identity.
    assert config_hash({"a": 1, "paths": {"output_dir": "x"}, "timing": {"progress": True}}) == \
        config_hash({"a": 1, "paths": {"output_dir": "y"}, "timing": {"progress": False}})


# -- the summary table (issue 12.13-15) --------------------------------------------------------


def _summary_frame():
    from tests.records import timing_record
    rows = []
    for engine, few in (("both", False), ("vmap", True)):
        r = timing_record(engine, "ffnn", 64, True)
        r["iqr_step_s"] = 0.004 * r["median_step_s"]
        r["throughput_bursts_s"] = [r["throughput_step_s"]] * 3
        if few:
            r["steps_timed"] = 2
        rows.append(r)
    reused = dict(timing_record("jit", "ffnn", 64, True), reused=True, path="/old/run/result.json")
    rows.append(reused)
    failed = timing_record("none", "ffnn", 64, True, status="oom")
    failed["n_params"] = None
    rows.append(failed)
    return pd.DataFrame(rows)


def test_summary_marks_estimates_spread_reuse_and_epsilon_scope():
    text = format_summary(_summary_frame())
    assert "~" in text and "epoch estimated as steps per epoch x throughput" in text
    assert "2!" in text and "fewer than 5 latency steps" in text
    assert "jit*" in text and "/old/run/result.json" in text
    assert "eps at delta=1e-05: for the configured training" in text
    assert "oom" in text
    table = summary_table(_summary_frame())
    row = table.set_index("engine").loc["vmap"]
    assert row["both x digits"] == 2  # too few steps: no spread to justify more figures


def test_ratio_precision_follows_the_spread():
    from ablation.report.summary import ratio_digits, significant
    assert ratio_digits(0.001, 0.002) == 3
    assert ratio_digits(0.03, 0.04) == 2
    assert ratio_digits(0.3, 0.1) == 1
    assert significant(1.4237, 2) == "1.4" and significant(5762.4, 2) == "5,800"
    assert significant(0.56234, 3) == "0.562"


def test_markdown_and_csv_formats():
    frame = _summary_frame()
    md = format_summary(frame, "markdown")
    assert md.splitlines()[0].startswith("| engine | model |") and "|---|" in md
    csv = format_summary(frame, "csv")
    assert csv.splitlines()[0].startswith("engine,model,batch,private,status")


def test_eta_line():
    import datetime as dt

    from ablation.sweep.callbacks import eta_line
    now = dt.datetime(2026, 11, 28, 12, 0)
    assert eta_line(3, 12, 90.0, now) == ("[sweep] 3/12 cells done, 1.5 min so far, "
                                          "~4.5 min left (ETA 12:04)")
    assert eta_line(12, 12, 360.0, now) == "[sweep] 12/12 cells done, 6.0 min so far"


def test_summary_command_compares_two_folders(tmp_path):
    """Issue 15.3: python -m ablation.summary prints tables, and for two folders the ratio."""
    from ablation.report.records import write_json
    from tests.records import timing_record
    for folder, factor in (("a", 1.0), ("b", 2.0)):
        for engine in ("both", "vmap"):
            r = timing_record(engine, "ffnn", 64, True)
            r["median_epoch_s"] *= factor
            write_json(tmp_path / folder / engine / "result.json", r)
    proc = run_cli("ablation.summary", str(tmp_path / "a"), str(tmp_path / "b"),
                   output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "=== b / a" in proc.stdout
    ratios = [line for line in proc.stdout.splitlines() if line.strip().startswith(("both", "vmap"))
              and line.strip().endswith("×2.0")]
    assert len(ratios) == 2
    md = run_cli("ablation.summary", str(tmp_path / "a"), "--format", "markdown",
                 output_dir=tmp_path)
    assert md.stdout.startswith("| engine | model |")
    empty = run_cli("ablation.summary", str(tmp_path / "nothing"), output_dir=tmp_path)
    assert empty.returncode == 2 and "no such folder" in empty.stderr


def test_a_record_whose_worker_died_keeps_the_machine_of_its_family(monkeypatch):
    """A worker killed by a signal reports no environment; its record takes the framework's
    (devices included), so it stays in its sweep's family and figures mark the cell, and
    falls back to what the parent knows when even that cannot be asked."""
    from ablation.sweep import jobs
    jobs.machine_env.cache_clear()
    env = jobs._failed_env("both")
    assert env["platform"] == "cpu" and env["device_count"] >= 1 and env["git_sha"]

    def unreachable(engine):
        raise RuntimeError("could not query the machine")
    monkeypatch.setattr(jobs, "machine_env", unreachable)
    fallback = jobs._failed_env("both")
    assert "platform" not in fallback and fallback["git_sha"] == env["git_sha"]
