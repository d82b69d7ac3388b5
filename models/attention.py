"""Beyond the paper: the networks people train privately today, a transformer and a ViT.

Both are pre-LayerNorm encoders in the style of BERT and ViT: learned position embeddings,
blocks of multi-head self-attention and a GELU MLP (4× the width), each behind a LayerNorm and
inside a residual, a final LayerNorm, mean pooling and a linear classifier. Every parameterised
layer is a stock Haiku layer the ghost engine has a rule for (``hk.Embed``, ``hk.Linear`` over
positions, ``hk.LayerNorm``, ``hk.Conv2D``), so ghost clips them exactly without a fallback.

Sized for a 2-core CPU, where a non-private jit + vmap step at batch 64 should take 20–300 ms
(measured there, jax 0.10.2): the vit (2 blocks, 4 heads, 64 tokens) takes ~80 ms. On IMDb's
256 positions the attention's softmax over heads × 256² scores, not the projections, sets the
cost (width 32 instead of 64 saves little): 2 blocks of 4 heads took ~630 ms, 1 block of 4
heads ~290 ms, 1 block of 2 heads (each 32 wide) ~190 ms, which the transformer uses. Still
wide enough that matrix products, not dispatch, dominate; small enough that
``experiment=transformers`` (every engine and framework, three batch sizes) fits about an hour.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from models.nets import IMDB_SEQ_LEN, IMDB_VOCAB_ROWS

#: transformer on IMDb: width, blocks, heads (and the MLP's 4× width).
TRANSFORMER = dict(width=64, blocks=1, heads=2)  # 706,882 parameters (640,256 in the token table)
#: The tied transformer's classes read these rows of the token table as their vectors (ids 1
#: and 2: the start and out-of-vocabulary tokens of Keras' IMDb index, which real sequences and
#: synthetic ones alike also feed in, so both uses of a row get a gradient).
TIED_CLASS_ROWS = (1, 2)
#: vit on CIFAR-10: 4×4 patches of a 32×32 image (64 tokens), width, blocks, heads.
VIT = dict(patch=4, width=64, blocks=2, heads=4)  # 107,978 parameters


class Block(hk.Module):
    """One pre-LN encoder block: ``h + MHA(LN(h))``, then ``h + MLP(LN(h))``, ``[B, T, d]``.

    Parameters (under ``block``, ``block_1``, ...): ``attention_norm``, ``attention/{query,
    key,value,linear}``, ``mlp_norm``, ``mlp_in`` (d → 4d) and ``mlp_out`` (4d → d).
    """

    def __init__(self, width: int, heads: int, name: str | None = None):
        super().__init__(name=name)
        self.width, self.heads = width, heads

    def __call__(self, h: jax.Array) -> jax.Array:
        x = hk.LayerNorm(-1, create_scale=True, create_offset=True, name="attention_norm")(h)
        attention = hk.MultiHeadAttention(self.heads, self.width // self.heads,
                                          w_init=hk.initializers.VarianceScaling(1.0),
                                          name="attention")
        h = h + attention(x, x, x)
        x = hk.LayerNorm(-1, create_scale=True, create_offset=True, name="mlp_norm")(h)
        x = jax.nn.gelu(hk.Linear(4 * self.width, name="mlp_in")(x))
        return h + hk.Linear(self.width, name="mlp_out")(x)


def _encoder(h: jax.Array, positions: int, width: int, blocks: int, heads: int) -> jax.Array:
    """Position embeddings (a table of ``positions`` rows, the first T used), the blocks, a
    final LayerNorm and the mean over positions."""
    h = h + hk.Embed(positions, width, name="positions")(jnp.arange(h.shape[1]))
    for _ in range(blocks):
        h = Block(width, heads, name="block")(h)
    return hk.LayerNorm(-1, create_scale=True, create_offset=True, name="final_norm")(h).mean(
        axis=1)


def transformer(tokens: jax.Array, tied: bool = False) -> jax.Array:
    """Tokens ``[B, 256] -> [B, 2]``: token and position embeddings (width 64), one pre-LN
    block of 2-head self-attention and a GELU MLP, mean-pooled, a linear classifier.

    ``tied=True`` ties the classifier to the token table, as a language model's output layer
    is tied to its input embedding: ``logits = pooled @ E[TIED_CLASS_ROWS]ᵀ`` with no head of
    its own (706,752 parameters). One weight then gets a gradient from two uses, which is what
    per-layer clipping rules cannot add up: the ghost engine refuses it unless
    ``engine.fallback=materialise``, and Opacus' per-layer hooks get it wrong (see
    :mod:`ablation.reference.opacus`).
    """
    c = TRANSFORMER
    table = hk.Embed(IMDB_VOCAB_ROWS, c["width"], name="tokens",
                     w_init=hk.initializers.TruncatedNormal(stddev=0.02))
    pooled = _encoder(table(tokens), IMDB_SEQ_LEN, c["width"], c["blocks"], c["heads"])
    if tied:
        return pooled @ table.embeddings[jnp.array(TIED_CLASS_ROWS)].T
    return hk.Linear(2, name="head")(pooled)


def tied_transformer(tokens: jax.Array) -> jax.Array:
    """:func:`transformer` with the classifier tied to the token table (``model.tied=true``)."""
    return transformer(tokens, tied=True)


def vit(images: jax.Array) -> jax.Array:
    """Images ``[B, 32, 32, 3] -> [B, 10]``: 4×4 patches (64 tokens) by a strided convolution
    (width 64), position embeddings, 2 pre-LN blocks of 4-head self-attention and a GELU MLP,
    mean-pooled, a linear classifier."""
    c = VIT
    patches = hk.Conv2D(c["width"], c["patch"], stride=c["patch"], padding="VALID",
                        name="patches")(images)  # [B, 8, 8, width]
    h = patches.reshape(patches.shape[0], -1, c["width"])  # [B, 64, width]
    pooled = _encoder(h, (32 // c["patch"]) ** 2, c["width"], c["blocks"], c["heads"])
    return hk.Linear(10, name="head")(pooled)
