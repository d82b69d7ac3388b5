"""The privacy guarantee of a DP-SGD run, from Google's ``dp-accounting`` library.

A run of ``steps`` DP-SGD steps with sampling rate ``q = batch_size / n_train`` and noise
multiplier σ is the ``steps``-fold composition of a subsampled Gaussian mechanism. What is
subsampled depends on how batches are drawn:

* ``poisson`` – each example joins a step independently with probability q; batches are
  padded to a fixed capacity and, on the rare overflow, truncated to a random subset of that
  size. The PLD accountant accounts for exactly that (``TruncatedSubsampledGaussianDpEvent``,
  dp-accounting ≥ 0.5.1). The RDP accountant has no truncated event, and over a whole run a
  truncation is far likelier than δ (0.25 % to 27 % over 20 epochs for the paper's models),
  so RDP with truncated Poisson batches is refused rather than reported with an ε that does
  not hold.
* ``shuffle`` – fixed-size batches from a fresh permutation each epoch, as the paper and most
  code do. Shuffling is *accounted as if* Poisson (the common practice); this is an
  approximation, not a proof (Chua et al., "How Private are DP-SGD Implementations?",
  ICML 2024), and the record says so.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # dp-accounting (and scipy) load only when something is accounted
    import dp_accounting
    from dp_accounting import dp_event

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("shuffle", "poisson")

SHUFFLE_NOTE = ("shuffled fixed-size batches accounted as Poisson sampling with q = B/n "
                "(the usual approximation, not a proof for shuffling)")
POISSON_PLD_NOTE = "Poisson sampling truncated to the padded capacity, accounted exactly (PLD)"
POISSON_RDP_NOTE = "Poisson sampling without truncation (the capacity holds the whole dataset)"


def truncates(sampling: str, n_train: int | None, capacity: int | None) -> bool:
    """True when batches are Poisson samples cut at a capacity below the dataset size."""
    return sampling == "poisson" and capacity is not None and (n_train is None
                                                               or capacity < n_train)


def check_accountant_supports(accountant: str, sampling: str, n_train: int | None,
                              capacity: int | None) -> None:
    """One-line ``ValueError`` for an accountant that cannot account the sampling."""
    if accountant == "rdp" and truncates(sampling, n_train, capacity):
        raise ValueError("dp.accountant=rdp cannot account Poisson batches truncated at the "
                         "padded capacity (its epsilon would not hold); use dp.accountant=pld")


@dataclasses.dataclass(frozen=True)
class PrivacyReport:
    """What a run's record says about privacy."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sampling_rate: float
    accounted_steps: int
    accountant: str
    sampling: str
    note: str


def check_privacy_inputs(*, delta: float, sampling_rate: float, steps: int, accountant: str,
                         sampling: str, target_epsilon: float | None = None) -> None:
    """One-line ``ValueError`` naming the first bad value."""
    if not 0 < delta < 1:
        raise ValueError(f"dp.delta must be in (0, 1), got {delta}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling rate q = batch_size / n_train must be in (0, 1], got "
                         f"{sampling_rate}")
    if steps < 1:
        raise ValueError(f"the run must take at least one step, got {steps}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"dp.accountant must be one of {', '.join(ACCOUNTANTS)}, "
                         f"got {accountant!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"dp.sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if target_epsilon is not None and not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"dp.target_epsilon must be a finite number > 0, got {target_epsilon}")


def _event_factory(*, sampling_rate: float, steps: int, accountant: str, sampling: str,
                   n_train: int, capacity: int | None) -> Callable[[float], "dp_event.DpEvent"]:
    from dp_accounting import dp_event

    check_accountant_supports(accountant, sampling, n_train, capacity)
    truncated = accountant == "pld" and truncates(sampling, n_train, capacity)
    if truncated and not n_train:
        raise ValueError("n_train is needed to account Poisson batches truncated at a capacity")

    def make(noise_multiplier: float) -> "dp_event.DpEvent":
        if truncated:
            one = dp_event.TruncatedSubsampledGaussianDpEvent(
                dataset_size=n_train, sampling_probability=sampling_rate,
                truncated_batch_size=capacity, noise_multiplier=noise_multiplier)
        else:
            one = dp_event.PoissonSampledDpEvent(sampling_rate,
                                                 dp_event.GaussianDpEvent(noise_multiplier))
        return dp_event.SelfComposedDpEvent(one, steps)

    return make


def _new_accountant(name: str) -> "dp_accounting.PrivacyAccountant":
    from dp_accounting import pld, rdp
    return pld.PLDAccountant() if name == "pld" else rdp.RdpAccountant()


