"""Reference rows: the paper's six models in PyTorch, trained privately with Opacus.

``engine=opacus`` times the same cell as the JAX engines (:func:`~ablation.reference.
torch_nets.time_torch_cell`). ``engine.mode`` picks Opacus' grad-sample mode (``hooks``,
``ghost``, ``functorch``, ``ew``); ``private=false`` gives plain PyTorch SGD. Batches are
shuffled and of fixed size (Poisson sampling is refused at the config), clipped to the global
norm C, noised with σ·C on the sum and divided by the batch size: the JAX engines' DP-SGD.
"""

from __future__ import annotations

import warnings
from dataclasses import replace as dataclasses_replace
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
                      "(or `make torch`, which installs a CPU build of PyTorch first)"
                      ) from _error

# Opacus warns on every cell that its secure RNG is off; the sweep says so once instead.
warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG turned off.*")
warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")

__all__ = ["clipped_grad_sum", "environment_torch", "make_private", "time_cell_torch",
           "torch_device", "try_batch_torch"]


def environment_torch(device: torch.device) -> dict[str, Any]:
    """The ``env`` of an Opacus cell: PyTorch's and Opacus' versions and the device."""
    return _environment_torch(device, opacus=opacus.__version__)


def make_private(module: nn.Module, model_name: str, *, lr: float, clip_norm: float,
                 noise_multiplier: float, batch_size: int, x: torch.Tensor, y: torch.Tensor,
                 mode: str = "hooks"):
    """Wrap ``module`` with Opacus' PrivacyEngine: ``(module, optimizer, criterion)``.

    Fixed-size batches (no Poisson sampling), flat clipping to ``clip_norm``, noise σ·C on
    the sum, divided by Opacus' expected batch size ``int(n / (n // B))`` (B itself where B
    divides n; 257 for IMDb at B=256): the JAX engines' DP-SGD up to that divisor.
    """
    from opacus import PrivacyEngine
    check_per_example_gradients(module, model_name, x[:2], y[:2])
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


class OpacusUnsupported(ValueError):
    """A network on which Opacus' per-example gradients would be wrong (a tied weight)."""


#: How far Opacus' per-example gradients may miss the batch gradient, relative to its norm
#: (float32 sums of a few terms agree to ~1e-6; a weight used outside its layer misses a
#: large fraction).
ADD_UP_TOLERANCE = 1e-3


def check_per_example_gradients(module: nn.Module, model_name: str, x: torch.Tensor,
                                y: torch.Tensor) -> None:
    """Refuse a network whose Opacus per-example gradients do not add up to its gradient.

    Opacus computes each example's gradient layer by layer, from the hooks of the module that
    owns a parameter (in every mode: hooks, functorch and ghost clipping alike). A parameter also
    used outside its module, such as a classifier tied to the token table, gets a gradient from
    that use which no hook sees: its per-example gradients miss it, the clipping norms are too
    small, and a clipped example can count for more than C, silently. Checked on a copy of
    ``module`` for the first examples of ``x``, ``y`` (labels or the criterion's targets).

    Raises:
      OpacusUnsupported: naming the parameter and by how much its gradients miss.
    """
    import copy

    from opacus import GradSampleModule
    targets = targets_for(model_name, y) if y.dim() == 1 else y
    probe = GradSampleModule(copy.deepcopy(module), batch_first=True, loss_reduction="sum")
    loss = criterion_for(model_name)(probe(x), targets) * x.shape[0]
    loss.backward()
    # Measured against the whole gradient's norm: a parameter whose true gradient is ~0 (the
    # attention's key bias, which softmax ignores) has rounding for a relative error.
    grads = {name: p for name, p in probe._module.named_parameters() if p.grad is not None}
    scale = max(float(torch.sqrt(sum(p.grad.square().sum() for p in grads.values()))), 1e-30)
    for name, p in grads.items():
        summed = getattr(p, "grad_sample", None)
        gap = 1.0 if summed is None else float((summed.sum(0) - p.grad).norm()) / scale
        if gap > ADD_UP_TOLERANCE:
            raise OpacusUnsupported(
                f"opacus: the per-example gradients of {name} miss {gap:.0%} of the gradient: "
                f"a weight used outside its layer (tied weights) gets a gradient no Opacus hook "
                f"sees, so its clipping norms would be too small; Opacus refuses this model "
                f"here (use engine=jax_privacy, pyvacy or tfp, or ghost with "
                f"engine.fallback=materialise)")


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
    # Without privacy the lstm is PyTorch's own nn.LSTM (DPLSTM is Opacus' Python loop).
    return time_torch_cell(cell, setup, label=label, versions={"opacus": opacus.__version__},
                           dp_lstm=cell.private)


