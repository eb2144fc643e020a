"""Privacy-loss-distribution (PLD) accounting of the Skellam vector mechanism, on Google's `dp_accounting.pld`.

The mechanism adds independent symmetric Skellam noise of total variance v (Poisson(v/2) - Poisson(v/2)) to every
slot of the packed vector; neighbouring inputs move at most `coordinates` slots, each by at most `shift` integer
units. One slot shifted by s has privacy loss L(x) = log p(x) - log p(x - s) at outcome x (p the Skellam pmf); the
vector's loss is the sum over its slots, and releases compose the same way (dp_accounting convolves the PLDs).

Why every slot at its largest shift is the worst case: Skellam is log-concave, so its shifts have a monotone
likelihood ratio; threshold tests are then most powerful against every larger shift at once, so the trade-off
curve of a shift s' > s lies below that of s (every hockey-stick divergence of s' is at least that of s), and
composition preserves that order. So `coordinates` slots all at `shift` dominate any coordinate-wise smaller move.

Pessimism, so that the reported epsilon is never below the true one:
- per slot, the outcomes beyond +-N, where a Chernoff bound leaves at most TAIL_MASS on each side, count as loss
  +infinity;
- one slot's hockey-stick curve delta(eps) = sum_x max(0, p(x) - e^eps p(x - s)) is computed exactly (cumulative
  sums of the pmf) on a grid of epsilons and discretised with pessimistic connect-the-dots (Doroshenko, Ghazi,
  Kamath, Kumar, Manurangsi 2022), whose curve lies on or above the true one everywhere;
- composition truncates tails into the infinite-loss mass (COMPOSE_TAIL_MASS);
- composition convolves with FFTs, whose round-off moves the tail's mass by up to about 1e-16 per slot composed
  (measured against long-double FFTs), so epsilon is read off at delta minus an allowance for it
  (`fft_allowance`); where that allowance exceeds 1% of delta (`resolves`), callers account with RDP instead
  (privacy/accountant.py).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from dp_accounting.pld import pld_pmf
from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution
from scipy.special import ive

from privacy.encoding import Sensitivity

#: Skellam mass beyond the truncated support, on each side of one slot (counted as infinite loss).
TAIL_MASS = 1e-24
#: Mass each composition may truncate from the loss distribution's tails (counted as infinite loss).
COMPOSE_TAIL_MASS = 1e-18
#: FFT round-off allowance on delta: this much per composition, and FFT_ROUNDOFF_PER_SLOT more per slot composed.
#: Measured against long-double FFTs of the same loss distributions: 1.6e-16 for 4 slots, 7e-16 for 384, 1.3e-15
#: for 1,536 and 1e-14 for 1,200 slots of wide losses.
FFT_ROUNDOFF = 1e-15
FFT_ROUNDOFF_PER_SLOT = 1e-16
#: The coarsest loss grid; finer for mechanisms whose per-slot loss is narrow (see `discretization`).
MAX_DISCRETIZATION = 2.0**-10
MIN_DISCRETIZATION = 2.0**-24

# From this order on, four terms of the Debye expansion give log ive to about 1e-14 (tests compare it with scipy
# and a Poisson-convolution reference).
_DEBYE_FROM = 500
# scipy's ive (Amos) returns nan for arguments above about 2^31; above this one, Hankel's expansion serves the
# orders below _DEBYE_FROM, where 4 nu^2 / z < 1e-3 makes it accurate to rounding.
_HANKEL_FROM = 1e9


@dataclass(frozen=True, order=True)
class SkellamMechanism:
    """One release: Skellam noise of total variance `variance` on every slot; a neighbouring input moves at most
    `coordinates` slots by at most `shift` integer units each."""

    variance: float
    coordinates: int
    shift: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.variance) and self.variance > 0):
            raise ValueError(f"variance must be positive and finite, got {self.variance}")
        if self.coordinates < 0 or self.shift < 0:
            raise ValueError(f"coordinates and shift must be non-negative, got {self.coordinates}, {self.shift}")

    @property
    def sensitivity(self) -> Sensitivity:
        return Sensitivity(coordinates=self.coordinates, shift=self.shift)

    @property
    def l1(self) -> float:
        return self.sensitivity.l1

    @property
    def l2(self) -> float:
        return self.sensitivity.l2

    @property
    def loss_scale(self) -> float:
        """About the standard deviation of one slot's privacy loss (s / sqrt(v) in the Gaussian regime)."""
        return self.shift / math.sqrt(self.variance)


