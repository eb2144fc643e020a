"""Skellam noise: exact scale, seeded distribution tests with stated tolerances, generators, test-only switches.

Distribution tests use fixed seeds, so they are deterministic; the stated tolerances are what a correct sampler
would fail with small probability under a fresh seed (chi-square p > 1e-4; moments within 5 standard errors;
KS distance below the 0.1% critical value 1.95 / sqrt(n), conservative for a discrete law).
"""

from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest
from randomgen import ChaCha
from scipy import stats

from fusion.config.federation import PrivacyMode, parse_config
from fusion.errors import ConfigError
from privacy.skellam import SkellamNoise, chacha20, secure_generator, seeded_generator
from tests.conftest import config_text

N = 200_000
P_MIN = 1e-4  # chi-square goodness-of-fit: fail only if p <= 1e-4
SE_TOLERANCE = 5.0  # sample mean and variance within 5 standard errors
KS_CRITICAL = 1.95  # sup |ECDF - CDF| * sqrt(n) below the asymptotic 0.1% critical value


def pooled_chi_square(samples: np.ndarray, mu: float) -> tuple[float, int]:
    """Chi-square p-value of integer samples against Skellam(mu, mu), bins pooled to expected counts >= 5.

    The outermost bins carry the whole tails (cdf / sf), so expected counts sum to n.
    Returns (p-value, number of bins).
    """
    dist = stats.skellam(mu, mu)
    n = samples.size
    lo, hi = int(dist.ppf(1e-9)) - 1, int(dist.isf(1e-9)) + 1
    support = np.arange(lo, hi + 1)
    probs = dist.pmf(support)
    probs[0] = dist.cdf(lo)
    probs[-1] = dist.sf(hi - 1)
    observed = np.bincount(np.clip(samples, lo, hi) - lo, minlength=support.size).astype(float)
    assert observed.size == support.size

    # Greedy left-to-right pooling, then fold a short last bin into its neighbour.
    exp_bins: list[float] = []
    obs_bins: list[float] = []
    exp_acc = obs_acc = 0.0
    for p, o in zip(probs * n, observed, strict=True):
        exp_acc, obs_acc = exp_acc + p, obs_acc + o
        if exp_acc >= 5.0:
            exp_bins.append(exp_acc)
            obs_bins.append(obs_acc)
            exp_acc = obs_acc = 0.0
    exp_bins[-1] += exp_acc
    obs_bins[-1] += obs_acc
    expected, counts = np.array(exp_bins), np.array(obs_bins)
    assert expected.min() >= 5.0
    assert counts.sum() == n
    assert math.isclose(expected.sum(), n, rel_tol=1e-9)
    result = stats.chisquare(counts, expected * (n / expected.sum()))
    return float(result.pvalue), expected.size


def ks_distance(samples: np.ndarray, mu: float) -> float:
    """sup_k |ECDF(k) - CDF(k)| over the integers (where a discrete ECDF can differ from the CDF)."""
    ks = np.arange(samples.min() - 1, samples.max() + 1)
    ecdf = np.searchsorted(np.sort(samples), ks, side="right") / samples.size
    return float(np.max(np.abs(ecdf - stats.skellam.cdf(ks, mu, mu))))


# --- scale --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance", [0.1, 1.0, 3.0, 400.0, 12345.678, 1.5e12])
def test_mu_is_exactly_half_the_variance(variance: float) -> None:
    noise = SkellamNoise(variance=variance, generator=seeded_generator(0))
    assert noise.variance == variance
    assert noise.mu == variance / 2


