"""What every clipping rule shares: the tap of a layer, a rule's answer, and the rule itself.

A rule turns one layer's per-example inputs ``A [B, ...]`` and output gradients ``G [B, ...]``
(one row per example, as :mod:`ablation.core.taps` collects them) into each example's squared
gradient norm for that layer's parameters, and into the clipped sum ``Σ_i c_i ∇_i`` where it
holds the per-example gradients anyway. Its guarantee, whatever the input: the squared norm
that sets an example's clip factor is at least the squared norm of what the sum adds for that
example (so no example counts for more than C), and above the true one by at most
:data:`ablation.core.rules.dense.GRAM_TOLERANCE` (so none is clipped harder than DP-SGD would).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

#: ``apply(layer_params, inputs) -> outputs``: a layer as a function of its parameters.
LayerApply = Callable[[Mapping[str, jax.Array], jax.Array], jax.Array]
#: The rules' and the layers' own contractions run at full float32 precision on every backend
#: (TF32 or bf16 passes on GPUs/TPUs would make the clip norm disagree with the summed gradient).
HIGHEST = lax.Precision.HIGHEST


class GhostUnsupported(ValueError):
    """A network the ghost engine cannot clip exactly; the message names the layer."""


@dataclasses.dataclass(frozen=True)
class LayerTap:
    """What the rules need to know of one layer besides its arrays (static, not traced).

    Attributes:
      kind: the key of the layer's rule in :data:`ablation.core.rules.RULES`.
      apply: the layer as a function of its parameters and its input as the layer saw it.
      params: the parameter names of the layer's scope that ``apply`` consumes.
      options: what the kind's rule needs besides arrays (a conv's kernel shape and strides,
        an embedding's ``vocab_size``, a norm's axes and epsilon, ...).
    """

    kind: str
    apply: LayerApply
    params: tuple[str, ...]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LayerNorms:
    """A rule's answer for one layer.

    Attributes:
      sq: ``[B]`` squared norms that set the clip factors: at least the squared norm of what
        the sum adds for each example.
      exact_sum: ``(c [B], names) -> {name: Σ_i c_i ∇_i}`` for the parameters ``names``, built
        from each example's own gradient values (those the norms were computed from).
      names: the parameters whose sum always comes from ``exact_sum`` (the rule holds their
        per-example gradients anyway); the others come from the batched sum.
      fallback: a scalar bool (traced) that is True where ``exact_sum`` must replace the
        batched sum of every parameter for this batch (a Gram bound was loose), or None.
    """

    sq: jax.Array
    exact_sum: Callable[[jax.Array, tuple[str, ...]], dict[str, jax.Array]]
    names: tuple[str, ...] = ()
    fallback: jax.Array | None = None


#: ``describe(tap, input_shape, output_shape, batch_size)``: how the rule clips one layer,
#: for the layer's input and output as one example's pass saw them (``layer_rules``).
Describe = Callable[[LayerTap, tuple[int, ...], tuple[int, ...], "int | None"], str]
#: ``tap(module, args, kwargs) -> LayerTap | None``: how a stock Haiku module called with
#: ``args`` and ``kwargs`` is tapped (None: it holds no parameters, so there is nothing to
#: clip). Raises :class:`GhostUnsupported` for a call the rules cannot clip exactly.
TapBuilder = Callable[[Any, tuple, Mapping[str, Any]], "LayerTap | None"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One layer kind's rule: its norms, what it covers, and the stock layers it taps.

    Attributes:
      kind: the key taps carry (``dense``, ``conv``, ...).
      norms: ``(inputs, G, tap) -> LayerNorms``, inputs and output gradients ``[B, ...]``.
      covers: what the rule covers, in one line (refusals list these).
      describe: the one-line description of a layer's rule (see :data:`Describe`).
      taps: the stock Haiku classes the rule taps, exactly these classes (a subclass is
        refused unless registered as equivalent), each with its :data:`TapBuilder`.
      materialised: the engine takes the layer's per-example gradients from the examples'
        backward pass instead of calling ``norms`` (None then).
    """

    kind: str
    norms: Callable[[jax.Array, jax.Array, LayerTap], LayerNorms] | None
    covers: str
    describe: Describe
    taps: Mapping[type, TapBuilder] = dataclasses.field(default_factory=dict)
    materialised: bool = False


def positions(a: jax.Array) -> jax.Array:
    """``[B, ..., f] -> [B, T, f]``: every axis between the example and the features is a
    position (including the batch-of-one axis of the per-example pass)."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


def weighted(c: jax.Array, per_example: jax.Array) -> jax.Array:
    """``Σ_i c_i · per_example[i]``: each example's own values, scaled, then summed."""
    return jnp.tensordot(c.astype(per_example.dtype), per_example, axes=1, precision=HIGHEST)


def held_norms(held: Mapping[str, jax.Array]) -> LayerNorms:
    """The answer of a rule that holds every parameter's per-example gradient (``[B, ...]``
    each): the norms are those values' and the sum is built from the very same values."""
    batch = next(iter(held.values())).shape[0]
    sq = sum((jnp.sum(jnp.square(v.reshape(batch, -1)), axis=1) for v in held.values()),
             jnp.zeros(batch, next(iter(held.values())).dtype))

    def exact_sum(c, wanted):
        return {name: weighted(c, held[name]) for name in wanted}

    return LayerNorms(sq, exact_sum, tuple(sorted(held)))
