"""Typed settings of one measurement: the frozen values that timing and the memory probe consume.

The Hydra shell (:mod:`ablation.sweep.config`) validates a resolved config into these; nothing
below the shell sees a ``DictConfig``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

TIMING_MODES = ("budget", "epochs")
#: Engines outside the JAX registry (reference rows from other frameworks).
REFERENCE_ENGINES = ("opacus", "backpack", "pyvacy", "tfp", "jax_privacy")
#: Reference engines that train on shuffled fixed-size batches only (no Poisson sampling).
FIXED_BATCH_ENGINES = ("opacus", "backpack", "pyvacy", "tfp")
#: Engines with modes (``engine.mode``), the first of each being the default.
ENGINE_MODES = {
    "ghost": ("bookkeeping", "two_pass"),
    "opacus": ("hooks", "ghost", "functorch", "ew"),
    "tfp": ("vectorized", "loop", "fast"),
    "jax_privacy": ("vmap", "microbatch"),
}


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """How a cell is timed.

    Attributes:
      mode: ``budget`` (up to ``max_steps`` steady steps or ``budget_s`` seconds; epoch time
        estimated as steps_per_epoch × median step) or ``epochs`` (``epochs`` full passes).
      epochs: full passes in ``epochs`` mode.
      max_steps: most steady-state steps in ``budget`` mode.
      budget_s: seconds of steady-state stepping in ``budget`` mode (checked between steps).
      warmup_steps: steps after the first that are run but not reported.
      min_steps: steady-state steps taken even past the budget, so a median exists.
      timeout_s: the cell's wall-clock limit; past it the cell is killed, status ``timeout``.
      progress: show a progress bar.
      cost_split: for a private ghost cell, also time the step with its parts taken away
        (:mod:`ablation.measure.cost_split`): non-private work, clipped sum, norms, noise.
    """

    mode: str = "budget"
    epochs: int = 20
    max_steps: int = 100
    budget_s: float = 10.0
    warmup_steps: int = 2
    min_steps: int = 5
    timeout_s: float = 1800.0
    progress: bool = True
    cost_split: bool = False


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD and accounting settings (paper defaults: C 1.0, σ 1.1, δ 1e-5)."""

    clip_norm: float = 1.0
    noise_multiplier: float = 1.1
    delta: float = 1e-5
    accountant: str = "pld"
    target_epsilon: float | None = None
    sampling: str = "shuffle"
    capacity_sigmas: float = 5.0


@dataclasses.dataclass(frozen=True)
class CellConfig:
    """One cell of the grid: engine × model × batch size × privacy, and how to time it."""

    engine: str = "both"
    loop: str = "dispatch"
    engine_mode: str | None = None  # see ENGINE_MODES (ghost: bookkeeping; opacus: hooks)
    model: str = "ffnn"
    unroll: str = "dynamic"  # lstm: dynamic (lax.scan) | static (the paper's unroll)
    pool: str = "fast"  # cnn: fast (custom-VJP max-pool) | xla (hk.MaxPool, the paper's)
    tied: bool = False  # transformer: its classifier tied to the token table
    factory: str | None = None  # model=custom: MODULE:FUNCTION returning an ablation.Model
    model_kwargs: str = "{}"  # model=custom: the factory's keyword arguments (JSON)
    ghost_fallback: str = "error"  # ghost: error | materialise (parameters no rule covers)
    steps_per_call: int = 1  # compiled engines: DP-SGD steps per compiled call
    devices: int = 1  # both/ghost: the batch split over this many devices per process
    processes: int = 1  # JAX processes of one run (multi-controller; the batch split over all)
    coordinator: str | None = None  # host:port of process 0 (None: chosen or found for you)
    process_id: int | None = None  # this process's rank, where a launcher starts each one
    scaling: str = "strong"  # strong: batch_size is the global batch; weak: it was per process
    xla: bool = False  # tfp: compile the Keras step with XLA (jit_compile)
    microbatch_size: int = 16  # jax_privacy, engine.mode=microbatch: examples per micro-batch
    data: str = "synthetic"
    data_path: str | None = None  # data=arrays: the .npz file
    data_limit: int | None = None
    data_cache_dir: str | None = None
    download: bool = True
    batch_size: int = 64
    private: bool = True
    epochs: int = 20
    seed: int = 42
    lr: float = 0.15
    dp: PrivacyConfig = PrivacyConfig()
    timing: TimingConfig = TimingConfig()

    @property
    def is_reference(self) -> bool:
        """True for engines of other frameworks (Opacus)."""
        return self.engine in REFERENCE_ENGINES

    @property
    def global_devices(self) -> int:
        """The devices a batch is split over: ``devices`` on each of ``processes``."""
        return self.devices * self.processes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_of(cell: CellConfig) -> Any:
    """The :class:`models.Model` a cell runs: a registered one (with its options), or the one
    ``model.factory`` returns for ``model=custom``."""
    if cell.model == "custom":
        from models.custom import load_factory
        return load_factory(cell.factory, cell.model_kwargs)
    from models import get_model
    return get_model(cell.model, unroll=cell.unroll, pool=cell.pool, tied=cell.tied)


