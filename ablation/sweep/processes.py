"""Who starts the processes of a run of several: this job, or a launcher that started each.

``distributed.processes=N`` with nothing else on one machine: this job starts the N worker
processes itself, with a coordinator on a free local port (a try without a cluster). Under a
launcher that starts one task per process (SLURM's ``srun``, submitit's SLURM or local
executor with ``tasks_per_node``/``nodes``), each task's job is one process of the run: its
rank comes from the launcher (submitit's job environment, else SLURM's ``SLURM_PROCID``), or
from ``distributed.process_id`` for processes started by hand. Process 0 writes the record.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

from ablation.measure.settings import CellConfig


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this job takes part in its cell's run.

    Attributes:
      rank: this job's process, or None when it starts all ``processes`` itself.
      coordinator: process 0's ``host:port``; None where JAX reads it from SLURM.
      by: who started the processes (``this job``, ``submitit``, ``SLURM``, ``by hand``).
    """

    rank: int | None
    coordinator: str | None
    by: str

    @property
    def writes_record(self) -> bool:
        return self.rank in (None, 0)


def _task() -> tuple[int, int, str, str] | None:
    """(rank, tasks, job id, launcher) of the task this job runs in, if a launcher started
    several."""
    try:
        import submitit
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            kind = "submitit local" if "SUBMITIT_LOCAL_JOB_ID" in os.environ else "submitit"
            return env.global_rank, env.num_tasks, str(env.job_id), kind
    except Exception:  # noqa: BLE001 - not inside a submitit job (or no submitit at all)
        pass
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return (int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                os.environ.get("SLURM_JOB_ID", "0"), "SLURM")
    return None


def _port_of(job_id: str) -> int:
    """A port every task of one job derives alike (they cannot ask each other yet)."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def plan_launch(cell: CellConfig) -> Launch:
    """How this job runs ``cell``'s processes.

    Raises:
      ValueError: the launcher started a different number of tasks than
        ``distributed.processes``, or a hand-started process has no coordinator.
    """
    from ablation.sweep.launch import free_port
    if cell.process_id is not None:
        if cell.coordinator is None:
            raise ValueError("distributed.process_id is set, so the processes were started by "
                             "hand: distributed.coordinator=HOST:PORT of process 0 is needed too")
        return Launch(cell.process_id, cell.coordinator, "by hand")
    task = _task()
    if task is not None:
        rank, tasks, job_id, kind = task
        if tasks != cell.processes:
            raise ValueError(f"the launcher started {tasks} tasks but distributed.processes="
                             f"{cell.processes}: set them equal (one process per task)")
        coordinator = cell.coordinator
        if coordinator is None and kind == "submitit local":
            coordinator = f"127.0.0.1:{_port_of(job_id)}"
        return Launch(rank, coordinator, kind)
    return Launch(None, cell.coordinator or f"127.0.0.1:{free_port()}", "this job")


def process_environments(count: int, devices_per_process: int) -> list[dict[str, str]]:
    """What each of ``count`` processes this job starts on one machine sees: on a machine with
    NVIDIA GPUs, its own ``devices_per_process`` of them (``CUDA_VISIBLE_DEVICES``: process i
    the i-th group; one process per GPU is what NCCL expects), else nothing changed (CPUs:
    every process runs on the host, gloo between them).

    Raises:
      ValueError: there are GPUs, but fewer than ``count × devices_per_process``.
    """
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return [{} for _ in range(count)]
    gpus = _visible_gpus()
    if not gpus:
        return [{} for _ in range(count)]
    need = count * devices_per_process
    if len(gpus) < need:
        raise ValueError(f"{count} processes × {devices_per_process} device(s) need {need} "
                         f"GPUs; this machine shows {len(gpus)} ({','.join(gpus)}); NCCL takes "
                         "one process per GPU (JAX_PLATFORMS=cpu runs the processes on the CPU)")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(
        gpus[i * devices_per_process:(i + 1) * devices_per_process])} for i in range(count)]


def _visible_gpus() -> list[str]:
    """This machine's NVIDIA GPUs as ``CUDA_VISIBLE_DEVICES`` names them: the variable's own
    list where it is set, else ``nvidia-smi -L``'s indices (none without the tool)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = [line for line in listing.splitlines() if line.startswith("GPU ")]
    return [str(i) for i in range(len(gpus))]
