"""Run a worker task in a fresh child process, with a time limit and an optional memory cap."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from ablation.report.records import read_json, write_json
from ablation.sweep.failures import status_of_exit


@dataclasses.dataclass(frozen=True)
class ChildOutcome:
    """How a worker ended. ``result`` is what it wrote, or a status record made for it."""

    result: dict[str, Any]
    returncode: int | None
    wall_s: float
    timed_out: bool


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """A worker's environment: this one's plus ``env``, unbuffered output, this process as its
    parent to watch, and the repository on its path (it starts as a module from the
    repository's own package, whatever the caller's cwd)."""
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    child_env["DPSGD_WORKER_PARENT"] = str(os.getpid())
    root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH")) if p)
    return child_env


def run_process(argv: list[str], *, timeout_s: float, env: Mapping[str, str] | None = None,
                memory_capped: bool = False, out_path: Path | None = None,
                log_path: Path | None = None) -> ChildOutcome:
    """Run ``argv`` in its own process group, wait at most ``timeout_s``, read ``out_path``.

    The child inherits stdout/stderr (its progress bar shows live), or with ``log_path`` writes
    both there (a memory try that runs out of memory on purpose prints allocator noise that
    belongs in its log, not on the console). On timeout its whole
    process group is killed and the result says ``timeout``; a child that ends without writing
    ``out_path`` gets a status from its exit (:func:`ablation.sweep.failures.status_of_exit`), where
    ``memory_capped`` says it ran under a memory cap (death by signal then means out of memory).
    """
    child_env = _child_env(env)
    if out_path is not None:
        out_path.unlink(missing_ok=True)
    start = time.perf_counter()
    log = open(log_path, "w") if log_path is not None else None  # noqa: SIM115 - closed below
    with _sigterm_raises(), contextlib.ExitStack() as stack:
        if log is not None:
            stack.enter_context(log)
        proc = subprocess.Popen(argv, env=child_env, start_new_session=True, stdout=log,
                                stderr=log)
        timed_out = False
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            returncode = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM in the parent: take the child down with it
            _kill_group(proc)
            proc.wait()
            raise
    wall_s = time.perf_counter() - start
    if timed_out:
        result = {"status": "timeout", "error": f"cell ran past its {timeout_s:g} s limit"}
    elif out_path is not None and out_path.exists():
        result = read_json(out_path)
        out_path.unlink()  # merged into the job's result.json by the caller
    else:
        status, reason = status_of_exit(returncode, memory_capped=memory_capped)
        result = {"status": status, "error": reason}
    return ChildOutcome(result=result, returncode=returncode, wall_s=wall_s, timed_out=timed_out)


def run_worker(spec: Mapping[str, Any], workdir: str | os.PathLike, *, timeout_s: float,
               name: str = "cell", env: Mapping[str, str] | None = None,
               memory_capped: bool = False, quiet: bool = False,
               python: str | None = None) -> ChildOutcome:
    """Run ``python -m ablation.sweep.worker`` on ``spec`` in ``workdir`` (see :func:`run_process`),
    with ``python`` as the interpreter when a framework runs in an environment of its own.

    The worker may report fields before it finishes into ``spec["partial_path"]``; they are
    merged into the result under whatever the worker wrote at the end.
    """
    workdir = Path(workdir)
    partial_path = workdir / f"{name}.partial.json"
    partial_path.unlink(missing_ok=True)
    spec_path = write_json(workdir / f"{name}.spec.json",
                           {**spec, "partial_path": str(partial_path)})
    out_path = workdir / f"{name}.out.json"
    outcome = run_process([python or sys.executable, "-m", "ablation.sweep.worker", str(spec_path),
                           str(out_path)], timeout_s=timeout_s, env=env,
                          memory_capped=memory_capped, out_path=out_path,
                          log_path=workdir / f"{name}.log" if quiet else None)
    if partial_path.exists():
        # What the task reported before it ended (a memory try's prediction), kept also when
        # the child then died; its final result, where it wrote one, has the last word.
        for key, value in read_json(partial_path).items():
            outcome.result.setdefault(key, value)
        partial_path.unlink()
    return outcome


def free_port() -> int:
    """A TCP port free on this machine now (for a local run's coordinator)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_workers(specs: list[Mapping[str, Any]], workdir: str | os.PathLike, *,
                timeout_s: float, grace_s: float = 60.0, failed_grace_s: float = 5.0,
                env: Mapping[str, str] | None = None, python: str | None = None,
                envs: list[Mapping[str, str]] | None = None) -> list[ChildOutcome]:
    """Run the processes of one run at once (``python -m ablation.sweep.worker`` on each of
    ``specs``, process i writing ``process-i.*`` files in ``workdir``) and watch them together.

    The run is as good as its worst process: once one ends without an ok result (an error,
    a death by signal), the others get ``failed_grace_s`` seconds to say their own error and
    are then killed (a peer blocked in a collective with a dead process never returns by
    itself); once one ends ok, the others get ``grace_s`` to finish too. So no process
    outlives the run; past ``timeout_s`` all are killed.
    Each outcome is its process's own; one killed here says ``killed after process k ...``.
    ``envs`` adds to each process's environment (its own GPUs).
    """
    workdir = Path(workdir)
    child_env = _child_env(env)
    outs, procs = [], []
    start = time.perf_counter()
    with _sigterm_raises():
        try:
            for i, spec in enumerate(specs):
                spec_path = write_json(workdir / f"process-{i}.spec.json", dict(spec))
                out = workdir / f"process-{i}.out.json"
                out.unlink(missing_ok=True)
                outs.append(out)
                procs.append(subprocess.Popen(
                    [python or sys.executable, "-m", "ablation.sweep.worker", str(spec_path),
                     str(out)], env={**child_env, **(envs[i] if envs else {})},
                    start_new_session=True))
            return _watch(procs, outs, timeout_s, (grace_s, failed_grace_s), start)
        except BaseException:  # Ctrl-C or SIGTERM in the parent: take every process down
            for proc in procs:
                _kill_group(proc)
                proc.wait()
            raise


