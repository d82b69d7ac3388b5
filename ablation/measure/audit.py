"""Audit an engine as a privacy mechanism: canaries against the update it releases.

Equality to an oracle does not show that a step is private: a mistake the oracle shares (a
reused noise key, a masked slot that leaks, a rule that under-clips a crafted input) passes
every equality test. This module runs the cell's own step, built as a training run builds it,
on inputs with and without a canary, and measures how far the released update tells them
apart. White-box: the auditor sees the parameters before and after each call, so with SGD at
the audit's small learning rate η the released noisy sum is ``(θ − θ') · B / η``, and a
canary's score is that sum projected on the canary's own gradient direction, in units of C.

Tests (each a pair of worlds; :class:`Test`):

``one step``
    The canary in slot 0 of every step of one call (in) against the same slot holding an
    ordinary example that is masked (out). A correct step releases ``C`` more along the canary
    in one world, with noise ``σC`` along it per step: ``μ = √K/σ`` for a call of K steps.
``masked slot``
    The canary in a masked slot against an ordinary example there: a correct step cannot tell
    (``μ = 0``); a slot that leaks gives ``μ ≈ 1/σ``.
``noise schedule``
    Two calls with the run's own noise keys (:func:`ablation.measure.timing.step_keys`), the
    canary in the second; the score differences the two calls' releases, so a key reused
    across steps cancels the noise and the score is exact (``μ̂ → ∞``). Correct: ``μ = √K/(σ√2)``.
``whole run``
    A training run with m canaries, each in the training set with probability ½, under the
    run's Poisson sampler and key schedule; the one-run lower bound on ε
    (:func:`ablation.core.audit_bounds.epsilon_one_run`) beside the accountant's ε.

A test passes when ``μ̂ − 3·SE ≤ μ_claim`` and its lower bound on ε is at most the claim's ε.
The controls (:data:`CONTROLS`) break the mechanism on purpose, only here, never reachable
from a training run; an audit that does not catch them has no power.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ablation.core import audit_bounds as bounds
from ablation.core.engines import get_engine, vmap_sum
from ablation.data.samplers import (PoissonSampler, ShuffleSampler, TrainingSet,
                                    poisson_capacity, run_keys)
from ablation.measure.settings import AuditSettings, CellConfig, model_of, training_set_of
from ablation.measure.timing import build_step, step_keys

#: The broken mechanisms the audit must catch (each injected here only).
CONTROLS = {
    "noise halved": "the noise std σC/2 while the claim stays σ",
    "clipping off": "no clipping, noise σC",
    "leaky mask": "a masked slot's example counted in the sum",
    "one noise key": "the same noise key for every step and call",
}
class NotAuditable(ValueError):
    """A cell the audit cannot audit (named why): the command exits 2, not 1."""


#: Trials batched into one compiled call: at most this many noise values at once.
_VALUES_PER_CHUNK = 1 << 24


@dataclasses.dataclass(frozen=True)
class Test:
    """One audit test: scores of two worlds and what they say.

    Attributes:
      name: ``one step``, ``masked slot``, ``noise schedule``.
      claim_mu: the μ a correct mechanism has here.
      estimate: μ̂ and its standard error.
      noise_ratio: the measured std of the scores ÷ the std a correct step gives.
      bound: the Clopper–Pearson lower bound on ε (None where the claim is μ = 0).
      claim_epsilon: the ε at δ of ``claim_mu`` (what the bound must not exceed).
      leak_mu: for the masked-slot test, the μ a slot that leaked would show (its power).
      extended: a marginal failure was checked on as many fresh trials, pooled (see _pair).
    """

    name: str
    claim_mu: float
    estimate: bounds.MuEstimate
    noise_ratio: float
    bound: bounds.LowerBound | None
    claim_epsilon: float | None
    leak_mu: float | None = None
    extended: bool = False

    @property
    def noise_within(self) -> bool:
        """The measured noise std within 4 of its standard errors of σC·√K, either way: a key
        reused inside a call (noise Kσ instead of √Kσ) lowers μ̂ but not this."""
        e = self.estimate
        return abs(self.noise_ratio - 1) <= 4 / math.sqrt(2 * max(1, e.n_in + e.n_out - 2))

    @property
    def passed(self) -> bool:
        within = not self.estimate.above(self.claim_mu)
        bounded = self.bound is None or self.bound.epsilon <= (self.claim_epsilon or 0.0)
        return within and bounded and self.noise_within

    def line(self, delta: float) -> str:
        """The test on one line; its GDP estimate of ε at ``delta``."""
        e = self.estimate
        mu = "inf" if math.isinf(e.mu) else f"{e.mu:.3f} ± {e.se:.3f}"
        pooled = ", pooled after a marginal first draw" if self.extended else ""
        text = (f"{self.name:<15} μ̂ = {mu} (claim {self.claim_mu:.3f}; {e.n_in}+{e.n_out} "
                f"trials{pooled}), noise std ÷ σC·√K = {self.noise_ratio:.3f}")
        if not self.noise_within:
            text += " (outside its 4-SE band)"
        if self.leak_mu is not None:
            text += f"; a leaking slot would show μ ≈ {self.leak_mu:.2f}"
        if self.bound is not None:
            text += (f", ε ≥ {self.bound.epsilon:.2f} (Clopper–Pearson, {1 - self.bound.alpha:.0%};"
                     f" claim ε = {self.claim_epsilon:.2f}), GDP estimate ε ≈ "
                     f"{bounds.epsilon_of_gdp(e.mu, delta):.2f}")
        return text + ("" if self.passed else "  ← FAILS")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "claim_mu": self.claim_mu, "mu": self.estimate.mu,
                "mu_se": self.estimate.se, "n_in": self.estimate.n_in,
                "n_out": self.estimate.n_out, "noise_ratio": self.noise_ratio,
                "epsilon_lower": None if self.bound is None else self.bound.epsilon,
                "claim_epsilon": self.claim_epsilon, "leak_mu": self.leak_mu,
                "extended": self.extended, "passed": self.passed}


@dataclasses.dataclass(frozen=True)
class WholeRun:
    """The one-run audit: m canaries in one training run.

    Attributes:
      steps, canaries, included, examples, sampling_rate: the run.
      epsilon: the accountant's ε of that run (PLD, Poisson).
      bounds: the one-run lower bounds, ``sum`` (the releases summed along each canary) and
        ``difference`` (squared differences of consecutive releases, which a reused noise
        key leaves noise-free), each at confidence 1 − α/2.
    """

    steps: int
    canaries: int
    included: int
    examples: int
    sampling_rate: float
    epsilon: float
    bounds: dict[str, bounds.OneRunBound]

    @property
    def epsilon_lower(self) -> float:
        return max(b.epsilon for b in self.bounds.values())

    @property
    def passed(self) -> bool:
        return self.epsilon_lower <= self.epsilon

    def line(self) -> str:
        parts = ", ".join(f"{name} {b.correct}/{b.guesses} right → ε ≥ {b.epsilon:.2f}"
                          for name, b in self.bounds.items())
        return (f"{'whole run':<15} {self.steps} steps, {self.canaries} canaries "
                f"({self.included} in), q = {self.sampling_rate:.3g}: {parts}; accountant "
                f"ε = {self.epsilon:.2f}" + ("" if self.passed else "  ← FAILS"))

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "canaries": self.canaries, "included": self.included,
                "examples": self.examples, "sampling_rate": self.sampling_rate,
                "epsilon": self.epsilon, "epsilon_lower": self.epsilon_lower,
                "bounds": {k: dataclasses.asdict(b) for k, b in self.bounds.items()},
                "passed": self.passed}


@dataclasses.dataclass(frozen=True)
class Audit:
    """What one audit of one mechanism found (:func:`audit_cell`, or a control)."""

    mechanism: str
    tests: tuple[Test, ...]
    whole_run: WholeRun | None = None

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tests) and (self.whole_run is None
                                                       or self.whole_run.passed)

    def to_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "passed": self.passed,
                "tests": [t.to_dict() for t in self.tests],
                "whole_run": None if self.whole_run is None else self.whole_run.to_dict()}


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """The audit of a cell's engine and, with ``audit.controls``, of the controls.

    Attributes:
      engine: the engine and its layout as audited (``jit[scan]``, ``both ×4 steps/call``).
      canary, canary_norm: the canary's kind and its gradient norm.
      clip_norm: the C the audit clipped at (the cell's, or lower where the network bounds the
        canary's gradient: ``clip_note`` says so).
      noise_multiplier, delta, steps_per_call: the mechanism's claim.
      audit: the engine's audit; controls: each control's (``caught`` when it fails).
      seconds: how long it took.
    """

    model: str
    engine: str
    n_params: int
    batch_size: int
    canary: str
    canary_norm: float
    clip_norm: float
    clip_note: str | None
    noise_multiplier: float
    delta: float
    steps_per_call: int
    audit: Audit
    controls: dict[str, Audit]
    seconds: float

    @property
    def passed(self) -> bool:
        return self.audit.passed

    @property
    def powered(self) -> bool:
        """Every control caught (vacuously true when none ran)."""
        return all(not c.passed for c in self.controls.values())

    def lines(self) -> list[str]:
        out = [f"audit: {self.model} ({self.n_params:,} parameters), engine {self.engine}, "
               f"batch {self.batch_size}, σ = {self.noise_multiplier:g}, C = "
               f"{self.clip_norm:.4g}, δ = {self.delta:g}; canary '{self.canary}' with "
               f"gradient norm {self.canary_norm:.3g}"]
        if self.clip_note:
            out.append(f"  note: {self.clip_note}")
        out += [f"  {t.line(self.delta)}" for t in self.audit.tests]
        if self.audit.whole_run is not None:
            out.append(f"  {self.audit.whole_run.line()}")
        for name, control in self.controls.items():
            worst = max(control.tests, key=lambda t: (not t.passed, t.estimate.mu))
            mu = "inf" if math.isinf(worst.estimate.mu) else f"{worst.estimate.mu:.2f}"
            run = control.whole_run
            extra = (f"; whole run ε ≥ {run.epsilon_lower:.2f} vs {run.epsilon:.2f}"
                     if run is not None else "")
            out.append(f"  control '{name}' ({CONTROLS[name]}): "
                       f"{'caught' if not control.passed else 'NOT CAUGHT'} by {worst.name} "
                       f"(μ̂ = {mu} vs claim {worst.claim_mu:.3f}{extra})")
        verdict = ("private: every test within its claim" if self.passed
                   else "NOT PRIVATE: a test exceeds its claim")
        if self.controls:
            verdict += ("; every control caught" if self.powered
                        else "; a control was NOT caught (the audit lacks power here)")
        out.append(f"{verdict} ({self.seconds:.0f} s)")
        return out

    def to_record(self) -> dict[str, Any]:
        return {"audited_engine": self.engine, "n_params": self.n_params,
                "canary": self.canary, "canary_norm": self.canary_norm,
                "clip_norm_audited": self.clip_norm, "clip_note": self.clip_note,
                "noise_multiplier": self.noise_multiplier, "delta": self.delta,
                "audit": self.audit.to_dict(),
                "controls": {k: {**v.to_dict(), "caught": not v.passed}
                             for k, v in self.controls.items()},
                "audit_passed": self.passed, "audit_powered": self.powered,
                "audit_s": self.seconds}


# ---------------------------------------------------------------------------------------------
# Canaries


def _grad_norm(loss: Callable, params, x1, y1) -> float:
    flat, _ = ravel_pytree(jax.grad(loss)(params, x1, y1))
    return float(jnp.linalg.norm(flat))


def craft_canary(model, params, x0: jax.Array, kind: str, clip_norm: float, ratio: float,
                 key: jax.Array) -> tuple[jax.Array, jax.Array, str, float]:
    """A canary ``(x, y)`` built from the input ``x0``, its kind, and its gradient norm.

    ``offset`` adds a large shared offset (where a Gram form of the norms cancels), ``scaled``
    multiplies, ``random`` draws a fresh input; each float input is then scaled ×10 until its
    gradient norm is ≥ ``ratio × C`` (or 10⁶). ``repeated`` puts the first token id at every
    position, ``random`` draws fresh ids. The label is the class with the largest gradient.
    """
    floating = jnp.issubdtype(x0.dtype, jnp.floating)
    if kind == "auto":
        kind = "offset" if floating else "repeated"
    if floating:
        if kind == "offset":
            x = x0 + jnp.asarray(1e3, x0.dtype)
        elif kind == "scaled":
            x = x0 * jnp.asarray(10.0, x0.dtype)
        elif kind == "random":
            x = jax.random.normal(key, x0.shape, x0.dtype)
        else:
            raise NotAuditable(f"audit.canary={kind} needs token inputs; this model's are "
                               f"floats (offset, scaled, random)")
    else:
        flat = x0.reshape(-1)
        if kind == "repeated":
            x = jnp.broadcast_to(flat[:1], flat.shape).reshape(x0.shape)
        elif kind == "random":
            x = jax.random.randint(key, x0.shape, 0, model.dataset.vocab_size, x0.dtype)
        else:
            raise NotAuditable(f"audit.canary={kind} needs float inputs; this model's are "
                               f"token ids (repeated, random)")
    labels = jnp.arange(model.dataset.num_classes, dtype=jnp.int32)

    def best(x):
        norms = [_grad_norm(model.loss, params, x, y) for y in labels]
        i = int(np.argmax(norms))
        return labels[i], norms[i]

    y, norm = best(x)
    for _ in range(6):
        if not floating or norm >= ratio * clip_norm:
            break
        x = x * jnp.asarray(10.0, x.dtype)
        y, norm = best(x)
    if not (math.isfinite(norm) and norm > 0):
        raise NotAuditable(f"the '{kind}' canary's gradient norm is {norm}: no direction to "
                           f"audit along (try another audit.canary)")
    return x, y, kind, norm


# ---------------------------------------------------------------------------------------------
# Trials


def _displacement(before, after) -> jax.Array:
    return ravel_pytree(before)[0] - ravel_pytree(after)[0]


class _Worlds:
    """The audited step, its state and the inputs of each world, and how to score a trial."""

    def __init__(self, cell: CellConfig, settings: AuditSettings, model, params, batches,
                 canary: tuple[jax.Array, jax.Array], clip_norm: float, *,
                 noise_multiplier: float, clipped_sum: Callable | None = None,
                 one_key: bool = False, engine: str | None = None):
        audited = dataclasses.replace(cell, dp=dataclasses.replace(cell.dp, clip_norm=clip_norm))
        self.step, optimizer = build_step(audited, model, noise_multiplier,
                                          clipped_sum=clipped_sum, engine=engine,
                                          donate=False, lr=settings.lr)
        self.params, self.opt_state = params, optimizer.init(params)
        self.k = cell.steps_per_call
        self.one_key = one_key
        x, y = batches  # [K, B, ...], [K, B]
        cx, cy = canary
        grad = ravel_pytree(jax.grad(model.loss)(params, cx, cy))[0]
        self.direction = grad / jnp.linalg.norm(grad)
        # Slot 0 of the out world: the ordinary example whose clipped gradient differs most
        # from the canary's, so that a masked slot that leaks moves the release most along
        # their difference (the masked-slot test's direction; a correct step moves it not).
        rows = jax.vmap(lambda a, b: ravel_pytree(jax.grad(model.loss)(params, a, b))[0])(
            x[0], y[0])
        norms = jnp.linalg.norm(rows, axis=1, keepdims=True)
        clipped = rows * jnp.minimum(1.0, clip_norm / jnp.where(norms > 0, norms, 1.0))
        gaps = clip_norm * self.direction - clipped
        other = int(jnp.argmax(jnp.linalg.norm(gaps, axis=1)))
        self.leak_direction = gaps[other] / jnp.linalg.norm(gaps[other])
        #: the μ a leaking masked slot would show (K steps, each leaking the gap)
        self.leak_mu = float(jnp.linalg.norm(gaps[other])) / clip_norm * math.sqrt(self.k) / \
            noise_multiplier
        x, y = x.at[:, 0].set(x[0, other]), y.at[:, 0].set(y[0, other])
        ones = jnp.ones(x.shape[:2], jnp.float32)
        slot0_off = ones.at[:, 0].set(0.0)
        x_canary, y_canary = x.at[:, 0].set(cx), y.at[:, 0].set(cy)
        self.worlds = {"in": (x_canary, y_canary, ones), "out": (x, y, slot0_off),
                       "masked": (x_canary, y_canary, slot0_off), "plain": (x, y, ones)}
        # the score's unit: released sum = displacement · B / η, then along û, in units of C
        self.scale = cell.batch_size / (settings.lr * clip_norm)
        self.compiled = self.step.engine.compiles_whole_step
        self.n_params = int(grad.size)

    def _unit(self, inputs):
        x, y, mask = inputs
        if self.k == 1:
            return x[0], y[0], mask[0]
        return inputs

    def _keys(self, base: jax.Array, call: int) -> jax.Array:
        keys = step_keys(base, 0 if self.one_key else call, self.k)
        if self.one_key and self.k > 1:
            keys = jnp.broadcast_to(keys[0], keys.shape)
        return keys

    def _score(self, state, units, direction, base) -> jax.Array:
        """The score of one trial (one base key): one call (one world), or two calls (plain
        then the world) scored by the difference of their releases, along ``direction``.
        Everything but the key is an argument, never a closure: a compiled function would
        hold the parameters as constants and XLA would fold the whole clipped sum into them
        at compile time (minutes on cifar10)."""
        (params, opt_state), released = state, []
        for call, (x, y, mask) in enumerate(units):
            new, opt_state = self.step(params, opt_state, x, y, self._keys(base, call), mask)
            released.append(_displacement(params, new))
            params = new
        value = released[0] if len(released) == 1 else released[1] - released[0]
        return jnp.dot(value, direction) * self.scale

    def scores(self, worlds: tuple[str, ...], bases: jax.Array, budget: _Budget,
               direction: jax.Array | None = None) -> np.ndarray:
        args = ((self.params, self.opt_state), [self._unit(self.worlds[w]) for w in worlds],
                self.direction if direction is None else direction)
        if self.compiled:
            per = max(1, _VALUES_PER_CHUNK // (self.n_params * len(worlds) * self.k))
            batched = jax.jit(jax.vmap(self._score, in_axes=(None, None, None, 0)))
            return np.concatenate([np.asarray(batched(*args, bases[i:i + per]))
                                   for i in range(0, bases.shape[0], per)])
        out = []
        for i in range(bases.shape[0]):
            if not budget.allows(i):
                break
            out.append(float(self._score(*args, bases[i])))
        return np.asarray(out)


#: The fewest trials a side gets, however slow the engine (the bounds need a few each side).
MIN_TRIALS = 8


class _Budget:
    """Trials that run one by one: at most ``limit`` a side, each side within its share of
    ``seconds`` (and never fewer than :data:`MIN_TRIALS`)."""

    def __init__(self, limit: int, seconds: float, sides: int):
        self.limit, self.per_side = limit, seconds / sides
        self.next_side()

    def allows(self, i: int) -> bool:
        if i < MIN_TRIALS:
            return True
        return i < self.limit and time.perf_counter() - self.side_start < self.per_side

    def next_side(self) -> None:
        self.side_start = time.perf_counter()


def _pair(worlds: _Worlds, name: str, w_in: tuple[str, ...], w_out: tuple[str, ...],
          trials: int, claim_mu: float, expected_std: float, delta: float, key: jax.Array,
          budget: _Budget, with_bound: bool, direction: jax.Array | None = None) -> Test:
    """One test. A marginal failure (μ̂ − 3 SE above the claim but μ̂ − 6 SE not, or a lower
    bound above the claim's ε) is checked again on as many fresh trials, pooled with the
    first: a 3-SE fluctuation of the trial keys is not a finding (it happened on cifar10),
    while a failure beyond 6 SE, or one that the pooled trials confirm, stands."""
    def run(draw: jax.Array, s_in=np.zeros(0), s_out=np.zeros(0)):
        k_in, k_out = jax.random.split(draw)
        bases = (jax.random.split(k_in, trials), jax.random.split(k_out, trials))
        new_in = worlds.scores(w_in, bases[0], budget, direction)
        budget.next_side()
        new_out = worlds.scores(w_out, bases[1][:len(new_in)], budget, direction)
        budget.next_side()
        s_in, s_out = np.concatenate([s_in, new_in]), np.concatenate([s_out, new_out])
        est = bounds.gdp_mu(s_in, s_out)
        bound = claim = None
        if with_bound:
            bound = bounds.epsilon_lower_bound(s_in, s_out, delta)
            claim = bounds.epsilon_of_gdp(claim_mu, delta)
        return Test(name, claim_mu, est, est.std / expected_std, bound, claim), s_in, s_out

    test, s_in, s_out = run(key)
    if not test.passed and not test.estimate.above(claim_mu, sigmas=2 * bounds.SIGMAS):
        test, _, _ = run(jax.random.fold_in(key, 1), s_in, s_out)
        test = dataclasses.replace(test, extended=True)
    return test


def _one_step_tests(worlds: _Worlds, settings: AuditSettings, sigma_claim: float, delta: float,
                    key: jax.Array) -> tuple[Test, ...]:
    k = worlds.k
    trials = settings.trials if worlds.compiled else settings.loop_trials
    budget = _Budget(trials, settings.budget_s, sides=6)
    keys = jax.random.split(key, 3)
    std = sigma_claim * math.sqrt(k)  # the noise along the canary over K steps, in units of C
    one = _pair(worlds, "one step", ("in",), ("out",), trials, math.sqrt(k) / sigma_claim,
                std, delta, keys[0], budget, True)
    masked = _pair(worlds, "masked slot", ("masked",), ("out",), trials, 0.0, std, delta,
                   keys[1], budget, False, worlds.leak_direction)
    masked = dataclasses.replace(masked, leak_mu=worlds.leak_mu)
    schedule_trials = settings.schedule_trials if worlds.compiled else settings.loop_trials
    budget.limit = schedule_trials
    schedule = _pair(worlds, "noise schedule", ("plain", "in"), ("plain", "out"),
                     schedule_trials, math.sqrt(k / 2) / sigma_claim, std * math.sqrt(2),
                     delta, keys[2], budget, True)
    return one, masked, schedule


# ---------------------------------------------------------------------------------------------
# The whole run


def _run_canaries(model, params, data: TrainingSet, m: int, scale_like: jax.Array,
                  key: jax.Array) -> TrainingSet:
    """m random canaries: float inputs drawn at the scale of the one-step canary, token ids
    uniform, so that their gradients point in nearly orthogonal directions; each labelled
    with the class the network finds least likely (a saturated right answer has no gradient)."""
    shape = (m, *data.x.shape[1:])
    if jnp.issubdtype(data.x.dtype, jnp.floating):
        x = jax.random.normal(key, shape, data.x.dtype) * jnp.sqrt(jnp.mean(scale_like ** 2))
    else:
        x = jax.random.randint(key, shape, 0, model.dataset.vocab_size, data.x.dtype)
    logits = jnp.concatenate([model.logits(params, x[i:i + 256]) for i in range(0, m, 256)])
    y = ((logits[:, 0] <= 0) if model.binary_logit else jnp.argmin(logits, axis=-1))
    return TrainingSet(x, y.astype(data.y.dtype))


def _gradient_rows(loss, params, x: jax.Array, y: jax.Array, chunk: int) -> jax.Array:
    """Each example's gradient direction at ``params``: ``[n, n_params]`` unit rows (a zero
    gradient gives a zero row, never NaN)."""
    @jax.jit
    def rows(p, a, b):  # parameters as an argument: never folded in as constants
        g = jax.vmap(lambda a1, b1: ravel_pytree(jax.grad(loss)(p, a1, b1))[0])(a, b)
        norms = jnp.linalg.norm(g, axis=1, keepdims=True)
        return g / jnp.where(norms > 0, norms, 1.0)
    return jnp.concatenate([rows(params, x[i:i + chunk], y[i:i + chunk])
                            for i in range(0, x.shape[0], chunk)])


def _canary_directions(loss, params, canaries: TrainingSet, ordinary: TrainingSet,
                       clip_norm: float, shared: int = 32) -> tuple[jax.Array, jax.Array]:
    """The directions the whole-run scores read, one per canary, and what one step releases
    along each on average, whoever is in (in units of C).

    Each direction is the canary's gradient with the directions it shares with the ordinary
    examples' gradients (their top ``shared`` principal directions, and the canaries' mean)
    projected out, renormalised. The average is what a step releases along it on average over
    the sampling and the canaries' coins: q·(the ordinary examples' clipped sum + half the
    canaries' clipped gradients); multiply by the sampling rate q. Any direction and offset
    chosen without knowing which canaries are in keeps the bound valid; these keep the other
    examples off each canary's score, which otherwise drown its signal (on the ffnn, the
    data's sum moves a raw direction's score over a run ~4× the noise along it)."""
    n_params = ravel_pytree(params)[0].size
    chunk = max(1, (1 << 24) // n_params)
    raw = _gradient_rows(loss, params, canaries.x, canaries.y, chunk)
    count = max(shared, min(256, (1 << 26) // n_params, ordinary.size))
    data = _gradient_rows(loss, params, ordinary.x[:count], ordinary.y[:count], chunk)
    _, _, basis = jnp.linalg.svd(jnp.concatenate([data, raw.mean(0, keepdims=True)]),
                                 full_matrices=False)
    basis = basis[:shared + 1]  # [r, n] orthonormal
    rows = raw - (raw @ basis.T) @ basis
    norms = jnp.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows / jnp.where(norms > 0, norms, 1.0)
    summed = jax.jit(lambda p, x, y: ravel_pytree(vmap_sum(loss, p, x, y, clip_norm))[0])
    data_sum = sum(summed(params, ordinary.x[i:i + chunk], ordinary.y[i:i + chunk])
                   for i in range(0, ordinary.size, chunk))
    average = rows @ (data_sum / clip_norm + 0.5 * raw.sum(0))
    return rows, average


def _whole_run(cell: CellConfig, settings: AuditSettings, model, params, data: TrainingSet,
               clip_norm: float, noise_multiplier: float, scale_like: jax.Array,
               key: jax.Array, *, clipped_sum: Callable | None = None,
               one_key: bool = False) -> WholeRun:
    k_canary, k_in, k_sampler, k_noise = jax.random.split(key, 4)
    n_params = ravel_pytree(params)[0].size
    m = max(10, min(settings.run_canaries, (1 << 27) // n_params))  # [m, n] directions in memory
    canaries = _run_canaries(model, params, data, m, scale_like, k_canary)
    included = np.asarray(jax.random.bernoulli(k_in, 0.5, (m,)))
    ordinary = TrainingSet(data.x[:settings.run_examples], data.y[:settings.run_examples])
    train = TrainingSet(jnp.concatenate([ordinary.x, canaries.x[included]]),
                        jnp.concatenate([ordinary.y, canaries.y[included]]))
    poisson = dataclasses.replace(cell, dp=dataclasses.replace(cell.dp, clip_norm=clip_norm,
                                                               sampling="poisson"))
    batch = min(cell.batch_size, train.size)
    capacity = poisson_capacity(batch, train.size, cell.dp.capacity_sigmas, cell.global_devices)
    sampler = PoissonSampler(train, batch, k_sampler, capacity)
    step, optimizer = build_step(dataclasses.replace(poisson, batch_size=batch), model,
                                 noise_multiplier, clipped_sum=clipped_sum, donate=False,
                                 lr=settings.lr)
    directions, average = _canary_directions(model.loss, params, canaries, ordinary, clip_norm)
    k = cell.steps_per_call
    calls = max(1, settings.run_steps // k)
    state = (params, optimizer.init(params))
    scale = batch / (settings.lr * clip_norm)
    project = jax.jit(lambda d, before, after: d @ _displacement(before, after) * scale)
    projections = []
    # engines that run op by op (or loop over examples) get the audit's time budget
    deadline = (None if step.engine.compiles_whole_step
                else time.perf_counter() + settings.budget_s)
    for call in range(calls):
        if deadline is not None and call >= MIN_TRIALS and time.perf_counter() > deadline:
            break
        parts = [sampler.batch(call * k + j) for j in range(k)]
        x, y, mask = ((parts[0].x, parts[0].y, parts[0].mask) if k == 1 else
                      (jnp.stack([p.x for p in parts]), jnp.stack([p.y for p in parts]),
                       jnp.stack([p.mask for p in parts])))
        keys = step_keys(k_noise, 0 if one_key else call, k)
        if one_key and k > 1:
            keys = jnp.broadcast_to(keys[0], keys.shape)
        new = step(*state, x, y, keys, mask)
        projections.append(np.asarray(project(directions, state[0], new[0]), np.float64))
        state = new
    # [calls, m], less what a call releases along each canary on average, whoever is in
    p = np.stack(projections) - k * sampler.sampling_rate * np.asarray(average, np.float64)
    calls = len(projections)
    scores = {"sum": p.sum(axis=0), "difference": np.square(np.diff(p, axis=0)).sum(axis=0)}
    guesses = max(2, int(round(settings.guesses * m)))
    found = {name: bounds.epsilon_one_run(s, included, cell.dp.delta, guesses,
                                          alpha=bounds.ALPHA / len(scores))
             for name, s in scores.items()}
    from ablation.core.privacy import epsilon
    eps = epsilon(noise_multiplier=noise_multiplier, sampling_rate=sampler.sampling_rate,
                  steps=calls * k, delta=cell.dp.delta, accountant="pld", sampling="poisson",
                  n_train=train.size, capacity=capacity)
    return WholeRun(calls * k, m, int(included.sum()), ordinary.size, sampler.sampling_rate,
                    eps, found)


# ---------------------------------------------------------------------------------------------
# The audit of a cell


def _engine_label(cell: CellConfig) -> str:
    name = cell.engine
    if cell.engine == "jit":
        name += f"[{cell.loop}]"
    if cell.engine == "ghost":
        extras = [cell.engine_mode or "bookkeeping"]
        if cell.ghost_fallback != "error":
            extras.append(f"fallback={cell.ghost_fallback}")
        name += f"[{', '.join(extras)}]"
    if cell.steps_per_call > 1:
        name += f" ×{cell.steps_per_call} steps/call"
    if cell.devices > 1:
        name += f" on {cell.devices} devices"
    return name


def _check_auditable(cell: CellConfig) -> None:
    if cell.is_reference:
        raise NotAuditable(f"the audit runs this toolkit's engines; engine={cell.engine} is "
                         f"another framework's")
    if not cell.private:
        raise NotAuditable("the audit needs a private step (private=true)")
    if cell.dp.noise_multiplier <= 0:
        raise NotAuditable("the audit needs noise (dp.noise_multiplier > 0): without it any "
                         "canary is told apart exactly")
    if cell.processes > 1:
        raise NotAuditable("the audit runs one process; a run over several processes "
                         "(distributed.processes > 1) is not audited yet")


def _leaky(strategy: Callable) -> Callable:
    """A clipped sum that ignores the mask: a masked slot's example counted (a control)."""
    def clipped_sum(loss, params, x, y, clip, mask):
        return strategy(loss, params, x, y, clip, None)
    return clipped_sum


