"""The ghost engine's clipping rules, one module per layer kind, and the table over them.

Each module holds one kind's rule (:class:`~ablation.core.rules.base.Rule`): its per-example
norms, its exact sum, its statement of what it covers, and the stock Haiku layers it taps.

===========  ============================================================  =====================
kind         layers                                                        module
===========  ============================================================  =====================
dense        ``hk.Linear`` at one position or over positions / time        :mod:`.dense`
conv         ``hk.Conv1D/2D/3D``, ``hk.ConvND`` (patches, then dense)      :mod:`.conv`
embed        ``hk.Embed`` (segment sum over repeated ids)                  :mod:`.embed`
norm_affine  ``hk.LayerNorm``, ``hk.InstanceNorm``, ``hk.RMSNorm``         :mod:`.norms`
recurrent    a recurrence's gate projection (the toolkit's LSTM)           :mod:`.recurrent`
per_example  ``hk.Bias``, ``hk.GroupNorm``, depthwise, transposed and      :mod:`.per_example`
             grouped / masked / channels-first convolutions
===========  ============================================================  =====================

A new rule is one new module defining ``RULE`` plus its tests, and one line below. Stock
layers no rule can clip exactly are in :data:`REFUSED`, with the reason.
"""

from __future__ import annotations

from typing import Mapping

import haiku as hk

from ablation.core.rules import conv, dense, embed, norms, per_example, recurrent
from ablation.core.rules.base import (GhostUnsupported, LayerNorms, LayerTap, Rule,
                                      TapBuilder)

#: The layer kinds the ghost engine clips exactly, and how.
RULES: Mapping[str, Rule] = {rule.kind: rule for rule in (
    dense.RULE, conv.RULE, embed.RULE, norms.RULE, recurrent.RULE, per_example.RULE)}

#: Exact stock module types the taps intercept, and how each is tapped. A subclass of one of
#: these may compute something else (an overridden ``__call__``); it is refused unless
#: registered as equivalent (:func:`ablation.core.taps.register_equivalent`).
STOCK: Mapping[type, TapBuilder] = {cls: build for rule in RULES.values()
                                    for cls, build in rule.taps.items()}

#: Stock layers with parameters that no rule clips exactly, and why (the refusal says it).
REFUSED: Mapping[type, str] = {
    hk.BatchNorm: "its batch statistics couple the examples of a batch and its moving averages "
                  "are state that a private step would update from every example; use "
                  "hk.GroupNorm or hk.LayerNorm",
    hk.SpectralNorm: "its power iteration keeps state updated from the batch",
}

__all__ = ["GhostUnsupported", "LayerNorms", "LayerTap", "REFUSED", "RULES", "Rule", "STOCK"]
