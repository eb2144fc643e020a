"""Quantiles from noisy histograms: monotone, exact bins without noise, intervals that cover under noise."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.quantiles import QUANTILES, histogram_quantiles
from privacy.skellam import SkellamNoise, seeded_generator

BINS = 16
LOWER, UPPER = 0.0, 160.0  # bins of width 10


def histograms(values: list[np.ndarray]) -> np.ndarray:
    """(bins, cells) exact histograms of each cell's values."""
    edges = np.linspace(LOWER, UPPER, BINS + 1)
    return np.stack([np.histogram(np.clip(v, LOWER, UPPER - 1e-9), bins=edges)[0] for v in values], axis=1).astype(
        float
    )


def inverse_cdf(values: np.ndarray, q: float) -> float:
    ordered = np.sort(values)
    return float(ordered[max(0, int(np.ceil(q * len(ordered) - 1e-9)) - 1)])


def quantiles_of(values: list[np.ndarray], bin_sd: float, noise: np.ndarray | None = None) -> dict[str, np.ndarray]:
    h = histograms(values)
    if noise is not None:
        h = h + noise
    cells = h.shape[1]
    return histogram_quantiles(
        h, bin_sd=np.full(cells, bin_sd), lower=np.full(cells, LOWER), upper=np.full(cells, UPPER)
    )


def test_without_noise_each_quantile_lies_in_its_bin_and_its_interval_is_that_bin() -> None:
    rng = np.random.default_rng(5)
    values = [rng.uniform(LOWER, UPPER, size=int(rng.integers(5, 400))) for _ in range(200)]
    out = quantiles_of(values, bin_sd=0.0)
    for i, v in enumerate(values):
        for name, q in QUANTILES:
            truth = inverse_cdf(v, q)
            assert out[f"{name}_ci_low"][i] <= truth <= out[f"{name}_ci_high"][i]
            assert out[f"{name}_ci_high"][i] - out[f"{name}_ci_low"][i] <= 10.0 + 1e-9  # one bin
            assert abs(out[name][i] - truth) <= 10.0


def test_quantiles_are_monotone_even_under_heavy_noise() -> None:
    rng = np.random.default_rng(6)
    values = [rng.normal(80, 20, size=50) for _ in range(300)]
    noise = SkellamNoise(400.0, generator=seeded_generator(6)).sample(BINS * 300).reshape(BINS, 300)
    out = quantiles_of(values, bin_sd=20.0, noise=noise)
    released = ~np.isnan(out["median"])  # a cell whose noisy total is not positive has no quantiles
    assert released.sum() > 150
    out = {name: values[released] for name, values in out.items()}
    assert (out["p10"] <= out["median"]).all() and (out["median"] <= out["p90"]).all()
    for name, _ in QUANTILES:
        assert (out[f"{name}_ci_low"] <= out[name]).all() and (out[name] <= out[f"{name}_ci_high"]).all()
        assert (out[f"{name}_ci_low"] >= LOWER).all() and (out[f"{name}_ci_high"] <= UPPER).all()


def test_an_empty_histogram_gives_no_quantiles() -> None:
    out = histogram_quantiles(np.zeros((BINS, 2)) - 1.0, bin_sd=np.ones(2), lower=np.zeros(2), upper=np.ones(2))
    assert np.isnan(out["median"]).all() and np.isnan(out["p90_ci_high"]).all()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_intervals_cover_the_true_quantile_at_least_95_percent_of_the_time(seed: int) -> None:
    """Known truth, real Skellam noise on every bin; the intervals are conservative (noise and binning)."""
    rng = np.random.default_rng(seed)
    cells, variance = 2000, 25.0  # bin noise SD 5 readings against 200..600 readings per cell
    values = [rng.gamma(4.0, 12.0, size=int(rng.integers(200, 600))) for _ in range(cells)]
    noise = SkellamNoise(variance, generator=seeded_generator(seed)).sample(BINS * cells).reshape(BINS, cells)
    out = quantiles_of(values, bin_sd=np.sqrt(variance), noise=noise)
    for name, q in QUANTILES:
        truth = np.array([inverse_cdf(np.clip(v, LOWER, UPPER), q) for v in values])
        covered = (out[f"{name}_ci_low"] <= truth) & (truth <= out[f"{name}_ci_high"])
        assert covered.mean() >= 0.95, (name, covered.mean())


@pytest.mark.parametrize("seed", [4, 5])
def test_intervals_cover_tail_quantiles_at_demo_noise_levels(seed: int) -> None:
    """Few readings per cell against a bin noise SD of 9 readings, skewed data: tail quantiles stay covered."""
    rng = np.random.default_rng(seed)
    cells, sd = 2000, 9.0
    values = [rng.gamma(2.0, 10.0, size=120) for _ in range(cells)]
    noise = SkellamNoise(sd**2, generator=seeded_generator(seed)).sample(BINS * cells).reshape(BINS, cells)
    out = quantiles_of(values, bin_sd=sd, noise=noise)
    for name, q in QUANTILES:
        truth = np.array([inverse_cdf(np.clip(v, LOWER, UPPER), q) for v in values])
        released = ~np.isnan(out[name])
        covered = (out[f"{name}_ci_low"] <= truth) & (truth <= out[f"{name}_ci_high"])
        assert covered[released].mean() >= 0.95, (name, covered[released].mean())
        bias = np.median(out[name][released] - truth[released])
        assert abs(bias) <= 10.0, (name, bias)  # within one bin: no systematic drag towards the tails
