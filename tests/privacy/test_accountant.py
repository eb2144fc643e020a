"""Skellam accounting against independent computations: the RDP bound against exact Renyi divergences and its
conversion; the PLD epsilon against exact hockey-stick divergences (direct summation over outcomes, and a
fine-grid sandwich at a demo-sized variance), PLD never above RDP, calibration, and the sensitivity's shape."""

from __future__ import annotations

import functools
import itertools
import math
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.special import ive, logsumexp

from fusion.config.federation import parse_config
from fusion.config.parameters import release_parameters
from privacy.accountant import (
    ORDERS,
    Composition,
    NormBoundMechanism,
    ReleaseCharge,
    calibrate_skellam_variance,
    calibrate_variance,
    curve_sum,
    epsilon_for,
    instant_groups,
    period_loss,
    rdp_floor,
    skellam_epsilon,
    skellam_rdp,
)
from privacy.encoding import balanced_encodings, entity_level_sensitivity, event_level_sensitivity
from privacy.pld import TAIL_MASS, SkellamMechanism, pld_epsilon, resolves, skellam_log_pmf, support_radius
from tests.conftest import config_text

EXACT_ORDERS = np.arange(2, 33)
FLOAT_SLACK = 1e-9


# --- independent references ---------------------------------------------------------------------------------------


def rdp_bound_reference(alpha: float, *, variance: float, l1: float, l2: float) -> float:
    """The Agarwal-Kairouz-Liu bound, written out for one order (slow, obvious)."""
    gaussian = alpha * l2**2 / (2 * variance)
    return gaussian + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))


def conversion_reference(rdp: np.ndarray, delta: float, orders: np.ndarray = ORDERS) -> float:
    """eps = min_a [ rdp(a) + log((a-1)/a) - (log(delta) + log(a)) / (a-1) ] (Balle et al. 2020, Theorem 21)."""
    a = np.asarray(orders, dtype=float)
    return float(np.min(rdp + np.log((a - 1) / a) - (np.log(delta) + np.log(a)) / (a - 1)))


@functools.cache
def reference_log_pmf(mu: float) -> tuple[np.ndarray, np.ndarray]:
    """(k, log P(k)) of Skellam(mu, mu) for |k| <= K, as the Poisson convolution sum_j Pois(j + |k|) Pois(j).

    Computed in log space (log-sum-exp over j) so the far tails, which dominate high Renyi orders, neither
    underflow nor lose accuracy (scipy.stats.skellam.pmf, via the noncentral chi-square, does both below ~1e-250).
    """
    spread = int(mu + 60 * math.sqrt(mu) + 600)
    j = np.arange(2 * spread + 1)
    k = np.arange(spread + 1)
    log_pois_j = stats.poisson.logpmf(j, mu)
    log_half = logsumexp(log_pois_j[None, :] + stats.poisson.logpmf(j[None, :] + k[:, None], mu), axis=1)
    ks = np.arange(-spread, spread + 1)
    return ks, np.concatenate([log_half[:0:-1], log_half])


def exact_renyi_shift(mu: float, shift: int, orders: np.ndarray) -> np.ndarray:
    """D_a(Sk(mu) + shift || Sk(mu)) = log(sum_k P(k - shift)^a P(k)^(1-a)) / (a - 1), numerically."""
    _, log_p = reference_log_pmf(mu)
    out = []
    for a in orders:
        terms = a * log_p[:-shift] + (1 - a) * log_p[shift:]  # k runs over the support where both are stored
        total = logsumexp(terms)
        # Truncating the support drops only positive terms (it can only under-estimate): make that negligible.
        assert max(terms[:3].max(), terms[-3:].max()) - total < -70.0
        out.append(total / (a - 1))
    return np.array(out)


def test_log_pmf_reference_agrees_with_scipy() -> None:
    for mu in (10.0, 25.0, 100.0):
        ks, log_p = reference_log_pmf(mu)
        assert math.isclose(math.exp(logsumexp(log_p)), 1.0, rel_tol=1e-12)
        scipy_pmf = stats.skellam.pmf(ks, mu, mu)
        shown = scipy_pmf > 1e-250
        np.testing.assert_allclose(np.exp(log_p[shown]), scipy_pmf[shown], rtol=1e-9)


