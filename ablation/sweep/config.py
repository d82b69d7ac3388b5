"""From the Hydra tree to typed settings: validation with one-line errors.

Entry points turn their resolved ``DictConfig`` into a plain dict and call
:func:`cell_from_dict` (and :func:`probe_settings_from_dict`); everything below the shell sees
only the frozen dataclasses of :mod:`ablation.measure.settings`. Every invalid value raises
:class:`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Mapping

from ablation.core.clipping import FALLBACKS
from ablation.core.engines import ENGINES, LOOPS, MIN_CLIP_NORM
from ablation.core.privacy import ACCOUNTANTS, SAMPLINGS
from ablation.data.samplers import SOURCES
from ablation.measure.settings import (CANARY_KINDS, ENGINE_MODES, FIXED_BATCH_ENGINES,
                                       REFERENCE_ENGINES, TIMING_MODES, AuditSettings,
                                       CellConfig, PrivacyConfig, ProbeSettings, TimingConfig)
from models import MODEL_NAMES
from models.registry import POOLS, UNROLLS


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the key."""


#: Every key the toolkit reads; anything else (a typo, a stray ``+key=``) is refused.
KNOWN_KEYS: dict[str, frozenset[str] | None] = {
    "engine": frozenset({"name", "loop", "mode", "fallback", "devices", "xla",
                         "microbatch_size"}),
    "model": frozenset({"name", "unroll", "pool", "tied", "factory", "kwargs"}),
    "data": frozenset({"source", "limit", "cache_dir", "download", "path"}),
    "dp": frozenset(f.name for f in dataclasses.fields(PrivacyConfig)),
    "optim": frozenset({"lr"}),
    "train": frozenset({"steps_per_call"}),
    "distributed": frozenset({"processes", "coordinator", "process_id", "scaling"}),
    "timing": frozenset(f.name for f in dataclasses.fields(TimingConfig)),
    "memory": frozenset(f.name for f in dataclasses.fields(ProbeSettings)),
    "audit": frozenset(f.name for f in dataclasses.fields(AuditSettings)),
    "paths": frozenset({"output_dir"}),
    "batch_size": None, "private": None, "epochs": None, "seed": None, "resume": None,
}


def check_known_keys(cfg: Mapping[str, Any]) -> None:
    """Refuse any key the toolkit does not read, naming the nearest valid one."""
    for key, value in cfg.items():
        if key == "hydra":
            continue
        if key not in KNOWN_KEYS:
            _unknown(key, list(KNOWN_KEYS))
        allowed = KNOWN_KEYS[key]
        if allowed is not None and isinstance(value, Mapping):
            for sub in value:
                if sub not in allowed:
                    _unknown(f"{key}.{sub}", [f"{key}.{a}" for a in sorted(allowed)])


def _unknown(key: str, valid: list[str]) -> None:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(valid)}"
    raise ConfigError(f"unknown config key {key!r}; {hint}")


# ---------------------------------------------------------------------------------------------


def _int(value: Any, key: str, *, minimum: int) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value != int(value)):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if int(value) < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    return int(value)


