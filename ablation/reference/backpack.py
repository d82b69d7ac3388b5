"""Reference rows: BackPACK's per-example gradients, clipped and noised by the shared recipe.

``engine=backpack`` extends the PyTorch twin and its loss with BackPACK and reads each
example's gradient from ``BatchGrad`` (``p.grad_batch``), as the paper's BackPACK rows did; the
clipping (global L2 norm C per example), the noise (σ·C on the sum) and the division by the
batch size are ours, the same recipe as every other engine. The lstm uses ``nn.LSTM``: BackPACK
has no extension for Opacus' ``DPLSTM``. A layer BackPACK cannot extend only warns and leaves
no ``grad_batch``: that is turned into an error naming the parameter, never a silently
unclipped gradient. ``private=false`` is plain PyTorch.
"""

from __future__ import annotations

import warnings
from typing import Any

from ablation.measure.settings import CellConfig
from ablation.reference.torch_nets import noisy_sgd_update, plain_sgd, time_torch_cell

try:
    import torch
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad
    from torch import nn
except ImportError as _error:  # pragma: no cover - exercised where backpack is absent
    raise ImportError("engine=backpack needs BackPACK: make torch installs it "
                      "(pip install --no-deps backpack-for-pytorch unfoldNd einops)") from _error

# A layer without an extension only warns (and has no grad_batch, which is refused below).
warnings.filterwarnings("ignore", message="Extension saving to grad_batch")


def summed_loss(name: str) -> nn.Module:
    """The batch's summed loss (BackPACK's per-example gradients are exact for a sum)."""
    return nn.BCEWithLogitsLoss(reduction="sum") if name == "logreg" else \
        nn.CrossEntropyLoss(reduction="sum")


def clipped_sum(module: nn.Module, loss: nn.Module, x: torch.Tensor, y: torch.Tensor,
                clip_norm: float) -> list[torch.Tensor]:
    """Σ_i g_i · min(1, C/‖g_i‖) per parameter, from BackPACK's per-example gradients."""
    module.zero_grad(set_to_none=True)
    with backpack(BatchGrad()):
        loss(module(x), y).backward()
    params = [p for p in module.parameters() if p.requires_grad]
    missing = [name for name, p in module.named_parameters()
               if p.requires_grad and getattr(p, "grad_batch", None) is None]
    if missing:
        raise ValueError(f"BackPACK computed no per-example gradient for {', '.join(missing)}")
    sq = sum(p.grad_batch.flatten(1).pow(2).sum(1) for p in params)  # [B]
    scale = torch.clamp(clip_norm / sq.sqrt(), max=1.0)
    return [torch.einsum("b,b...->...", scale, p.grad_batch) for p in params]


def time_cell_backpack(cell: CellConfig, noise_multiplier: float) -> dict[str, Any]:
    """Time one BackPACK (or, non-private, plain PyTorch) cell."""
    def private_setup(module, x, targets):
        model, loss = extend(module), extend(summed_loss(cell.model))
        params = [p for p in model.parameters() if p.requires_grad]
        std = cell.dp.clip_norm * noise_multiplier

        def step(xb, yb):
            grads = clipped_sum(model, loss, xb, yb, cell.dp.clip_norm)
            noisy_sgd_update(params, grads, std, xb.shape[0], cell.lr)
        return step

    setup = private_setup if cell.private else plain_sgd(cell)
    return time_torch_cell(cell, setup, label="backpack" if cell.private else "pytorch",
                           versions={"backpack": _version()}, dp_lstm=False)


def _version() -> str | None:
    from importlib.metadata import version
    return version("backpack-for-pytorch")
