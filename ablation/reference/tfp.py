"""Reference rows: TensorFlow Privacy's DP-Keras SGD, the paper's four TensorFlow rows.

``engine=tfp`` trains Keras twins of the paper's six models (and of the transformer and the
vit) with
``VectorizedDPKerasSGDOptimizer`` (``engine.mode=vectorized``, default) or
``DPKerasSGDOptimizer`` (``engine.mode=loop``: per-example gradients in a loop), with XLA
(``engine.xla=true``: ``jit_compile``) or without: the paper's TF2 rows. ``engine.mode=fast`` is
TF Privacy's own fast gradient clipping (``DPModel`` with a layer registry: per-example norms
from each layer's activations and output gradients, the ghost engine's idea); its registry
covers Dense, Embedding, LayerNormalization and MultiHeadAttention, and a model with any other
trainable layer is refused naming it (``DPModel`` itself would fall back to microbatches
without a word). Clipping to the global
norm C of each example, noise σ·C on the sum, divided by the batch size: the JAX engines'
DP-SGD. ``private=false`` is plain Keras SGD.

TensorFlow Privacy 0.9 pins dp-accounting 0.4.3 and numpy 1.x (and Python < 3.12), so these rows
run in an environment of their own, ``.venv-tf`` (``make tf``: tensorflow 2.15.1 and
tensorflow-privacy 0.9.0), which the sweep's worker process uses as its interpreter. This module
therefore imports neither JAX nor PyTorch; the timing protocol is the shared one
(:mod:`ablation.measure.clock`). ``train_on_batch`` returns the loss, so every TensorFlow step
is synchronised: its throughput is its latency. Tracing and XLA compilation happen in the first
step (``first_step_s``); ``compile_s`` stays null.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
    import tensorflow as tf
    # tensorflow_privacy's package init imports its v1 estimators; the optimizers are enough.
    sys.skip_tf_privacy_import = True  # type: ignore[attr-defined]
    from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras import DPKerasSGDOptimizer
    from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras_vectorized import (
                                                                                     VectorizedDPKerasSGDOptimizer)
except ImportError as _error:  # pragma: no cover - exercised outside .venv-tf
    raise ImportError("engine=tfp needs the TensorFlow Privacy environment: make tf (creates "
                      ".venv-tf with tensorflow 2.15.1 and tensorflow-privacy 0.9.0)") from _error

from ablation.measure.clock import PreparedClock, run_timing_loop
from ablation.measure.settings import CellConfig

keras = tf.keras
layers = keras.layers
MODES = ("vectorized", "loop", "fast")
VOCAB_ROWS = 10_004


def build(name: str, tied: bool = False) -> keras.Model:
    """The Keras twin of the JAX model ``name`` (NHWC images, as the Haiku models; ``tied``:
    the transformer's classifier tied to its token table)."""
    def seq(shape, *stack):
        return keras.Sequential([keras.Input(shape), *stack])

    if name == "logreg":
        return seq((104,), layers.Dense(1))
    if name == "ffnn":
        return seq((104,), layers.Dense(50, activation="relu"), layers.Dense(2))
    if name == "cnn":
        return seq((28, 28, 1),
                   layers.Conv2D(16, 8, strides=2, padding="same", activation="relu"),
                   layers.MaxPool2D(2, 1),
                   layers.Conv2D(32, 4, strides=2, padding="valid", activation="relu"),
                   layers.MaxPool2D(2, 1), layers.Flatten(),
                   layers.Dense(32, activation="relu"), layers.Dense(10))
    if name == "embed":
        return seq((256,), layers.Embedding(VOCAB_ROWS, 16), layers.GlobalAveragePooling1D(),
                   layers.Dense(16, activation="relu"), layers.Dense(2))
    if name == "lstm":
        return seq((256,), layers.Embedding(VOCAB_ROWS, 100),
                   layers.LSTM(100, return_sequences=True), layers.GlobalAveragePooling1D(),
                   layers.Dense(2))
    if name == "cifar10":
        stack: list[Any] = []
        for widths in ((32, 32), (64, 64), (128, 128)):
            stack += [layers.Conv2D(w, 3, padding="same", activation="relu") for w in widths]
            stack.append(layers.AveragePooling2D(2, 2))
        stack += [layers.Conv2D(256, 3, padding="same", activation="relu"),
                  layers.Conv2D(10, 3, padding="same"), layers.GlobalAveragePooling2D()]
        return seq((32, 32, 3), *stack)
    if tied and name != "transformer":
        raise ValueError(f"tied applies to the transformer only, not {name!r}")
    if name in ENCODERS:
        return _encoder(name, tied)
    raise ValueError(f"unknown model {name!r}")


#: models.attention's sizes (this environment has no JAX to import them from): width, blocks,
#: heads, the position table's rows, the classes; the vit's 4×4 patches; the token rows the
#: tied transformer's classes read (models.attention.TIED_CLASS_ROWS).
ENCODERS = {"transformer": dict(width=64, blocks=1, heads=2, positions=256, classes=2),
            "vit": dict(width=64, blocks=2, heads=4, positions=64, classes=10, patch=4)}
TIED_CLASS_ROWS = (1, 2)


class TiedClassifier(layers.Layer):
    """``pooled @ table[rows]ᵀ``: the classes read their vectors from an embedding layer's own
    table (the same variable, so its gradient sums both uses)."""

    def __init__(self, table: layers.Embedding, rows: Sequence[int], **kwargs):
        super().__init__(**kwargs)
        self.table, self.rows = table, tf.constant(rows)

    def call(self, pooled):
        return tf.matmul(pooled, tf.gather(self.table.embeddings, self.rows), transpose_b=True)


class PositionEmbedding(layers.Layer):
    """``h + table[:T]``: Haiku's ``hk.Embed(positions, width)(arange(T))`` added to the input."""

    def __init__(self, positions: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.shape_ = (positions, width)

    def build(self, input_shape):  # here the weight is named under the layer
        self.table = self.add_weight(name="embeddings", shape=self.shape_,
                                     initializer="random_normal")

    def call(self, h):
        return h + self.table[None, :tf.shape(h)[1]]


def _gelu(x):
    return tf.nn.gelu(x, approximate=True)  # jax.nn.gelu's default


def _encoder(name: str, tied: bool = False) -> keras.Model:
    """models.attention's transformer or vit in Keras. Layers are named after the Haiku scopes
    they twin (``block_1-attention`` for ``block_1/attention``): :func:`haiku_weights` maps
    by those names."""
    c = ENCODERS[name]
    width, heads = c["width"], c["heads"]
    if name == "transformer":
        inputs = keras.Input((c["positions"],), dtype="int32")
        table = layers.Embedding(VOCAB_ROWS, width, name="tokens")
        h = table(inputs)
    else:
        inputs = keras.Input((32, 32, 3))
        h = layers.Conv2D(width, c["patch"], strides=c["patch"], name="patches")(inputs)
        h = layers.Reshape((c["positions"], width))(h)  # (h, w) row-major, as Haiku's reshape
    h = PositionEmbedding(c["positions"], width, name="positions")(h)
    for b in range(c["blocks"]):
        block = "block" if b == 0 else f"block_{b}"

        def norm(part):
            return layers.LayerNormalization(epsilon=1e-5, name=f"{block}-{part}")

        x = norm("attention_norm")(h)
        h = h + layers.MultiHeadAttention(heads, width // heads, name=f"{block}-attention")(x, x)
        x = norm("mlp_norm")(h)
        x = layers.Dense(4 * width, activation=_gelu, name=f"{block}-mlp_in")(x)
        h = h + layers.Dense(width, name=f"{block}-mlp_out")(x)
    h = layers.LayerNormalization(epsilon=1e-5, name="final_norm")(h)
    pooled = layers.GlobalAveragePooling1D()(h)
    head = (TiedClassifier(table, TIED_CLASS_ROWS, name="tied_head") if tied else
            layers.Dense(c["classes"], name="head"))
    return keras.Model(inputs, head(pooled))


_LEAVES = {"kernel": "w", "bias": "b", "gamma": "scale", "beta": "offset",
           "embeddings": "embeddings"}
_PROJECTIONS = {"query": "query", "key": "key", "value": "value", "attention_output": "linear"}


def haiku_path(weight_name: str) -> tuple[str, str]:
    """The Haiku ``(scope, leaf)`` a weight of an encoder twin holds, from its Keras name
    (``block_1-attention/query/kernel:0`` -> ``("block_1/attention/query", "w")``)."""
    parts = weight_name.split(":")[0].split("/")
    scope = parts[0].replace("-", "/")
    if len(parts) == 3:  # a projection inside the attention layer
        scope = f"{scope}/{_PROJECTIONS[parts[1]]}"
    return scope, _LEAVES[parts[-1]]


def _gates(a: np.ndarray) -> np.ndarray:
    """Haiku's LSTM gate blocks (i, g, f, o) in Keras' order (i, f, c, o) along the last axis."""
    i, g, f, o = np.split(a, 4, axis=-1)
    return np.concatenate([i, f, g, o], axis=-1)


def haiku_weights(name: str, params: Mapping[str, Mapping[str, np.ndarray]],
                  tied: bool = False) -> list[np.ndarray]:
    """Haiku parameters as the twin's ``get_weights()`` list (Keras kernels are ``[in, out]``
    and HWIO, like Haiku's; the LSTM's ``[x, h]`` map splits into kernel and recurrent kernel,
    its forget-gate offset of +1 moves into the bias)."""
    if name in ENCODERS:  # by name; the attention's kernels reshape [d, h·k] <-> [d, h, k]
        return [np.asarray(params[scope][leaf]).reshape(tuple(w.shape))
                for w, (scope, leaf) in ((w, haiku_path(w.name))
                                         for w in build(name, tied).weights)]
    if name == "lstm":
        w, b = np.asarray(params["lstm/linear"]["w"]), np.asarray(params["lstm/linear"]["b"])
        bias = _gates(b).copy()
        bias[100:200] += 1.0
        return [np.asarray(params["embed"]["embeddings"]), _gates(w[:100]), _gates(w[100:]), bias,
                np.asarray(params["linear"]["w"]), np.asarray(params["linear"]["b"])]
    out = []
    for group in params.values():  # creation order: the twin's layer order
        if "embeddings" in group:
            out.append(np.asarray(group["embeddings"]))
        else:
            out += [np.asarray(group["w"]), np.asarray(group["b"])]
    return out


def per_example_loss(name: str) -> keras.losses.Loss:
    """The loss of each example (``reduction=NONE``: what the DP optimizers clip)."""
    if name == "logreg":
        return keras.losses.BinaryCrossentropy(from_logits=True,
                                               reduction=keras.losses.Reduction.NONE)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction=keras.losses.Reduction.NONE)


def labels_for(name: str, y: np.ndarray) -> np.ndarray:
    return y.astype(np.float32)[:, None] if name == "logreg" else y


def make_optimizer(*, mode: str, private: bool, lr: float, clip_norm: float,
                   noise_multiplier: float, batch_size: int):
    """TF Privacy's DP-Keras SGD (per-example microbatches), or plain SGD without privacy."""
    if not private:
        return keras.optimizers.SGD(learning_rate=lr)
    if mode not in MODES:
        raise ValueError(f"engine.mode for tfp must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "fast":
        raise ValueError("engine.mode=fast clips inside TF Privacy's DPModel (fast_model), "
                         "not in an optimizer")
    cls = VectorizedDPKerasSGDOptimizer if mode == "vectorized" else DPKerasSGDOptimizer
    return cls(l2_norm_clip=clip_norm, noise_multiplier=noise_multiplier,
               num_microbatches=batch_size, learning_rate=lr)


def fast_registry():
    """TF Privacy's layer registry for fast gradient clipping: its default (Dense, Embedding)
    and the layer norm and multi-head attention rules it ships."""
    from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry
    from tensorflow_privacy.privacy.fast_gradient_clipping.registry_functions import (
        layer_normalization, multi_head_attention)
    registry = layer_registry.make_default_layer_registry()
    registry.insert(layers.LayerNormalization, layer_normalization.layer_normalization_computation)
    registry.insert(layers.MultiHeadAttention,
                    multi_head_attention.multi_head_attention_layer_computation)
    return registry


def unregistered_layers(model: keras.Model, registry) -> list[str]:
    """The trainable layers that ``registry`` has no rule for, as ``name (Class)``."""
    return [f"{layer.name} ({type(layer).__name__})" for layer in model.layers
            if layer.trainable_variables and not registry.is_elem(layer)]


def fast_model(name: str, *, clip_norm: float, noise_multiplier: float, xla: bool,
               tied: bool = False) -> keras.Model:
    """The Keras twin of ``name`` as TF Privacy's ``DPModel`` with fast gradient clipping.

    Raises:
      ValueError: a trainable layer the registry has no rule for (named): TF Privacy would
        clip it by microbatches instead, which is not the row this mode claims to be.
    """
    from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPModel
    plain = build(name, tied)
    registry = fast_registry()
    missing = unregistered_layers(plain, registry)
    if missing:
        raise ValueError(f"TF Privacy's fast gradient clipping has no rule for "
                         f"{', '.join(missing)} of model {name} (its registry: Dense, "
                         f"Embedding, LayerNormalization, MultiHeadAttention)")
    return DPModel(l2_norm_clip=clip_norm, noise_multiplier=noise_multiplier, use_xla=xla,
                   layer_registry=registry, inputs=plain.inputs, outputs=plain.outputs)


def mean_loss(name: str) -> keras.losses.Loss:
    """The batch-mean loss ``DPModel``'s fast path clips (it reads the reduction from it)."""
    if name == "logreg":
        return keras.losses.BinaryCrossentropy(from_logits=True)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def clipped_grad_sum(name: str, params: Mapping[str, Any], x: np.ndarray, y: np.ndarray,
                     clip_norm: float, mode: str = "vectorized",
                     tied: bool = False) -> list[np.ndarray]:
    """TF Privacy's sum of per-example gradients clipped to ``clip_norm`` (σ = 0), in the
    twin's weight order: the cross-framework oracle against :func:`ablation.clipped_grad_sum`.
    ``mode=fast`` reads it off one step of ``DPModel`` (SGD at lr 1, σ = 0: the weights move by
    the mean clipped gradient), so its own train step is what is checked."""
    if mode == "fast":
        model = fast_model(name, clip_norm=clip_norm, noise_multiplier=0.0, xla=False,
                           tied=tied)
        model.set_weights(haiku_weights(name, params, tied))
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss=mean_loss(name))
        before = [w.numpy().astype(np.float64) for w in model.trainable_weights]
        model.train_on_batch(tf.constant(x), tf.constant(labels_for(name, y)))
        return [(b - w.numpy()) * len(x) for b, w in zip(before, model.trainable_weights)]
    model = build(name, tied)
    model.set_weights(haiku_weights(name, params, tied))
    optimizer = make_optimizer(mode=mode, private=True, lr=0.0, clip_norm=clip_norm,
                               noise_multiplier=0.0, batch_size=len(x))
    loss = per_example_loss(name)
    labels = labels_for(name, y)
    grads = optimizer._compute_gradients(  # the Keras path: (Σ clip(g_i) + noise) / B
        lambda: loss(labels, model(x, training=True)), model.trainable_variables)
    return [g.numpy() * len(x) for g, _ in grads]


def environment_tf() -> dict[str, Any]:
    """The record's ``env`` of a TensorFlow cell: versions and the device TF ran on."""
    from importlib.metadata import version

    from ablation.report.records import environment
    env = environment(devices=False)
    gpus = tf.config.list_physical_devices("GPU")
    env.update(tensorflow=tf.__version__, tensorflow_privacy=version("tensorflow-privacy"),
               platform="gpu" if gpus else "cpu",
               device_kind=(tf.config.experimental.get_device_details(gpus[0]).get("device_name")
                            if gpus else "cpu"),
               device_count=max(1, len(gpus)),
               tf_threads=tf.config.threading.get_intra_op_parallelism_threads())
    return env


def _training_set(cell: CellConfig, dataset: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    if cell.data == "real":
        from ablation.data import datasets
        x, y = datasets.load(dataset["name"], cache_dir=cell.data_cache_dir,
                             download=cell.download)
    else:
        n = dataset["n_train"] if cell.data_limit is None else min(cell.data_limit,
                                                                   dataset["n_train"])
        rng = np.random.default_rng(cell.seed)
        shape = (n, *dataset["input_shape"])
        x = (rng.integers(0, dataset["vocab_size"], shape, dtype=np.int32)
             if dataset["input_dtype"] == "int32" else rng.random(shape, dtype=np.float32))
        y = rng.integers(0, dataset["num_classes"], n).astype(np.int32)
    if cell.data_limit is not None:
        x, y = x[:cell.data_limit], y[:cell.data_limit]
    return x, y


def time_cell_tfp(cell: CellConfig, noise_multiplier: float,
                  dataset: Mapping[str, Any]) -> dict[str, Any]:
    """Time one TF Privacy (or, non-private, plain Keras) cell."""
    tf.random.set_seed(cell.seed)
    x, y = _training_set(cell, dataset)
    n = len(x)
    if cell.batch_size > n:
        raise ValueError(f"batch_size {cell.batch_size} exceeds the training set ({n} examples)")
    mode = cell.engine_mode or "vectorized"
    loss = per_example_loss(cell.model)
    if mode == "fast" and cell.private:  # the clipping lives in the model's train_step
        model = fast_model(cell.model, clip_norm=cell.dp.clip_norm,
                           noise_multiplier=noise_multiplier, xla=bool(cell.xla), tied=cell.tied)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=cell.lr),
                      loss=mean_loss(cell.model))
    else:
        model = build(cell.model, cell.tied)
        optimizer = make_optimizer(mode=mode, private=cell.private, lr=cell.lr,
                                   clip_norm=cell.dp.clip_norm,
                                   noise_multiplier=noise_multiplier, batch_size=cell.batch_size)
        model.compile(optimizer=optimizer, loss=loss, jit_compile=bool(cell.xla))
    labels = labels_for(cell.model, y)
    steps_per_epoch = n // cell.batch_size
    rng = np.random.default_rng(cell.seed)
    order = {"epoch": -1, "perm": None}

    def batch(i: int) -> tuple[Any, Any]:
        epoch, pos = divmod(i, steps_per_epoch)
        if epoch != order["epoch"]:
            order["perm"] = rng.permutation(n)
            order["epoch"] = epoch
        idx = order["perm"][pos * cell.batch_size:(pos + 1) * cell.batch_size]
        return tf.constant(x[idx]), tf.constant(labels[idx])

    def eval_loss() -> float:
        return float(tf.reduce_mean(loss(labels[:1024], model(x[:1024], training=False))))

    loss_start = eval_loss()
    clock = PreparedClock(batch, lambda inputs: model.train_on_batch(*inputs), lambda: None,
                          lambda inputs: sum(int(t.numpy().nbytes) for t in inputs))
    label = f"tfp[{mode}{',xla' if cell.xla else ''}]" if cell.private else "keras"
    fields = run_timing_loop(clock, cell.timing, steps_per_epoch,
                             f"{label} {cell.model} B={cell.batch_size}")
    fields.update(n_params=int(sum(np.prod(w.shape) for w in model.trainable_weights)),
                  n_train=n, steps_per_epoch=steps_per_epoch, compile_s=None, n_compiles=None,
                  compiled_functions=None, loss_start=loss_start, loss_end=eval_loss(),
                  device_peak_bytes=None, env=environment_tf())
    return fields


def weight_order(name: str, tied: bool = False) -> Sequence[str]:
    """The twin's weight names, in ``get_weights()`` order (for messages and tests)."""
    return [w.name for w in build(name, tied).weights]


if __name__ == "__main__":  # pragma: no cover - a smoke check inside .venv-tf
    start = time.perf_counter()
    for model_name in ("logreg", "ffnn", "cnn", "embed", "lstm", "cifar10", *ENCODERS):
        print(model_name, sum(int(np.prod(w.shape)) for w in build(model_name).weights))
    print(f"{time.perf_counter() - start:.1f} s")
