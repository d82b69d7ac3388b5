"""The paper's six networks in dm-haiku, written for a batch: inputs are ``[B, ...]``.

The architectures follow the paper's code (TheSalon/fast-dpsgd) layer for layer, so the
parameter counts match the paper: logreg 105, ffnn 5,352, cnn 26,010, embed 160,370,
lstm 1,081,002, cifar10 605,226. Every network returns logits ``[B, num_outputs]``.
"""

from __future__ import annotations

import haiku as hk
import jax

#: Keras' IMDb word index with ``num_words=10_000`` and ``index_from=3`` needs 10,004 rows.
IMDB_VOCAB_ROWS = 10_004
IMDB_SEQ_LEN = 256


def logreg(x: jax.Array) -> jax.Array:
    """Logistic regression on Adult: ``[B, 104] -> [B, 1]`` (one logit)."""
    return hk.Linear(1)(x)


def ffnn(x: jax.Array) -> jax.Array:
    """Feed-forward net on Adult: ``[B, 104] -> 50 -> ReLU -> [B, 2]``."""
    return hk.Sequential([hk.Linear(50), jax.nn.relu, hk.Linear(2)])(x)


def cnn(x: jax.Array) -> jax.Array:
    """The MNIST conv net: ``[B, 28, 28, 1] -> [B, 10]``.

    conv 16·8×8 stride 2 SAME → ReLU → max-pool 2 stride 1 → conv 32·4×4 stride 2 VALID → ReLU
    → max-pool 2 stride 1 → flatten (512) → 32 → ReLU → 10.
    """
    return hk.Sequential([
        hk.Conv2D(16, 8, stride=2, padding="SAME"), jax.nn.relu,
        hk.MaxPool((1, 2, 2, 1), 1, padding="VALID"),
        hk.Conv2D(32, 4, stride=2, padding="VALID"), jax.nn.relu,
        hk.MaxPool((1, 2, 2, 1), 1, padding="VALID"),
        hk.Flatten(),
        hk.Linear(32), jax.nn.relu,
        hk.Linear(10),
    ])(x)


def _embedding(width: int) -> hk.Embed:
    # The paper's code initialises its embeddings with a truncated normal of std 0.02.
    return hk.Embed(IMDB_VOCAB_ROWS, width,
                    w_init=hk.initializers.TruncatedNormal(stddev=0.02))


def embed(tokens: jax.Array) -> jax.Array:
    """Embedding bag on IMDb: tokens ``[B, 256]`` → embed 16 → mean over tokens → 16 → ReLU → 2."""
    h = _embedding(16)(tokens).mean(axis=1)  # [B, 16]
    return hk.Sequential([hk.Linear(16), jax.nn.relu, hk.Linear(2)])(h)


def make_lstm(unroll: str = "dynamic"):
    """LSTM on IMDb: tokens ``[B, 256]`` → embed 100 → LSTM(100) → mean over time → 2.

    ``unroll="static"`` traces the 256 time steps as straight-line code (what the paper used,
    slow to compile, fast to run); ``"dynamic"`` uses ``lax.scan`` (fast to compile).
    """
    if unroll not in ("static", "dynamic"):
        raise ValueError(f"lstm unroll must be 'static' or 'dynamic', got {unroll!r}")
    unroll_fn = hk.static_unroll if unroll == "static" else hk.dynamic_unroll

    def lstm(tokens: jax.Array) -> jax.Array:
        h = _embedding(100)(tokens)  # [B, T, 100]
        core = hk.LSTM(100)
        outputs, _ = unroll_fn(core, h, core.initial_state(tokens.shape[0]), time_major=False)
        return hk.Linear(2)(outputs.mean(axis=1))  # [B, T, 100] -> [B, 100] -> [B, 2]

    return lstm


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
