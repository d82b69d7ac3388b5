"""A convolution's input patches, held as one strided view of the input per kernel offset.

The conv rule treats a layer's input patches as the dense rule's ``A [B, T, d]`` (T output
positions, ``d = k₁···k_n·C``). Written out, ``A`` is a concatenation of the ``k₁···k_n``
shifted views ``X_o [B, T, C]`` along the features, and on XLA:CPU that interleaving copy costs
more than the products that read it (82 ms of a 94 ms rule for the cifar10 net's second conv at
B=64, measured by ``scripts/bench_conv_rules.py``). Everything the rule needs splits over the
offsets instead, so no patch is ever written out:

* the Gram matrix ``A Aᵀ = Σ_o X_o X_oᵀ``;
* each example's weight gradient ``Aᵀ G = [X_o₁ᵀ G; X_o₂ᵀ G; …]``, one block of kernel rows per
  offset, in the kernel's own ``(k₁, …, k_n, C)`` row order;
* the squared norm of the rows ``Σ_t ‖a_t‖² = Σ_o ‖X_o‖²``.

The sums over offsets reorder the sums of the dense rule's inner products of length d, which
its rounding bound already allows for (it holds whatever order each sum runs in).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Patches:
    """``A [B, T, k·C]`` as its views ``X_o [B, T, C]``, one per kernel offset in the kernel's
    row order."""

    views: tuple[jax.Array, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        batch, positions, channels = self.views[0].shape
        return batch, positions, channels * len(self.views)

    @property
    def dtype(self) -> Any:
        return self.views[0].dtype

    def gram(self) -> jax.Array:
        """``[B, T, T]``: ``A Aᵀ`` for each example."""
        return sum(jnp.einsum("btc,bsc->bts", v, v, precision=HIGHEST) for v in self.views)

    def outer(self, grads: jax.Array) -> jax.Array:
        """``[B, d, p]``: ``A_iᵀ G_i`` for each example (``grads [B, T, p]``)."""
        return jnp.concatenate([jnp.einsum("btc,btp->bcp", v, grads, precision=HIGHEST)
                                for v in self.views], axis=1)

    def sq_rows(self) -> jax.Array:
        """``[B]``: ``Σ_t ‖a_t‖²``."""
        return sum(jnp.sum(jnp.square(v), axis=(1, 2)) for v in self.views)

    def dense(self) -> jax.Array:
        """``[B, T, d]``: the patches written out (only where a rule needs them whole)."""
        return jnp.concatenate(self.views, axis=-1)


def patch_views(x: jax.Array, kernel: tuple[int, ...], strides: tuple[int, ...],
                padding: Any, batch: int) -> Patches:
    """The patches of ``x [N, *spatial, C]`` (``N = batch·n``: n inputs per example) for an
    undilated channels-last convolution: pads (a negative pad crops, as the convolution's
    own padding does), then one strided slice per kernel offset."""
    dims = len(kernel)
    spatial = x.shape[1:1 + dims]
    pads = (lax.padtype_to_pads(spatial, kernel, strides, padding) if isinstance(padding, str)
            else [tuple(p) for p in padding])
    zero = jnp.zeros((), x.dtype)
    x = lax.pad(x, zero, [(0, 0, 0), *((int(lo), int(hi), 0) for lo, hi in pads), (0, 0, 0)])
    out = [(x.shape[1 + i] - kernel[i]) // strides[i] + 1 for i in range(dims)]
    channels = x.shape[-1]
    views = tuple(
        x[(slice(None), *(slice(o, o + s * (n - 1) + 1, s)
                          for o, s, n in zip(offsets, strides, out)))].reshape(batch, -1, channels)
        for offsets in itertools.product(*(range(k) for k in kernel)))
    return Patches(views)