def _unclipped(loss, params, x, y, clip, mask):
    """The sum of unclipped per-example gradients (a control: clipping off)."""
    return vmap_sum(loss, params, x, y, jnp.inf, mask)


def audit_cell(cell: CellConfig, settings: AuditSettings,
               progress: Callable[[str], None] = lambda text: None) -> AuditReport:
    """Audit the cell's engine (its layout: loop, mode, fallback, steps per call, devices) on
    its model and data, and, with ``settings.controls``, the controls.

    Raises:
      NotAuditable: a cell the audit cannot audit (non-private, σ = 0, another framework's
        engine, several processes), or a canary kind the inputs do not allow.
      GhostUnsupported: the ghost engine refuses the model (names the layer).
    """
    _check_auditable(cell)
    start = time.perf_counter()
    model = model_of(cell)
    keys = run_keys(cell.seed)
    params = model.init(keys.init)
    data = training_set_of(cell, model, keys.data)
    sampler = ShuffleSampler(data, min(cell.batch_size, data.size), keys.sampler)
    k = cell.steps_per_call
    parts = [sampler.batch(i) for i in range(k)]
    batches = (jnp.stack([p.x for p in parts]), jnp.stack([p.y for p in parts]))
    audit_key = jax.random.fold_in(keys.noise, 0xA0D17)  # never a training step's key
    k_canary, k_trials, k_run = jax.random.split(audit_key, 3)
    cx, cy, kind, norm = craft_canary(model, params, batches[0][0, 0], settings.canary,
                                      cell.dp.clip_norm, settings.canary_ratio, k_canary)
    clip, note = cell.dp.clip_norm, None
    if norm < settings.canary_ratio * clip:
        clip = norm / settings.canary_ratio
        note = (f"the network bounds this canary's gradient at {norm:.3g} < "
                f"{settings.canary_ratio:g} × C = {settings.canary_ratio * cell.dp.clip_norm:g}"
                f"; the audit clips at C = {clip:.3g} instead (privacy holds for every C)")
    sigma = cell.dp.noise_multiplier
    delta = cell.dp.delta

    def audit(name, *, noise=sigma, clipped_sum=None, one_key=False, engine=None,
              whole_run=True) -> Audit:
        progress(f"auditing {name}")
        worlds = _Worlds(cell, settings, model, params, batches, (cx, cy), clip,
                         noise_multiplier=noise, clipped_sum=clipped_sum, one_key=one_key,
                         engine=engine)
        tests = _one_step_tests(worlds, settings, sigma, delta, k_trials)
        run = None
        if whole_run and settings.run_steps > 0:
            run = _whole_run(cell, settings, model, params, data, clip, noise, cx, k_run,
                             clipped_sum=clipped_sum, one_key=one_key)
        return Audit(name, tests, run)

    label = _engine_label(cell)
    main = audit(label)
    controls: dict[str, Audit] = {}
    if settings.controls:
        engine = get_engine(cell.engine, cell.loop, cell.engine_mode, cell.ghost_fallback)
        # the controls that replace the clipped sum need a step compiled whole; other
        # engines' controls run on `both` (they test the audit's power, not the engine)
        host = None if engine.compiles_whole_step else "both"
        from ablation.core.engines import traced_sum_strategy
        strategy = traced_sum_strategy(engine if host is None else get_engine("both"), True)
        controls["noise halved"] = audit("noise halved", noise=sigma / 2, engine=host,
                                         whole_run=False)
        controls["clipping off"] = audit("clipping off", clipped_sum=_unclipped, engine=host,
                                         whole_run=False)
        controls["leaky mask"] = audit("leaky mask", clipped_sum=_leaky(strategy),
                                       engine=host, whole_run=False)
        controls["one noise key"] = audit("one noise key", one_key=True, engine=host)
    return AuditReport(model.name, label, int(ravel_pytree(params)[0].size),
                       cell.batch_size, kind, norm, clip, note, sigma, delta, k, main, controls,
                       time.perf_counter() - start)
