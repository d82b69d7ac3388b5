"""DP-SGD JIT × vmap ablation toolkit.

The pure core: engines (:mod:`ablation.core.engines`), the DP-SGD step (:mod:`ablation.core.dpsgd`).
Entry points: ``python -m ablation.run`` (timing) and ``python -m ablation.memory`` (memory probe).
"""

from ablation.core.dpsgd import DPConfig, Step, add_noise, make_step, sgd
from ablation.core.engines import ENGINES, LOOPS, Engine, clipped_grad_sum, get_engine

__version__ = "0.1.0"

__all__ = ["DPConfig", "ENGINES", "Engine", "LOOPS", "Step", "add_noise", "clipped_grad_sum",
           "get_engine", "make_step", "sgd"]
