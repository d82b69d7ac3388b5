"""Reference rows: PyVacy's DP-SGD, per-example microbatches of one, as the paper ran it.

PyVacy's optimizer (github.com/ChrisWaites/pyvacy, the version the paper used) loops over
microbatches of one example: for each, a backward pass, the gradient clipped to the global L2
norm C (across all parameters) and accumulated; at the step, Gaussian noise σ·C is added and
the sum divided by the batch size. The release on PyPI (0.0.32) has no such loop: it clips the
batch's mean gradient, which is not per-example DP-SGD, and its noise is σ·C/√B. So this row
implements PyVacy's microbatch algorithm here, on the PyTorch twins (``nn.LSTM`` for the lstm),
and says so in every record (``implementation``). ``private=false`` is plain PyTorch.
"""

from __future__ import annotations

from typing import Any

from ablation.measure.settings import CellConfig
from ablation.reference.torch_nets import criterion_for, noisy_sgd_update, plain_sgd, time_torch_cell

try:
    import torch
    from torch import nn
except ImportError as _error:  # pragma: no cover - exercised where torch is absent
    raise ImportError("engine=pyvacy needs the torch extra: make torch") from _error

IMPLEMENTATION = ("PyVacy's per-example microbatch loop (github.com/ChrisWaites/pyvacy, as in "
                  "the paper), implemented in ablation.reference.pyvacy: PyPI's pyvacy 0.0.32 "
                  "clips the batch's mean gradient instead")


def microbatch_clipped_sum(module: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor,
                           clip_norm: float) -> list[torch.Tensor]:
    """Σ_i g_i · min(1, C / ‖g_i‖) by one backward pass per example (PyVacy's loop)."""
    params = [p for p in module.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    criterion = criterion_for(name)
    for i in range(x.shape[0]):
        module.zero_grad(set_to_none=True)
        criterion(module(x[i:i + 1]), y[i:i + 1]).backward()
        grads = [p.grad for p in params]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = torch.clamp(clip_norm / norm, max=1.0)
        for t, g in zip(total, grads):
            t.add_(g, alpha=float(scale))
    return total


def time_cell_pyvacy(cell: CellConfig, noise_multiplier: float) -> dict[str, Any]:
    """Time one PyVacy-algorithm (or, non-private, plain PyTorch) cell."""
    def private_setup(module, x, targets):
        params = [p for p in module.parameters() if p.requires_grad]
        std = cell.dp.clip_norm * noise_multiplier

        def step(xb, yb):
            grads = microbatch_clipped_sum(module, cell.model, xb, yb, cell.dp.clip_norm)
            noisy_sgd_update(params, grads, std, xb.shape[0], cell.lr)
        return step

    setup = private_setup if cell.private else plain_sgd(cell)
    fields = time_torch_cell(cell, setup, label="pyvacy" if cell.private else "pytorch",
                             versions={"pyvacy": None}, dp_lstm=False)
    fields["implementation"] = IMPLEMENTATION if cell.private else None
    return fields
