"""The child process that measures one cell: ``python -m ablation.sweep.worker SPEC OUT``.

Each cell runs in a fresh process, so no cell's compile caches, allocator state or failures
reach the next. SPEC is a JSON file written by the parent; OUT receives the measurement (or
the status and one-line error of the failure) atomically.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any, Callable


def _isolate_jax() -> None:
    """No persistent compilation cache: every cell pays (and reports) its own compile.
    (A worker of another framework's environment has no JAX: nothing to isolate.)"""
    try:
        import jax
    except ImportError:
        return
    for option, value in (("jax_enable_compilation_cache", False),):
        try:
            jax.config.update(option, value)
        except (AttributeError, KeyError, ValueError):
            pass


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the process that started it dies (even by
    SIGKILL), so no cell runs on unwatched, without its time limit or its record."""
    import ctypes
    import os
    import signal
    parent = os.environ.get("DPSGD_WORKER_PARENT")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the parent's own handlers still stop the worker
    if parent and os.getppid() != int(parent):  # the parent died before the line above
        os._exit(1)


def run_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Dispatch a spec to the function that handles its task."""
    task = spec["task"]
    handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "timing": _timing,
        "memory_try": _memory_try,
        "device_info": _device_info,
        "environment": _environment,
    }
    return handlers[task](spec)


def _join_run(spec: dict[str, Any]) -> None:
    """A process of a run of several: join it (``jax.distributed``) before any device use."""
    rank = spec.get("process")
    if rank is None:
        return
    from ablation.core.distributed import ProcessSet, initialize
    initialize(ProcessSet(spec["cell"]["processes"], rank, spec.get("coordinator")),
               timeout_s=int(spec.get("join_timeout_s", 120)))


