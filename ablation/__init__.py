"""DP-SGD JIT × vmap ablation toolkit.

The public API is the pure core: engines (:mod:`ablation.core.engines`), the DP-SGD step
(:mod:`ablation.core.dpsgd`) and the model contract (``Model``, ``DatasetSpec``: your own Haiku
network and the shape of its data), importable from here (``from ablation import make_step``). They
load on first use, so that a worker of another framework (TensorFlow Privacy's runs in an
environment without JAX) can import the package's framework-neutral parts.
Entry points: ``python -m ablation.run`` (timing) and ``python -m ablation.memory`` (memory probe).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "DPConfig": "ablation.core.dpsgd", "Step": "ablation.core.dpsgd",
    "add_noise": "ablation.core.noise", "make_step": "ablation.core.dpsgd",
    "sgd": "ablation.core.dpsgd", "ENGINES": "ablation.core.engines",
    "LOOPS": "ablation.core.engines", "Engine": "ablation.core.engines",
    "clipped_grad_sum": "ablation.core.engines", "get_engine": "ablation.core.engines",
    "Model": "models.registry", "DatasetSpec": "models.registry",
    "GhostUnsupported": "ablation.core.taps",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ablation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_PUBLIC))
