"""One registry: model name → network, per-example loss and dataset spec."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from ablation.core.taps import LayeredLoss
from models import attention, nets

PyTree = object
#: ``loss(params, x1, y1) -> scalar`` for ONE example (no batch axis).
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """The shape of a training set: what synthetic data copies exactly, and what real data
    (``data=real``, ``data=arrays``) is checked against.

    Attributes:
      name: dataset name (``adult``, ``mnist``, ``imdb``, ``cifar10``, or your own).
      n_train: training-set size (45,220 / 60,000 / 25,000 / 50,000; synthetic data has as
        many examples; ``data=arrays`` takes the file's).
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
    """A network with its per-example loss and the dataset it trains on: what every engine,
    command, figure and reference row takes (the paper's six models, and yours).

    Attributes:
      name: the model's name in records, tables and figures.
      fn: the batched Haiku network, untransformed: ``inputs [B, ...] -> logits [B, K]``
        (``K = 1`` with ``binary_logit``, else ``dataset.num_classes``).
      dataset: the shape of its data (:class:`DatasetSpec`).
      binary_logit: one logit and a sigmoid cross-entropy, rather than K and a softmax one.
      paper_n_params: the parameter count the paper reports (None for models not in it).
      output_loss: ``(logits [K], label) -> scalar``, the loss of ONE example's outputs;
        default: the (sigmoid or softmax) cross-entropy.

    ``net`` is ``fn``'s transform (``apply(params, x[B, ...])``, no RNG). ``loss(params, x1,
    y1)`` is the loss of ONE example (the contract of :func:`ablation.clipped_grad_sum`); it is
    a :class:`~ablation.core.taps.LayeredLoss`, so the ghost engine can tap its layers.
    """

    name: str
    fn: Callable[[jax.Array], jax.Array]
    dataset: DatasetSpec
    binary_logit: bool = False
    paper_n_params: int | None = None
    output_loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None

    @functools.cached_property
    def loss(self) -> LayeredLoss:
        output_loss = self.output_loss or (sigmoid_cross_entropy if self.binary_logit
                                           else softmax_cross_entropy)
        return LayeredLoss(network=self.fn, output_loss=output_loss)

    @property
    def net(self) -> hk.Transformed:
        return self.loss.transformed

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

    def predict(self, params: PyTree, x: jax.Array) -> jax.Array:
        """Predicted class per example: ``x [B, ...] -> [B]`` int."""
        logits = self.logits(params, x)
        if self.binary_logit:
            return (logits[:, 0] > 0).astype(jnp.int32)
        return jnp.argmax(logits, axis=-1)


def count_params(params: PyTree) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def _build(name: str, unroll: str, pool: str, tied: bool = False) -> Model:
    builders = {
        "logreg": (nets.logreg, ADULT, True, 105),
        "ffnn": (nets.ffnn, ADULT, False, 5_352),
        "cnn": (nets.cnn if pool == "fast" else nets.make_cnn(pool), MNIST, False, 26_010),
        "embed": (nets.embed, IMDB, False, 160_370),
        "lstm": (nets.make_lstm(unroll), IMDB, False, 1_081_002),
        "cifar10": (nets.cifar10, CIFAR10, False, 605_226),
        "transformer": (attention.tied_transformer if tied else attention.transformer, IMDB,
                        False, None),
        "vit": (attention.vit, CIFAR10, False, None),
    }
    fn, dataset, binary, n_params = builders[name]
    return Model(name, fn, dataset, binary, n_params)


#: The paper's six models.
PAPER_MODEL_NAMES: tuple[str, ...] = ("logreg", "ffnn", "cnn", "embed", "lstm", "cifar10")
#: Every registered model: the paper's, then the networks people train privately today.
MODEL_NAMES: tuple[str, ...] = (*PAPER_MODEL_NAMES, "transformer", "vit")
#: Models built with their default options; use :func:`get_model` for options (lstm unroll).
MODELS: Mapping[str, Model] = {name: _build(name, "dynamic", "fast") for name in MODEL_NAMES}
UNROLLS = ("dynamic", "static")
POOLS = nets.POOLS


def get_model(name: str, *, unroll: str = "dynamic", pool: str = "fast",
              tied: bool = False) -> Model:
    """The model called ``name``; ``unroll`` (``dynamic``/``static``) applies to the lstm only,
    ``pool`` (``fast``/``xla``) to the cnn only (the same model, another max-pool gradient),
    ``tied`` to the transformer only (its classifier tied to the token table).

    The lstm scans its 256 tokens by default (``dynamic``); ``static`` unrolls them as the
    paper's code did (slow to compile on XLA:CPU).

    Raises:
      ValueError: for an unknown name (the message lists the valid ones) or unroll value.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    if unroll not in UNROLLS:
        raise ValueError(f"unknown lstm unroll {unroll!r}; valid: {', '.join(UNROLLS)}")
    if pool not in POOLS:
        raise ValueError(f"unknown cnn pool {pool!r}; valid: {', '.join(POOLS)}")
    if tied and name != "transformer":
        raise ValueError(f"tied applies to the transformer only, not {name!r}")
    if (name == "lstm" and unroll != "dynamic") or (name == "cnn" and pool != "fast") or tied:
        return _with_options(name, unroll if name == "lstm" else "dynamic",
                             pool if name == "cnn" else "fast", tied)
    return MODELS[name]


@functools.lru_cache(maxsize=8)
def _with_options(name: str, unroll: str, pool: str, tied: bool = False) -> Model:
    # One Model per option, so repeated calls share its transform and compiled code.
    return _build(name, unroll, pool, tied)
