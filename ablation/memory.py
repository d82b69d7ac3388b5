"""``python -m ablation.memory [overrides]``: the largest batch size that fits in memory.

Examples::

    python -m ablation.memory model=cnn memory.limit_gb=1          # engine both, CPU cap 1 GiB
    python -m ablation.memory -m engine=both,vmap model=cnn,lstm   # with vs. without XLA
    python -m ablation.memory engine=both memory.predict_only=true # compile only, run nothing

Same config as ``ablation.run`` (engine, model, private, dp.*) plus ``memory.*``.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ablation.sweep.config import ConfigError, probe_settings_from_dict
from ablation.sweep.shell import (CONF_DIR, check_command_line, config_or_exit, exit_with_error,
                                  experiment_name, follow_the_sweep, launcher_of)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from ablation.sweep.folders import FolderBusy
    from ablation.sweep.jobs import run_memory_job
    plain, cell = config_or_exit(cfg)
    try:
        settings = probe_settings_from_dict(plain.get("memory"))
    except ConfigError as error:
        exit_with_error(error)
    hydra_cfg = HydraConfig.get()
    follow_the_sweep(launcher_of(hydra_cfg)[0])
    try:
        record = run_memory_job(cell, settings, plain, hydra_cfg.runtime.output_dir,
                                resume=cfg.resume, resume_root=cfg.paths.output_dir,
                                experiment=experiment_name())
    except (ValueError, FolderBusy) as error:  # a cap above the machine's memory, a busy folder
        exit_with_error(error)
    if hydra_cfg.mode == RunMode.RUN and record.get("status") != "ok":
        sys.exit(1)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
