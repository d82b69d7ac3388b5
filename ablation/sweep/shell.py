"""What both Hydra entry points share: the config folder and the one-line error exit."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from ablation.sweep.config import ConfigError, cell_from_dict

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def launcher_minutes(timeout_s: Any) -> int:
    """A cluster job's limit in minutes: the cell's own limit plus 5 minutes of start-up."""
    return int(math.ceil(float(timeout_s) / 60)) + 5


# ``${ablation_minutes:${timing.timeout_s}}`` in conf/hydra/launcher/*.yaml.
OmegaConf.register_new_resolver("ablation_minutes", launcher_minutes, replace=True)


def exit_with_error(message: object) -> NoReturn:
    """Bad input on the command line: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def config_or_exit(cfg: DictConfig):
    """The plain resolved config and its typed cell; bad values exit 2 with one line."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    try:
        return plain, cell_from_dict(plain)
    except ConfigError as error:
        exit_with_error(error)


def experiment_name() -> str | None:
    """The ``experiment=`` chosen on the command line (None without one)."""
    from hydra.core.hydra_config import HydraConfig
    choice = HydraConfig.get().runtime.choices.get("experiment")
    return None if choice in (None, "null") else str(choice)


def config_groups() -> dict[str, list[str]]:
    """The config groups of ``conf/`` and their options (``engine``: both, ghost, jit, ...)."""
    root = Path(CONF_DIR)
    return {group.name: sorted(p.stem for p in group.glob("*.yaml"))
            for group in sorted(root.iterdir()) if group.is_dir() and group.name != "hydra"}


def check_command_line(argv: list[str]) -> None:
    """Before Hydra composes anything, one line (exit 2) instead of Hydra's page of text for:
    an unknown option of a config group (``engine=fastest``, also in a sweep's comma list) and
    an unknown key (``timing.max_step=3``, with or without ``+``), naming what is valid."""
    from ablation.sweep.config import ConfigError, check_known_keys
    groups = config_groups()
    for arg in argv:
        if arg.startswith("-"):
            continue  # Hydra's own options (--config-dir=..., --cfg, -m)
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key.startswith("hydra"):
            continue
        if key in groups:
            if "(" in value:
                continue  # a sweep function that Hydra expands itself
            for option in value.split(","):
                if option not in groups[key] and option not in ("null", ""):
                    exit_with_error(f"unknown {key} {option!r}; valid: "
                                    f"{', '.join(groups[key])}")
            continue
        head, _, rest = key.partition(".")
        try:
            check_known_keys({head: {rest: None} if rest else None})
        except ConfigError as error:
            exit_with_error(error)


def launcher_of(hydra_cfg: Any) -> tuple[str, int]:
    """Which launcher runs this job (``basic``, ``local``, ``slurm``) and how many cells it lets
    run at once on one machine (the records say so: concurrent timing corrupts numbers)."""
    launcher = hydra_cfg.get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    if "SerialSubmititLauncher" in target or target.endswith("LocalLauncher"):
        parallel = launcher.get("array_parallelism")
        return "local", int(parallel) if parallel else 1 << 10  # submitit's own: all at once
    if target.endswith("SlurmLauncher"):
        return "slurm", 1  # one allocation (and GPU) per cell
    return "basic", 1
