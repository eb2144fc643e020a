"""Accounting for the Skellam mechanism: PLD epsilons (privacy/pld.py), the Renyi-DP bound kept as a cross-check,
composition of a privacy period's releases (parallel or sequential), and noise calibration.

RDP bound (Agarwal, Kairouz, Liu, NeurIPS 2021), total variance v, L1/L2 sensitivities D1, D2:
    eps(alpha) <= alpha*D2^2/(2v) + min(((2*alpha-1)*D2^2 + 6*D1)/(4*v^2), 3*D1/(2*v))
RDP adds over releases; (epsilon, delta) comes from Opacus's conversion (Balle et al. 2020), written out here
(`epsilon_from_rdp`, checked against Opacus's in the tests): importing Opacus imports torch, about 2 s.
Only integer orders are used, so nothing relies on the bound between integers; the RDP epsilon is the
minimum over those orders and therefore never below the true one. The PLD epsilon is tighter (5-9% at the
configs Fusion calibrates) and also never below the true one; it is what Fusion reports, and it never exceeds
the RDP epsilon of the same composition (`PeriodLoss`; the ledger and the calibration check it).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import numpy as np

from privacy.pld import SkellamMechanism, pld_epsilon, resolves


@dataclass(frozen=True)
class NormBoundMechanism:
    """Skellam noise of total variance `variance` on every slot of a vector that a neighbouring input moves by at
    most `l1` in L1 norm and `l2` in L2 norm, in any shape (a training round's clipped gradient sum, training/).
    Only the RDP bound covers it: the PLD accountant assumes SkellamMechanism's per-slot shape."""

    variance: float
    l1: float
    l2: float


#: What one release or training round is for the accountant.
Mechanism = SkellamMechanism | NormBoundMechanism

#: Integer Renyi orders at which the bound is evaluated.
ORDERS: np.ndarray = np.concatenate([np.arange(2, 64), np.arange(64, 257, 4), np.arange(288, 1025, 32)]).astype(float)


def skellam_rdp(*, variance: float, l1: float, l2: float, orders: np.ndarray = ORDERS) -> np.ndarray:
    """RDP epsilon of one Skellam release at each order (same shape as `orders`)."""
    _check_mechanism(variance=variance, l1=l1, l2=l2)
    a = np.asarray(orders, dtype=float)
    gaussian_part = a * l2**2 / (2.0 * variance)
    correction = np.minimum(((2.0 * a - 1.0) * l2**2 + 6.0 * l1) / (4.0 * variance**2), 3.0 * l1 / (2.0 * variance))
    return gaussian_part + correction


def _check_mechanism(*, variance: float, l1: float, l2: float) -> None:
    if not (math.isfinite(variance) and variance > 0):
        raise ValueError(f"variance must be positive and finite, got {variance}")
    if not (math.isfinite(l1) and math.isfinite(l2) and l1 >= 0 and l2 >= 0):
        raise ValueError(f"sensitivities must be finite and non-negative, got l1={l1}, l2={l2}")


def epsilon_for(*, variance: float, l1: float, l2: float, delta: float, releases: int = 1) -> float:
    """(epsilon, delta)-DP epsilon of `releases` compositions of the Skellam mechanism."""
    if releases < 1:
        raise ValueError("releases must be at least 1")
    return epsilon_from_rdp(releases * skellam_rdp(variance=variance, l1=l1, l2=l2), delta=delta)


def epsilon_from_rdp(rdp: np.ndarray, *, delta: float) -> float:
    """(epsilon, delta)-DP epsilon of a composed RDP curve given at ORDERS."""
    rdp = np.asarray(rdp, dtype=float)
    if rdp.shape != ORDERS.shape:
        raise ValueError(f"an RDP curve needs one value per order ({ORDERS.size}), got shape {rdp.shape}")
    if not rdp.any():
        return 0.0
    # Balle et al. 2020, Theorem 21, at each order a: rdp - (log(delta) + log(a)) / (a - 1) + log((a - 1) / a);
    # epsilon is the least over the orders (opacus.accountants.analysis.rdp.get_privacy_spent, NaN orders skipped).
    with np.errstate(invalid="ignore"):
        at_order = rdp - (np.log(delta) + np.log(ORDERS)) / (ORDERS - 1.0) + np.log((ORDERS - 1.0) / ORDERS)
    if np.isnan(at_order).all():
        return math.inf
    return float(np.nanmin(at_order))


def calibrate_variance(*, epsilon: float, delta: float, l1: float, l2: float, releases: int = 1) -> float:
    """The smallest total variance (to 0.1% relative) whose epsilon does not exceed the target.

    Bisection on log-variance; the returned variance always satisfies epsilon_for(...) <= epsilon.
    """
    if not (epsilon > 0 and 0 < delta < 1):
        raise ValueError(f"need epsilon > 0 and 0 < delta < 1, got epsilon={epsilon}, delta={delta}")
    if not (math.isfinite(l1) and math.isfinite(l2) and l1 > 0 and l2 > 0):
        raise ValueError(f"sensitivities must be positive and finite, got l1={l1}, l2={l2}")
    floor = rdp_floor(delta)
    if epsilon <= floor:
        raise ValueError(
            f"no noise level reaches epsilon={epsilon} at delta={delta} by the Renyi-DP bound, whose conversion "
            f"stops at about {floor:.3g} at this delta (its orders end at {ORDERS[-1]:.0f}): raise epsilon or delta"
        )
    low, high = 1e-6, max(1.0, l2**2)
    while epsilon_for(variance=high, l1=l1, l2=l2, delta=delta, releases=releases) > epsilon:
        low, high = high, high * 4.0
        if high > 1e36:
            raise ValueError(f"no noise level reaches epsilon={epsilon}; the sensitivity is too large")
    while high / low > 1.001:
        middle = math.sqrt(low * high)
        if epsilon_for(variance=middle, l1=l1, l2=l2, delta=delta, releases=releases) > epsilon:
            low = middle
        else:
            high = middle
    return high


def rdp_floor(delta: float) -> float:
    """The least epsilon the RDP conversion can give at `delta`, however much noise: its value for a curve that
    is zero at every order (about 0.0125 at delta 1e-9, 0.0035 at 1e-5)."""
    return epsilon_from_rdp(np.full(ORDERS.size, 1e-300), delta=delta)


#: Calibration stops when the smallest feasible variance is bracketed to this ratio (0.1%).
_CALIBRATION_RATIO = 1.001


@functools.lru_cache(maxsize=512)
def calibrate_skellam_variance(*, epsilon: float, delta: float, coordinates: int, shift: int) -> float:
    """The smallest total variance (to 0.1% relative) whose reported epsilon (`skellam_epsilon`) for one release
    of `coordinates` slots moved by `shift` does not exceed the target.

    Starts from the RDP calibration, an upper bound (the PLD epsilon never exceeds the RDP one), predicts the
    answer from epsilon ~ 1/sqrt(v), and brackets it with probes just above and below each prediction
    (log-log interpolation, bisection as a fallback): 3-5 PLD evaluations. The returned variance is always one
    whose epsilon was evaluated at or below the target. Cached: `release_parameters` calls it for every plan.
    """
    if not (coordinates >= 1 and shift >= 1):
        raise ValueError(f"need coordinates >= 1 and shift >= 1, got {coordinates}, {shift}")
    mechanism = SkellamMechanism(1.0, coordinates, shift)
    if not resolves([mechanism], delta=delta):  # delta too small for the PLD at any variance: RDP alone
        return calibrate_variance(epsilon=epsilon, delta=delta, l1=mechanism.l1, l2=mechanism.l2)

    def reported(variance: float) -> float:
        """What the ledger will report: the PLD, or RDP where the noise is too wide for the PLD to enumerate."""
        return skellam_epsilon([SkellamMechanism(variance, coordinates, shift)], delta=delta)

    if epsilon > rdp_floor(delta):
        high = calibrate_variance(epsilon=epsilon, delta=delta, l1=mechanism.l1, l2=mechanism.l2)
    else:  # below what the RDP conversion reaches: a variance the PLD certifies, found by quadrupling
        high = max(1.0, mechanism.l2**2 * 2.0 * math.log(1.25 / delta) / epsilon**2)  # the classic Gaussian's
        while reported(high) > epsilon:
            high *= 4.0
            if not resolves([SkellamMechanism(high, coordinates, shift)], delta=delta):
                raise ValueError(
                    f"no noise level reaches epsilon={epsilon} at delta={delta}: the Renyi-DP bound stops at "
                    f"about {rdp_floor(delta):.3g} at this delta, and the privacy-loss distribution would need "
                    "noise wider than it enumerates (privacy.pld.MAX_SUPPORT_RADIUS); raise epsilon or delta"
                )
    e_high = reported(high)
    if e_high > epsilon:
        raise RuntimeError(
            f"the PLD epsilon {e_high} exceeds the RDP epsilon at variance {high} (target {epsilon}); "
            "this is probably a bug"
        )
    low, e_low = 0.0, math.inf
    nudge = _CALIBRATION_RATIO**0.4  # probes at 0.8 of the final bracket's half-width around each prediction
    for attempt in range(64):
        if high <= low * _CALIBRATION_RATIO:
            return high
        if attempt >= 8:  # the predictions did not close the bracket: bisect
            probes = [math.sqrt(low * high) if low else high / 2.0]
        else:
            if low == 0.0:
                guess = high * (e_high / epsilon) ** 2  # epsilon ~ 1 / sqrt(v)
            else:  # log epsilon linear in log v between the bracket's ends
                t = math.log(e_low / epsilon) / math.log(e_low / e_high)
                guess = low * (high / low) ** t
            probes = [guess * nudge, guess / nudge]
        for probe in probes:
            if not low < probe < high:
                probe = math.sqrt(low * high) if low else high / _CALIBRATION_RATIO
            e = reported(probe)
            if e <= epsilon:
                high, e_high = probe, e
            else:
                low, e_low = probe, e
                break  # a smaller variance would not meet the target either
    raise RuntimeError(f"calibrating the Skellam variance for epsilon {epsilon} did not converge; probably a bug")


def mechanism_rdp(mechanism: Mechanism, orders: np.ndarray = ORDERS) -> np.ndarray:
    """The RDP curve of one release of `mechanism` (its L1 and L2 sensitivities in the bound)."""
    return skellam_rdp(variance=mechanism.variance, l1=mechanism.l1, l2=mechanism.l2, orders=orders)


def skellam_epsilon(mechanisms: Sequence[SkellamMechanism], *, delta: float) -> float:
    """The epsilon Fusion reports for the sequential composition of `mechanisms`: PLD, or the RDP conversion
    where delta is too small for the PLD to resolve (privacy.pld.resolves: below about 1e-12 for a few slots)."""
    if not resolves(mechanisms, delta=delta):
        if not mechanisms:
            return 0.0
        return epsilon_from_rdp(curve_sum(np.array([mechanism_rdp(m) for m in mechanisms])), delta=delta)
    return pld_epsilon(mechanisms, delta=delta)


class Composition(StrEnum):
    """How the releases of one privacy period compose, which follows from the privacy unit."""

    PARALLEL = "parallel"  # event level: a reading lies in one interval; only releases sharing an instant compose
    SEQUENTIAL = "sequential"  # entity level: one entity may be in every release of the period


@dataclass(frozen=True)
class ReleaseCharge:
    """What one release costs: its mechanism (None for a test-mode release without noise, which protects
    nothing and is charged nothing), the interval [start, end) of the readings it covers, and how it composes
    with the other releases of its period."""

    mechanism: Mechanism | None
    start: datetime
    end: datetime
    composition: Composition

    def __post_init__(self) -> None:
        if not self.start < self.end:
            raise ValueError(f"a release interval needs start < end, got {self.start} .. {self.end}")


@dataclass(frozen=True)
class PeriodLoss:
    """A period's privacy loss at one delta: the PLD epsilon (reported), and the RDP curve and epsilon of the
    same composition, a looser bound the PLD epsilon must never exceed."""

    epsilon: float
    epsilon_rdp: float
    rdp: np.ndarray  # shape (len(ORDERS),)


def period_loss(charges: Sequence[ReleaseCharge], *, composition: Composition, delta: float) -> PeriodLoss:
    """The loss of a privacy period's releases under `composition`.

    Sequential: all releases compose. Parallel: the loss is the worst, over instants t, of the sequential
    composition of the releases whose intervals contain t (a reading at t is seen by those releases only): the
    largest single release when the intervals are disjoint, and overlapping releases, should any exist, compose.
    """
    charged = [c for c in charges if c.mechanism is not None]
    mechanisms = [c.mechanism for c in charged if c.mechanism is not None]
    if not charged:
        return PeriodLoss(0.0, 0.0, np.zeros(ORDERS.size))
    if composition is Composition.SEQUENTIAL:
        groups = [tuple(range(len(charged)))]
    else:
        groups = instant_groups([(c.start, c.end) for c in charged])
    curve_of = {m: mechanism_rdp(m) for m in dict.fromkeys(mechanisms)}  # a period's releases share a few shapes
    curves = np.array([curve_of[m] for m in mechanisms])  # (releases, orders)
    distinct: set[tuple[Mechanism, ...]]
    if all(len(group) == 1 for group in groups):  # disjoint intervals: each release alone, the largest one counts
        rdp = curves.max(axis=0)
        distinct = {(mechanism,) for mechanism in curve_of}
    else:
        rdp = np.max([curve_sum(curves[list(group)]) for group in groups], axis=0)
        distinct = {tuple(sorted((mechanisms[i] for i in group), key=_order)) for group in groups}
    epsilon_rdp = epsilon_from_rdp(rdp, delta=delta)
    epsilon = max(_group_epsilon(group, delta=delta) for group in distinct)
    return PeriodLoss(epsilon, epsilon_rdp, rdp)


def _order(mechanism: Mechanism) -> tuple[str, float, float, float]:
    if isinstance(mechanism, SkellamMechanism):
        return ("", mechanism.variance, mechanism.coordinates, mechanism.shift)
    return ("norm", mechanism.variance, mechanism.l1, mechanism.l2)


def _group_epsilon(group: Sequence[Mechanism], *, delta: float) -> float:
    """The reported epsilon of releases that compose: PLD where every one has the per-slot shape, else the RDP
    conversion of their summed curves (a training round's norm bound is covered by RDP alone)."""
    per_slot = [m for m in group if isinstance(m, SkellamMechanism)]
    if len(per_slot) == len(group):
        return skellam_epsilon(per_slot, delta=delta)
    return epsilon_from_rdp(curve_sum(np.array([mechanism_rdp(m) for m in group])), delta=delta)


def curve_sum(curves: np.ndarray) -> np.ndarray:
    """The sum of RDP curves (rows), order by order, exactly rounded (math.fsum): the same float whatever order
    the curves come in. A period's summed curve and a group's (the same releases, sorted) must agree to the last
    bit: summed in different orders, a training round's and releases' curves gave an epsilon one ulp above the RDP
    bound of the same group, which the ledger refuses as an internal error."""
    return np.array([math.fsum(column) for column in np.asarray(curves, dtype=np.float64).T])


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def instant_groups(intervals: Sequence[tuple[datetime, datetime]]) -> list[tuple[int, ...]]:
    """The sets of intervals [start, end) that share an instant, one per distinct set, as sorted indices, in
    ascending order; every set of intervals containing some instant t is one of them or a subset of one (the
    intervals containing t all contain the latest of their starts, so the starts are the only instants to look at).

    A sweep over the starts in order, keeping the intervals open at each (a heap by end): O(n log n) plus the sets'
    sizes, so a period of a month of 15-minute releases (2,880) is accounted in milliseconds; comparing every start
    with every interval took 1.2 s there, twice a release (the check, then the charge)."""
    spans = sorted(
        ((s - _EPOCH) // timedelta(microseconds=1), (e - _EPOCH) // timedelta(microseconds=1), i)
        for i, (s, e) in enumerate(intervals)
    )
    if all(start < end for start, end, _ in spans) and all(
        later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans)
    ):  # disjoint (a period's releases, in practice): each interval alone at its start
        return [(i,) for i in range(len(spans))]
    groups: set[tuple[int, ...]] = set()
    open_: list[tuple[int, int]] = []  # (end, index) of the intervals started so far, the earliest end first
    at = 0
    while at < len(spans):
        instant = spans[at][0]
        while at < len(spans) and spans[at][0] == instant:
            heapq.heappush(open_, (spans[at][1], spans[at][2]))
            at += 1
        while open_ and open_[0][0] <= instant:  # ended by this start (each interval is open at its own start)
            heapq.heappop(open_)
        groups.add(tuple(sorted(index for _, index in open_)))
    return sorted(groups)
