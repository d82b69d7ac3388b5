"""Reference rows: the paper's six models in PyTorch, trained privately with Opacus.

``engine=opacus`` times the same cell as the JAX engines, with the same timing protocol
(:func:`ablation.measure.timing.run_timing_loop`): data on the device before timing, batches drawn
outside the clock, the device synchronised before every clock read, and ``compile_s`` null
(nothing is compiled ahead). ``engine.mode`` picks Opacus' grad-sample mode (``hooks``,
``ghost``, ``functorch``, ``ew``); ``private=false`` gives plain PyTorch SGD.

The architectures mirror :mod:`models.nets` layer for layer. Images arrive NHWC like the JAX
models and are permuted to NCHW inside the network, and the conv net flattens in NHWC order,
so JAX parameters load one to one (:func:`load_haiku_params`). Parameter counts equal the
JAX ones except the LSTM: PyTorch's (Opacus' ``DPLSTM``) keeps two bias vectors per gate, so
it has 400 more (1,081,402); records hold ``n_params`` as measured.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Mapping

import numpy as np

from ablation.measure.settings import CellConfig
from models import get_model
from models.nets import IMDB_VOCAB_ROWS

try:
    import torch
    from torch import nn
except ImportError as _error:  # pragma: no cover - exercised where torch is absent
    raise ImportError("engine=opacus needs the torch extra: pip install -e '.[torch]' "
                      "(install torch==2.13.0 first on the development machine: make torch)"
                      ) from _error

# Opacus' hooks fire on the first layer, whose input (the data) needs no gradient; PyTorch
# warns about exactly that on every cell. Expected, and nothing to act on.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


class NHWCToNCHW(nn.Module):
    """NHWC → NCHW in PyTorch's standard (contiguous) memory format.

    A copy is forced: for one channel the permuted view already counts as contiguous, PyTorch
    then runs the convs channels-last, and Opacus' hook-based conv grad samples come out wrong
    for channels-last activations (and expanded weights refuse them).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


class FlattenNHWC(nn.Module):
    """Flatten ``[B, C, H, W]`` in NHWC order, as Haiku's Flatten does on NHWC tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


class MeanOver(nn.Module):
    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.dims)


class EmbeddingBagNet(nn.Module):
    """embed: tokens ``[B, 256]`` → Embedding(10004, 16) → mean over tokens → 16 → ReLU → 2."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(IMDB_VOCAB_ROWS, 16)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(dim=1))


class LSTMNet(nn.Module):
    """lstm: tokens → Embedding(10004, 100) → DPLSTM(100) → mean over time → 2."""

    def __init__(self):
        super().__init__()
        from opacus.layers import DPLSTM  # per-example gradients through an LSTM need it
        self.embed = nn.Embedding(IMDB_VOCAB_ROWS, 100)
        self.lstm = DPLSTM(100, 100, batch_first=True)
        self.head = nn.Linear(100, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out.mean(dim=1))


def build(name: str) -> nn.Module:
    """The PyTorch twin of the JAX model ``name``."""
    if name == "logreg":
        return nn.Sequential(nn.Linear(104, 1))
    if name == "ffnn":
        return nn.Sequential(nn.Linear(104, 50), nn.ReLU(), nn.Linear(50, 2))
    if name == "cnn":
        # 28×28 'SAME' with kernel 8, stride 2 pads 3 on each side.
        return nn.Sequential(
            NHWCToNCHW(),
            nn.Conv2d(1, 16, 8, stride=2, padding=3), nn.ReLU(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(), nn.MaxPool2d(2, 1),
            FlattenNHWC(), nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 10))
    if name == "embed":
        return EmbeddingBagNet()
    if name == "lstm":
        return LSTMNet()
    if name == "cifar10":
        layers: list[nn.Module] = [NHWCToNCHW()]
        channels = 3
        for widths in ((32, 32), (64, 64), (128, 128)):
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
            layers.append(nn.AvgPool2d(2, 2))
        layers += [nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(),
                   nn.Conv2d(256, 10, 3, padding=1), MeanOver((2, 3))]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown model {name!r}")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_haiku_params(module: nn.Module, params: Mapping[str, Mapping[str, Any]]) -> None:
    """Copy Haiku parameters into the twin built by :func:`build` (all models but the lstm).

    Haiku modules are matched to PyTorch layers in creation order; Linear ``w [in, out]`` is
    transposed, Conv2D ``w [kh, kw, in, out]`` becomes ``[out, in, kh, kw]``.
    """
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]
    groups = list(params.values())
    if len(layers) != len(groups):
        raise ValueError(f"{len(groups)} Haiku modules for {len(layers)} PyTorch layers")
    with torch.no_grad():
        for layer, group in zip(layers, groups):
            if isinstance(layer, nn.Embedding):
                layer.weight.copy_(_tensor(group["embeddings"]))
                continue
            w = np.asarray(group["w"])
            w = w.T if isinstance(layer, nn.Linear) else w.transpose(3, 2, 0, 1)
            layer.weight.copy_(_tensor(w))
            layer.bias.copy_(_tensor(group["b"]))


