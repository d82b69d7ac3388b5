"""One private training run over many processes, on JAX's multi-controller runtime.

Each process of a run calls :func:`initialize` before it touches a device (JAX's own
``jax.distributed.initialize``: a coordinator at process 0's address, collectives over gloo on
CPUs and NCCL on GPUs; with no address given JAX reads SLURM's environment itself). From then
on ``jax.devices()`` are the devices of every process, and the data-parallel DP-SGD step of
:class:`ablation.core.dpsgd.Step` (a mesh over the batch axis, ``shard_map``, each device
clipping its own examples, a ``psum`` of the clipped sums, the noise drawn once from the
step's key) runs unchanged across processes: the noise comes from a key every process holds,
so it is the same on every device, and so are the parameters after every step.

What changes is where arrays come from: each process holds only its own part of a batch, and
the state is replicated. :func:`global_array` and :func:`replicated` assemble those into
global arrays; :func:`local_copy` reads a replicated one back on this process;
:func:`agree` and :func:`gather` are the two host-side decisions a timing loop needs (every
process must run the same number of steps).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ProcessSet:
    """Where this process stands in a run: ``index`` of ``count``, process 0 at
    ``coordinator`` (``host:port``; None: JAX finds it in SLURM's environment)."""

    count: int = 1
    index: int = 0
    coordinator: str | None = None

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"process {self.index} of {self.count}: the index must lie in "
                             f"[0, {self.count})")

    @property
    def multi(self) -> bool:
        return self.count > 1


def initialize(processes: ProcessSet, timeout_s: int = 120) -> None:
    """Join the run (a no-op for one process). Must come before any use of a device.

    On CPUs the collectives go over gloo (JAX's CPU client has no other cross-process
    implementation); GPUs use NCCL, JAX's default there.
    """
    if not processes.multi:
        return
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # an older JAX: gloo is the default there
        pass
    kwargs: dict[str, Any] = {"num_processes": processes.count,
                              "process_id": processes.index}
    if processes.coordinator:
        kwargs["coordinator_address"] = processes.coordinator
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    except TypeError:  # a JAX without the timeout argument
        jax.distributed.initialize(**kwargs)


def is_multi_process() -> bool:
    return jax.process_count() > 1


def global_array(local: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """The global array whose part on this process's devices is ``local`` (the batch rows
    this process holds, laid out by ``sharding``); with one process, ``local`` placed there."""
    if not is_multi_process():
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def replicated(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """``tree`` (the same values on every process) as arrays replicated over ``mesh``."""
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda a: global_array(a, spec), tree)


def local_copy(tree: PyTree) -> PyTree:
    """A replicated tree as arrays on this process's first device (its whole value)."""
    if not is_multi_process():
        return tree
    return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


def agree(value: Any) -> Any:
    """Process 0's ``value`` (a number or bool), on every process: a decision every process
    must take alike (how many steps to run), though each measured its own clock."""
    if not is_multi_process():
        return value
    from jax.experimental import multihost_utils
    out = multihost_utils.broadcast_one_to_all(np.asarray(value))
    return type(value)(np.asarray(out).item())


def gather(values: Any) -> np.ndarray:
    """``[processes, ...]``: every process's ``values`` (numbers), on every process."""
    values = np.asarray(values, np.float64)
    if not is_multi_process():
        return values[None]
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(values.astype(np.float32)), np.float64)
