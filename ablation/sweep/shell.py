"""What both Hydra entry points share: the config folder and the one-line error exit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig, OmegaConf

from ablation.sweep.config import ConfigError, cell_from_dict

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


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
