"""The paper's six models as PyTorch twins, and the timing of a PyTorch cell.

Shared by every PyTorch-based reference row (Opacus, BackPACK, PyVacy). The architectures
mirror :mod:`models.nets` layer for layer. Images arrive NHWC like the JAX models and are
permuted to NCHW inside the network, and the conv net flattens in NHWC order, so JAX parameters
load one to one (:func:`load_haiku_params`, :func:`haiku_to_torch`). Parameter counts equal the
JAX ones except the LSTM: PyTorch's keeps two bias vectors per gate, so it has 400 more
(1,081,402); records hold ``n_params`` as measured.

:func:`time_torch_cell` times a cell with the same protocol as the JAX engines
(:func:`ablation.measure.clock.run_timing_loop`): data on the device before timing, batches
drawn outside the clock, the device synchronised before every clock read, and ``compile_s``
null (nothing is compiled ahead). A framework supplies only how one step runs.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import numpy as np

from ablation.measure.settings import CellConfig
from models import get_model
from models.nets import IMDB_VOCAB_ROWS

try:
    import torch
    from torch import nn
except ImportError as _error:  # pragma: no cover - exercised where torch is absent
    raise ImportError("the PyTorch reference rows need the torch extra: pip install -e "
                      "'.[torch]' (or `make torch`, which installs a CPU build of PyTorch "
                      "first)") from _error

# Hooks fire on the first layer, whose input (the data) needs no gradient; PyTorch warns about
# exactly that on every cell. Expected, and nothing to act on.
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
    """lstm: tokens → Embedding(10004, 100) → LSTM(100) → mean over time → 2."""

    def __init__(self, dp_lstm: bool = True):
        super().__init__()
        self.embed = nn.Embedding(IMDB_VOCAB_ROWS, 100)
        if dp_lstm:
            from opacus.layers import DPLSTM  # Opacus' per-example gradients need it
            self.lstm = DPLSTM(100, 100, batch_first=True)
        else:
            self.lstm = nn.LSTM(100, 100, batch_first=True)
        self.head = nn.Linear(100, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out.mean(dim=1))


class TorchAttention(nn.Module):
    """Multi-head self-attention as Haiku's ``hk.MultiHeadAttention`` computes it, built from
    ``nn.Linear`` layers applied batch-first, which is what Opacus needs for per-example
    gradients. (Opacus 1.6's ``DPMultiheadAttention`` is the same idea, but its
    ``batch_first=True`` path reshapes the heads' outputs without moving the head axis back,
    so it computes another function; fed time-major instead, its linear layers see the batch
    on axis 1 and Opacus' per-example gradients come out wrong.)"""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qlinear, self.klinear, self.vlinear = (nn.Linear(width, width) for _ in range(3))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, width]
        batch, steps, width = x.shape
        size = width // self.heads

        def split(t):  # [B, T, H·k] -> [B, H, T, k], heads contiguous as Haiku lays them
            return t.view(batch, steps, self.heads, size).transpose(1, 2)

        q, k, v = split(self.qlinear(x)), split(self.klinear(x)), split(self.vlinear(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / size ** 0.5, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, steps, width)
        return self.out_proj(out)


class TorchBlock(nn.Module):
    """models.attention.Block in PyTorch: ``h + MHA(LN(h))``, then ``h + MLP(LN(h))``, with the
    tanh approximation of GELU that ``jax.nn.gelu`` is by default."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = TorchAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.gelu = nn.GELU(approximate="tanh")
        self.mlp_out = nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.attention_norm(h))
        return h + self.mlp_out(self.gelu(self.mlp_in(self.mlp_norm(h))))


class EncoderNet(nn.Module):
    """models.attention's transformer (tokens) or vit (images) in PyTorch; ``tied``: the
    transformer's classifier reads its class vectors from the token table, as the Haiku model
    does (no ``head`` layer)."""

    def __init__(self, name: str, tied: bool = False):
        super().__init__()
        from models import attention
        config = attention.TRANSFORMER if name == "transformer" else attention.VIT
        width, self.name, self.tied = config["width"], name, tied
        self.register_buffer("class_rows", torch.tensor(attention.TIED_CLASS_ROWS),
                             persistent=False)
        if name == "transformer":
            self.tokens = nn.Embedding(IMDB_VOCAB_ROWS, width)
            steps, classes = 256, 2
        else:
            patch = config["patch"]
            self.to_nchw = NHWCToNCHW()
            self.patches = nn.Conv2d(3, width, patch, stride=patch)
            steps, classes = (32 // patch) ** 2, 10
        # Looked up with batched positions, so that Opacus sees one row per example.
        self.positions = nn.Embedding(steps, width)
        self.blocks = nn.ModuleList([TorchBlock(width, config["heads"])
                                     for _ in range(config["blocks"])])
        self.final_norm = nn.LayerNorm(width)
        self.head = None if tied else nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "transformer":
            h = self.tokens(x)
        else:
            h = self.patches(self.to_nchw(x)).flatten(2).transpose(1, 2)  # [B, 64, width], (h, w)
        steps = torch.arange(h.shape[1], device=h.device).repeat(h.shape[0], 1)  # contiguous
        h = h + self.positions(steps)
        for block in self.blocks:
            h = block(h)
        pooled = self.final_norm(h).mean(dim=1)
        if self.tied:  # the token table's own weight, used a second time
            return pooled @ self.tokens.weight[self.class_rows].T
        return self.head(pooled)


def build(name: str, *, dp_lstm: bool = True, tied: bool = False) -> nn.Module:
    """The PyTorch twin of the JAX model ``name`` (``tied``: the transformer's tied classifier).

    The lstm uses Opacus' ``DPLSTM`` (which Opacus needs for per-example gradients) when
    ``dp_lstm``, else ``nn.LSTM`` (for BackPACK and plain autograd); both have the same
    parameters under the same names.
    """
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
        return LSTMNet(dp_lstm)
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
    if tied and name != "transformer":
        raise ValueError(f"tied applies to the transformer only, not {name!r}")
    if name in ("transformer", "vit"):
        return EncoderNet(name, tied)
    raise ValueError(f"unknown model {name!r}")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


#: Haiku's LSTM gate blocks are (i, g, f, o); PyTorch's are (i, f, g, o).
_HAIKU_TO_TORCH_GATES = (0, 2, 1, 3)


def _gates(a: np.ndarray, axis: int) -> np.ndarray:
    blocks = np.split(a, 4, axis=axis)
    return np.concatenate([blocks[i] for i in _HAIKU_TO_TORCH_GATES], axis=axis)


def haiku_to_torch(name: str, tree: Mapping[str, Mapping[str, Any]], *,
                   gradient: bool = False) -> list[np.ndarray]:
    """Haiku parameters (or gradients) of model ``name`` as arrays in the twin's
    ``parameters()`` order and layout.

    Linear ``w [in, out]`` is transposed; Conv2D ``w [kh, kw, in, out]`` becomes
    ``[out, in, kh, kw]``. The LSTM's one linear map over ``[x, h]`` splits into PyTorch's
    input and hidden weights, its gates reordered, Haiku's forget-gate offset of +1 moved into
    ``bias_ih`` (parameters only: it has no gradient) and ``bias_hh`` zero. As gradients the two
    biases are each Haiku's bias gradient: PyTorch's per-example norm counts it twice.
    """
    groups = {key: {k: np.asarray(v, np.float64 if gradient else np.float32)
                    for k, v in group.items()} for key, group in tree.items()}
    if name in ("transformer", "vit"):
        return _encoder_to_torch(name, groups)
    if name == "lstm":
        lin, cell = groups["linear"], groups["lstm/linear"]
        w = _gates(cell["w"], axis=1)  # [200, 400]
        b = _gates(cell["b"], axis=0)
        b_ih = b.copy()
        if not gradient:
            b_ih[100:200] += 1.0  # PyTorch's f block; Haiku adds 1 inside the cell
        b_hh = b if gradient else np.zeros_like(b)
        return [groups["embed"]["embeddings"], w[:100].T, b_ih, w[100:].T, b_hh,
                lin["w"].T, lin["b"]]
    out = []
    for group in groups.values():  # creation order: the twin's layer order
        if "embeddings" in group:
            out.append(group["embeddings"])
            continue
        w = group["w"]
        out += [w.T if w.ndim == 2 else w.transpose(3, 2, 0, 1), group["b"]]
    return out


def _encoder_to_torch(name: str, groups: Mapping[str, Mapping[str, np.ndarray]]
                      ) -> list[np.ndarray]:
    """The transformer's or vit's Haiku arrays in :class:`EncoderNet`'s parameter order."""
    def linear(scope):
        return [groups[scope]["w"].T, groups[scope]["b"]]

    def norm(scope):
        return [groups[scope]["scale"], groups[scope]["offset"]]

    out = ([groups["tokens"]["embeddings"]] if name == "transformer" else
           [groups["patches"]["w"].transpose(3, 2, 0, 1), groups["patches"]["b"]])
    out.append(groups["positions"]["embeddings"])
    blocks = sorted({scope.split("/")[0] for scope in groups if scope.startswith("block")},
                    key=lambda b: int(b.partition("_")[2] or 0))
    for block in blocks:
        out += norm(f"{block}/attention_norm")
        for projection in ("query", "key", "value", "linear"):
            out += linear(f"{block}/attention/{projection}")
        out += norm(f"{block}/mlp_norm") + linear(f"{block}/mlp_in") + linear(f"{block}/mlp_out")
    # the tied transformer has no head: its classes read the token table
    return out + norm("final_norm") + (linear("head") if "head" in groups else [])


def load_haiku_params(module: nn.Module, params: Mapping[str, Mapping[str, Any]],
                      name: str) -> None:
    """Copy the Haiku parameters of model ``name`` into its twin built by :func:`build`."""
    arrays = haiku_to_torch(name, params)
    targets = list(module.parameters())
    if len(arrays) != len(targets):
        raise ValueError(f"{len(arrays)} Haiku arrays for {len(targets)} PyTorch parameters")
    with torch.no_grad():
        for target, array in zip(targets, arrays):
            if tuple(target.shape) != array.shape:
                raise ValueError(f"shape {array.shape} for a parameter of shape "
                                 f"{tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.array(array, copy=True, order="C")))


def criterion_for(name: str) -> nn.Module:
    """Mean loss over the batch: sigmoid cross-entropy for logreg, softmax for the rest."""
    return nn.BCEWithLogitsLoss() if name == "logreg" else nn.CrossEntropyLoss()


def targets_for(name: str, y: torch.Tensor) -> torch.Tensor:
    """Labels as the criterion wants them (float column for logreg, long otherwise)."""
    return y.float().unsqueeze(1) if name == "logreg" else y.long()


# ---------------------------------------------------------------------------------------------
# Timing a cell.


def torch_device() -> torch.device:
    """Where PyTorch rows run: the first CUDA device if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU, where PyTorch runs synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_set(cell: CellConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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


def environment_torch(device: torch.device, **versions: str | None) -> dict[str, Any]:
    """The record's ``env`` for a PyTorch cell: versions (torch's and ``versions``, e.g.
    ``opacus=...``) and the device PyTorch ran on."""
    from ablation.report.records import environment
    env = environment(devices=False)
    env.update(versions)
    env.update(torch=torch.__version__, platform=device.type,
               device_kind=(torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu"),
               device_count=torch.cuda.device_count() if device.type == "cuda" else 1,
               torch_threads=torch.get_num_threads())
    return env



#: ``setup(module, x, targets) -> step(xb, yb)``: a framework's training step for a cell.
StepSetup = Callable[[nn.Module, torch.Tensor, torch.Tensor],
                     Callable[[torch.Tensor, torch.Tensor], None]]


def time_torch_cell(cell: CellConfig, setup: StepSetup, *, label: str,
                    versions: Mapping[str, str | None], dp_lstm: bool = True) -> dict[str, Any]:
    """Time one PyTorch cell whose step ``setup`` builds; the same fields as
    :func:`ablation.measure.timing.time_cell`, with ``versions`` in the record's ``env``."""
    from ablation.measure.clock import PreparedClock, run_timing_loop

    device = torch_device()
    torch.manual_seed(cell.seed)
    x, y = training_set(cell, device)
    n = x.shape[0]
    if cell.batch_size > n:
        raise ValueError(f"batch_size {cell.batch_size} exceeds the training set ({n} examples)")
    module = build(cell.model, dp_lstm=dp_lstm, tied=cell.tied).to(device)
    n_params = count_params(module)
    targets = targets_for(cell.model, y)
    step = setup(module, x, targets)

    steps_per_epoch = n // cell.batch_size
    gen = torch.Generator(device=device).manual_seed(cell.seed)
    order = {"epoch": -1, "perm": None}

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(i, steps_per_epoch)
        if epoch != order["epoch"]:
            order["perm"] = torch.randperm(n, generator=gen, device=device)
            order["epoch"] = epoch
        idx = order["perm"][pos * cell.batch_size:(pos + 1) * cell.batch_size]
        return x[idx], targets[idx]

    def eval_loss() -> float:
        with torch.no_grad():
            return float(criterion_for(cell.model)(module(x[:1024]), targets[:1024]))

    loss_start = eval_loss()
    clock = PreparedClock(batch, lambda inputs: step(*inputs), lambda: sync(device),
                          lambda inputs: sum(t.nelement() * t.element_size() for t in inputs))
    fields = run_timing_loop(clock, cell.timing, steps_per_epoch,
                             f"{label} {cell.model} B={cell.batch_size}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    fields.update(n_params=n_params, n_train=n, steps_per_epoch=steps_per_epoch, compile_s=None,
                  n_compiles=0, compiled_functions=0, loss_start=loss_start,
                  loss_end=eval_loss(), device_peak_bytes=peak,
                  env=environment_torch(device, **versions))
    return fields


def plain_sgd(cell: CellConfig) -> StepSetup:
    """Non-private PyTorch SGD on the batch's mean loss (every framework's baseline row)."""
    def setup(module, x, targets):
        optimizer = torch.optim.SGD(module.parameters(), lr=cell.lr)
        criterion = criterion_for(cell.model)

        def step(xb, yb):
            optimizer.zero_grad(set_to_none=True)
            criterion(module(xb), yb).backward()
            optimizer.step()
        return step
    return setup


def noisy_sgd_update(params, grads, std: float, batch_size: int, lr: float) -> None:
    """The shared DP-SGD update of the PyTorch rows, in place: each parameter's clipped sum plus
    N(0, std²) noise (none when ``std`` is 0), divided by the batch size, one SGD step."""
    with torch.no_grad():
        for p, g in zip(params, grads):
            noisy = g + std * torch.randn_like(g) if std else g
            p.add_(noisy / batch_size, alpha=-lr)
