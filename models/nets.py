"""The paper's six networks in dm-haiku, written for a batch: inputs are ``[B, ...]``.

The architectures follow the paper's code (TheSalon/fast-dpsgd) layer for layer, so the
parameter counts match the paper: logreg 105, ffnn 5,352, cnn 26,010, embed 160,370,
lstm 1,081,002, cifar10 605,226. Every network returns logits ``[B, num_outputs]``.
"""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ablation.core.rules.recurrent import gate_tap
from ablation.core.taps import tap_input, tap_output, tap_region

#: Keras' IMDb word index with ``num_words=10_000`` and ``index_from=3`` needs 10,004 rows.
IMDB_VOCAB_ROWS = 10_004
IMDB_SEQ_LEN = 256


def logreg(x: jax.Array) -> jax.Array:
    """Logistic regression on Adult: ``[B, 104] -> [B, 1]`` (one logit)."""
    return hk.Linear(1)(x)


def ffnn(x: jax.Array) -> jax.Array:
    """Feed-forward net on Adult: ``[B, 104] -> 50 -> ReLU -> [B, 2]``."""
    return hk.Sequential([hk.Linear(50), jax.nn.relu, hk.Linear(2)])(x)


POOLS = ("fast", "xla")


@jax.custom_vjp
def max_pool_2x2_s1(x: jax.Array) -> jax.Array:
    """Max-pool with a 2×2 window, stride 1, VALID, on ``[B, H, W, C]``: ``[B, H-1, W-1, C]``.

    The same values and gradients as ``hk.MaxPool((1, 2, 2, 1), 1, "VALID")``, computed as the
    elementwise max of the four shifted views. Its gradient is a custom VJP that routes each
    output's gradient to the first maximum of its window in row-major order, as XLA's
    select-and-scatter does, so ties (equal maxima, e.g. zeros after a ReLU) match exactly; but
    it is built from selects and pads, which XLA:CPU runs several times faster than its
    select-and-scatter (28.8 → 11 ms for the cnn's forward + backward at B=256 on 2 cores).

    The forward keeps, as its residual, which window position each output took (one byte per
    output): a backward that re-derived it from the input and the output let XLA fuse the
    forward's layer (conv, bias, ReLU) into the routing and evaluate it once per window
    position and test (that fusion ran several times slower in the ghost engine's vmapped
    per-example pass; the whole step gains a few per cent).
    """
    return _max_of_views(x)[0]


def _views(x: jax.Array) -> tuple[jax.Array, ...]:
    return x[:, :-1, :-1], x[:, :-1, 1:], x[:, 1:, :-1], x[:, 1:, 1:]


def _max_of_views(x: jax.Array):
    views = _views(x)
    out = jnp.maximum(jnp.maximum(views[0], views[1]), jnp.maximum(views[2], views[3]))
    return out, views


#: Where no window position equals the output (a NaN in the window): no gradient is routed.
_NOWHERE = 4


def _pool_fwd(x):
    out, views = _max_of_views(x)
    taken = jnp.full(out.shape, _NOWHERE, jnp.int8)
    for position in reversed(range(4)):  # the first maximum in row-major order wins
        taken = jnp.where(views[position] == out, jnp.int8(position), taken)
    # A barrier makes the index a value of its own, read (not recomputed) by the backward.
    return out, lax.optimization_barrier(taken)


def _pool_bwd(taken, g):
    # Window positions in row-major order, each padded back to the input's place.
    pads = (((0, 1), (0, 1)), ((0, 1), (1, 0)), ((1, 0), (0, 1)), ((1, 0), (1, 0)))
    grad = sum(jnp.pad(jnp.where(taken == position, g, jnp.zeros_like(g)),
                       ((0, 0), pad_h, pad_w, (0, 0)))
               for position, (pad_h, pad_w) in enumerate(pads))
    return (grad,)


max_pool_2x2_s1.defvjp(_pool_fwd, _pool_bwd)


def _xla_max_pool(x: jax.Array) -> jax.Array:
    return hk.MaxPool((1, 2, 2, 1), 1, padding="VALID")(x)


def make_cnn(pool: str = "fast"):
    """The MNIST conv net: ``[B, 28, 28, 1] -> [B, 10]``.

    conv 16·8×8 stride 2 SAME → ReLU → max-pool 2 stride 1 → conv 32·4×4 stride 2 VALID → ReLU
    → max-pool 2 stride 1 → flatten (512) → 32 → ReLU → 10. ``pool="fast"`` (default) pools
    with :func:`max_pool_2x2_s1`; ``"xla"`` with ``hk.MaxPool`` (the paper's choice: XLA's
    reduce-window forward and select-and-scatter gradient). Both give the same values and
    gradients.
    """
    if pool not in POOLS:
        raise ValueError(f"cnn pool must be one of {', '.join(POOLS)}, got {pool!r}")
    pool_fn = max_pool_2x2_s1 if pool == "fast" else _xla_max_pool

    def cnn(x: jax.Array) -> jax.Array:
        h = jax.nn.relu(hk.Conv2D(16, 8, stride=2, padding="SAME")(x))
        h = pool_fn(h)
        h = jax.nn.relu(hk.Conv2D(32, 4, stride=2, padding="VALID")(h))
        h = pool_fn(h)
        h = hk.Flatten()(h)
        h = jax.nn.relu(hk.Linear(32)(h))
        return hk.Linear(10)(h)

    return cnn


cnn = make_cnn("fast")