def _watch(procs: list[subprocess.Popen], outs: list[Path], timeout_s: float,
           graces: tuple[float, float], start: float) -> list[ChildOutcome]:
    """Wait for ``procs`` as :func:`run_workers` says; their outcomes, in order."""
    ended: dict[int, tuple[int, float]] = {}  # process -> (return code, wall seconds)
    first_end: tuple[int, bool, float] | None = None  # (process, ok, when)
    killed: dict[int, str] = {}
    while len(ended) < len(procs):
        now = time.perf_counter()
        for i, proc in enumerate(procs):
            if i in ended or proc.poll() is None:
                continue
            ended[i] = (proc.returncode, now - start)
            if first_end is None:
                first_end = (i, _ok(outs[i]), now)
        if len(ended) == len(procs):
            break
        overdue = now - start > timeout_s
        grace_s = 0.0 if first_end is None else graces[0] if first_end[1] else graces[1]
        late = first_end is not None and now - first_end[2] > grace_s
        if overdue or late:
            for i, proc in enumerate(procs):
                if i not in ended:
                    _kill_group(proc)
                    proc.wait()
                    ended[i] = (proc.returncode, time.perf_counter() - start)
                    killed[i] = ("timeout" if overdue else
                                 f"killed {grace_s:g} s after process {first_end[0]} "
                                 f"{'finished' if first_end[1] else 'failed'}, still running "
                                 "(hung)")
            break
        time.sleep(0.1)
    outcomes = []
    for i, out in enumerate(outs):
        returncode, wall_s = ended[i]
        if i in killed and killed[i] == "timeout":
            result = {"status": "timeout", "error": f"cell ran past its {timeout_s:g} s limit"}
        elif i in killed:
            result = {"status": "error", "error": killed[i]}
        elif out.exists():
            result = read_json(out)
            out.unlink()
        else:
            status, reason = status_of_exit(returncode, memory_capped=False)
            result = {"status": status, "error": reason}
        outcomes.append(ChildOutcome(result, returncode, wall_s, i in killed))
    return outcomes


def _ok(out: Path) -> bool:
    try:
        return out.exists() and read_json(out).get("status", "ok") == "ok"
    except (OSError, ValueError):
        return False


#: The signals a scheduler or a terminal sends before it kills a job: SIGTERM (``kill``,
#: ``timeout``, SLURM's time limit or preemption), SIGHUP (the terminal went away), SIGUSR1 and
#: SIGUSR2 (SLURM's ``--signal`` warning; submitit's time-limit and preemption signal).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGUSR1",
                                                        "SIGUSR2") if hasattr(signal, name))


class Terminated(SystemExit):
    """The sweep was told to stop (one of :data:`STOP_SIGNALS`) while a cell ran;
    ``signal_name`` says which signal, and :meth:`forward` hands it on to the handler that
    was installed before (submitit's, which requeues the job) once the record is written."""

    def __init__(self, signum: int, previous: Any = None):
        super().__init__(128 + signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.previous = previous

    def forward(self) -> None:
        """Run the previous Python handler of the signal, if there was one."""
        if callable(self.previous):
            self.previous(self.signum, None)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn the stop signals into :class:`Terminated` while a child runs, so that ``timeout``,
    a batch scheduler, submitit or ``kill`` stopping the sweep also stops the child, which
    lives in its own session, and the cell still gets its record."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def _raise(signum: int, frame: Any) -> None:
        raise Terminated(signum, previous.get(signum))

    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, _raise)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def watch_sweep(pid: int, period_s: float = 1.0) -> None:
    """End this job (as if by SIGTERM: its cell gets a ``timeout`` record) once the sweep
    process ``pid`` that launched it is gone: a local launcher's jobs must not run on,
    unwatched and timed under someone else's load, after their sweep was killed."""
    def watch() -> None:
        while _alive(pid):
            time.sleep(period_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-sweep", daemon=True).start()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
