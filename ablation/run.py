"""``python -m ablation.run [overrides]``: time one cell; ``-m`` sweeps a grid.

Examples::

    python -m ablation.run                                    # ffnn, engine both, batch 64
    python -m ablation.run -m engine=jit,vmap,both,none       # the four-engine ablation
    python -m ablation.run -m engine=both,jit model=cnn batch_size=16,64,256 private=true,false
    python -m ablation.run -m +experiment=ablation            # a paper experiment

The thin Hydra shell: it validates the config, then hands a typed cell to
:func:`ablation.sweep.jobs.run_timing_job`, which runs it in a fresh worker process.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ablation.sweep.shell import (CONF_DIR, check_command_line, config_or_exit, exit_with_error,
                                  experiment_name, follow_the_sweep, launcher_of)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from ablation.sweep.folders import FolderBusy
    from ablation.sweep.jobs import run_timing_job
    plain, cell = config_or_exit(cfg)
    hydra_cfg = HydraConfig.get()
    launcher, concurrent = launcher_of(hydra_cfg)
    follow_the_sweep(launcher)
    try:
        record = run_timing_job(cell, plain, hydra_cfg.runtime.output_dir, resume=cfg.resume,
                                resume_root=cfg.paths.output_dir, experiment=experiment_name(),
                                launcher=launcher, concurrent_cells=concurrent)
    except FolderBusy as error:
        exit_with_error(error)
    if hydra_cfg.mode == RunMode.RUN and record.get("status") != "ok":
        sys.exit(1)  # a single failed cell fails the command; a sweep goes on


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