def _float(value: Any, key: str, *, positive: bool = False, allow_inf: bool = False,
           allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    x = float(value)
    if math.isnan(x) or (math.isinf(x) and not allow_inf):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if x < 0 or (positive and x == 0) or (not allow_zero and x == 0):
        raise ConfigError(f"{key} must be {'> 0' if positive or not allow_zero else '>= 0'}, "
                          f"got {value!r}")
    return x


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _get(d: Mapping[str, Any], key: str, default: Any) -> Any:
    value = d.get(key, default) if isinstance(d, Mapping) else default
    return default if value is None and default is not None else value


def cell_from_dict(cfg: Mapping[str, Any]) -> CellConfig:
    """Validate a resolved config (the Hydra tree as plain dicts) into a :class:`CellConfig`."""
    check_known_keys(cfg)
    engine = _get(cfg, "engine", {}) or {}
    model = _get(cfg, "model", {}) or {}
    data = _get(cfg, "data", {}) or {}
    dp = _get(cfg, "dp", {}) or {}
    optim = _get(cfg, "optim", {}) or {}
    timing = _get(cfg, "timing", {}) or {}

    engine_name = _choice(engine.get("name", "both"), "engine", tuple(ENGINES) + REFERENCE_ENGINES)
    mode = engine.get("mode")
    if engine_name in ENGINE_MODES:
        mode = _choice(mode or ENGINE_MODES[engine_name][0], "engine.mode",
                       ENGINE_MODES[engine_name])
    else:
        mode = None
    # Options that only some engines read: set for another engine they would change the
    # config's identity but not what runs, so they are refused.
    if engine.get("xla") and engine_name != "tfp":
        raise ConfigError(f"engine.xla applies to engine=tfp only, not engine={engine_name}")
    if (engine.get("loop") or "dispatch") != "dispatch" and engine_name != "jit":
        raise ConfigError(f"engine.loop applies to engine=jit only, not engine={engine_name}")
    fallback = engine.get("fallback") or "error"
    if fallback != "error" and engine_name != "ghost":
        raise ConfigError(f"engine.fallback applies to engine=ghost only, not "
                          f"engine={engine_name}")
    fallback = _choice(fallback, "engine.fallback", FALLBACKS)
    devices = _int(engine.get("devices", 1) or 1, "engine.devices", minimum=1)
    if devices > 1 and engine_name not in ("both", "ghost"):
        raise ConfigError(f"engine.devices={devices} needs engine=both or ghost (a compiled, "
                          f"vectorised step to split over devices), not engine={engine_name}")
    processes, coordinator, process_id, scaling = _distributed(cfg, engine_name)
    train = _get(cfg, "train", {}) or {}
    steps_per_call = _int(train.get("steps_per_call", 1), "train.steps_per_call", minimum=1)
    if steps_per_call > 1:
        compiled = (engine_name in ("both", "ghost")
                    or (engine_name == "jit" and engine.get("loop") in ("unrolled", "scan")))
        if not compiled:
            raise ConfigError(f"train.steps_per_call={steps_per_call} needs an engine that "
                              "compiles the whole step (both, ghost, or jit with engine.loop="
                              f"unrolled|scan), not engine={engine_name}")
    target = dp.get("target_epsilon")
    epochs = _int(_get(cfg, "epochs", 20), "epochs", minimum=1)
    timing_cfg = TimingConfig(
        mode=_choice(timing.get("mode", "budget"), "timing.mode", TIMING_MODES),
        epochs=_int(_get(timing, "epochs", epochs), "timing.epochs", minimum=1),
        max_steps=_int(timing.get("max_steps", 100), "timing.max_steps", minimum=1),
        budget_s=_float(timing.get("budget_s", 10.0), "timing.budget_s", positive=True),
        warmup_steps=_int(timing.get("warmup_steps", 2), "timing.warmup_steps", minimum=0),
        min_steps=_int(timing.get("min_steps", 5), "timing.min_steps", minimum=1),
        timeout_s=_float(timing.get("timeout_s", 1800.0), "timing.timeout_s", positive=True),
        progress=_bool(timing.get("progress", True), "timing.progress"),
        cost_split=_bool(timing.get("cost_split", False) or False, "timing.cost_split"),
    )
    delta = _float(dp.get("delta", 1e-5), "dp.delta", positive=True)
    if delta >= 1:
        raise ConfigError(f"dp.delta must be in (0, 1), got {delta!r}")
    dp_cfg = PrivacyConfig(
        clip_norm=_float(dp.get("clip_norm", 1.0), "dp.clip_norm", positive=True, allow_inf=True),
        noise_multiplier=_float(dp.get("noise_multiplier", 1.1), "dp.noise_multiplier"),
        delta=delta,
        accountant=_choice(dp.get("accountant", "pld"), "dp.accountant", ACCOUNTANTS),
        target_epsilon=None if target is None else _float(target, "dp.target_epsilon",
                                                          positive=True),
        sampling=_choice(dp.get("sampling", "shuffle"), "dp.sampling", SAMPLINGS),
        capacity_sigmas=_float(dp.get("capacity_sigmas", 5.0), "dp.capacity_sigmas"),
    )
    if dp_cfg.clip_norm < MIN_CLIP_NORM:
        raise ConfigError(f"dp.clip_norm must be at least {MIN_CLIP_NORM:g} (a normal float32), "
                          f"got {dp_cfg.clip_norm!r}")
    if math.isinf(dp_cfg.clip_norm) and dp_cfg.noise_multiplier > 0 and target is None:
        raise ConfigError("dp.noise_multiplier must be 0 when dp.clip_norm is inf")
    private = _bool(_get(cfg, "private", True), "private")
    if private and dp_cfg.sampling == "poisson":
        if dp_cfg.accountant == "rdp":
            raise ConfigError("dp.accountant=rdp cannot account Poisson batches truncated at the "
                              "padded capacity (its epsilon would not hold); use "
                              "dp.accountant=pld")
        if engine_name in FIXED_BATCH_ENGINES:
            raise ConfigError(f"engine={engine_name} trains on shuffled fixed-size batches; "
                              "dp.sampling=poisson runs the JAX engines (and jax_privacy) only")
    limit = data.get("limit")
    _bool(_get(cfg, "resume", False), "resume")  # read by the entry points, checked here
    factory, model_kwargs = _factory(model)
    source = _choice(data.get("source", "synthetic"), "data", SOURCES)
    data_path = data.get("path")
    if source != "arrays" and data_path is not None:
        raise ConfigError(f"data.path applies to data=arrays only, not data={source}")
    cell = CellConfig(
        engine=engine_name,
        loop=_choice(engine.get("loop", "dispatch") or "dispatch", "engine.loop", LOOPS),
        engine_mode=mode,
        model=_choice(model.get("name", "ffnn"), "model", (*MODEL_NAMES, "custom")),
        unroll=_choice(model.get("unroll", "dynamic") or "dynamic", "model.unroll", UNROLLS),
        pool=_choice(model.get("pool", "fast") or "fast", "model.pool", POOLS),
        tied=_tied(model),
        factory=factory,
        model_kwargs=model_kwargs,
        ghost_fallback=fallback,
        steps_per_call=steps_per_call,
        devices=devices,
        xla=_bool(engine.get("xla", False) or False, "engine.xla"),
        microbatch_size=_int(engine.get("microbatch_size", 16) or 16, "engine.microbatch_size",
                             minimum=1),
        data=source,
        data_path=None if data_path is None else str(data_path),
        data_limit=None if limit is None else _int(limit, "data.limit", minimum=1),
        data_cache_dir=data.get("cache_dir"),
        download=_bool(data.get("download", True), "data.download"),
        batch_size=_int(_get(cfg, "batch_size", 64), "batch_size", minimum=1) * (
            processes if scaling == "weak" else 1),
        processes=processes,
        coordinator=coordinator,
        process_id=process_id,
        scaling=scaling,
        private=private,
        epochs=epochs,
        seed=_int(_get(cfg, "seed", 42), "seed", minimum=0),
        lr=_float(optim.get("lr", 0.15), "optim.lr"),
        dp=dp_cfg,
        timing=timing_cfg,
    )
    if cell.processes > 1 and cell.timing.cost_split:
        raise ConfigError("timing.cost_split times one process's step part by part; it needs "
                          "distributed.processes=1")
    model_obj = _model_or_error(cell)
    if cell.data == "arrays":
        from ablation.data.arrays import ArraysError, check_file
        try:
            check_file(cell.data_path, model_obj.dataset)
        except ArraysError as error:
            raise ConfigError(str(error)) from None
    _check_batch(cell, model_obj)
    return cell


def _tied(model: Mapping[str, Any]) -> bool:
    """``model.tied``: the transformer's classifier tied to its token table (no other model)."""
    tied = _bool(model.get("tied", False) or False, "model.tied")
    if tied and model.get("name") != "transformer":
        raise ConfigError(f"model.tied applies to model=transformer only, not "
                          f"model={model.get('name')}")
    return tied


def _factory(model: Mapping[str, Any]) -> tuple[str | None, str]:
    """``model.factory`` and ``model.kwargs`` (as sorted JSON), only with ``model=custom``."""
    import json
    factory, kwargs = model.get("factory"), model.get("kwargs") or {}
    if model.get("name") != "custom":
        if factory is not None or kwargs:
            raise ConfigError(f"model.factory and model.kwargs apply to model=custom only, not "
                              f"model={model.get('name')}")
        return None, "{}"
    if not factory:
        raise ConfigError("model=custom needs model.factory=MODULE:FUNCTION (a function "
                          "returning an ablation.Model)")
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"model.kwargs must be a mapping ({{key: value, ...}}), got {kwargs!r}")
    try:
        return str(factory), json.dumps(dict(kwargs), sort_keys=True)
    except TypeError as error:
        raise ConfigError(f"model.kwargs must hold plain values: {error}") from None


