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
    """No persistent compilation cache: every cell pays (and reports) its own compile."""
    import jax
    for option, value in (("jax_enable_compilation_cache", False),):
        try:
            jax.config.update(option, value)
        except (AttributeError, KeyError, ValueError):
            pass


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


def _timing(spec: dict[str, Any]) -> dict[str, Any]:
    from ablation.measure.settings import cell_from_plain
    cell = cell_from_plain(spec["cell"])
    if cell.engine == "opacus":
        from ablation.reference.opacus import time_cell_torch
        return time_cell_torch(cell, spec["noise_multiplier"])
    from ablation.measure.timing import time_cell
    return time_cell(cell, spec["noise_multiplier"])


def _memory_try(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    try:  # synchronous dispatch: an allocation failure surfaces where it happens, as itself
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    except (AttributeError, KeyError, ValueError):
        pass
    from ablation.measure.probe import try_batch
    from ablation.measure.settings import cell_from_plain
    from ablation.report.records import write_json
    partial = spec.get("partial_path")

    def on_predicted(predicted_bytes: int) -> None:
        if partial:
            write_json(partial, {"predicted_bytes": predicted_bytes})

    return try_batch(cell_from_plain(spec["cell"]), spec["noise_multiplier"],
                     spec["batch_size"], predict_only=spec.get("predict_only", False),
                     cap_bytes=spec.get("cap_bytes"), n_train=spec.get("n_train"),
                     on_predicted=on_predicted)


def _environment(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``env`` a record of ``spec["engine"]`` would carry on this machine (for resume)."""
    from ablation.measure.settings import REFERENCE_ENGINES
    if spec.get("engine") in REFERENCE_ENGINES:
        from ablation.reference.opacus import environment_torch, torch_device
        return {"env": environment_torch(torch_device())}
    from ablation.report.records import environment
    return {"env": environment()}


def _expected(error: BaseException) -> bool:
    """Errors whose message says it all (bad input, missing data, out of memory): no traceback."""
    from ablation.data.datasets import DatasetUnavailable
    from ablation.sweep.failures import is_out_of_memory
    return isinstance(error, (DatasetUnavailable, ValueError)) or is_out_of_memory(error)


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

    from ablation.report.records import environment, one_line, read_json, write_json
    from ablation.sweep.failures import status_of

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
        try:
            result["env"] = environment()
        except Exception as error:  # noqa: BLE001
            result["env"] = {"error": one_line(error)}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
