"""The statistics of a privacy audit: what canary scores say about ε, as estimates and as bounds.

An audit releases scores of a canary's presence: ``in`` scores where the canary took part,
``out`` scores where it did not. For DP-SGD's Gaussian mechanism with the canary's clipped
gradient projected on its own direction, the two are normal with the same std and means
``μ`` std apart, ``μ = 1/σ`` for one step (Gaussian differential privacy, Dong, Roth & Su
2022). This module turns scores into:

* :func:`gdp_mu`: ``μ̂`` with its standard error (an estimate of the mechanism's μ);
* :func:`epsilon_of_gdp`: the ε at δ of a μ-GDP mechanism (the claim of ``μ = 1/σ``; of ``μ̂``
  it is an *estimate*, not a bound: it exceeds the truth in a good part of runs);
* :func:`epsilon_lower_bound`: a valid lower bound on ε from a threshold test on held-out
  trials, its error rates bounded by Clopper–Pearson intervals;
* :func:`epsilon_one_run`: the lower bound of one training run with m canaries, each included
  with probability ½ (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
  NeurIPS 2023, their Theorem 3.1 with δ), from the count of correct guesses.

Nothing here imports JAX: the scores are plain arrays.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize, special, stats

#: Confidence of the lower bounds: each is below the true ε with probability ≥ 1 − ALPHA.
ALPHA = 0.01
#: The pass rule's margin in standard errors (one-sided false alarm ≈ 0.13 % per test).
SIGMAS = 3.0


@dataclasses.dataclass(frozen=True)
class MuEstimate:
    """``μ̂ = (mean(in) − mean(out)) / pooled std`` and its standard error.

    Attributes:
      mu, se: the estimate and its (delta-method) standard error.
      n_in, n_out: trials each side.
      std: the pooled std of the scores (the noise along the canary, in the scores' unit).
    """

    mu: float
    se: float
    n_in: int
    n_out: int
    std: float

    def above(self, claim: float, sigmas: float = SIGMAS) -> bool:
        """True when ``μ̂ − sigmas·SE > claim``: the scores separate more than the claim (and
        when μ̂ is not a number: scores that are NaN prove nothing private)."""
        return not self.mu - sigmas * self.se <= claim


def gdp_mu(scores_in: np.ndarray, scores_out: np.ndarray) -> MuEstimate:
    """μ̂ of two samples of scores (each ≥ 2 trials). Identical constant scores give 0;
    different constant scores (no noise at all) give ``inf``."""
    a = np.asarray(scores_in, np.float64)
    b = np.asarray(scores_out, np.float64)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"μ̂ needs at least 2 trials each side, got {a.size} and {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):  # a step that released NaN/inf
        return MuEstimate(math.nan, math.nan, a.size, b.size, math.nan)
    gap = float(a.mean() - b.mean())
    pooled = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1))
                       / (a.size + b.size - 2))
    scale = max(abs(float(a.mean())), abs(float(b.mean())), 1.0)
    if pooled <= 1e-12 * scale:  # no noise: any gap is perfectly distinguishable
        mu = 0.0 if abs(gap) <= 1e-12 * scale else math.copysign(math.inf, gap)
        return MuEstimate(mu, 0.0, a.size, b.size, pooled)
    mu = gap / pooled
    se = math.sqrt(1 / a.size + 1 / b.size + mu * mu / (2 * (a.size + b.size - 2)))
    return MuEstimate(mu, se, a.size, b.size, pooled)


def gdp_delta(mu: float, eps: float) -> float:
    """δ(ε) of a μ-GDP mechanism: ``Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)``."""
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    # e^ε Φ(b) as exp(ε + log Φ(b)): no overflow at large ε
    return float(special.ndtr(-eps / mu + mu / 2)
                 - math.exp(eps + special.log_ndtr(-eps / mu - mu / 2)))


def epsilon_of_gdp(mu: float, delta: float) -> float:
    """The smallest ε with ``δ(ε) ≤ delta`` for a μ-GDP mechanism (0 when μ ≤ 0)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    if math.isinf(mu):
        return math.inf
    high = 1.0
    while gdp_delta(mu, high) > delta:
        high *= 2
    return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, high, xtol=1e-10))


def _upper(failures: int, trials: int, alpha: float) -> float:
    """Clopper–Pearson one-sided upper bound on a rate, at confidence 1 − alpha."""
    if failures >= trials:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, failures + 1, trials - failures))


def _epsilon_of_rates(fpr: float, fnr: float, delta: float) -> float:
    """The ε that a test with these error rates proves: ``fpr ≥ (1 − δ − fnr)·e^{−ε}`` and
    the same with the roles swapped must both hold for an (ε, δ)-DP mechanism."""
    best = 0.0
    for a, b in ((fpr, fnr), (fnr, fpr)):
        if a <= 0:
            return math.inf if 1 - delta - b > 0 else best
        if 1 - delta - b > 0:
            best = max(best, math.log((1 - delta - b) / a))
    return best


