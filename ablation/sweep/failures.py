"""Classify a failure as out-of-memory or another error, by type and status, never by log text.

Out of memory is: Python's ``MemoryError`` (numpy and host allocations), an XLA runtime
error whose status code is ``RESOURCE_EXHAUSTED`` (the code XLA's allocators return when a
buffer does not fit; JAX exposes the status only as the code that leads the exception's
message, so that structured prefix is what is compared), or PyTorch's ``OutOfMemoryError``.
A worker that died by a signal while limited is only a ``crash``: the memory probe runs it
again without the limit, and calls it out of memory only if it then runs.
"""

from __future__ import annotations

import signal

#: XLA's canonical status code for an allocation that did not fit.
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"


#: absl status codes, as XLA's runtime errors lead their messages with them.
STATUS_CODES = frozenset({
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED"})


def xla_status_code(error: BaseException) -> str | None:
    """The XLA status code an error raised by the runtime carries, e.g. ``RESOURCE_EXHAUSTED``.

    JAX raises ``JaxRuntimeError`` (asynchronous dispatch) or ``ValueError`` (synchronous CPU
    dispatch) for a failed XLA status and exposes the status only as the code that leads the
    message; that structured prefix is read, nothing else of the text.
    """
    if not isinstance(error, (RuntimeError, ValueError)):
        return None
    code, sep, _ = str(error).partition(":")
    return code if sep and code in STATUS_CODES else None


def is_out_of_memory(error: BaseException) -> bool:
    """True when ``error`` is an allocation failure (see the module docstring)."""
    if isinstance(error, MemoryError):
        return True
    if xla_status_code(error) == RESOURCE_EXHAUSTED:
        return True
    torch_oom = _torch_oom_type()
    return torch_oom is not None and isinstance(error, torch_oom)


def _torch_oom_type() -> type | None:
    import sys
    torch = sys.modules.get("torch")  # only if the worker already uses torch
    return getattr(torch, "OutOfMemoryError", None) if torch is not None else None


def status_of(error: BaseException) -> str:
    """``oom`` or ``error`` for an exception raised in a cell."""
    return "oom" if is_out_of_memory(error) else "error"


#: Status of a worker that died by a signal while memory-limited: to be verified, not trusted.
CRASH = "crash"


def status_of_exit(returncode: int, *, memory_capped: bool) -> tuple[str, str]:
    """Status and a one-line reason for a worker that ended without writing its result.

    A worker killed by a signal under a memory limit is a ``crash`` (the kernel's OOM killer
    sends SIGKILL, an allocator that aborts SIGABRT, but so does a failed XLA check): the
    caller decides, with evidence, whether it was out of memory. Anything else is an error.
    """
    if returncode < 0:
        sig = signal.Signals(-returncode)
        if memory_capped and sig in (signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV,
                                     signal.SIGBUS):
            return CRASH, f"worker killed by {sig.name} under the memory limit"
        return "error", f"worker killed by {sig.name}"
    return "error", f"worker exited with code {returncode} without writing a result"
