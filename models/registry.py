"""One registry: model name → network, per-example loss and dataset spec."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from models import nets

PyTree = object
#: ``loss(params, x1, y1) -> scalar`` for ONE example (no batch axis).
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Shape of a training set as the paper prepared it (synthetic data copies it exactly).

    Attributes:
      name: dataset name (``adult``, ``mnist``, ``imdb``, ``cifar10``).
      n_train: training-set size (45,220 / 60,000 / 25,000 / 50,000).
      input_shape: shape of ONE example, without the batch axis.
      input_dtype: numpy dtype name of the inputs (``float32`` or ``int32`` token ids).
      num_classes: number of label values; labels are ``int32`` in ``[0, num_classes)``.
      vocab_size: for token inputs, ids are drawn from ``[0, vocab_size)``.
    """

    name: str
    n_train: int
    input_shape: tuple[int, ...]
    input_dtype: str
    num_classes: int
    vocab_size: int | None = None


ADULT = DatasetSpec("adult", 45_220, (104,), "float32", 2)
MNIST = DatasetSpec("mnist", 60_000, (28, 28, 1), "float32", 10)
IMDB = DatasetSpec("imdb", 25_000, (nets.IMDB_SEQ_LEN,), "int32", 2, vocab_size=10_000)
CIFAR10 = DatasetSpec("cifar10", 50_000, (32, 32, 3), "float32", 10)
DATASETS: Mapping[str, DatasetSpec] = {d.name: d for d in (ADULT, MNIST, IMDB, CIFAR10)}


def softmax_cross_entropy(logits: jax.Array, label: jax.Array) -> jax.Array:
    """Cross-entropy of one example: ``logits [K]``, integer ``label []`` → scalar."""
    return -jnp.take(jax.nn.log_softmax(logits), label)


def sigmoid_cross_entropy(logit: jax.Array, label: jax.Array) -> jax.Array:
    """Binary cross-entropy of one logit ``[1]`` and a label in {0, 1}, numerically stable."""
    z = logit[0]
    return jnp.maximum(z, 0) - z * label.astype(z.dtype) + jnp.log1p(jnp.exp(-jnp.abs(z)))


@dataclasses.dataclass(frozen=True)
class Model:
    """A network with its per-example loss and the dataset it trains on.

    ``net`` is a batched Haiku network without RNG (``apply(params, x[B, ...]) -> [B, K]``).
    ``loss(params, x1, y1)`` is the loss of ONE example: the contract of
    :func:`ablation.clipped_grad_sum`. ``paper_n_params`` is the paper's count.
    """

    name: str
    net: hk.Transformed
    dataset: DatasetSpec
    binary_logit: bool
    paper_n_params: int

    def init(self, key: jax.Array) -> PyTree:
        """Parameters initialised from ``key`` (float32)."""
        return self._compiled_init(key)

    @functools.cached_property
    def _compiled_init(self) -> Callable[[jax.Array], PyTree]:
        # Compiled (an eager init of cifar10 takes seconds) and kept, so that calling init
        # again reuses the executable.
        shape, dtype = (1, *self.dataset.input_shape), self.dataset.input_dtype
        return jax.jit(lambda key: self.net.init(key, jnp.zeros(shape, dtype)))

    def logits(self, params: PyTree, x: jax.Array) -> jax.Array:
        """Batched logits: ``x [B, ...] -> [B, K]``."""
        return self.net.apply(params, x)

    def loss(self, params: PyTree, x1: jax.Array, y1: jax.Array) -> jax.Array:
        """Loss of ONE example ``x1`` (no batch axis) with integer label ``y1``: a scalar."""
        logits = self.net.apply(params, x1[None])[0]
        if self.binary_logit:
            return sigmoid_cross_entropy(logits, y1)
        return softmax_cross_entropy(logits, y1)

    def predict(self, params: PyTree, x: jax.Array) -> jax.Array:
        """Predicted class per example: ``x [B, ...] -> [B]`` int."""
        logits = self.logits(params, x)
        if self.binary_logit:
            return (logits[:, 0] > 0).astype(jnp.int32)
        return jnp.argmax(logits, axis=-1)


def count_params(params: PyTree) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def _build(name: str, unroll: str) -> Model:
    builders = {
        "logreg": (nets.logreg, ADULT, True, 105),
        "ffnn": (nets.ffnn, ADULT, False, 5_352),
        "cnn": (nets.cnn, MNIST, False, 26_010),
        "embed": (nets.embed, IMDB, False, 160_370),
        "lstm": (nets.make_lstm(unroll), IMDB, False, 1_081_002),
        "cifar10": (nets.cifar10, CIFAR10, False, 605_226),
    }
    fn, dataset, binary, n_params = builders[name]
    return Model(name, hk.without_apply_rng(hk.transform(fn)), dataset, binary, n_params)


MODEL_NAMES: tuple[str, ...] = ("logreg", "ffnn", "cnn", "embed", "lstm", "cifar10")
#: Models built with their default options; use :func:`get_model` for options (lstm unroll).
MODELS: Mapping[str, Model] = {name: _build(name, "dynamic") for name in MODEL_NAMES}


def get_model(name: str, *, unroll: str = "dynamic") -> Model:
    """The model called ``name``; ``unroll`` (``static``/``dynamic``) applies to the lstm only.

    The lstm scans its 256 tokens by default (``dynamic``); ``static`` unrolls them as the
    paper's code did (slow to compile on XLA:CPU).

    Raises:
      ValueError: for an unknown name (the message lists the valid ones) or unroll value.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    if unroll not in ("static", "dynamic"):
        raise ValueError(f"unknown lstm unroll {unroll!r}; valid: static, dynamic")
    if name != "lstm" or unroll == "dynamic":
        return MODELS[name]
    return _build(name, unroll)
