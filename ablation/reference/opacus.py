"""Reference rows: the paper's six models in PyTorch, trained privately with Opacus.

``engine=opacus`` times the same cell as the JAX engines (:func:`~ablation.reference.
torch_nets.time_torch_cell`). ``engine.mode`` picks Opacus' grad-sample mode (``hooks``,
``ghost``, ``functorch``, ``ew``); ``private=false`` gives plain PyTorch SGD. Batches are
shuffled and of fixed size (Poisson sampling is refused at the config), clipped to the global
norm C, noised with σ·C on the sum and divided by the batch size: the JAX engines' DP-SGD.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ablation.measure.settings import CellConfig
from ablation.reference.torch_nets import (criterion_for, plain_sgd, targets_for, time_torch_cell,
                                           torch_device)
from ablation.reference.torch_nets import environment_torch as _environment_torch

try:
    import opacus
    import torch
    from torch import nn
except ImportError as _error:  # pragma: no cover - exercised where opacus is absent
    raise ImportError("engine=opacus needs the torch extra: pip install -e '.[torch]' "
                      "(install torch==2.13.0 first on the development machine: make torch)"
                      ) from _error

__all__ = ["clipped_grad_sum", "environment_torch", "make_private", "time_cell_torch",
           "torch_device"]


def environment_torch(device: torch.device) -> dict[str, Any]:
    """The ``env`` of an Opacus cell: PyTorch's and Opacus' versions and the device."""
    return _environment_torch(device, opacus=opacus.__version__)


def make_private(module: nn.Module, model_name: str, *, lr: float, clip_norm: float,
                 noise_multiplier: float, batch_size: int, x: torch.Tensor, y: torch.Tensor,
                 mode: str = "hooks"):
    """Wrap ``module`` with Opacus' PrivacyEngine: ``(module, optimizer, criterion)``.

    Fixed-size batches (no Poisson sampling), flat clipping to ``clip_norm``, noise σ·C on
    the sum, divided by the batch size: the same DP-SGD as the JAX engines.
    """
    from opacus import PrivacyEngine
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    criterion = criterion_for(model_name)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=batch_size, drop_last=True)
    engine = PrivacyEngine()
    out = engine.make_private(module=module, optimizer=optimizer, criterion=criterion,
                              data_loader=loader, noise_multiplier=noise_multiplier,
                              max_grad_norm=clip_norm, poisson_sampling=False,
                              grad_sample_mode=mode)
    if mode == "ghost":
        module, optimizer, criterion, _ = out
    else:
        module, optimizer, _ = out
    return module, optimizer, criterion


def clipped_grad_sum(module: nn.Module, model_name: str, x: torch.Tensor, y: torch.Tensor,
                     clip_norm: float, mode: str = "hooks") -> list[np.ndarray]:
    """Opacus' sum of per-example gradients clipped to ``clip_norm`` (σ = 0), per parameter.

    The cross-framework oracle: with the same weights and data it equals
    :func:`ablation.clipped_grad_sum`.
    """
    batch_size = x.shape[0]
    private, optimizer, criterion = make_private(
        module, model_name, lr=0.0, clip_norm=clip_norm, noise_multiplier=0.0,
        batch_size=batch_size, x=x, y=y, mode=mode)
    optimizer.zero_grad(set_to_none=True)
    criterion(private(x), targets_for(model_name, y)).backward()
    optimizer.pre_step()  # clip, sum, add (zero) noise, divide by the batch size
    return [p.grad.detach().cpu().numpy() * batch_size for p in private.parameters()]


def time_cell_torch(cell: CellConfig, noise_multiplier: float) -> dict[str, Any]:
    """Time one Opacus (or, non-private, plain PyTorch) cell."""
    mode = cell.engine_mode or "hooks"

    def private_setup(module, x, targets):
        private, optimizer, criterion = make_private(
            module, cell.model, lr=cell.lr, clip_norm=cell.dp.clip_norm,
            noise_multiplier=noise_multiplier, batch_size=cell.batch_size, x=x, y=targets,
            mode=mode)
        # Expanded weights (mode "ew") refuses gradients that were set to None between steps.
        set_to_none = mode != "ew"

        def step(xb, yb):
            optimizer.zero_grad(set_to_none=set_to_none)
            criterion(private(xb), yb).backward()
            optimizer.step()
        return step

    setup = private_setup if cell.private else plain_sgd(cell)
    label = f"opacus[{mode}]" if cell.private else "pytorch"
    return time_torch_cell(cell, setup, label=label, versions={"opacus": opacus.__version__})