def try_batch_torch(cell: CellConfig, noise_multiplier: float, batch_size: int, *,
                    cap_bytes: int | None = None) -> dict[str, Any]:
    """One Opacus (or plain PyTorch) step at ``batch_size`` for the memory probe, measured as
    :func:`ablation.measure.probe.try_batch` measures a JAX step: on the CPU the step's own peak
    resident memory after a warm-up step, against the cap (with the same safety net); on a GPU
    PyTorch's allocator capped to the cap and its peak reset before the step."""
    import gc
    import time

    from ablation.measure.probe import (_data_limit, _proc_status_bytes, _reset_peak_rss,
                                        safety_limit)
    from ablation.reference.torch_nets import build, training_set

    start = time.perf_counter()
    device = torch_device()
    on_cpu = device.type == "cpu"
    torch.manual_seed(cell.seed)
    limited = dataclasses_replace(cell, data_limit=batch_size)
    x, y = training_set(limited, device)
    targets = targets_for(cell.model, y)
    if not on_cpu and cap_bytes is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)
    module = build(cell.model, dp_lstm=cell.private, tied=cell.tied).to(device)
    if cell.private:
        module, optimizer, criterion = make_private(
            module, cell.model, lr=cell.lr, clip_norm=cell.dp.clip_norm,
            noise_multiplier=noise_multiplier, batch_size=batch_size, x=x, y=targets,
            mode=cell.engine_mode or "hooks")
    else:
        optimizer = torch.optim.SGD(module.parameters(), lr=cell.lr)
        criterion = criterion_for(cell.model)

    def one_step() -> None:
        optimizer.zero_grad(set_to_none=(cell.engine_mode or "hooks") != "ew")
        criterion(module(x), targets).backward()
        optimizer.step()
        if not on_cpu:
            torch.cuda.synchronize(device)

    result: dict[str, Any] = {"batch_size": batch_size, "rows": batch_size, "status": "ok",
                              "peak_bytes": None, "predicted_bytes": None, "peak_scope": "step"}
    safety = safety_limit(cap_bytes) if on_cpu and cap_bytes is not None else None
    with _data_limit(safety):
        one_step()  # warm-up: PyTorch's and Opacus' one-off allocations
    gc.collect()
    if on_cpu:
        baseline = _proc_status_bytes("VmRSS")
        with _data_limit(safety):
            reset = _reset_peak_rss()
            one_step()
            high = _proc_status_bytes("VmHWM") if reset else None
        result["peak_bytes"] = None if high is None else high - baseline
        result["peak_scope"] = "step" if reset else None
        if cap_bytes is not None and result["peak_bytes"] is not None \
                and result["peak_bytes"] > cap_bytes:
            result.update(status="oom", error=f"the step's peak {result['peak_bytes'] >> 20} MiB "
                          f"exceeds the cap {cap_bytes >> 20} MiB")
    else:
        torch.cuda.reset_peak_memory_stats(device)
        one_step()
        result["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        if cap_bytes is not None and result["peak_bytes"] > cap_bytes:
            result.update(status="oom", error=f"the step's peak {result['peak_bytes'] >> 20} "
                          f"MiB exceeds the cap {cap_bytes >> 20} MiB")
    result["wall_s"] = time.perf_counter() - start
    result["env"] = environment_torch(device)
    return result
