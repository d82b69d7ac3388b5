"""Your own model, ablated like the paper's: a small network of today's layers on token data.

    python -m ablation.run -m model=custom model.factory=my_model:small_transformer \
        engine=both,jit,vmap,none,ghost batch_size=32
    python -m ablation.check_ghost model=custom model.factory=my_model:small_transformer

(from this folder, or with it on PYTHONPATH; README: "Ablate your own model").
"""

import functools

import haiku as hk
import jax

from ablation import DatasetSpec, Model

#: The data: 4,096 sequences of 64 token ids from a 2,000-word vocabulary, two classes.
REVIEWS = DatasetSpec("reviews", n_train=4096, input_shape=(64,), input_dtype="int32",
                      num_classes=2, vocab_size=2000)


def network(tokens, width: int, heads: int):
    """tokens [B, 64] -> logits [B, 2]: embed, a convolution and self-attention block, pool."""
    h = hk.Embed(REVIEWS.vocab_size, width)(tokens)  # [B, T, width]
    h = h + hk.Conv1D(width, kernel_shape=3)(jax.nn.gelu(hk.LayerNorm(-1, True, True)(h)))
    x = hk.LayerNorm(-1, True, True)(h)
    h = h + hk.MultiHeadAttention(heads, width // heads, w_init=hk.initializers.VarianceScaling())(
        x, x, x)
    return hk.Linear(REVIEWS.num_classes)(hk.RMSNorm(-1)(h).mean(axis=1))


def small_transformer(width: int = 32, heads: int = 2) -> Model:
    """The model (``model.kwargs={width: 64}`` picks another width)."""
    return Model("small_transformer", functools.partial(network, width=width, heads=heads),
                 REVIEWS)
