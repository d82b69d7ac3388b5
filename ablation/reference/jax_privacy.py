"""Reference rows: jax_privacy 2.x's clipped gradient on the toolkit's Haiku models.

``engine=jax_privacy`` takes the clipped per-example gradient sum from
``jax_privacy.clipping.clipped_grad`` (the strongest JAX peer of today) and runs it inside the
toolkit's own compiled DP-SGD step (:func:`ablation.core.dpsgd.make_step`): the same noise from
the same key, the same averaging and update, the same timing protocol as ``both``, so the row
differs from ``both`` only by whose clipping runs. ``engine.mode=vmap`` (default) clips the
whole batch in one vectorised pass; ``engine.mode=microbatch`` lets jax_privacy loop over
micro-batches of ``engine.microbatch_size`` examples (less memory), which must divide the batch.
``private=false`` is non-private ``both``.
"""

from __future__ import annotations

import functools
from typing import Any

from ablation.measure.settings import CellConfig

try:
    from jax_privacy import clipping
except ImportError as _error:  # pragma: no cover - exercised where jax-privacy is absent
    raise ImportError("engine=jax_privacy needs jax-privacy 2.x: pip install -e '.[jax_privacy]'"
                      " (make test installs it)") from _error

MODES = ("vmap", "microbatch")


def clipped_sum(loss_fn, params, x, y, clip_norm, mask=None, *,
                microbatch_size: int | None = None):
    """jax_privacy's Σ_i g_i · min(1, C/‖g_i‖) of a per-example ``loss_fn(params, x1, y1)``,
    padded slots (``mask <= 0``) excluded by its ``is_padding_example``."""
    if microbatch_size is not None and x.shape[0] % microbatch_size:
        raise ValueError(f"jax_privacy micro-batches of {microbatch_size} do not divide a batch "
                         f"of {x.shape[0]}")
    grad_fn = clipping.clipped_grad(loss_fn, argnums=0, l2_clip_norm=clip_norm,
                                    batch_argnums=(1, 2), keep_batch_dim=False,
                                    microbatch_size=microbatch_size)
    if mask is None:
        return grad_fn(params, x, y)
    return grad_fn(params, x, y, is_padding_example=mask <= 0)


def time_cell_jax_privacy(cell: CellConfig, noise_multiplier: float) -> dict[str, Any]:
    """Time one jax_privacy cell with the toolkit's JAX timing (``time_cell``)."""
    from importlib.metadata import version

    from ablation.measure.timing import time_cell
    mode = cell.engine_mode or "vmap"
    size = cell.microbatch_size if mode == "microbatch" else None
    from ablation.report.records import environment
    fields = time_cell(cell, noise_multiplier,
                       clipped_sum=functools.partial(clipped_sum, microbatch_size=size),
                       engine="both")
    fields["env"] = {**environment(), "jax_privacy": version("jax-privacy")}
    return fields