def _embedding(width: int) -> hk.Embed:
    # The paper's code initialises its embeddings with a truncated normal of std 0.02.
    return hk.Embed(IMDB_VOCAB_ROWS, width,
                    w_init=hk.initializers.TruncatedNormal(stddev=0.02))


def embed(tokens: jax.Array) -> jax.Array:
    """Embedding bag on IMDb: tokens ``[B, 256]`` → embed 16 → mean over tokens → 16 → ReLU → 2."""
    h = _embedding(16)(tokens).mean(axis=1)  # [B, 16]
    return hk.Sequential([hk.Linear(16), jax.nn.relu, hk.Linear(2)])(h)


class _GateParams(hk.Module):
    """The lstm's gate projection parameters, named and initialised as ``hk.Linear`` does."""

    def __call__(self, input_size: int, output_size: int) -> tuple[jax.Array, jax.Array]:
        w = hk.get_parameter("w", [input_size, output_size],
                             init=hk.initializers.TruncatedNormal(1.0 / np.sqrt(input_size)))
        b = hk.get_parameter("b", [output_size], init=jnp.zeros)
        return w, b


class LSTM(hk.Module):
    """``hk.LSTM`` over a whole sequence, with the same parameters and the same arithmetic.

    One linear map of ``[x_t, h_{t-1}]`` gives the gates (i, g, f, o; forget bias +1), as in
    ``hk.LSTM``, whose parameter tree (``lstm/linear``: ``w [D+H, 4H]``, ``b [4H]``) this keeps.
    The input half of that map runs once for all steps before the recurrence and the hidden
    half inside it, which is what lets the ghost engine tap the layer: the gates' gradient is
    the gradient of the input half's output, and the layer's input is ``[x_t, h_{t-1}]``.
    ``unroll="dynamic"`` scans the steps; ``"static"`` unrolls them as the paper's code did.
    """

    def __init__(self, hidden_size: int, unroll: str = "dynamic", name: str | None = None):
        super().__init__(name=name)
        self.hidden_size = hidden_size
        self.unroll = unroll

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, H]
        scope = f"{self.module_name}/linear"
        gates = _GateParams(name="linear")  # created here: its parameters stay lstm/linear
        with tap_region(scope):  # every use of the gate parameters lies inside
            return self._sequence(x, scope, gates)

    def _sequence(self, x: jax.Array, scope: str, gates: _GateParams) -> jax.Array:
        batch, steps, features = x.shape
        hidden = self.hidden_size
        w, b = gates(features + hidden, 4 * hidden)
        w_x, w_h = w[:features], w[features:]
        gates_x = tap_output(scope, jnp.dot(x, w_x) + b)  # [B, T, 4H]

        def step(carry, g_t):
            h, c = carry
            i, g, f, o = jnp.split(g_t + jnp.dot(h, w_h), 4, axis=-1)
            c = jax.nn.sigmoid(f + 1) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((batch, hidden), x.dtype)
        if self.unroll == "dynamic":
            _, hs = lax.scan(step, (zeros, zeros), jnp.swapaxes(gates_x, 0, 1))
            hs = jnp.swapaxes(hs, 0, 1)
        else:
            carry, outs = (zeros, zeros), []
            for t in range(steps):
                carry, h = step(carry, gates_x[:, t])
                outs.append(h)
            hs = jnp.stack(outs, axis=1)
        previous = jnp.concatenate([zeros[:, None], hs[:, :-1]], axis=1)
        tap_input(scope, gate_tap(), jnp.concatenate([x, previous], axis=-1))
        return hs


def make_lstm(unroll: str = "dynamic"):
    """LSTM on IMDb: tokens ``[B, 256]`` → embed 100 → LSTM(100) → mean over time → 2.

    ``unroll="dynamic"`` (default) scans the 256 time steps (fast to compile); ``"static"``
    traces them as straight-line code, as the paper's code did (minutes to compile on XLA:CPU).
    """
    if unroll not in ("static", "dynamic"):
        raise ValueError(f"lstm unroll must be 'static' or 'dynamic', got {unroll!r}")
    return functools.partial(_lstm, unroll=unroll)


def _lstm(tokens: jax.Array, unroll: str) -> jax.Array:
    h = _embedding(100)(tokens)  # [B, T, 100]
    outputs = LSTM(100, unroll=unroll, name="lstm")(h)
    return hk.Linear(2)(outputs.mean(axis=1))  # [B, T, 100] -> [B, 100] -> [B, 2]


def cifar10(x: jax.Array) -> jax.Array:
    """The CIFAR-10 conv net: ``[B, 32, 32, 3] -> [B, 10]``.

    3×3 SAME convs 32, 32, avg-pool, 64, 64, avg-pool, 128, 128, avg-pool, 256, 10 (ReLU after
    each conv but the last), then the spatial mean of the last conv's 10 channels.
    """
    def conv(channels: int) -> hk.Conv2D:
        return hk.Conv2D(channels, 3, padding="SAME")

    def pool(h: jax.Array) -> jax.Array:
        # Full [B, H, W, C] window: an int window is ambiguous under vmap (see haiku's pool).
        return hk.avg_pool(h, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding="VALID")

    h = x
    for widths in ((32, 32), (64, 64), (128, 128)):
        for width in widths:
            h = jax.nn.relu(conv(width)(h))
        h = pool(h)
    h = jax.nn.relu(conv(256)(h))
    return conv(10)(h).mean(axis=(1, 2))
