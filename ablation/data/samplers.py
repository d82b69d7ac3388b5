"""Training data on the device, and batch samplers whose work stays out of the timed region.

``load_training_set`` gives the whole training set as device arrays (synthetic by default:
the real dataset's shapes, dtypes and class counts, deterministic by seed; ``real`` reads the
cached files through :mod:`ablation.data.datasets`). The samplers draw every batch on the
device with
one compiled call, so a step is timed without any host copy or data work inside the clock.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models import DatasetSpec

SOURCES = ("synthetic", "real", "arrays")


class TrainingSet(NamedTuple):
    """A training set on the device."""

    x: jax.Array  # [N, *input_shape], float32 or int32 token ids
    y: jax.Array  # [N] int32 labels in [0, num_classes)

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


class RunKeys(NamedTuple):
    """The independent random streams of one run, each from its own split of the seed.

    No two uses share a key: the synthetic data, the initial parameters, the batch sampler and
    the DP noise (folded with the step index, so every step gets a fresh noise key).
    """

    data: jax.Array
    init: jax.Array
    sampler: jax.Array
    noise: jax.Array


def run_keys(seed: int) -> RunKeys:
    """The four streams of a run with this seed."""
    return RunKeys(*jax.random.split(jax.random.key(seed), 4))


class Batch(NamedTuple):
    """One batch. ``mask`` is None for fixed-size batches, ``[capacity]`` for Poisson ones."""

    x: jax.Array  # [B, ...]
    y: jax.Array  # [B]
    mask: jax.Array | None = None  # [B] 1.0 = a sampled example, 0.0 = a padded slot


def synthetic(spec: DatasetSpec, key: jax.Array, n: int | None = None) -> TrainingSet:
    """Random data with the real dataset's shapes and dtypes, generated on the device.

    Inputs are uniform in [0, 1) (images, Adult features) or uniform token ids in
    ``[0, vocab_size)``; labels are uniform over the classes. Same key ⇒ same data (use the
    ``data`` stream of :func:`run_keys`).
    """
    n = spec.n_train if n is None else n
    return TrainingSet(*_random_data(key, (n, *spec.input_shape), spec.input_dtype,
                                     spec.vocab_size, spec.num_classes))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _random_data(key: jax.Array, shape: tuple[int, ...], dtype: str, vocab_size: int | None,
                 num_classes: int) -> tuple[jax.Array, jax.Array]:
    # Module-level and compiled once per shape: a second call (e.g. in the memory probe,
    # under a cap) reuses the executable instead of compiling again.
    kx, ky = jax.random.split(key)
    if dtype == "int32":
        x = jax.random.randint(kx, shape, 0, vocab_size, jnp.int32)
    else:
        x = jax.random.uniform(kx, shape, jnp.dtype(dtype))
    return x, jax.random.randint(ky, (shape[0],), 0, num_classes, jnp.int32)


def load_training_set(spec: DatasetSpec, source: str, *, key: jax.Array, limit: int | None = None,
                      cache_dir: str | None = None, download: bool = True,
                      path: str | None = None) -> TrainingSet:
    """The training set for ``spec`` on the device, optionally only its first ``limit`` rows.

    ``key`` draws synthetic data (real data ignores it); ``path`` is the ``.npz`` file of
    ``source="arrays"`` (:mod:`ablation.data.arrays`).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; valid: {', '.join(SOURCES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"data.limit must be a positive integer, got {limit}")
    if source == "synthetic":
        n = spec.n_train if limit is None else min(limit, spec.n_train)
        return synthetic(spec, key, n)
    if source == "arrays":
        from ablation.data.arrays import load_arrays
        x, y = load_arrays(path, spec)
    else:
        from ablation.data import datasets  # real files: only imported when asked for
        x, y = datasets.load(spec.name, cache_dir=cache_dir, download=download)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return TrainingSet(jax.device_put(x), jax.device_put(y))


class ShuffleSampler:
    """Fixed-size batches from a fresh permutation each epoch (the remainder is dropped).

    ``batch(i)`` is batch ``i`` of the run: epoch ``i // steps_per_epoch``, position
    ``i % steps_per_epoch``. The permutation and the gather are compiled device work.
    """

    def __init__(self, data: TrainingSet, batch_size: int, key: jax.Array):
        if batch_size > data.size:
            raise ValueError(f"batch_size {batch_size} exceeds the training set "
                             f"({data.size} examples)")
        self.data = data
        self.batch_size = batch_size
        self.steps_per_epoch = data.size // batch_size
        self._key = key
        self._epoch = -1
        self._perm = None

        @jax.jit
        def take(x, y, perm, start):
            idx = jax.lax.dynamic_slice_in_dim(perm, start, batch_size)
            return jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)

        self._take = take
        self._permute = jax.jit(lambda key, n=data.size: jax.random.permutation(key, n))

    def batch(self, i: int) -> Batch:
        epoch, pos = divmod(i, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = self._permute(jax.random.fold_in(self._key, epoch))
            self._epoch = epoch
        x, y = self._take(self.data.x, self.data.y, self._perm, pos * self.batch_size)
        return Batch(x, y)


def poisson_capacity(expected_batch: float, n: int, sigmas: float, multiple_of: int = 1) -> int:
    """Padded capacity: the expected batch size plus ``sigmas`` binomial standard deviations,
    rounded up to a multiple of ``multiple_of`` (the devices a batch is split over)."""
    q = expected_batch / n
    capacity = int(math.ceil(expected_batch + sigmas * math.sqrt(n * q * (1 - q))))
    capacity = -(-capacity // multiple_of) * multiple_of
    return capacity if capacity <= n else n - n % multiple_of


class PoissonSampler:
    """Poisson batches padded to a fixed capacity, so one compiled step serves every batch.

    Each example joins a step independently with probability ``q = batch_size / n``. The
    sampled examples fill the first slots of a ``capacity``-long batch, in random order; the
    other slots hold randomly chosen unsampled examples with mask 0 (the engines select them
    away, so what they hold never matters). When more than ``capacity`` examples
    are sampled (rare), a uniformly random subset of ``capacity`` of them is kept; the
    overflow is counted in ``overflow_steps`` and accounted by the PLD accountant.
    """

    def __init__(self, data: TrainingSet, batch_size: int, key: jax.Array, capacity: int):
        if batch_size > data.size:
            raise ValueError(f"batch_size {batch_size} exceeds the training set "
                             f"({data.size} examples)")
        if capacity < batch_size:
            raise ValueError(f"Poisson capacity {capacity} is below the expected batch size "
                             f"{batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.capacity = capacity
        self.sampling_rate = batch_size / data.size
        self.steps_per_epoch = data.size // batch_size
        self._key = key
        self._counts: dict[int, jax.Array] = {}  # per step index: each step counted once
        q, n = self.sampling_rate, data.size

        @jax.jit
        def sample(x, y, key):
            k_in, k_order = jax.random.split(key)
            selected = jax.random.uniform(k_in, (n,)) < q
            # Random priorities: sampled examples in [0, 1), the rest in [2, 3). The `capacity`
            # lowest are the sampled ones in random order (a random subset on overflow), then
            # padding slots drawn at random from the unsampled examples (never the same few).
            priority = jax.random.uniform(k_order, (n,)) + jnp.where(selected, 0.0, 2.0)
            _, idx = jax.lax.top_k(-priority, capacity)
            mask = (jnp.take(priority, idx) < 2.0).astype(jnp.float32)
            return (jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0), mask,
                    jnp.sum(selected.astype(jnp.int32)))

        self._sample = sample

    def batch(self, i: int) -> Batch:
        x, y, mask, count = self._sample(self.data.x, self.data.y, jax.random.fold_in(self._key, i))
        self._counts[i] = count
        return Batch(x, y, mask)

    def stats(self) -> dict:
        """Sampled batch sizes of the steps drawn so far (each step once, also where a timing
        burst reused prepared batches): mean, max and how many overflowed the capacity."""
        counts = (np.asarray(jax.device_get(list(self._counts.values()))) if self._counts
                  else np.zeros(0))
        return {
            "capacity": self.capacity,
            "poisson_mean_batch": float(counts.mean()) if counts.size else None,
            "poisson_max_batch": int(counts.max()) if counts.size else None,
            "poisson_overflow_steps": int((counts > self.capacity).sum()),
        }


# ---------------------------------------------------------------------------------------------
# One run over several processes: each process holds its part of every batch.


class ProcessRows:
    """Process ``index`` of ``count``'s rows of a fixed-size batch: every process draws the
    same global batch (the same permutation of the same data, from the same key) and keeps
    its equal share of the rows, in process order."""

    def __init__(self, sampler: ShuffleSampler, index: int, count: int):
        if sampler.batch_size % count:
            raise ValueError(f"a batch of {sampler.batch_size} does not divide over {count} "
                             "processes")
        self.sampler, self.index, self.count = sampler, index, count
        self.batch_size = sampler.batch_size // count  # this process's rows
        self.steps_per_epoch = sampler.steps_per_epoch
        self.data = sampler.data

    def batch(self, i: int) -> Batch:
        rows = slice(self.index * self.batch_size, (self.index + 1) * self.batch_size)
        x, y, _ = self.sampler.batch(i)
        return Batch(x[rows], y[rows])


def process_shard(data: TrainingSet, index: int, count: int) -> TrainingSet:
    """Process ``index`` of ``count``'s shard of the training set: ``n // count`` examples,
    contiguous, no example in two shards (the last ``n % count`` are in none)."""
    size = data.size // count
    rows = slice(index * size, (index + 1) * size)
    return TrainingSet(data.x[rows], data.y[rows])


def process_poisson(data: TrainingSet, batch_size: int, key: jax.Array, index: int,
                    count: int, sigmas: float, devices: int = 1) -> PoissonSampler:
    """Process ``index`` of ``count``'s Poisson sampler: every example of its shard
    (:func:`process_shard`) joins a step with probability ``q = batch_size / (count·size)``,
    drawn from its own key (``fold_in(key, index)``: no two processes share one), padded to a
    capacity of its own (:func:`poisson_capacity` of its expected ``batch_size / count``).
    Together: every example of the run's ``count·size`` is in a step independently with
    probability q, once."""
    shard = process_shard(data, index, count)
    expected = batch_size // count
    capacity = poisson_capacity(expected, shard.size, sigmas, devices)
    return PoissonSampler(shard, expected, jax.random.fold_in(key, index), capacity)

