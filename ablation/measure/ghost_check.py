"""The ghost engine's self-check: its norms and clipped sum against materialised gradients.

``python -m ablation.check_ghost model=...`` runs :func:`check_ghost` on a few batches of the
model's data (synthetic or real, as ``data=`` says) and on the same batches made adversarial
(inputs shifted by a large shared offset, 1e3 and 1e4, the case where a Gram form cancels; for
token inputs, every position of an example the same id), and says ``exact`` or what differs.
It compares, on each batch:

* each example's norm by the rules with the norm of its materialised gradient (vmap, what
  DP-SGD clips): never below it (beyond float32 rounding) and above it by at most the Gram
  form's documented tolerance (the largest ratio is the over-clip factor);
* the clipped sum with ``Σ_i min(1, C/n_i) g_i`` built from the materialised gradients and the
  rules' own norms ``n_i`` (so the sum is checked to rounding, whatever the norms' slack), at
  the configured C and at the median norm (which clips half the examples);
* the clipped sum with the ``both`` engine's (clip factors from the true norms), at both clip
  norms: what the over-clipping costs the released sum.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from ablation.core.clipping import (GRAM_TOLERANCE, ghost_clipped_sum, layer_rules,
                                    per_example_sq_norms)
from ablation.core.engines import get_engine, vmap_sum
from ablation.data.samplers import ShuffleSampler, run_keys
from ablation.measure.settings import CellConfig, model_of, training_set_of
from models import count_params

#: Below this, a norm ratio is float32 rounding (per-example norms agree to ~1e-6 here).
NORM_RTOL = 1e-5
#: The clipped sums agree to ~1e-6 of their scale; a wrong rule moves them by ≥ 1e-2.
SUM_RTOL = 1e-4
#: The shared offsets the adversarial batches add to float inputs.
OFFSETS = (1e3, 1e4)


@dataclasses.dataclass(frozen=True)
class GhostCheck:
    """What :func:`check_ghost` found.

    Attributes:
      model, n_params, batches, batch_size: what was checked.
      rules: each layer's rule (``{scope: rule}``, see :func:`layer_rules`).
      norm_ratio: the smallest and largest (rules' norm ÷ materialised norm) over all examples.
      norm_ratio_allowed: the range the ratio must lie in.
      sum_error: the largest ``max |ghost − expected| / max |expected|`` over batches and clip
        norms, per clip norm (``{"C=1": ..., "median": ...}``).
      clipped: how many examples each clip norm clipped, over all batches.
      inputs: the kinds of batch checked (``data``, ``offset 1e+03``, ``repeated ids``, ...).
      sum_vs_both: the largest ``max |ghost − both| / max |both|`` per clip norm, where
        ``both`` clips by the true norms.
      sum_vs_both_allowed: what the over-clip tolerance allows of it.
    """

    model: str
    n_params: int
    batches: int
    batch_size: int
    rules: dict[str, str]
    norm_ratio: tuple[float, float]
    norm_ratio_allowed: tuple[float, float]
    sum_error: dict[str, float]
    clipped: dict[str, int]
    inputs: tuple[str, ...] = ("data",)
    sum_vs_both: dict[str, float] = dataclasses.field(default_factory=dict)
    sum_vs_both_allowed: float = SUM_RTOL

    @property
    def exact(self) -> bool:
        low, high = self.norm_ratio
        return (self.norm_ratio_allowed[0] <= low and high <= self.norm_ratio_allowed[1]
                and all(e <= SUM_RTOL for e in self.sum_error.values())
                and all(e <= self.sum_vs_both_allowed for e in self.sum_vs_both.values()))

    def lines(self) -> list[str]:
        """The report, one line each."""
        low, high = self.norm_ratio
        allowed = self.norm_ratio_allowed
        out = [f"ghost check: {self.model} ({self.n_params:,} parameters), {self.batches} "
               f"batch(es) of {self.batch_size}, each as {', '.join(self.inputs)}",
               *(f"  {scope}: {rule}" for scope, rule in self.rules.items()),
               f"  norms, rules ÷ materialised: {low:.7f} … {high:.7f} (allowed "
               f"{allowed[0]:.7f} … {allowed[1]:.7f}); over-clip factor {max(high, 1.0):.7f}"]
        for name, error in self.sum_error.items():
            out.append(f"  clipped sum at {name} (clips {self.clipped[name]} of "
                       f"{self.batches * len(self.inputs) * self.batch_size}): max |ghost − "
                       f"materialised| = {error:.2e} of the sum's scale (allowed {SUM_RTOL:g}); "
                       f"vs both {self.sum_vs_both.get(name, 0.0):.2e} (allowed "
                       f"{self.sum_vs_both_allowed:.2g})")
        out.append("exact" if self.exact else "NOT EXACT: the ghost engine differs from the "
                   "materialised gradients beyond rounding")
        return out


def _materialised(loss):
    @jax.jit
    def grads(params, x, y):
        per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
        leaves = jax.tree.leaves(per_example)
        return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)
    return grads


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                           for leaf in jax.tree.leaves(tree)])


def adversarial(x: jax.Array, vocab_size: int | None) -> dict[str, jax.Array]:
    """The batch ``x`` made to break the rules: float inputs shifted by each of
    :data:`OFFSETS` (a shared offset much larger than their variation), token ids repeated
    (every position of an example its first id)."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        return {f"offset {offset:.0e}": x + jnp.asarray(offset, x.dtype) for offset in OFFSETS}
    flat = x.reshape(x.shape[0], -1)
    return {"repeated ids": jnp.broadcast_to(flat[:, :1], flat.shape).reshape(x.shape)}


def check_ghost(cell: CellConfig, batches: int = 3) -> GhostCheck:
    """Compare the ghost engine (``cell.engine_mode``: book-keeping or two-pass) with
    materialised per-example gradients and with the ``both`` engine on ``batches`` batches of
    the cell's model and data, each also made adversarial (:func:`adversarial`).

    Raises:
      GhostUnsupported: the model has a layer the rules cannot clip exactly (names it).
    """
    model = model_of(cell)
    keys = run_keys(cell.seed)
    params = model.init(keys.init)
    data = training_set_of(cell, model, keys.data)
    sampler = ShuffleSampler(data, min(cell.batch_size, data.size), keys.sampler)
    mode = get_engine("ghost", mode=cell.engine_mode or "bookkeeping").ghost
    fallback = cell.ghost_fallback
    rules = layer_rules(model.loss, params, data.x[0], data.y[0], fallback)
    norms_fn = jax.jit(lambda p, x, y: per_example_sq_norms(model.loss, p, x, y, fallback))
    sum_fn = jax.jit(lambda p, x, y, c: ghost_clipped_sum(model.loss, p, x, y, c, mode=mode,
                                                          fallback=fallback))
    both_fn = jax.jit(lambda p, x, y, c: vmap_sum(model.loss, p, x, y, c))
    grads_fn = _materialised(model.loss)
    ratios, errors, versus, clipped, kinds = [], {}, {}, {}, ["data"]
    for i in range(batches):
        batch = sampler.batch(i)
        variants = {"data": batch.x, **adversarial(batch.x, model.dataset.vocab_size)}
        kinds = list(variants)
        for x in variants.values():
            g = np.asarray(grads_fn(params, x, batch.y), np.float64)  # [B, n_params]
            true = np.linalg.norm(g, axis=1)
            rule = np.sqrt(np.asarray(norms_fn(params, x, batch.y), np.float64))
            ratios.extend(np.where(true > 0, rule / np.where(true > 0, true, 1), 1.0))
            for name, clip in ((f"C={cell.dp.clip_norm:g}", cell.dp.clip_norm),
                               ("the median norm", float(np.median(true)))):
                factors = np.minimum(1.0, clip / np.where(rule > 0, rule, math.inf))
                expected = factors @ g
                got = _flat(sum_fn(params, x, batch.y, jnp.float32(clip)))
                both = _flat(both_fn(params, x, batch.y, jnp.float32(clip)))
                errors[name] = max(errors.get(name, 0.0), _relative(got, expected))
                versus[name] = max(versus.get(name, 0.0), _relative(got, both))
                clipped[name] = clipped.get(name, 0) + int(np.sum(rule > clip))
    gram = any("gram" in rule for rule in rules.values())
    over = math.sqrt(1 + GRAM_TOLERANCE) - 1 if gram else 0.0
    high = 1 + NORM_RTOL + over
    return GhostCheck(model.name, count_params(params), batches, sampler.batch_size, rules,
                      (float(min(ratios)), float(max(ratios))), (1 - NORM_RTOL, high),
                      errors, clipped, tuple(kinds), versus, SUM_RTOL + over)


def _relative(got: np.ndarray, expected: np.ndarray) -> float:
    """``max |got − expected| / max |expected|`` (0 for two zero sums)."""
    scale = max(float(np.abs(expected).max()), np.finfo(np.float32).tiny)
    return float(np.abs(got - expected).max()) / scale