def _tensor(array: Any) -> torch.Tensor:
    """A tensor holding a copy of ``array`` (JAX arrays are read-only views; PyTorch warns)."""
    return torch.from_numpy(np.array(array, copy=True, order="C"))


def criterion_for(name: str) -> nn.Module:
    """Mean loss over the batch: sigmoid cross-entropy for logreg, softmax for the rest."""
    return nn.BCEWithLogitsLoss() if name == "logreg" else nn.CrossEntropyLoss()


def _targets(name: str, y: torch.Tensor) -> torch.Tensor:
    return y.float().unsqueeze(1) if name == "logreg" else y.long()


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
    criterion(private(x), _targets(model_name, y)).backward()
    optimizer.pre_step()  # clip, sum, add (zero) noise, divide by the batch size
    return [p.grad.detach().cpu().numpy() * batch_size for p in private.parameters()]


# ---------------------------------------------------------------------------------------------
# Timing a cell.


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _training_set(cell: CellConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    spec = get_model(cell.model).dataset
    if cell.data == "real":
        from ablation.data import datasets
        x, y = datasets.load(spec.name, cache_dir=cell.data_cache_dir, download=cell.download)
        if cell.data_limit is not None:
            x, y = x[:cell.data_limit], y[:cell.data_limit]
        return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    n = spec.n_train if cell.data_limit is None else min(cell.data_limit, spec.n_train)
    gen = torch.Generator(device=device).manual_seed(cell.seed)
    shape = (n, *spec.input_shape)
    if spec.input_dtype == "int32":
        x = torch.randint(0, spec.vocab_size, shape, generator=gen, device=device)
    else:
        x = torch.rand(shape, generator=gen, device=device)
    y = torch.randint(0, spec.num_classes, (n,), generator=gen, device=device)
    return x, y


def environment_torch(device: torch.device) -> dict[str, Any]:
    """The record's ``env`` for a PyTorch cell: versions and the device PyTorch ran on."""
    import opacus

    from ablation.report.records import environment
    env = environment(devices=False)
    env.update(torch=torch.__version__, opacus=opacus.__version__, platform=device.type,
               device_kind=(torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu"),
               device_count=torch.cuda.device_count() if device.type == "cuda" else 1,
               torch_threads=torch.get_num_threads())
    return env


def time_cell_torch(cell: CellConfig, noise_multiplier: float) -> dict[str, Any]:
    """Time one PyTorch/Opacus cell; the same fields as :func:`ablation.measure.timing.time_cell`."""
    from ablation.measure.timing import run_timing_loop

    device = _device()
    torch.manual_seed(cell.seed)
    x, y = _training_set(cell, device)
    n = x.shape[0]
    if cell.batch_size > n:
        raise ValueError(f"batch_size {cell.batch_size} exceeds the training set ({n} examples)")
    module = build(cell.model).to(device)
    n_params = count_params(module)
    targets = _targets(cell.model, y)
    if cell.private:
        module, optimizer, criterion = make_private(
            module, cell.model, lr=cell.lr, clip_norm=cell.dp.clip_norm,
            noise_multiplier=noise_multiplier, batch_size=cell.batch_size, x=x, y=y,
            mode=cell.engine_mode or "hooks")
    else:
        optimizer = torch.optim.SGD(module.parameters(), lr=cell.lr)
        criterion = criterion_for(cell.model)

    steps_per_epoch = n // cell.batch_size
    gen = torch.Generator(device=device).manual_seed(cell.seed)
    order = {"epoch": -1, "perm": None}
    count = {"steps": 0}

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(i, steps_per_epoch)
        if epoch != order["epoch"]:
            order["perm"] = torch.randperm(n, generator=gen, device=device)
            order["epoch"] = epoch
        idx = order["perm"][pos * cell.batch_size:(pos + 1) * cell.batch_size]
        return x[idx], targets[idx]

    def eval_loss() -> float:
        plain = getattr(module, "_module", module)  # the network without Opacus' wrapper
        with torch.no_grad():
            return float(criterion_for(cell.model)(plain(x[:1024]), targets[:1024]))

    loss_start = eval_loss()

    def tick() -> float:
        xb, yb = batch(count["steps"])
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=set_to_none)
        criterion(module(xb), yb).backward()
        optimizer.step()
        _sync(device)
        elapsed = time.perf_counter() - start
        count["steps"] += 1
        return elapsed

    # Expanded weights (mode "ew") refuses gradients that were set to None between steps.
    set_to_none = not (cell.private and cell.engine_mode == "ew")
    label = f"opacus[{cell.engine_mode}]" if cell.private else "pytorch"
    fields = run_timing_loop(tick, cell.timing, steps_per_epoch,
                             f"{label} {cell.model} B={cell.batch_size}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    fields.update(n_params=n_params, n_train=n, steps_per_epoch=steps_per_epoch, compile_s=None,
                  steps_run=count["steps"], n_compiles=0, compiled_functions=0,
                  loss_start=loss_start, loss_end=eval_loss(), device_peak_bytes=peak,
                  env=environment_torch(device))
    return fields