def _model_or_error(cell: CellConfig):
    """The cell's model (a custom factory loaded and checked), or one line naming why not."""
    from ablation.measure.settings import model_of
    from models.custom import ModelError
    try:
        return model_of(cell)
    except ModelError as error:
        raise ConfigError(str(error)) from None


def _check_batch(cell: CellConfig, model) -> None:
    """The batch fits the training set and, fixed-size, divides over the devices: found here,
    before any cell runs, rather than inside a worker."""
    from ablation.measure.settings import training_size
    n_train = training_size(dataclasses.replace(cell, data_limit=None))
    n = training_size(cell)
    source = (f"data.path={cell.data_path}" if cell.data == "arrays"
              else f"of {model.dataset.name}")
    where = f"the training set ({n:,} examples" + (
        f", data.limit={cell.data_limit:,})" if cell.data_limit is not None and
        cell.data_limit < n_train else f" {source})")
    if cell.batch_size > n:
        raise ConfigError(f"batch_size={cell.batch_size:,} exceeds {where}: at most {n:,}")
    if cell.dp.sampling == "poisson" and cell.private and cell.batch_size >= n:
        raise ConfigError(f"batch_size={cell.batch_size:,} with dp.sampling=poisson is an "
                          f"expected batch of the whole of {where}: at most {n - 1:,}")
    if cell.devices > 1 and cell.dp.sampling != "poisson" and cell.batch_size % cell.devices:
        raise ConfigError(f"batch_size={cell.batch_size} does not divide over engine.devices="
                          f"{cell.devices} (each device takes an equal share)")
    if cell.processes > 1 and cell.batch_size % cell.global_devices:
        raise ConfigError(f"batch_size={cell.batch_size} does not divide over the "
                          f"{cell.global_devices} devices of distributed.processes="
                          f"{cell.processes} (each process takes an equal share; under "
                          "Poisson sampling, an equal expected share)")


