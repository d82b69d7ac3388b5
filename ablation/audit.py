"""``python -m ablation.audit [overrides]``: is the engine's step private? Canaries will say.

Examples::

    python -m ablation.audit model=ffnn engine=ghost              # one cell, its controls
    python -m ablation.audit -m engine=both,ghost,jit,vmap,none model=ffnn,cnn
    python -m ablation.audit engine=jit engine.loop=scan train.steps_per_call=4
    python -m ablation.audit engine=both engine.devices=2         # data-parallel step

Takes the same config as ``ablation.run`` (``model``, ``engine`` and its options, ``data``,
``batch_size``, ``dp.*``, ``seed``, your own ``model=custom``) plus ``audit.*``, and audits
the step that a training run of that cell would build (:mod:`ablation.measure.audit`): μ̂
against 1/σ per test, Clopper–Pearson lower bounds on ε against the claim's, the one-run bound
of a whole training run with canaries against the accountant's ε, and the controls (broken
mechanisms) it must catch. Writes ``result.json`` (``kind: audit``) in the Hydra job folder.
Exit status 0 when private (and every control caught), 1 when a test fails or a control is
missed, 2 for a cell it cannot audit.
"""

from __future__ import annotations

import os
import re
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ablation.sweep.shell import (CONF_DIR, check_command_line, config_or_exit, exit_with_error,
                                  experiment_name)


def host_devices(argv: list[str]) -> None:
    """On a CPU, make as many XLA host devices as the largest ``engine.devices=`` asks for,
    and at least 2 (an experiment may pin ``engine.devices=2``): it must be set before JAX
    starts, and this command audits in its own process. Nothing is timed, so extra host
    devices cost nothing here; GPUs are unaffected."""
    counts = [int(n) for arg in argv if arg.startswith(("engine.devices=", "+engine.devices="))
              for n in re.findall(r"\d+", arg.partition("=")[2])]
    flags = os.environ.get("XLA_FLAGS", "")
    if "force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                                   f"{max([2, *counts])}").strip()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from ablation.sweep.config import ConfigError, audit_settings_from_dict
    from ablation.sweep.audit_job import run_audit_job
    plain, cell = config_or_exit(cfg)
    try:
        settings = audit_settings_from_dict(plain.get("audit"))
    except ConfigError as error:
        exit_with_error(error)
    hydra_cfg = HydraConfig.get()
    record = run_audit_job(cell, settings, plain, hydra_cfg.runtime.output_dir,
                           experiment=experiment_name())
    if hydra_cfg.mode == RunMode.RUN:
        if record.get("refused"):
            sys.exit(2)
        if not (record.get("audit_passed") and record.get("audit_powered")):
            sys.exit(1)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    host_devices(sys.argv[1:])
    main()
