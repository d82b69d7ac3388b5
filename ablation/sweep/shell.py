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
    """The plain resolved config and its typed cell; bad values exit 2 with one line.

    Also tells every process below where runs land (``paths.output_dir``), so that records
    written into a folder of the checkout never count as a change of its code.
    """
    import os

    from ablation.report.records import OUTPUT_DIR_VARIABLE
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        cell = cell_from_dict(plain)
    except ConfigError as error:
        exit_with_error(error)
    except Exception as error:  # noqa: BLE001 - an interpolation Hydra could not resolve
        exit_with_error(str(error).splitlines()[0])
    output_dir = (plain.get("paths") or {}).get("output_dir")
    if output_dir:
        os.environ[OUTPUT_DIR_VARIABLE] = str(Path(output_dir).resolve())
    return plain, cell


def compose_or_exit(overrides: list[str]) -> DictConfig:
    """The config of ``overrides`` composed without running Hydra's job machinery (no output
    folder): for commands that read the config and write nothing. Bad overrides exit 2."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    if any(arg.startswith("-") for arg in overrides):
        exit_with_error(f"this command takes overrides only (key=value), not "
                        f"{next(a for a in overrides if a.startswith('-'))!r}")
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except HydraException as error:
        exit_with_error(str(error).splitlines()[0])


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


#: Keys that name a folder the run writes into (checked before Hydra tries to create it).
FOLDER_KEYS = ("paths.output_dir", "hydra.run.dir", "hydra.sweep.dir")


def _check_folder(key: str, value: str) -> None:
    """One line (exit 2) when the folder ``key=value`` names cannot be created or written."""
    import os
    folder = Path(value).expanduser()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        exit_with_error(f"{key}={value}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        exit_with_error(f"{key}={value}: cannot create or write folders in {existing}")


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
        if sep and key in FOLDER_KEYS and "${" not in value:
            _check_folder(key, value)
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


#: Set by a sweep for the jobs it launches (they inherit it through submitit's local executor).
SWEEP_PID = "DPSGD_SWEEP_PID"


def follow_the_sweep(launcher: str) -> None:
    """In a job that submitit's local launcher started: stop (a ``timeout`` record) when the
    sweep that launched it is gone (:func:`ablation.sweep.launch.watch_sweep`)."""
    import os
    pid = os.environ.get(SWEEP_PID)
    if launcher == "local" and pid and int(pid) != os.getpid():
        from ablation.sweep.launch import watch_sweep
        watch_sweep(int(pid))


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