def _timing(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one cell with its framework's timing (each imported only when it runs)."""
    from ablation.measure.settings import cell_from_plain
    cell = cell_from_plain(spec["cell"])
    sigma = spec["noise_multiplier"]
    _join_run(spec)
    _check_twin(cell)
    if cell.engine == "opacus":
        from ablation.reference.opacus import time_cell_torch
        return time_cell_torch(cell, sigma)
    if cell.engine == "backpack":
        from ablation.reference.backpack import time_cell_backpack
        return time_cell_backpack(cell, sigma)
    if cell.engine == "pyvacy":
        from ablation.reference.pyvacy import time_cell_pyvacy
        return time_cell_pyvacy(cell, sigma)
    if cell.engine == "tfp":
        from ablation.reference.tfp import time_cell_tfp
        return time_cell_tfp(cell, sigma, spec["dataset"])
    if cell.engine == "jax_privacy":
        from ablation.reference.jax_privacy import time_cell_jax_privacy
        return time_cell_jax_privacy(cell, sigma)
    from ablation.measure.timing import time_cell
    return time_cell(cell, sigma)


#: Reference rows written in another framework: they run a twin of the model written there.
TWIN_ENGINES = ("opacus", "backpack", "pyvacy", "tfp")


def _check_twin(cell: Any) -> None:
    """A PyTorch or TensorFlow row needs the model's twin in that framework and its data:
    the registered models have theirs; a custom model or ``data=arrays`` has none."""
    if cell.engine in TWIN_ENGINES and (cell.model == "custom" or cell.data == "arrays"):
        what = "a custom model" if cell.model == "custom" else "data=arrays"
        raise ValueError(f"engine={cell.engine} runs a twin of the model written in its own "
                         f"framework, which {what} does not have; the JAX engines (both, jit, "
                         "vmap, none, ghost) and jax_privacy run it")


def _memory_try(spec: dict[str, Any]) -> dict[str, Any]:
    from ablation.measure.settings import REFERENCE_ENGINES, cell_from_plain
    from ablation.report.records import write_json
    cell = cell_from_plain(spec["cell"])
    _check_twin(cell)
    if cell.engine in REFERENCE_ENGINES and cell.engine != "opacus":
        raise ValueError(f"the memory probe measures the JAX engines and Opacus, not "
                         f"engine={cell.engine}")
    if cell.engine in REFERENCE_ENGINES:
        if spec.get("predict_only"):
            raise ValueError("memory.predict_only needs a jit engine (both, jit or ghost)")
        from ablation.reference.opacus import try_batch_torch
        return try_batch_torch(cell, spec["noise_multiplier"], spec["batch_size"],
                               cap_bytes=spec.get("cap_bytes"))
    import jax
    try:  # synchronous dispatch: an allocation failure surfaces where it happens, as itself
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    except (AttributeError, KeyError, ValueError):
        pass
    from ablation.measure.probe import try_batch
    partial = spec.get("partial_path")

    def on_predicted(predicted_bytes: int) -> None:
        if partial:
            write_json(partial, {"predicted_bytes": predicted_bytes})

    return try_batch(cell, spec["noise_multiplier"], spec["batch_size"],
                     predict_only=spec.get("predict_only", False),
                     cap_bytes=spec.get("cap_bytes"), n_train=spec.get("n_train"),
                     on_predicted=on_predicted)


def _environment(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``env`` a record of ``spec["engine"]`` would carry on this machine (for resume)."""
    from importlib.metadata import version
    engine = spec.get("engine")
    if engine == "tfp":
        from ablation.reference.tfp import environment_tf
        return {"env": environment_tf()}
    if engine in ("opacus", "backpack", "pyvacy"):
        from ablation.reference.torch_nets import environment_torch, torch_device
        # Only this framework's own version: resuming an Opacus cell needs no BackPACK.
        package = {"opacus": "opacus", "backpack": "backpack-for-pytorch"}.get(engine)
        extra = {engine: version(package) if package else None}
        return {"env": environment_torch(torch_device(), **extra)}
    from ablation.report.records import environment
    env = environment()
    if engine == "jax_privacy":
        env["jax_privacy"] = version("jax-privacy")
    return {"env": env}


def _environment_or_less(spec: dict[str, Any]) -> dict[str, Any]:
    """The env of the cell's framework (a failed TF cell too: no JAX in its environment), else
    what can be said without a framework (the code and the machine), never nothing."""
    from ablation.report.records import environment, one_line
    engine = (spec.get("cell") or {}).get("engine") or spec.get("engine")
    try:
        return _environment({"engine": engine})["env"]
    except Exception:  # noqa: BLE001 - the framework itself may be what failed
        try:
            return environment(devices=False)
        except Exception as error:  # noqa: BLE001
            return {"error": one_line(error)}


def _expected(error: BaseException) -> bool:
    """Errors whose message says it all (bad input, missing data, a framework that is not
    installed, out of memory): no traceback."""
    from ablation.data.datasets import DatasetUnavailable
    from ablation.sweep.failures import is_out_of_memory
    return (isinstance(error, (DatasetUnavailable, ValueError, ImportError))
            or is_out_of_memory(error))


def _device_info(spec: dict[str, Any]) -> dict[str, Any]:
    """The first device's platform, kind and memory in bytes (GPU: what XLA may allocate)."""
    import os

    import jax
    device = jax.devices()[0]
    total = None
    if device.platform == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        stats = device.memory_stats() or {}
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
        if "bytes_limit" in stats:
            total = int(stats["bytes_limit"] / fraction)
    return {"platform": device.platform, "device_kind": device.device_kind,
            "device_count": len(jax.devices()), "total_bytes": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec")
    parser.add_argument("out")
    args = parser.parse_args(argv)

    from ablation.report.records import one_line, read_json, write_json
    from ablation.sweep.failures import status_of

    _die_with_parent()
    spec = read_json(args.spec)
    _isolate_jax()
    try:
        result = run_task(spec)
        result.setdefault("status", "ok")
        result.setdefault("error", None)
    except Exception as error:  # noqa: BLE001 - every failure becomes a record
        if _expected(error):
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc(file=sys.stderr)
        result = {"status": status_of(error), "error": one_line(error)}
    if "env" not in result:  # PyTorch cells bring their own (torch's device, not JAX's)
        result["env"] = _environment_or_less(spec)
    if "config_hash" in spec:  # which cell this is, for the parent to check
        result["config_hash"] = spec["config_hash"]
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
