"""One writer per folder: a sweep (or a single job) holds its folder for as long as it runs.

Two sweeps started within the same second land in one folder (Hydra names it to the second),
and their jobs would write the same worker files. Each therefore takes an exclusive lock on a
file in its folder first; a second one finds it held and stops with one line, before writing
anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO, Iterator

LOCK_FILE = ".lock"


class FolderBusy(RuntimeError):
    """The folder is held by another running sweep or job; the message names it."""


def hold_folder(folder: Path, what: str) -> IO[str]:
    """Lock ``folder`` for this process (released when it exits, however it exits).

    Raises:
      FolderBusy: another process holds it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FolderBusy(f"{folder} is in use by {holder}: start the {what} into another folder "
                         f"(hydra.sweep.dir=... or hydra.run.dir=...), or wait for it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"a {what} (pid {os.getpid()})\n")
    handle.flush()
    return handle


@contextlib.contextmanager
def holding(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder`` (:func:`hold_folder`) for the ``with`` block."""
    handle = hold_folder(folder, what)
    try:
        yield
    finally:
        handle.close()