def _note(sampling: str, accountant: str) -> str:
    if sampling == "shuffle":
        return SHUFFLE_NOTE
    return POISSON_PLD_NOTE if accountant == "pld" else POISSON_RDP_NOTE


def epsilon(*, noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "pld", sampling: str = "shuffle", n_train: int | None = None,
            capacity: int | None = None) -> float:
    """ε of ``steps`` DP-SGD steps at ``delta`` (``inf`` when σ = 0).

    ``n_train`` and ``capacity`` describe truncated Poisson batches (PLD only).
    """
    check_privacy_inputs(delta=delta, sampling_rate=sampling_rate, steps=steps,
                         accountant=accountant, sampling=sampling)
    if noise_multiplier == 0:
        return math.inf
    make = _event_factory(sampling_rate=sampling_rate, steps=steps, accountant=accountant,
                          sampling=sampling, n_train=n_train, capacity=capacity)
    acc = _new_accountant(accountant)
    acc.compose(make(noise_multiplier))
    return float(acc.get_epsilon(delta))


def calibrate_noise_multiplier(*, target_epsilon: float, sampling_rate: float, steps: int,
                               delta: float, accountant: str = "pld", sampling: str = "shuffle",
                               n_train: int | None = None, capacity: int | None = None) -> float:
    """The smallest σ whose run reaches ε ≤ ``target_epsilon`` at ``delta``."""
    check_privacy_inputs(delta=delta, sampling_rate=sampling_rate, steps=steps,
                         accountant=accountant, sampling=sampling, target_epsilon=target_epsilon)
    import dp_accounting

    make = _event_factory(sampling_rate=sampling_rate, steps=steps, accountant=accountant,
                          sampling=sampling, n_train=n_train, capacity=capacity)
    if accountant == "rdp":
        bracket = dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)
    else:
        bracket = _pld_bracket(make, target_epsilon, delta,
                               untruncated=dict(sampling_rate=sampling_rate, steps=steps,
                                                delta=delta))
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _new_accountant(accountant), make, target_epsilon, delta,
        bracket_interval=bracket, tol=1e-4))


def _pld_bracket(make: Callable[[float], "dp_event.DpEvent"], target_epsilon: float,
                 delta: float, untruncated: dict) -> "dp_accounting.ExplicitBracketInterval":
    """An interval of σ whose ends lie on both sides of the target, for the PLD search.

    It starts at the σ that RDP needs for untruncated Poisson sampling (a PLD of a tiny σ would
    need gigabytes, so the search never starts near zero) and moves out geometrically, judging
    each end by the accountant that will be used (truncation can need a larger σ).
    """
    import dp_accounting

    def eps_at(sigma: float) -> float:
        acc = _new_accountant("pld")
        acc.compose(make(sigma))
        return float(acc.get_epsilon(delta))

    guess = calibrate_noise_multiplier(target_epsilon=target_epsilon, accountant="rdp",
                                       sampling="poisson", **untruncated)
    low, high = 0.5 * guess, guess * 1.001
    for _ in range(20):
        if eps_at(high) <= target_epsilon:
            break
        low, high = high, high * 2
    else:
        raise ValueError(f"no noise multiplier up to {high:.3g} reaches epsilon "
                         f"{target_epsilon} at delta {delta} with this sampling")
    while low > 1e-2 and eps_at(low) <= target_epsilon:
        low, high = low * 0.5, low
    return dp_accounting.ExplicitBracketInterval(low, high)


def privacy_report(*, noise_multiplier: float, batch_size: int, n_train: int, epochs: int,
                   delta: float, accountant: str = "pld", sampling: str = "shuffle",
                   capacity: int | None = None,
                   target_epsilon: float | None = None) -> PrivacyReport:
    """ε of the configured training length: ``epochs × (n_train // batch_size)`` steps.

    With ``target_epsilon`` the noise multiplier is calibrated first (and reported).
    """
    q = batch_size / n_train
    steps = epochs * (n_train // batch_size)
    check_accountant_supports(accountant, sampling, n_train, capacity)
    common = dict(sampling_rate=q, steps=steps, delta=delta, accountant=accountant,
                  sampling=sampling, n_train=n_train, capacity=capacity)
    if target_epsilon is not None:
        noise_multiplier = calibrate_noise_multiplier(target_epsilon=target_epsilon, **common)
    eps = epsilon(noise_multiplier=noise_multiplier, **common)
    return PrivacyReport(epsilon=eps, delta=delta, noise_multiplier=noise_multiplier,
                         sampling_rate=q, accounted_steps=steps, accountant=accountant,
                         sampling=sampling, note=_note(sampling, accountant))
