"""Fake but well-formed result records, for testing analysis, figures and notebooks."""

from __future__ import annotations

from pathlib import Path

from ablation.report.records import SCHEMA, write_json

ENGINE_FACTOR = {"both": 1.0, "jit": 3.0, "vmap": 20.0, "none": 400.0, "opacus": 2.0,
                 "ghost": 0.5}
MODEL_BASE = {"logreg": 0.2, "ffnn": 0.5, "cnn": 4.0, "embed": 2.0, "lstm": 30.0, "cifar10": 50.0}
ENV = {"jax": "0.x", "jaxlib": "0.x", "haiku": "0.x", "optax": "0.x", "platform": "cpu",
       "device_kind": "cpu", "device_count": 1, "cpu_count": 2, "cpu_model": "Test CPU",
       "git_sha": "test", "git_diff_sha": None}
CPU_LABEL = "cpu: Test CPU (2 cores)"


def epoch_seconds(engine: str, model: str, batch: int, private: bool) -> float:
    """A made-up but structured epoch time: engine factor × model base × privacy × batch."""
    factor = ENGINE_FACTOR[engine] if private else (1.0 if engine != "opacus" else 0.7)
    return MODEL_BASE[model] * factor * (1.3 if private else 1.0) * (64 / batch) ** 0.5


def timing_record(engine, model, batch, private, *, status="ok", device_kind="cpu",
                  config=None, estimated=True):
    epoch = epoch_seconds(engine, model, batch, private) if status == "ok" else None
    spe = 1000 // batch
    return {
        "schema": SCHEMA, "kind": "timing", "status": status, "error": None,
        "engine": engine, "loop": "dispatch" if engine == "jit" else None,
        "engine_mode": "hooks" if engine == "opacus" else None, "model": model,
        "dataset": "x", "data": "synthetic", "batch_size": batch, "private": private,
        "n_params": 10, "steps_per_epoch": spe,
        "compile_s": (0.5 + batch / 100) if engine in ("both", "jit") and status == "ok" else None,
        "first_step_s": 0.01, "step_times_s": [epoch / spe] * 3 if epoch else None,
        "median_step_s": epoch / spe if epoch else None, "epoch_times_s": None,
        "first_epoch_s": None, "median_epoch_s": epoch, "epoch_estimated": estimated,
        "throughput_step_s": epoch / spe if epoch else None, "steps_timed": 10,
        "iqr_step_s": 0.01 * epoch / spe if epoch else None,
        "epsilon": 1.0 if private else None, "delta": 1e-5 if private else None,
        "accounted_steps": 20 * spe if private else None,
        "env": {**ENV, "device_kind": device_kind,
                "platform": "cpu" if device_kind == "cpu" else "gpu"},
        "config": {"engine": {"name": engine}, "model": {"name": model}, "batch_size": batch,
                   "private": private, **(config or {})},
        "started_at": "2026-11-27T00:00:00+00:00", "finished_at": "2026-11-27T00:00:01+00:00",
    }


def memory_record(engine, model, max_batch, *, predicted=None, limit_bytes=1 << 29,
                  predict_only=False):
    return {
        "schema": SCHEMA, "kind": "memory", "status": "ok", "error": None, "engine": engine,
        "loop": None, "engine_mode": None, "model": model, "dataset": "x", "data": "synthetic",
        "batch_size": 64, "private": True, "max_batch_size": max_batch,
        "predicted_max_batch_size": predicted, "limit_bytes": limit_bytes,
        "reached_max": False, "predict_only": predict_only,
        "tried": [{"batch_size": max_batch, "status": "ok", "peak_bytes": 1000,
                   "predicted_bytes": 900 if predicted else None}],
        "env": ENV, "started_at": "2026-11-27T00:00:00+00:00",
        "config": {"engine": {"name": engine}, "model": {"name": model}, "private": True,
                   "memory": {"limit_gb": limit_bytes / (1 << 30), "predict_only": predict_only}},
    }


def write_fixture(root: Path, models=("ffnn", "cnn"), batches=(16, 64),
                  engines=("both", "jit", "vmap", "none", "opacus")) -> Path:
    """A results folder shaped like a small real sweep (timing and memory records)."""
    i = 0
    for model in models:
        for engine in engines:
            for batch in batches:
                for private in (True, False):
                    write_json(root / f"t{i}" / "result.json",
                               timing_record(engine, model, batch, private))
                    i += 1
        write_json(root / f"m{i}" / "result.json", memory_record("both", model, 4096, predicted=4000))
        write_json(root / f"m{i + 1}" / "result.json", memory_record("vmap", model, 1024))
        i += 2
    return root