#: ``distributed.scaling``: ``strong`` (``batch_size`` is the global batch) or ``weak`` (it is
#: each process's: the global batch is ``batch_size × processes``).
SCALINGS = ("strong", "weak")


def _distributed(cfg: Mapping[str, Any], engine: str) -> tuple[int, str | None, int | None, str]:
    """``distributed.*``: processes, coordinator, process id and scaling, validated."""
    d = _get(cfg, "distributed", {}) or {}
    processes = _int(d.get("processes", 1) or 1, "distributed.processes", minimum=1)
    scaling = _choice(d.get("scaling", "strong") or "strong", "distributed.scaling", SCALINGS)
    coordinator = d.get("coordinator")
    if coordinator is not None:
        coordinator = str(coordinator)
        host, sep, port = coordinator.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"distributed.coordinator must be host:port, got {coordinator!r}")
    process_id = d.get("process_id")
    if process_id is not None:
        process_id = _int(process_id, "distributed.process_id", minimum=0)
        if process_id >= processes:
            raise ConfigError(f"distributed.process_id={process_id} must be below "
                              f"distributed.processes={processes}")
    if processes > 1 and engine not in ("both", "ghost"):
        raise ConfigError(f"distributed.processes={processes} needs engine=both or ghost (a "
                          f"compiled, vectorised step to split over processes), not "
                          f"engine={engine}")
    return processes, coordinator, process_id, scaling


def probe_settings_from_dict(memory: Mapping[str, Any] | None):
    """Validate the ``memory`` section into :class:`ablation.measure.probe.ProbeSettings`."""
    m = dict(memory or {})
    limit = m.get("limit_gb", 2.0)
    growth = _float(m.get("growth", 2.0), "memory.growth", positive=True)
    if growth <= 1:
        raise ConfigError(f"memory.growth must be > 1, got {growth!r}")
    return ProbeSettings(
        start=_int(m.get("start", 16), "memory.start", minimum=1),
        growth=growth,
        resolution=_float(m.get("resolution", 0.05), "memory.resolution", positive=True),
        max_batch_size=_int(m.get("max_batch_size", 1 << 20), "memory.max_batch_size", minimum=1),
        limit_gb=None if limit is None else _float(limit, "memory.limit_gb", positive=True),
        predict_only=_bool(m.get("predict_only", False), "memory.predict_only"),
        timeout_s=_float(m.get("timeout_s", 600.0), "memory.timeout_s", positive=True),
    )


def _canary_ratio(value: Any) -> float:
    ratio = _float(value, "audit.canary_ratio", positive=True)
    if ratio < 2:  # an unclipped canary would break the claim μ = 1/σ and hide clipping off
        raise ConfigError(f"audit.canary_ratio must be >= 2 (the canary must be clipped), "
                          f"got {value!r}")
    return ratio


def audit_settings_from_dict(audit: Mapping[str, Any] | None):
    """Validate the ``audit`` section into :class:`ablation.measure.settings.AuditSettings`."""
    a = dict(audit or {})
    canary = _choice(str(a.get("canary", "auto")), "audit.canary", CANARY_KINDS)
    guesses = _float(a.get("guesses", 0.2), "audit.guesses", positive=True)
    if guesses > 1:
        raise ConfigError(f"audit.guesses is a fraction of the canaries (<= 1), got {guesses}")
    return AuditSettings(
        trials=_int(a.get("trials", 1000), "audit.trials", minimum=8),
        schedule_trials=_int(a.get("schedule_trials", 200), "audit.schedule_trials", minimum=8),
        loop_trials=_int(a.get("loop_trials", 100), "audit.loop_trials", minimum=8),
        budget_s=_float(a.get("budget_s", 120.0), "audit.budget_s", positive=True),
        canary=canary,
        canary_ratio=_canary_ratio(a.get("canary_ratio", 100.0)),
        lr=_float(a.get("lr", 1e-3), "audit.lr", positive=True),
        controls=_bool(a.get("controls", True), "audit.controls"),
        run_steps=_int(a.get("run_steps", 100), "audit.run_steps", minimum=0),
        run_canaries=_int(a.get("run_canaries", 500), "audit.run_canaries", minimum=10),
        run_examples=_int(a.get("run_examples", 1000), "audit.run_examples", minimum=1),
        guesses=guesses,
    )