# --- the bound ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variance", "l1", "l2"), [(20.0, 1.0, 1.0), (3.7e6, 1000.0, 707.1), (1e12, 2.0, 1.5)])
def test_skellam_rdp_matches_the_formula(variance: float, l1: float, l2: float) -> None:
    got = skellam_rdp(variance=variance, l1=l1, l2=l2)
    assert got.shape == ORDERS.shape
    expected = [rdp_bound_reference(float(a), variance=variance, l1=l1, l2=l2) for a in ORDERS]
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("variance", [20.0, 50.0, 200.0])
@pytest.mark.parametrize("shift", [1, 2, 3])
def test_bound_dominates_the_exact_renyi_divergence(variance: float, shift: int) -> None:
    """1-D shift by d (D1 = D2 = d): the exact divergence never exceeds the bound at orders 2..32."""
    exact = exact_renyi_shift(variance / 2, shift, EXACT_ORDERS)
    bound = skellam_rdp(variance=variance, l1=shift, l2=shift, orders=EXACT_ORDERS)
    assert np.all(exact > 0)
    assert np.all(np.diff(exact) > 0)  # Renyi divergence increases with the order
    assert np.all(exact <= bound + FLOAT_SLACK), np.max(exact - bound)
    # Not a vacuous bound: at the lowest order it is within 15% of the truth at these variances.
    assert bound[0] <= 1.15 * exact[0]


@pytest.mark.parametrize("variance", [20.0, 200.0])
@pytest.mark.parametrize(("count_shift", "sum_shift"), [(2, 1), (2, 2), (3, 1)])
def test_bound_dominates_the_exact_divergence_of_a_reading(variance: float, count_shift: int, sum_shift: int) -> None:
    """One reading moves (COUNT, SUM) by (w, s); independent slots add their divergences. L1 = w + s, L2 = |(w, s)|."""
    exact = exact_renyi_shift(variance / 2, count_shift, EXACT_ORDERS) + exact_renyi_shift(
        variance / 2, sum_shift, EXACT_ORDERS
    )
    bound = skellam_rdp(
        variance=variance, l1=count_shift + sum_shift, l2=math.hypot(count_shift, sum_shift), orders=EXACT_ORDERS
    )
    assert np.all(exact <= bound + FLOAT_SLACK), np.max(exact - bound)


# --- conversion and composition -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variance", "l1", "l2", "delta"),
    [(20.0, 1.0, 1.0, 1e-5), (1.4e7, 1000.0, 707.1067811865476, 1e-6), (5e4, 30.0, 25.0, 1e-9), (1e9, 2.0, 2.0, 1e-3)],
)
def test_epsilon_matches_an_independent_conversion(variance: float, l1: float, l2: float, delta: float) -> None:
    rdp = np.array([rdp_bound_reference(float(a), variance=variance, l1=l1, l2=l2) for a in ORDERS])
    expected = conversion_reference(rdp, delta)
    got = epsilon_for(variance=variance, l1=l1, l2=l2, delta=delta)
    assert isinstance(got, float)
    assert math.isclose(got, expected, rel_tol=1e-12)


@pytest.mark.parametrize("releases", [1, 2, 5, 24, 365])
def test_composition_adds_rdp(releases: int) -> None:
    variance, l1, l2, delta = 3.0e6, 1000.0, 707.1067811865476, 1e-6
    rdp = np.array([rdp_bound_reference(float(a), variance=variance, l1=l1, l2=l2) for a in ORDERS])
    expected = conversion_reference(releases * rdp, delta)
    got = epsilon_for(variance=variance, l1=l1, l2=l2, delta=delta, releases=releases)
    assert math.isclose(got, expected, rel_tol=1e-12)
    if releases > 1:
        assert got > epsilon_for(variance=variance, l1=l1, l2=l2, delta=delta, releases=releases - 1)


# --- calibration --------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    epsilon=st.floats(min_value=0.1, max_value=8.0),
    log10_delta=st.floats(min_value=-9.0, max_value=-4.0),
    l1=st.floats(min_value=1.0, max_value=1e4),
    l2_fraction=st.floats(min_value=0.5, max_value=1.0),
    releases=st.sampled_from([1, 1, 1, 3, 30]),
)
def test_calibrated_variance_never_overshoots_and_is_tight(
    epsilon: float, log10_delta: float, l1: float, l2_fraction: float, releases: int
) -> None:
    delta, l2 = 10.0**log10_delta, l1 * l2_fraction
    variance = calibrate_variance(epsilon=epsilon, delta=delta, l1=l1, l2=l2, releases=releases)
    assert variance > 0
    assert epsilon_for(variance=variance, l1=l1, l2=l2, delta=delta, releases=releases) <= epsilon
    assert epsilon_for(variance=variance * 0.99, l1=l1, l2=l2, delta=delta, releases=releases) > epsilon


