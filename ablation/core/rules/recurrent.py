"""The recurrent rule: a recurrence's gate projection, the dense rule over time.

A recurrent layer that applies one weight matrix at every step, ``z_t = [x_t, h_{t-1}] W + b``,
has as each example's weight gradient ``Σ_t [x_t, h_{t-1}]ᵀ g_t``: the dense rule over the T
steps, with the step inputs ``[x_t, h_{t-1}]`` as ``A`` and the gate gradients as ``G`` (Gram
or materialised, whichever is cheaper; the toolkit's LSTM, ``W [200, 400]`` over 256 steps:
materialised). The layer taps itself: its input half ``x_t W_x`` runs once for all steps before
the recurrence, and the tap's zero is added to that output, so its gradient is every step's
gate gradient (``models/nets.py``'s LSTM, whose parameters are ``hk.LSTM``'s).

Haiku's stock recurrent cores (``hk.LSTM``, ``hk.GRU``, ``hk.VanillaRNN``, ...) apply their
weights once per step inside ``hk.dynamic_unroll``'s scan, or once per call of a Python loop:
the engine refuses them by name (a layer inside a transformation, or applied more than once;
``hk.GRU``'s own parameters have no rule), unless ``engine.fallback=materialise``.
"""

from __future__ import annotations

import numpy as np

from ablation.core.rules.base import LayerTap, Rule
from ablation.core.rules.dense import dense_apply, dense_norms, flop_form

KIND = "recurrent"


def gate_tap() -> LayerTap:
    """The tap of a recurrence's gate projection ``[x_t, h_{t-1}] @ w + b`` (parameters ``w``
    and ``b``), reported over all steps at once with ``tap_input``."""
    return LayerTap(KIND, dense_apply, ("w", "b"))


def _describe(tap, input_shape, output_shape, batch_size) -> str:
    steps = int(np.prod(output_shape[:-1]))
    return (f"recurrent: gate projection, {flop_form(steps, input_shape[-1], output_shape[-1])} "
            f"over {steps} steps")


RULE = Rule(KIND, lambda a, g, tap: dense_norms(a, g, tap.params),
            "a recurrence's gate projection tapped over all steps (the toolkit's LSTM): the "
            "dense rule over time", _describe)
