"""Skellam RDP accounting against independent computations: exact Renyi divergences, the conversion, calibration."""

from __future__ import annotations

import functools
import math
import tomllib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.special import logsumexp

from fusion.config import parse_config
from fusion.parameters import release_parameters
from privacy.accountant import ORDERS, calibrate_variance, epsilon_for, skellam_rdp
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
def skellam_log_pmf(mu: float) -> tuple[np.ndarray, np.ndarray]:
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
    _, log_p = skellam_log_pmf(mu)
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
        ks, log_p = skellam_log_pmf(mu)
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


# --- release parameters from a config -----------------------------------------------------------------------------


@pytest.mark.parametrize(("epsilon", "quorum", "institutions"), [(1.0, 2, 3), (0.3, 1, 1), (4.0, 3, 3)])
def test_release_parameters_from_a_config(epsilon: float, quorum: int, institutions: int) -> None:
    ids = [(f"inst{i}", "parquet") for i in range(institutions)]
    config = parse_config(tomllib.loads(config_text(institutions=ids, quorum=quorum, epsilon=epsilon)))
    params = release_parameters(config)
    assert params.noise
    assert params.quorum == quorum
    assert params.delta == 1e-6
    worst = max(e.count_weight for e in params.encodings)
    assert (params.sensitivity.l1, params.sensitivity.l2) == (2.0 * worst, math.sqrt(2.0) * worst)
    assert params.total_variance == calibrate_variance(
        epsilon=epsilon, delta=1e-6, l1=params.sensitivity.l1, l2=params.sensitivity.l2
    )
    assert params.epsilon <= epsilon
    assert params.epsilon == epsilon_for(
        variance=params.total_variance, l1=params.sensitivity.l1, l2=params.sensitivity.l2, delta=1e-6
    )
    assert params.share_variance == params.total_variance / quorum


def test_release_parameters_with_noise_off() -> None:
    text = config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2, noise=False)
    params = release_parameters(parse_config(tomllib.loads(text)))
    assert not params.noise
    assert params.total_variance == 0.0
    assert params.share_variance == 0.0
    assert params.epsilon == math.inf
