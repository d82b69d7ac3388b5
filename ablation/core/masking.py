"""Padded slots of a fixed-capacity batch: selected away, never multiplied away.

A Poisson batch padded to a fixed capacity carries slots that must contribute exactly nothing,
whatever they hold. Multiplying a slot's contribution by 0 is not enough (``0 · NaN`` is NaN,
and a network can be NaN at a zero input, e.g. an L2-normalising layer), so the engines that
run a batched pass fill such slots with a copy of a kept example and then select.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def fill_padded(x: jax.Array, y: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Padded slots (``keep`` False) hold a copy of the first kept example instead.

    Their contributions are then removed by selection (a clip factor or loss weight of exactly
    0 times a finite value), so a slot whose content or whose network output is NaN at any
    input (zeros included) cannot reach the sum. Labels of any trailing shape are filled along
    the batch axis.
    """
    first = jnp.argmax(keep)  # 0 when nothing is kept: the caller then releases zeros

    def fill(a):
        k = keep.reshape((-1,) + (1,) * (a.ndim - 1))
        return jnp.where(k, a, a[first])

    return fill(x), fill(y)


def zero_unless_any(keep: jax.Array, tree: PyTree) -> PyTree:
    """``tree``, or exact zeros when no slot is kept (every slot padded)."""
    anything = jnp.any(keep)
    return jax.tree.map(lambda g: jnp.where(anything, g, jnp.zeros_like(g)), tree)