@dataclasses.dataclass(frozen=True)
class LowerBound:
    """A valid lower bound on ε from a threshold test.

    Attributes:
      epsilon: the bound (0 where the test proves nothing).
      threshold: the score above which the test says ``in`` (chosen on other trials).
      fpr, fnr: the error rates on the held-out trials.
      n_in, n_out: the held-out trials each side.
      alpha: the bound holds with probability ≥ 1 − alpha.
    """

    epsilon: float
    threshold: float
    fpr: float
    fnr: float
    n_in: int
    n_out: int
    alpha: float


def epsilon_lower_bound(scores_in: np.ndarray, scores_out: np.ndarray, delta: float,
                        alpha: float = ALPHA, seed: int = 0) -> LowerBound:
    """ε lower bound of the threshold test ``score > τ ⇒ in``, valid at confidence 1 − alpha.

    Half of each side's trials (a random split, ``seed``) choose τ (the threshold that
    maximises the empirical ε there); the other half count its errors, and the error rates'
    Clopper–Pearson upper bounds (α/2 each) give the bound. Choosing τ on the same trials
    would make the bound invalid (it would overfit the noise).
    """
    rng = np.random.default_rng(seed)
    a = rng.permutation(np.asarray(scores_in, np.float64))
    b = rng.permutation(np.asarray(scores_out, np.float64))
    if a.size < 4 or b.size < 4:
        raise ValueError("a lower bound needs at least 4 trials each side")
    choose_a, test_a = a[: a.size // 2], a[a.size // 2:]
    choose_b, test_b = b[: b.size // 2], b[b.size // 2:]
    candidates = np.unique(np.concatenate([choose_a, choose_b]))

    def empirical(tau: float) -> float:
        fpr = (np.sum(choose_b > tau) + 0.5) / (choose_b.size + 1)
        fnr = (np.sum(choose_a <= tau) + 0.5) / (choose_a.size + 1)
        return _epsilon_of_rates(fpr, fnr, delta)

    tau = float(max(candidates, key=empirical))
    false_pos, false_neg = int(np.sum(test_b > tau)), int(np.sum(test_a <= tau))
    fpr_up = _upper(false_pos, test_b.size, alpha / 2)
    fnr_up = _upper(false_neg, test_a.size, alpha / 2)
    return LowerBound(_epsilon_of_rates(fpr_up, fnr_up, delta), tau, false_pos / test_b.size,
                      false_neg / test_a.size, test_a.size, test_b.size, alpha)


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The probability, under (ε, δ)-DP, of ≥ v correct guesses out of r about m canaries each
    included with probability ½ (Steinke et al. 2023, Theorem 3.1 with its δ term): the
    Binomial(r, e^ε/(1+e^ε)) tail plus ``2m·δ`` times the largest average of the lower tail."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    p = special.expit(eps)
    tail = float(stats.binom.sf(v - 1, r, p))
    if delta == 0 or v == 0:
        return min(1.0, tail)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[= v−1], P[= v−2], ... P[= 0]
    averages = np.cumsum(below) / np.arange(1, v + 1)
    return min(1.0, tail + float(averages.max()) * delta * 2 * m)


@dataclasses.dataclass(frozen=True)
class OneRunBound:
    """The one-run lower bound (:func:`epsilon_one_run`) and the guesses behind it."""

    epsilon: float
    canaries: int
    guesses: int
    correct: int
    alpha: float


def epsilon_one_run(scores: np.ndarray, included: np.ndarray, delta: float,
                    guesses: int, alpha: float = ALPHA) -> OneRunBound:
    """ε lower bound of one run: guess ``in`` for the ``guesses/2`` highest scores and ``out``
    for the ``guesses/2`` lowest (the number fixed in advance, so the bound stays valid),
    count the correct guesses, and return the largest ε whose p-value is still ≤ alpha."""
    s = np.asarray(scores, np.float64)
    truth = np.asarray(included, bool)
    m = s.size
    if not np.isfinite(s).all():  # a run that released NaN/inf: nothing is bounded
        return OneRunBound(math.inf, m, 0, 0, alpha)
    half = max(1, min(guesses, m) // 2)
    order = np.argsort(s, kind="stable")
    correct = int(truth[order[-half:]].sum() + (~truth[order[:half]]).sum())
    r = 2 * half
    if one_run_p_value(m, r, correct, 0.0, delta) > alpha:
        return OneRunBound(0.0, m, r, correct, alpha)
    high = 1.0
    while high < 100 and one_run_p_value(m, r, correct, high, delta) <= alpha:
        high *= 2
    eps = optimize.brentq(lambda e: one_run_p_value(m, r, correct, e, delta) - alpha,
                          0.0, high, xtol=1e-6) if high < 100 else high
    return OneRunBound(float(eps), m, r, correct, alpha)


def false_alarm_rate(sigmas: float = SIGMAS) -> float:
    """The chance that a correct mechanism fails one μ test of the audit's rule: μ̂ above the
    claim by more than ``sigmas`` SE, and then either by more than twice that or, pooled with
    as many fresh trials, by more than ``sigmas`` SE again (z-scores of large samples)."""
    from scipy import integrate

    def confirmed(z: float) -> float:  # first draw at z; the pooled z is (z + z2)/√2
        return stats.norm.pdf(z) * stats.norm.sf(sigmas * math.sqrt(2) - z)

    marginal = integrate.quad(confirmed, sigmas, 2 * sigmas)[0]
    return float(marginal + stats.norm.sf(2 * sigmas))