@pytest.mark.parametrize("variance", [0.0, -1.0, math.nan])
def test_non_positive_variance_is_refused(variance: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        SkellamNoise(variance=variance, generator=seeded_generator(0))


def test_samples_are_int64_of_the_requested_size() -> None:
    samples = SkellamNoise(variance=400.0, generator=seeded_generator(1)).sample(1000)
    assert samples.dtype == np.int64
    assert samples.shape == (1000,)
    assert SkellamNoise(variance=400.0, generator=seeded_generator(1)).sample(0).shape == (0,)


# --- distribution -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variance", "seed"), [(3.0, 11), (400.0, 12)])
def test_samples_follow_the_skellam_pmf(variance: float, seed: int) -> None:
    samples = SkellamNoise(variance=variance, generator=seeded_generator(seed)).sample(N)
    p_value, bins = pooled_chi_square(samples, variance / 2)
    assert bins >= 10
    assert p_value > P_MIN, f"chi-square p = {p_value:.2e} over {bins} bins"
    assert ks_distance(samples, variance / 2) < KS_CRITICAL / math.sqrt(N)


@pytest.mark.parametrize(("variance", "seed"), [(3.0, 21), (400.0, 22)])
def test_sample_mean_and_variance(variance: float, seed: int) -> None:
    """Skellam cumulants: k2 = k4 = v, so Var(sample variance) ~ (v + 2 v^2) / n and Var(mean) = v / n."""
    samples = SkellamNoise(variance=variance, generator=seeded_generator(seed)).sample(N).astype(float)
    assert abs(samples.mean()) <= SE_TOLERANCE * math.sqrt(variance / N)
    assert abs(samples.var(ddof=1) - variance) <= SE_TOLERANCE * math.sqrt((variance + 2 * variance**2) / N)


def test_the_distribution_test_has_power() -> None:
    """Negative control: the same chi-square rejects Skellam samples whose variance is 5% off."""
    samples = SkellamNoise(variance=420.0, generator=seeded_generator(13)).sample(N)
    p_value, _ = pooled_chi_square(samples, 400.0 / 2)
    assert p_value < P_MIN


@pytest.mark.parametrize(("quorum", "variance", "seed"), [(4, 40.0, 31), (3, 400.0, 32)])
def test_shares_sum_to_the_total_variance(quorum: int, variance: float, seed: int) -> None:
    """q institutions each adding Skellam(v / q) give exactly Skellam(v): chi-square of the sum."""
    generator = seeded_generator(seed)
    shares = [SkellamNoise(variance=variance / quorum, generator=generator).sample(N) for _ in range(quorum)]
    total = np.sum(shares, axis=0)
    assert total.dtype == np.int64
    p_value, bins = pooled_chi_square(total, variance / 2)
    assert p_value > P_MIN, f"chi-square p = {p_value:.2e} over {bins} bins"
    assert abs(total.var(ddof=1) - variance) <= SE_TOLERANCE * math.sqrt((variance + 2 * variance**2) / N)


# --- generators ---------------------------------------------------------------------------------------------------


def test_secure_generators_are_independently_keyed_chacha20() -> None:
    first, second = secure_generator(), secure_generator()
    for generator in (first, second):
        state = generator.bit_generator.state
        assert state["bit_generator"].endswith("ChaCha")
        assert state["state"]["rounds"] == 20
    assert not np.array_equal(
        first.bit_generator.state["state"]["keysetup"], second.bit_generator.state["state"]["keysetup"]
    )
    assert not np.array_equal(first.integers(0, 2**63, size=8), second.integers(0, 2**63, size=8))
    a = SkellamNoise(variance=400.0, generator=secure_generator()).sample(64)
    b = SkellamNoise(variance=400.0, generator=secure_generator()).sample(64)
    assert not np.array_equal(a, b)


def test_seeded_generators_are_reproducible() -> None:
    a = SkellamNoise(variance=400.0, generator=seeded_generator(2026)).sample(1000)
    b = SkellamNoise(variance=400.0, generator=seeded_generator(2026)).sample(1000)
    c = SkellamNoise(variance=400.0, generator=seeded_generator(2027)).sample(1000)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert seeded_generator(5).bit_generator.state["state"]["rounds"] == 20


# --- test-only switches -------------------------------------------------------------------------------------------

INSTITUTIONS = [("alpha", "parquet"), ("beta", "csv")]


def test_production_refuses_a_seed() -> None:
    text = config_text(institutions=INSTITUTIONS, quorum=2, mode="production", seed=7)
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text))
    message = str(info.value)
    assert "privacy" in message
    assert "seed" in message


def test_production_refuses_noise_off() -> None:
    text = config_text(institutions=INSTITUTIONS, quorum=2, mode="production", noise=False)
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text))
    message = str(info.value)
    assert "privacy" in message
    assert "noise = false" in message


def test_test_mode_accepts_the_switches_and_production_loads_without_them() -> None:
    test = parse_config(tomllib.loads(config_text(institutions=INSTITUTIONS, quorum=2, noise=False, seed=7)))
    assert test.privacy.mode is PrivacyMode.TEST
    assert (test.privacy.noise, test.privacy.seed) == (False, 7)
    production = parse_config(tomllib.loads(config_text(institutions=INSTITUTIONS, quorum=2, mode="production")))
    assert production.privacy.mode is PrivacyMode.PRODUCTION
    assert (production.privacy.noise, production.privacy.seed) == (True, None)


# --- large rates --------------------------------------------------------------------------------------------------


def test_large_rates_are_drawn_as_sums_that_keep_the_variance() -> None:
    # mu = 2.5e12 is drawn as 250 Poisson(1e10) sub-draws; the variance must stay within 5 standard errors.
    variance, n = 5e12, 40_000
    samples = SkellamNoise(variance, generator=seeded_generator(77)).sample(n).astype(float)
    standard_error = variance * math.sqrt(2.0 / n)  # of the sample variance of near-normal draws
    assert abs(samples.var() - variance) < 5 * standard_error
    assert abs(samples.mean()) < 5 * math.sqrt(variance / n)


def test_rates_beyond_what_is_sampled_exactly_are_refused() -> None:
    with pytest.raises(ValueError, match="coarsen the resolution"):
        SkellamNoise(2 * 1e13 * 1.01, generator=seeded_generator(1))


def test_a_config_whose_noise_cannot_be_sampled_exactly_is_refused_at_load() -> None:
    text = config_text(institutions=[("a", "csv"), ("b", "csv")], quorum=2).replace(
        "resolution = 1.0", "resolution = 0.000001"
    )
    with pytest.raises(ConfigError, match="too large to sample exactly"):
        parse_config(tomllib.loads(text))


def test_both_chacha20_implementations_draw_the_same_stream() -> None:
    # The generators pick randomgen's SIMD or portable ChaCha core by speed: both must be the same cipher.
    if not ChaCha(seed=0).use_simd:
        pytest.skip("randomgen has no SIMD ChaCha core on this CPU")
    streams = []
    for simd in (True, False):
        bit_generator = chacha20(key=2**255 + 2026)
        bit_generator.use_simd = simd
        streams.append(np.random.Generator(bit_generator).poisson(1234.5, size=(2, 5000)))
    np.testing.assert_array_equal(streams[0], streams[1])
    # One call for both Poisson vectors draws what two calls did.
    one = SkellamNoise(variance=400.0, generator=seeded_generator(7)).sample(3000)
    generator = seeded_generator(7)
    two = generator.poisson(200.0, size=3000) - generator.poisson(200.0, size=3000)
    np.testing.assert_array_equal(one, two)