def skellam_log_pmf(k: np.ndarray, *, variance: float) -> np.ndarray:
    """log P(K = k) for K = Poisson(v/2) - Poisson(v/2): P(k) = e^-v I_|k|(v) = ive(|k|, v), same shape as k."""
    nu = np.abs(np.asarray(k, dtype=np.float64))
    out = np.empty_like(nu)
    debye = nu >= _DEBYE_FROM
    out[debye] = _log_ive_debye(nu[debye], variance)
    rest = ~debye
    if variance >= _HANKEL_FROM:
        out[rest] = _log_ive_hankel(nu[rest], variance)
    else:
        with np.errstate(divide="ignore"):
            out[rest] = np.log(ive(nu[rest], variance))
        underflow = rest & np.isneginf(out)  # far tails below 1e-308 (orders well above sqrt(v)): Debye's still
        out[underflow] = _log_ive_debye(nu[underflow], variance)  # holds there to ~1e-9, ample for such masses
    return out


def _log_ive_debye(nu: np.ndarray, z: float) -> np.ndarray:
    """log(e^-z I_nu(z)) by the uniform (Debye) expansion, four terms (DLMF 10.41.3), for large nu."""
    r = np.hypot(nu, z)
    p = nu / r
    q = p * p
    inv = 1.0 / nu
    # u_k(p) / nu^k, Horner in p^2 (u1..u4 of DLMF 10.41.10).
    u1 = p * (3.0 - 5.0 * q) / 24.0
    u2 = q * (81.0 + q * (-462.0 + q * 385.0)) / 1152.0
    u3 = p * q * (30375.0 + q * (-369603.0 + q * (765765.0 - q * 425425.0))) / 414720.0
    u4 = q * q * (4465125.0 + q * (-94121676.0 + q * (349922430.0 + q * (-446185740.0 + q * 185910725.0))))
    series = 1.0 + inv * (u1 + inv * (u2 + inv * (u3 + inv * u4 / 39813120.0)))
    # nu * eta - z, with eta = sqrt(1 + t^2) + log(t / (1 + sqrt(1 + t^2))), t = z / nu, written without cancellation.
    exponent = nu * nu / (r + z) - nu * np.arcsinh(nu / z)
    return -0.5 * np.log(2.0 * np.pi) - 0.5 * np.log(r) + exponent + np.log(series)


def _log_ive_hankel(nu: np.ndarray, z: float, terms: int = 6) -> np.ndarray:
    """log(e^-z I_nu(z)) by Hankel's expansion for large z (DLMF 10.40.1), for nu^2 much smaller than z."""
    m = 4.0 * nu * nu
    term = np.ones_like(nu)
    total = np.ones_like(nu)
    for j in range(1, terms + 1):
        term = -term * (m - (2 * j - 1) ** 2) / (8.0 * j * z)
        total = total + term
    return -0.5 * np.log(2.0 * np.pi * z) + np.log(total)


def support_radius(variance: float, tail: float = TAIL_MASS) -> int:
    """N with P(K > N) <= tail for K Skellam of variance v, by the Chernoff bound
    P(K >= t) <= exp(-(t asinh(t/v) - sqrt(t^2 + v^2) + v))."""
    target = math.log(1.0 / tail)

    def exponent(t: float) -> float:
        return t * math.asinh(t / variance) - t * t / (math.hypot(t, variance) + variance)

    high = 1.0
    while exponent(high) < target:
        high *= 2.0
    low = high / 2.0
    while high - low > max(0.5, high * 1e-12):  # beyond 2^53 floats are further apart than 0.5
        middle = (low + high) / 2.0
        low, high = (middle, high) if exponent(middle) < target else (low, middle)
    return math.ceil(high)  # P(K > N) = P(K >= N + 1) <= P(K >= high)


def discretization(mechanism: SkellamMechanism) -> float:
    """The loss grid for this mechanism: a power of two (so grids of different mechanisms nest) about 1/64 of one
    slot's loss scale, at most MAX_DISCRETIZATION; connect-the-dots keeps the error second order in it."""
    target = min(MAX_DISCRETIZATION, mechanism.loss_scale / 64.0)
    return max(MIN_DISCRETIZATION, 2.0 ** math.floor(math.log2(target)))