def training_set_of(cell: CellConfig, model: Any, key: Any) -> Any:
    """The cell's training set for ``model`` (its ``data.*`` options: synthetic from ``key``,
    real, or a file), as every measurement of one cell loads it."""
    from ablation.data.samplers import load_training_set
    return load_training_set(model.dataset, cell.data, key=key, limit=cell.data_limit,
                             cache_dir=cell.data_cache_dir, download=cell.download,
                             path=cell.data_path)


def training_size(cell: CellConfig) -> int:
    """Examples the cell trains on: the dataset's (the file's for ``data=arrays``), or
    ``data.limit`` when smaller."""
    if cell.data == "arrays":
        from ablation.data.arrays import array_rows
        n = array_rows(cell.data_path)
    else:
        n = model_of(cell).dataset.n_train
    return n if cell.data_limit is None else min(n, cell.data_limit)


def cell_from_plain(d: Mapping[str, Any]) -> CellConfig:
    """Rebuild a :class:`CellConfig` from :meth:`CellConfig.to_dict` (worker side)."""
    d = dict(d)
    d["dp"] = PrivacyConfig(**d["dp"])
    d["timing"] = TimingConfig(**d["timing"])
    return CellConfig(**d)


#: Canary kinds of the audit (``audit.canary``); ``auto`` picks the adversarial one.
CANARY_KINDS = ("auto", "offset", "scaled", "repeated", "random")


@dataclasses.dataclass(frozen=True)
class AuditSettings:
    """How ``python -m ablation.audit`` audits a cell (``audit.*`` in the config).

    Attributes:
      trials: one-step audit, trials per side (in, out); compiled engines batch them over keys.
      schedule_trials: trials per side of the two-call test of the run's noise-key schedule.
      loop_trials: the most trials per side for the engines that cannot batch them (vmap and
        none run eagerly, jit with loop=dispatch loops over compiled calls) ...
      budget_s: ... and the seconds they may spend on them (the report says how many ran).
      canary: what the canary is: ``offset`` (an input plus a large shared offset, where a
        Gram form cancels), ``scaled`` (an input scaled up), ``repeated`` (one token id at
        every position), ``random``; ``auto``: offset for float inputs, repeated for tokens.
      canary_ratio: the canary's gradient norm is made ≥ this × C (inputs scaled up; where a
        network bounds its gradient, the audit clips at norm ÷ ratio instead, and says so).
      lr: the audit's learning rate. The update is post-processing of the noisy sum, so lr
        does not change privacy; a small one keeps the released sum readable from the update.
      controls: also run the broken mechanisms the audit must catch (audit module only).
      run_steps: whole-run audit: steps of one training run with the canaries (0: skip it).
      run_canaries: canaries in that run, each included with probability ½.
      run_examples: ordinary training examples beside them.
      guesses: the fraction of canaries the one-run bound guesses about (half in, half out).
    """

    trials: int = 1000
    schedule_trials: int = 200
    loop_trials: int = 100
    budget_s: float = 120.0
    canary: str = "auto"
    canary_ratio: float = 100.0
    lr: float = 1e-3
    controls: bool = True
    run_steps: int = 100
    run_canaries: int = 500
    run_examples: int = 1000
    guesses: float = 0.2


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """Search settings (``memory.*`` in the config).

    Attributes:
      start: first batch size tried.
      growth: factor between successive sizes while growing (> 1).
      resolution: stop bisecting when the gap between the largest size that fit and the
        smallest that did not is at most this: a count of examples when ≥ 1, a fraction of
        the size that fit when < 1.
      max_batch_size: stop growing here (the record then says ``reached_max``).
      limit_gb: the cap in GiB (None: no cap, the whole device or machine).
      predict_only: decide by ``memory_analysis()`` predictions (jit engines), run nothing.
      timeout_s: limit of one try.
    """

    start: int = 16
    growth: float = 2.0
    resolution: float = 0.05
    max_batch_size: int = 1 << 20
    limit_gb: float | None = 2.0
    predict_only: bool = False
    timeout_s: float = 600.0

    @property
    def limit_bytes(self) -> int | None:
        return None if self.limit_gb is None else int(self.limit_gb * (1 << 30))
