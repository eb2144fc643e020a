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
from privacy import skellam
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


# --- bulk Poisson draws from the keystream ------------------------------------------------------------------------


def _twin_generators(key: int, words: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Two ChaCha20 generators with the same key, both `words` 64-bit words into their stream."""
    pair = []
    for _ in range(2):
        bit_generator = chacha20(key=key)
        bit_generator.random_raw(words)
        pair.append(np.random.Generator(bit_generator))
    return pair[0], pair[1]


def _assert_same_draws_and_state(
    ours: np.random.Generator, numpy_s: np.random.Generator, drawn: np.ndarray, expected: np.ndarray
) -> None:
    assert drawn.dtype == expected.dtype == np.int64
    np.testing.assert_array_equal(drawn, expected)
    a, b = ours.bit_generator.state["state"], numpy_s.bit_generator.state["state"]
    for name in ("block", "keysetup", "ctr"):
        np.testing.assert_array_equal(a[name], b[name])
    # and the stream goes on identically
    np.testing.assert_array_equal(ours.bit_generator.random_raw(17), numpy_s.bit_generator.random_raw(17))


def test_the_bulk_draws_are_in_use_here() -> None:
    # Otherwise the tests below would only compare NumPy with itself.
    assert skellam._bulk_matches_numpy()
    generator = seeded_generator(3)
    assert skellam._bulk_poisson(generator.bit_generator, 5e6, 10) is not None


@pytest.mark.parametrize(
    "lam", [10.0, 10.000001, 13.7, 29.5, 30.5, 99.9, 640.0, 12345.678, 2.3e6, 7.0e6, 3.3e7, 9.9e8, 1e10]
)
def test_bulk_poisson_draws_are_numpys_bit_for_bit(lam: float) -> None:
    """The same draws as Generator.poisson from the same ChaCha20 generator, and the generator left where NumPy
    leaves it, from several keys and positions in the stream (even and odd 64-bit words, mid-block)."""
    rng = np.random.default_rng(int(lam * 1000) % 2**32)
    for words, size in ((0, 1), (1, 96_050), (7, 20_000), (13, 8_191)):
        key = int(rng.integers(0, 2**62)) << 190 | int(rng.integers(0, 2**62))
        ours, numpy_s = _twin_generators(key, words)
        drawn = skellam.poisson(ours, lam, size)
        _assert_same_draws_and_state(ours, numpy_s, drawn, numpy_s.poisson(lam, size=size))


@pytest.mark.parametrize("lam", [10.3, 14.9, 150.0, 7.7e5, 1e10])
def test_the_exact_acceptance_test_is_numpys(lam: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every acceptance test that needs log-gamma decided by the C library's log (as if all were close to their
    boundary): still NumPy's draws, so the rare close ones are decided exactly as NumPy decides them."""
    monkeypatch.setattr(skellam, "_CLOSE", math.inf)
    ours, numpy_s = _twin_generators(2**200 + int(lam), 3)
    drawn = skellam.poisson(ours, lam, 50_000)
    _assert_same_draws_and_state(ours, numpy_s, drawn, numpy_s.poisson(lam, size=50_000))


def test_bulk_draws_fall_back_to_numpy_where_they_do_not_apply() -> None:
    # Below PTRS's rates, half-way through a 64-bit word, another bit generator, near the 2^32-block counter limit.
    ours, numpy_s = _twin_generators(99, 2)
    _assert_same_draws_and_state(ours, numpy_s, skellam.poisson(ours, 9.99, 5000), numpy_s.poisson(9.99, size=5000))
    ours, numpy_s = _twin_generators(99, 2)
    for generator in (ours, numpy_s):
        generator.integers(0, 2**32 - 1, size=1, dtype=np.uint32)  # one 32-bit word
    assert skellam._bulk_poisson(ours.bit_generator, 5e5, 10) is None
    _assert_same_draws_and_state(ours, numpy_s, skellam.poisson(ours, 5e5, 5000), numpy_s.poisson(5e5, size=5000))
    pcg = np.random.Generator(np.random.PCG64(5))
    np.testing.assert_array_equal(
        skellam.poisson(pcg, 5e5, 100), np.random.Generator(np.random.PCG64(5)).poisson(5e5, 100)
    )
    near = [np.random.Generator(ChaCha(key=5, counter=16 * (2**32 - 2), rounds=20)) for _ in range(2)]
    assert skellam._bulk_poisson(near[0].bit_generator, 5e5, 10) is None
    _assert_same_draws_and_state(near[0], near[1], skellam.poisson(near[0], 5e5, 100), near[1].poisson(5e5, size=100))


@pytest.mark.parametrize("variance", [400.0, 1.1e7, 3.0, 5e12])
def test_skellam_draws_are_unchanged(variance: float) -> None:
    """SkellamNoise draws exactly what it drew with NumPy's sampler: both Poisson vectors in one call (or, above
    POISSON_RATE_LIMIT, sums of sub-draws), so seeded runs and regenerated noise layers keep their values."""
    generator = seeded_generator(11)
    drawn = SkellamNoise(variance, generator=seeded_generator(11)).sample(4000)
    mu = variance / 2
    if mu <= skellam.POISSON_RATE_LIMIT:
        both = generator.poisson(mu, size=(2, 4000))
        expected = np.subtract(both[0], both[1], dtype=np.int64)
    else:
        parts = math.ceil(mu / skellam.POISSON_RATE_LIMIT)
        halves = [sum(generator.poisson(mu / parts, size=4000) for _ in range(parts)) for _ in range(2)]
        expected = (halves[0] - halves[1]).astype(np.int64)
    np.testing.assert_array_equal(drawn, expected)