def test_more_releases_need_more_noise() -> None:
    one = calibrate_variance(epsilon=1.0, delta=1e-6, l1=1000.0, l2=707.1, releases=1)
    ten = calibrate_variance(epsilon=1.0, delta=1e-6, l1=1000.0, l2=707.1, releases=10)
    assert ten > 5 * one


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 0.0, "delta": 1e-6},
        {"epsilon": -1.0, "delta": 1e-6},
        {"epsilon": math.nan, "delta": 1e-6},
        {"epsilon": 1.0, "delta": 0.0},
        {"epsilon": 1.0, "delta": 1.0},
        {"epsilon": 1.0, "delta": 2.0},
        {"epsilon": 1.0, "delta": -1e-6},
        {"epsilon": 1.0, "delta": math.nan},
        {"epsilon": 1.0, "delta": 1e-6, "releases": 0},
        {"epsilon": 1e-3, "delta": 1e-9},  # unreachable at any noise: at order 1024 the conversion alone is ~0.012
    ],
)
def test_calibration_refuses_bad_inputs(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        calibrate_variance(l1=2.0, l2=1.5, **kwargs)


def test_epsilon_for_refuses_zero_releases() -> None:
    with pytest.raises(ValueError, match="releases"):
        epsilon_for(variance=100.0, l1=1.0, l2=1.0, delta=1e-6, releases=0)


# --- PLD: the Skellam pmf it is built on -----------------------------------------------------------------------


def test_skellam_log_pmf_matches_the_poisson_convolution_reference() -> None:
    """Small variances, the whole stored support: orders below 500 go through scipy's ive, the far tails (orders
    500 and up, log P down to about -1500) through the Debye expansion."""
    for mu in (10.0, 25.0, 100.0):
        ks, log_p = reference_log_pmf(mu)
        got = skellam_log_pmf(ks, variance=2 * mu)
        assert np.abs(ks).max() >= 600
        np.testing.assert_allclose(got, log_p, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("variance", [1e4, 1e6, 1e8])
def test_skellam_log_pmf_matches_scipy_out_to_twelve_sds(variance: float) -> None:
    k = np.arange(0, int(12 * math.sqrt(variance)))
    reference = np.log(ive(k, variance))
    np.testing.assert_allclose(skellam_log_pmf(k, variance=variance), reference, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("variance", [3e9, 2e10])
def test_skellam_log_pmf_beyond_scipy_s_range_has_the_right_mass_variance_and_shape(variance: float) -> None:
    """scipy's ive returns nan above arguments of about 2^31 (entity-level variances): there Hankel's expansion
    serves orders below 500 and Debye's the rest. Total mass 1, variance v, and a log pmf whose second difference
    is -1/v (nearly Gaussian) across the seam between the two expansions."""
    n = support_radius(variance)
    k = np.arange(-n, n + 1)
    p = np.exp(skellam_log_pmf(k, variance=variance))
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)
    assert math.isclose(float(np.sum(k.astype(float) ** 2 * p)), variance, rel_tol=1e-9)
    seam = skellam_log_pmf(np.arange(490, 511), variance=variance)
    np.testing.assert_allclose(np.diff(seam, 2), -1.0 / variance, rtol=0, atol=1e-13)


@pytest.mark.parametrize("mu", [0.25, 10.0, 100.0])
def test_the_support_radius_leaves_at_most_the_stated_tail(mu: float) -> None:
    ks, log_p = reference_log_pmf(mu)
    n = support_radius(2 * mu)
    beyond = math.exp(logsumexp(log_p[ks > n]))
    assert beyond <= TAIL_MASS
    assert math.exp(logsumexp(log_p[ks > 0.8 * n])) > TAIL_MASS * 1e-6  # and not absurdly far out


def test_the_support_radius_of_noise_wider_than_floats_count_by_halves_still_comes_back() -> None:
    """Beyond 2^53 two floats are further apart than 0.5: the bisection stopped at 0.5 never did (a tiny epsilon
    then hung config loading)."""
    for variance in (1e28, 1e30, 1e32):  # nearly normal: the Chernoff radius is about sd sqrt(2 log(1 / tail))
        gaussian = math.sqrt(variance) * math.sqrt(2 * math.log(1 / TAIL_MASS))
        assert support_radius(variance) == pytest.approx(gaussian, rel=0.01)


# --- PLD against exact hockey-stick divergences -----------------------------------------------------------------


def slot_atoms(variance: float, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(privacy loss, P) of one slot at every outcome x with P(x) > 1e-52: loss = log p(x) - log p(x - shift).

    Variances up to 2000 use the Poisson-convolution reference pmf; larger ones scipy's ive over +-16 SDs (not
    the Debye and Hankel expansions the accountant uses beyond order 500)."""
    if variance <= 2000:
        ks, log_p = reference_log_pmf(variance / 2)
        keep = log_p > -120.0
        assert ks[keep][0] - shift >= ks[0]
        return log_p[keep] - log_p[np.searchsorted(ks, ks[keep] - shift)], np.exp(log_p[keep])
    n = int(16 * math.sqrt(variance)) + 10
    x = np.arange(-n, n + 1)
    with np.errstate(divide="ignore"):
        log_p, log_q = np.log(ive(np.abs(x), variance)), np.log(ive(np.abs(x - shift), variance))
    keep = log_p > -120.0
    return (log_p - log_q)[keep], np.exp(log_p[keep])


class ExactHockeyStick:
    """delta(eps) = sum over joint outcomes of max(0, P - e^eps Q) for independent slots, exactly.

    The slots split into two halves, each enumerated outcome by outcome (its loss is the sum of its slots'); then
    delta(eps) = sum_a P_a sum_{b: L_a + L_b > eps} P_b (1 - e^(eps - L_a - L_b)), the inner sums read off suffix
    sums over the second half sorted by loss."""

    def __init__(self, slots: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        def enumerate_(group: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
            loss, prob = np.zeros(1), np.ones(1)
            for slot_loss, slot_prob in group:
                loss = (loss[:, None] + slot_loss[None, :]).ravel()
                prob = (prob[:, None] * slot_prob[None, :]).ravel()
            return loss, prob

        half = len(slots) // 2
        self.loss_a, self.prob_a = enumerate_(slots[:half])
        loss_b, prob_b = enumerate_(slots[half:])
        order = np.argsort(loss_b)
        self.loss_b = loss_b[order]
        self.upper_b = np.concatenate([np.cumsum(prob_b[order][::-1])[::-1], [0.0]])
        self.lower_b = np.concatenate([np.cumsum((prob_b[order] * np.exp(-self.loss_b))[::-1])[::-1], [0.0]])

    def delta(self, eps: float) -> float:
        threshold = eps - self.loss_a
        i = np.searchsorted(self.loss_b, threshold, side="right")
        inner = self.upper_b[i] - np.exp(threshold) * self.lower_b[i]
        return float(np.sum(self.prob_a * np.maximum(inner, 0.0)))

    def epsilon(self, delta: float) -> float:
        """The smallest eps >= 0 with delta(eps) <= delta (bisection to float precision)."""
        low, high = 0.0, 1.0
        while self.delta(high) > delta:
            low, high = high, 2.0 * high
        for _ in range(64):
            middle = (low + high) / 2.0
            low, high = (middle, high) if self.delta(middle) > delta else (low, middle)
        return high


EXACT_CASES = [  # releases as (variance, shift, coordinates), and delta
    ([(20.0, 1, 1)], 1e-5),
    ([(20.0, 2, 2)], 1e-6),
    ([(0.5, 1, 1)], 1e-6),  # far from Gaussian: most of the mass at 0
    ([(200.0, 5, 3)], 1e-6),
    ([(3.15e7, 600, 2)], 1e-7),  # the demo's variance and weight, for count and sum
    ([(50.0, 3, 2)] * 2, 1e-6),  # two releases
    ([(50.0, 3, 2)] * 2, 1e-12),  # where FFT round-off (about 1e-16 here) matters without its allowance
    ([(8.0, 1, 1)] * 3, 1e-9),  # three releases
    ([(50.0, 3, 2), (80.0, 2, 1)], 1e-7),  # two different releases
    ([(3.15e7, 600, 1)] * 2, 1e-9),
]


@pytest.mark.parametrize(("releases", "delta"), EXACT_CASES)
def test_pld_epsilon_is_within_2_percent_of_the_exact_one_and_never_below(
    releases: list[tuple[float, int, int]], delta: float
) -> None:
    slots = [slot_atoms(variance, shift) for variance, shift, k in releases for _ in range(k)]
    exact = ExactHockeyStick(slots).epsilon(delta)
    got = pld_epsilon([SkellamMechanism(variance, k, shift) for variance, shift, k in releases], delta=delta)
    assert got >= exact * (1 - 1e-12)  # never below (float rounding aside)
    assert got <= 1.02 * exact
    assert got <= 1.0001 * exact  # measured: at most 1.000025 over these cases (connect-the-dots is tight)


def grid_sandwich(variance: float, shift: int, coordinates: int, delta: float, step: float) -> tuple[float, float]:
    """Epsilons of `coordinates` slots with every loss rounded down and up to multiples of `step` (convolved with
    FFTs): the exact epsilon lies between them."""
    loss, prob = slot_atoms(variance, shift)
    bounds = []
    for rounding in (np.floor, np.ceil):
        index = rounding(loss / step).astype(np.int64)
        pmf = np.bincount(index - index.min(), weights=prob)
        size = coordinates * (pmf.size - 1) + 1
        fft_size = 1 << (size - 1).bit_length()
        composed = np.maximum(np.fft.irfft(np.fft.rfft(pmf, fft_size) ** coordinates, fft_size)[:size], 0.0)
        losses = (np.arange(size) + coordinates * index.min()) * step

        def delta_at(eps: float, losses: np.ndarray = losses, composed: np.ndarray = composed) -> float:
            above = losses > eps
            return float(np.sum(composed[above] * -np.expm1(eps - losses[above])))

        low, high = 0.0, 8.0
        for _ in range(50):
            middle = (low + high) / 2.0
            low, high = (middle, high) if delta_at(middle) > delta else (low, middle)
        bounds.append(high)
    return bounds[0], bounds[1]


@pytest.mark.parametrize(
    ("variance", "shift", "coordinates", "delta", "step"),
    [
        (3.15e7, 600, 4, 1e-7, 2.0**-16),  # the demo: count, sum, sum of squares and a histogram bin
        (9.87e5, 24, 96, 1e-6, 2.0**-14),  # entity level at a small weight: L0 = 24 cells of 4 slots, Linf = 4
    ],
)
def test_pld_epsilon_lies_in_a_fine_grid_sandwich_of_the_exact_one(
    variance: float, shift: int, coordinates: int, delta: float, step: float
) -> None:
    low, high = grid_sandwich(variance, shift, coordinates, delta, step=step)
    assert high - low <= coordinates * step + 1e-9
    got = pld_epsilon([SkellamMechanism(variance, coordinates, shift)], delta=delta)
    assert low <= got <= 1.02 * low


# --- PLD against the RDP bound, per-slot shapes, calibration -------------------------------------------------------


@pytest.mark.parametrize(("coordinates", "shift"), [(1, 1), (4, 1), (4, 600), (96, 1)])
@pytest.mark.parametrize("delta", [1e-5, 1e-10])
def test_pld_never_exceeds_rdp(coordinates: int, shift: int, delta: float) -> None:
    """Over variances putting one release near epsilon 0.3, 3 and 12, and 1, 3 and 30 releases composed."""
    for target in (0.3, 3.0, 12.0):
        mechanism = SkellamMechanism(1.0, coordinates, shift)
        variance = calibrate_variance(epsilon=target, delta=delta, l1=mechanism.l1, l2=mechanism.l2)
        for releases in (1, 3, 30):
            pld = pld_epsilon([SkellamMechanism(variance, coordinates, shift)] * releases, delta=delta)
            rdp = epsilon_for(variance=variance, l1=mechanism.l1, l2=mechanism.l2, delta=delta, releases=releases)
            assert 0 < pld <= rdp, (target, releases)


@pytest.mark.parametrize("variance", [2.0, 30.0, 1e4])
def test_a_larger_shift_of_one_slot_is_never_less_private(variance: float) -> None:
    """Monotone likelihood ratio (Skellam is log-concave): every hockey-stick divergence grows with the shift."""
    grid = np.linspace(0.0, 6.0, 25)
    curves = [[ExactHockeyStick([slot_atoms(variance, s)]).delta(e) for e in grid] for s in (1, 2, 3, 5)]
    for smaller, larger in itertools.pairwise(curves):
        assert np.all(np.array(smaller) <= np.array(larger) + 1e-15)


@pytest.mark.parametrize(
    ("w", "max_partitions", "max_per_partition", "components", "epsilon", "delta"),
    [
        (1, 1, 2, 3, 10.0, 1e-6),  # tiny variances: far from Gaussian
        (1, 1, 2, 3, 20.0, 1e-6),
        (1, 1, 10, 3, 8.0, 1e-6),
        (2, 1, 3, 3, 15.0, 1e-8),
        (1, 24, 4, 4, 1.0, 1e-6),
        (3, 4, 3, 4, 0.3, 1e-10),
        (100, 2, 4, 4, 4.0, 1e-7),  # a large weight: near-Gaussian
    ],
)
def test_a_cell_s_histogram_readings_in_one_bin_dominate_any_split(
    w: int, max_partitions: int, max_per_partition: int, components: int, epsilon: float, delta: float
) -> None:
    """Entity level: Linf readings move a cell's bins by Linf * w in total, possibly split. At the variance the
    config calibrates to, shifts (a w, b w) on two bins are dominated by (a + b) w on one, for every a + b <= Linf:
    merging two parts at a time, the concentrated bin then dominates every split."""
    variance = calibrate_skellam_variance(
        epsilon=epsilon, delta=delta, coordinates=max_partitions * components, shift=max_per_partition * w
    )
    grid = np.linspace(0.0, 2.5 * epsilon, 26)
    for a in range(1, max_per_partition):
        for b in range(1, min(a, max_per_partition - a) + 1):
            together = ExactHockeyStick([slot_atoms(variance, (a + b) * w)])
            split = ExactHockeyStick([slot_atoms(variance, a * w), slot_atoms(variance, b * w)])
            for eps in grid:
                assert split.delta(eps) <= together.delta(eps) + 1e-15, (a, b, eps)


@settings(max_examples=10, deadline=None)
@given(
    epsilon=st.floats(min_value=0.2, max_value=8.0),
    log10_delta=st.floats(min_value=-10.0, max_value=-4.0),
    coordinates=st.integers(min_value=1, max_value=24),
    shift=st.integers(min_value=1, max_value=300),
)
def test_calibrated_pld_epsilon_never_overshoots_and_is_tight(
    epsilon: float, log10_delta: float, coordinates: int, shift: int
) -> None:
    delta = 10.0**log10_delta
    variance = calibrate_skellam_variance(epsilon=epsilon, delta=delta, coordinates=coordinates, shift=shift)
    mechanism = SkellamMechanism(variance, coordinates, shift)
    assert skellam_epsilon([mechanism], delta=delta) <= epsilon
    assert skellam_epsilon([SkellamMechanism(variance / 1.002, coordinates, shift)], delta=delta) > epsilon
    assert variance <= calibrate_variance(epsilon=epsilon, delta=delta, l1=mechanism.l1, l2=mechanism.l2)


def test_where_fft_round_off_could_matter_the_accountant_uses_rdp() -> None:
    """The PLD reads epsilon off at delta minus an FFT round-off allowance (1e-15 + 1e-16 per slot composed), and
    only where that is at most 1% of delta: a few slots down to delta 1e-13, 96 slots down to about 2e-12."""
    few, many = SkellamMechanism(3e7, 4, 600), SkellamMechanism(3e7, 96, 600)
    assert skellam_epsilon([few], delta=1e-12) == pld_epsilon([few], delta=1e-12)
    for mechanisms, delta in (([few], 1e-13), ([many], 1e-12), ([few] * 30, 1e-12)):
        rdp = epsilon_for(variance=3e7, l1=mechanisms[0].l1, l2=mechanisms[0].l2, delta=delta, releases=len(mechanisms))
        assert skellam_epsilon(mechanisms, delta=delta) == rdp
        with pytest.raises(ValueError, match="does not resolve delta"):
            pld_epsilon(mechanisms, delta=delta)


def test_noise_too_wide_to_enumerate_is_accounted_with_rdp() -> None:
    """A slot's outcomes are enumerated out to a Chernoff radius; beyond MAX_SUPPORT_RADIUS (a noise sd of about
    350,000 integer units: very fine resolutions) the arrays would not fit in memory, and RDP accounts instead."""
    wide = SkellamMechanism(2.5e18, 4, 250_000_000)
    assert not resolves([wide], delta=1e-6)
    rdp = epsilon_for(variance=wide.variance, l1=wide.l1, l2=wide.l2, delta=1e-6)
    assert skellam_epsilon([wide], delta=1e-6) == rdp


def test_noise_that_must_be_too_wide_for_the_pld_is_calibrated_by_the_rdp_bound_reported_for_it() -> None:
    """A fine resolution and a small epsilon need noise wider than the PLD enumerates: the release is calibrated by
    the RDP bound that the ledger then reports for it (it was refused at load, the PLD asked at variance 1)."""
    epsilon, delta, coordinates, shift = 0.1, 1e-7, 4, 12_000
    variance = calibrate_skellam_variance(epsilon=epsilon, delta=delta, coordinates=coordinates, shift=shift)
    mechanism = SkellamMechanism(variance, coordinates, shift)
    assert not resolves([mechanism], delta=delta)
    assert skellam_epsilon([mechanism], delta=delta) <= epsilon
    assert skellam_epsilon([SkellamMechanism(variance / 1.002, coordinates, shift)], delta=delta) > epsilon
    rdp = calibrate_variance(epsilon=epsilon, delta=delta, l1=mechanism.l1, l2=mechanism.l2)
    assert variance == pytest.approx(rdp, rel=2e-3)


def test_an_epsilon_below_what_the_rdp_conversion_reaches_is_calibrated_by_the_pld() -> None:
    """The RDP conversion cannot go below a floor at a given delta (its orders end at 1024): about 0.0125 at
    delta 1e-9. The PLD certifies smaller epsilons; only where it too would need noise wider than it enumerates
    is the target refused, saying what limits it."""
    delta = 1e-9
    assert rdp_floor(delta) == pytest.approx(0.0125, rel=1e-3)
    variance = calibrate_skellam_variance(epsilon=0.012, delta=delta, coordinates=4, shift=1)
    mechanism = SkellamMechanism(variance, 4, 1)
    assert resolves([mechanism], delta=delta) and pld_epsilon([mechanism], delta=delta) <= 0.012
    assert pld_epsilon([SkellamMechanism(variance / 1.002, 4, 1)], delta=delta) > 0.012
    with pytest.raises(ValueError, match=r"Renyi-DP bound, whose conversion stops at about 0\.0125"):
        calibrate_variance(epsilon=0.012, delta=delta, l1=mechanism.l1, l2=mechanism.l2)
    with pytest.raises(ValueError, match="noise wider than it enumerates"):
        calibrate_skellam_variance(epsilon=0.001, delta=delta, coordinates=4, shift=12_000)


# --- the sensitivity's shape, and release parameters from a config --------------------------------------------------


def test_sensitivity_gives_slots_and_shift_with_the_l1_and_l2_they_imply() -> None:
    encodings = balanced_encodings([(0.0, 250.0, 0.1), (200.0, 260.0, 0.1)])
    w = max(e.count_weight for e in encodings)
    event = event_level_sensitivity(encodings, components=4)
    assert (event.coordinates, event.shift) == (4, w)
    assert (event.l1, event.l2) == (4.0 * w, 2.0 * w)
    entity = entity_level_sensitivity(encodings, max_partitions=24, max_per_partition=4, components=3)
    assert (entity.coordinates, entity.shift) == (72, 4 * w)
    assert entity.l1 == pytest.approx(3 * w * 24 * 4, rel=1e-15)
    assert entity.l2 == pytest.approx(math.sqrt(3) * w * math.sqrt(24) * 4, rel=1e-15)


@pytest.mark.parametrize(("epsilon", "quorum", "institutions"), [(1.0, 2, 3), (0.3, 1, 1), (4.0, 3, 3)])
def test_release_parameters_calibrate_with_pld(epsilon: float, quorum: int, institutions: int) -> None:
    ids = [(f"inst{i}", "parquet") for i in range(institutions)]
    config = parse_config(tomllib.loads(config_text(institutions=ids, quorum=quorum, epsilon=epsilon)))
    params = release_parameters(config)
    assert params.noise and params.quorum == quorum and params.delta == 1e-6
    worst = max(e.count_weight for e in params.encodings)
    assert (params.sensitivity.coordinates, params.sensitivity.shift) == (2, worst)
    assert (params.sensitivity.l1, params.sensitivity.l2) == (2.0 * worst, math.sqrt(2.0) * worst)
    assert params.mechanism == SkellamMechanism(params.total_variance, 2, worst)
    assert params.total_variance == calibrate_skellam_variance(epsilon=epsilon, delta=1e-6, coordinates=2, shift=worst)
    assert params.epsilon == pld_epsilon([params.mechanism], delta=1e-6) <= epsilon
    rdp_variance = calibrate_variance(epsilon=epsilon, delta=1e-6, l1=params.sensitivity.l1, l2=params.sensitivity.l2)
    assert params.total_variance < 0.95 * rdp_variance  # PLD needs less noise for the same epsilon
    assert params.epsilon < epsilon_for(
        variance=params.total_variance, l1=params.sensitivity.l1, l2=params.sensitivity.l2, delta=1e-6
    )


def test_release_parameters_with_noise_off() -> None:
    text = config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2, noise=False)
    params = release_parameters(parse_config(tomllib.loads(text)))
    assert not params.noise
    assert params.total_variance == 0.0
    assert params.mechanism is None and not params.rdp.any()


def _instant_groups_by_definition(intervals: Sequence[tuple[datetime, datetime]]) -> list[tuple[int, ...]]:
    """Every start against every interval: the distinct sets of intervals open at some start."""
    sets = {tuple(j for j, (s, e) in enumerate(intervals) if s <= start < e) for start, _ in intervals}
    return sorted(sets)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 12)), max_size=30))
def test_instant_groups_are_the_sets_open_at_each_start(spans: list[tuple[int, int]]) -> None:
    """Disjoint, touching, overlapping, nested and repeated intervals (hours from a day's start)."""
    day = datetime(2026, 1, 1, tzinfo=UTC)
    intervals = [(day + timedelta(hours=a), day + timedelta(hours=a + length)) for a, length in spans]
    assert instant_groups(intervals) == _instant_groups_by_definition(intervals)


def test_a_month_of_disjoint_15_minute_releases_is_one_release_wide_in_parallel() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    windows = [(start + timedelta(minutes=15 * i), start + timedelta(minutes=15 * (i + 1))) for i in range(2_880)]
    assert instant_groups(windows) == [(i,) for i in range(2_880)]
    mechanism = SkellamMechanism(calibrate_skellam_variance(epsilon=1.0, delta=1e-6, coordinates=4, shift=1), 4, 1)
    charges = [ReleaseCharge(mechanism, s, e, Composition.PARALLEL) for s, e in windows]
    loss = period_loss(charges, composition=Composition.PARALLEL, delta=1e-6)
    assert loss.epsilon == period_loss(charges[:1], composition=Composition.PARALLEL, delta=1e-6).epsilon <= 1.0


@pytest.mark.parametrize("rounds_first", [True, False])
def test_a_mixed_groups_epsilon_is_its_rdp_bound_to_the_last_bit_whatever_the_order(rounds_first: bool) -> None:
    """A period's summed RDP curve (charges in their order) and its group's (the same mechanisms, sorted) were
    added in different orders: with training rounds before releases the reported epsilon came out one ulp above
    epsilon_rdp (2 rounds of variance 2,000, L2 2, then 2 releases), and the ledger refused the honest period's
    every later release as an internal error. The curves now add up exactly rounded, in any order."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    round_charge = ReleaseCharge(NormBoundMechanism(2000.0, 3.4, 2.0), start, start + timedelta(hours=6),
                                 Composition.SEQUENTIAL)
    releases = [ReleaseCharge(SkellamMechanism(38567792.766657025, 6, 600), start + timedelta(hours=i),
                              start + timedelta(hours=i + 1), Composition.SEQUENTIAL) for i in range(2)]
    charges = [round_charge] * 2 + releases if rounds_first else releases + [round_charge] * 2
    loss = period_loss(charges, composition=Composition.SEQUENTIAL, delta=1e-6)
    assert loss.epsilon == loss.epsilon_rdp
    for permutation in itertools.permutations(charges):
        again = period_loss(list(permutation), composition=Composition.SEQUENTIAL, delta=1e-6)
        assert (again.epsilon, again.epsilon_rdp, again.rdp.tolist()) == (loss.epsilon, loss.epsilon_rdp,
                                                                           loss.rdp.tolist())


def test_curve_sum_is_exactly_rounded_in_any_order() -> None:
    curves = np.array([[1e16, 1.0], [1.0, 1e-16], [-1e16, 3.0]])
    assert curve_sum(curves).tolist() == [1.0, 4.0]
    assert curve_sum(curves[::-1]).tolist() == curve_sum(curves).tolist()