def _slot_losses(variance: float, shift: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(N, losses, P, Q) over outcomes x = -N..N in ascending order: P(x) = p(x), Q(x) = p(x - s), loss =
    log P - log Q, which decreases in x (log-concavity)."""
    n = support_radius(variance)
    log_p = skellam_log_pmf(np.arange(n + shift + 1), variance=variance)  # indexed by |k|
    x = np.arange(-n, n + 1)
    log_upper = log_p[np.abs(x)]
    log_lower = log_p[np.abs(x - shift)]
    with np.errstate(invalid="ignore"):
        loss = log_upper - log_lower
    return n, loss, np.exp(log_upper), np.exp(log_lower)


@functools.lru_cache(maxsize=64)
def _slot_pld(variance: float, shift: int, step: float) -> PrivacyLossDistribution:
    """One slot's pessimistic connect-the-dots PLD on the grid j * step."""
    _, loss, upper, lower = _slot_losses(variance, shift)
    finite = np.isfinite(loss)  # Q underflowed to 0 where loss = +inf: sorted first, in every prefix below
    lowest = math.floor(float(loss[finite].min()) / step)
    highest = math.ceil(float(loss[finite].max()) / step)
    epsilons = np.arange(lowest, highest + 1) * step
    # delta(eps) = P(L > eps) - e^eps Q(L > eps); the outcomes with L > eps are a prefix (losses descend in x).
    upper_tail = np.concatenate([[0.0], np.cumsum(upper)])
    lower_tail = np.concatenate([[0.0], np.cumsum(np.where(finite, lower, 0.0))])
    prefix = np.searchsorted(-np.where(finite, loss, np.inf), -epsilons, side="left")
    with np.errstate(divide="ignore"):  # e^eps Q(L > eps) in logs: no overflow where eps is large, Q tiny
        lower_term = np.exp(epsilons + np.log(lower_tail[prefix]))
    deltas = np.clip(upper_tail[prefix] - lower_term, 0.0, 1.0)
    deltas = np.minimum(deltas + 2.0 * TAIL_MASS, 1.0)  # the truncated outcomes, as infinite loss
    pmf = pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(step, lowest, highest, np.minimum.accumulate(deltas))
    return PrivacyLossDistribution(pmf)


@functools.lru_cache(maxsize=16)
def _mechanism_pld(mechanism: SkellamMechanism, step: float) -> PrivacyLossDistribution:
    """The vector's PLD: its `coordinates` slots composed."""
    slot = _slot_pld(mechanism.variance, mechanism.shift, step)
    if mechanism.coordinates == 1:
        return slot
    return slot.self_compose(mechanism.coordinates, tail_mass_truncation=COMPOSE_TAIL_MASS)


def fft_allowance(mechanisms: Iterable[SkellamMechanism]) -> float:
    """What FFT round-off may take off delta in the composition of `mechanisms` (see FFT_ROUNDOFF)."""
    return FFT_ROUNDOFF + FFT_ROUNDOFF_PER_SLOT * sum(m.coordinates for m in mechanisms)


#: One slot's outcomes are enumerated over -N..N: beyond this radius (noise sd above about 350,000 integer units)
#: the arrays would not fit in memory, and the accountant uses RDP instead.
MAX_SUPPORT_RADIUS = 4_000_000


def resolves(mechanisms: Iterable[SkellamMechanism], *, delta: float) -> bool:
    """Whether the PLD accounts for this composition at this delta: its FFT allowance is at most 1% of delta, and
    every slot's support is small enough to enumerate."""
    mechanisms = list(mechanisms)
    return (
        0 < delta < 1
        and fft_allowance(mechanisms) <= delta / 100.0
        and all(support_radius(m.variance) + m.shift <= MAX_SUPPORT_RADIUS for m in mechanisms)
    )


def pld_epsilon(mechanisms: Iterable[SkellamMechanism], *, delta: float) -> float:
    """(epsilon, delta)-DP epsilon of the sequential composition of `mechanisms` (a release each), by PLD.

    Never below the true epsilon; 0 for no mechanism (or none that moves anything)."""
    counts = Counter(m for m in mechanisms if m.coordinates and m.shift)
    if not resolves(counts.elements(), delta=delta):
        raise ValueError(
            f"the PLD of {counts.total()} releases does not resolve delta {delta} or its noise is too wide to "
            "enumerate (see `resolves`)"
        )
    return _composed_epsilon(tuple(sorted(counts.items())), delta)


@functools.lru_cache(maxsize=1024)
def _composed_epsilon(counts: tuple[tuple[SkellamMechanism, int], ...], delta: float) -> float:
    if not counts:
        return 0.0
    step = min(discretization(m) for m, _ in counts)
    composed: PrivacyLossDistribution | None = None
    for mechanism, times in counts:
        pld = _mechanism_pld(mechanism, step)
        if times > 1:
            pld = pld.self_compose(times, tail_mass_truncation=COMPOSE_TAIL_MASS)
        composed = pld if composed is None else composed.compose(pld, tail_mass_truncation=COMPOSE_TAIL_MASS)
    assert composed is not None
    allowance = fft_allowance(m for m, times in counts for _ in range(times))
    return float(composed.get_epsilon_for_delta(delta - allowance))
