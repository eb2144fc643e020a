"""Quantiles from noisy histograms: the post-processed histogram, the posterior against a slow reference, exact bins
without noise, ordered estimates under heavy noise, accuracy where the raw CDF was dragged, and coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.stats import norm

from fusion.release.quantiles import (
    QUANTILES,
    SUBDIVISIONS,
    histogram_posterior,
    histogram_quantiles,
    quantile_cdf,
)
from privacy.skellam import SkellamNoise, seeded_generator

BINS = 16
LOWER, UPPER = 0.0, 160.0  # bins of width 10
WIDTH = (UPPER - LOWER) / BINS
CENTRE = (LOWER + UPPER) / 2


def histograms(values: list[np.ndarray]) -> np.ndarray:
    """(bins, cells) exact histograms of each cell's values."""
    edges = np.linspace(LOWER, UPPER, BINS + 1)
    return np.stack([np.histogram(np.clip(v, LOWER, UPPER - 1e-9), bins=edges)[0] for v in values], axis=1).astype(
        float
    )


def inverse_cdf(values: np.ndarray, q: float) -> float:
    """The true quantile: the ceil(q n)-th smallest reading."""
    ordered = np.sort(values)
    return float(ordered[max(0, int(np.ceil(q * len(ordered) - 1e-9)) - 1)])


def noisy_cells(values: list[np.ndarray], sd: float, seed: int) -> dict[str, np.ndarray]:
    """Noisy bins, count and centred sum (each slot with independent Skellam noise of SD `sd` readings; the sum's
    SD is 10 value units per reading of count SD) of exact cells: histogram_quantiles' keyword arguments."""
    cells = len(values)
    noise = SkellamNoise(sd**2, generator=seeded_generator(seed)).sample((BINS + 2) * cells).reshape(BINS + 2, cells)
    return {
        "histogram": histograms(values) + noise[:BINS],
        "bin_sd": np.full(cells, sd),
        "count": np.array([v.size for v in values], dtype=float) + noise[BINS],
        "centred_sum": np.array([(v - CENTRE).sum() for v in values]) + 10 * noise[BINS + 1],
        "centred_sd": np.full(cells, 10 * sd),
        "centre": np.full(cells, CENTRE),
        "lower": np.full(cells, LOWER),
        "upper": np.full(cells, UPPER),
    }


def quantiles_of(cells: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    histogram = cells["histogram"]
    return histogram_quantiles(histogram, **{k: v for k, v in cells.items() if k != "histogram"})


def posterior_of(cells: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    return histogram_posterior(cells["histogram"], **{k: v for k, v in cells.items() if k != "histogram"})


# --- the post-processed histogram and the posterior -----------------------------------------------------------


def test_the_post_processed_histogram_is_non_negative_consistent_and_its_quantile_cdf_monotone() -> None:
    """Noisy bins go negative and do not add up to the noisy count; the posterior mean histogram is >= 0 and holds
    the cell's readings (its total within the count's noise of the true total), and each quantile's posterior
    CDF rises from 0 to 1."""
    rng = np.random.default_rng(7)
    values = [rng.normal(rng.uniform(30, 130), rng.uniform(2, 20), size=int(rng.integers(20, 400))) for _ in range(300)]
    cells = noisy_cells(values, sd=3.0, seed=7)
    assert (cells["histogram"] < 0).any()
    assert np.abs(cells["histogram"].sum(axis=0) - cells["count"]).max() > 10  # raw bins: not consistent
    posterior = posterior_of(cells)
    assert (posterior.histogram >= 0).all()
    totals = posterior.histogram.sum(axis=0)
    # Consistent with the noisy count (SD 3 readings; measured: SD 1.3, at most 5.7 readings apart) and, on
    # average, with the true count (measured: mean -0.1, SD 2.9).
    assert np.abs(totals - cells["count"]).max() < 3 * 3.0
    assert np.abs(np.mean(totals - np.array([v.size for v in values]))) < 0.5
    # The posterior's supports: probabilities summing to 1 in every cell.
    np.testing.assert_allclose(np.bincount(posterior.cell, weights=posterior.weight, minlength=300), 1.0)
    for _, q in QUANTILES:
        cdf = quantile_cdf(posterior, q)
        assert cdf.shape == (BINS * SUBDIVISIONS + 2, 300)
        assert (np.diff(cdf, axis=0) >= 0).all()
        assert cdf[-1].min() == 1.0
        # The first point is the probability that the quantile is the lower bound itself: cells whose readings stay
        # clear of the first bin have next to none (noise can suggest a few readings piled there: measured, mean
        # 0.0005, at most 0.09).
        clear = np.array([v.min() > WIDTH + 3 * 3.0 for v in values])
        assert cdf[0][clear].mean() < 0.005


def _reference_edge_cdf(
    y: np.ndarray, sd: float, count: float, centred: float, centred_sd: float, q: float
) -> list[float]:
    """The posterior CDF of the q-quantile at every bin edge for one cell, the slow way: every support S = [a, b]
    by hand, its bins' truncated-normal moments, the count and sum as observations conditioned with full matrices,
    its evidence, and at each edge k P(C_k - q n + shift >= 0) from the conditioned normal."""
    bins = y.size
    t = y / sd
    ratio = norm.pdf(t) / norm.cdf(t)
    mean = y + sd * ratio
    var = sd**2 * np.clip(1 - ratio * (ratio + t), 1e-9, 1)
    log_in = norm.logcdf(t)
    for j in (0, bins - 1):  # a bound's bin: two cells (the bound itself and the rest), prior density h
        moments = [quad(lambda h, k=k, at=y[j]: h ** (k + 1) * norm.pdf(at, h, sd), 0, max(y[j], 0) + 12 * sd)[0]
                   for k in range(3)]
        mean[j], var[j] = moments[1] / moments[0], moments[2] / moments[0] - (moments[1] / moments[0]) ** 2
        log_in[j] = math.log(moments[0])
    midpoints = (LOWER + (np.arange(bins) + 0.5) * WIDTH - CENTRE) / ((UPPER - LOWER) / 2)
    half = (UPPER - LOWER) / 2
    total = max((bins * count + y.sum()) / (bins + 1), sd)
    sum_var = (centred_sd / half) ** 2 + (max(count, sd) * WIDTH / half) ** 2 / 12 + 1e-12
    supports, evidences, posteriors = [], [], []
    for a in range(bins):
        for b in range(a, bins):
            inside = np.arange(a, b + 1)
            rows = np.vstack([np.ones(inside.size), midpoints[inside]])  # (2, L)
            prior_cov = np.diag(var[inside])
            k = rows @ prior_cov @ rows.T + np.diag([sd**2, sum_var])
            residual = np.array([count, centred / half]) - rows @ mean[inside]
            gain = prior_cov @ rows.T @ np.linalg.inv(k)
            post_mean = mean[inside] + gain @ residual
            post_cov = prior_cov - gain @ rows @ prior_cov
            outside = np.setdiff1d(np.arange(bins), inside)
            cells = inside.size + (a == 0) + (b == bins - 1)  # the composition's cells, a bound's pile one
            evidence = (
                norm.logpdf(y[outside], 0, sd).sum()
                + log_in[inside].sum()
                + math.lgamma(cells)
                - (cells - 1) * math.log(total)
                - 0.5 * residual @ np.linalg.solve(k, residual)
                - 0.5 * np.linalg.slogdet(k)[1]
            )
            supports.append((a, b))
            evidences.append(evidence)
            posteriors.append((inside, post_mean, post_cov))
    weights = np.exp(np.array(evidences) - max(evidences))
    weights /= weights.sum()
    # Whole readings: at most x iff (readings below x) >= ceil(q n); continuity-corrected with n the posterior
    # total (the posterior mean histogram's, clipped at 0 like it).
    n_hat = sum(w * np.maximum(m, 0).sum() for w, (_, m, _) in zip(weights, posteriors, strict=True))
    shift = 0.5 - (math.ceil(q * n_hat - 1e-3) - q * n_hat)
    cdf = []
    for edge in range(bins + 1):
        p = 0.0
        for (a, b), w, (inside, m, c) in zip(supports, weights, posteriors, strict=True):
            if b < edge:
                p += w
            elif a < edge and b > a:  # the edge splits a support of two or more bins
                coefficients = np.where(inside < edge, 1 - q, -q)
                p += w * norm.cdf((coefficients @ m + shift) / math.sqrt(coefficients @ c @ coefficients))
        cdf.append(p)
    return cdf


def test_the_posterior_at_the_bin_edges_matches_a_slow_reference() -> None:
    """The prefix-sum algebra (O(1) per support) against full matrices per support, at every bin edge (where no
    within-bin assumption enters), for cells from barely released (30 readings) to crowded."""
    rng = np.random.default_rng(11)
    values = [rng.normal(rng.uniform(20, 140), rng.uniform(3, 25), size=n) for n in (30, 40, 150, 600)]
    cells = noisy_cells(values, sd=3.0, seed=11)
    posterior = posterior_of(cells)
    for _, q in QUANTILES:
        cdf = quantile_cdf(posterior, q)[SUBDIVISIONS:-2:SUBDIVISIONS]  # the bin edges inside the range
        for i in range(len(values)):
            reference = _reference_edge_cdf(cells["histogram"][:, i], 3.0, cells["count"][i], cells["centred_sum"][i],
                                             cells["centred_sd"][i], q)
            # The fast path drops the least probable supports, 1e-4 of the posterior in all (measured: at most
            # 1e-4 apart; when the count's noise variance was added to the sum's, they were 0.08 apart). At the
            # range's ends the split of a bound's bin between the bound and the rest enters (not a bin edge).
            np.testing.assert_allclose(cdf[:, i], np.maximum.accumulate(reference)[1:-1], atol=1e-3)


# --- estimates and intervals ----------------------------------------------------------------------------------


def test_without_noise_each_estimate_and_interval_lie_in_the_true_quantiles_bin() -> None:
    rng = np.random.default_rng(5)
    values = [rng.uniform(LOWER, UPPER, size=int(rng.integers(5, 400))) for _ in range(200)]
    cells = noisy_cells(values, sd=1.0, seed=5)
    cells.update(histogram=histograms(values), count=np.array([v.size for v in values], dtype=float),
                 centred_sum=np.array([(v - CENTRE).sum() for v in values]), bin_sd=np.zeros(200),
                 centred_sd=np.zeros(200))
    out = quantiles_of(cells)
    for i, v in enumerate(values):
        ordered = np.sort(v)
        for name, q in QUANTILES:
            # The quantile's bin; where q n is a whole number k the k-th and (k+1)-th readings tie for it (the
            # posterior reads 'at least q n readings below x', a linear function of the counts).
            first = min(int(ordered[math.ceil(q * v.size - 1e-9) - 1] // WIDTH), BINS - 1)
            last = min(int(ordered[min(math.floor(q * v.size + 1e-9), v.size - 1)] // WIDTH), BINS - 1)
            low_edge, high_edge = LOWER + first * WIDTH, LOWER + (last + 1) * WIDTH
            assert low_edge - 1e-9 <= out[f"{name}_ci_low"][i] <= out[name][i] <= out[f"{name}_ci_high"][i]
            assert out[f"{name}_ci_high"][i] <= high_edge + 1e-9


def test_quantiles_are_ordered_and_inside_their_intervals_under_heavy_noise() -> None:
    rng = np.random.default_rng(6)
    values = [rng.normal(80, 20, size=400) for _ in range(300)]
    out = quantiles_of(noisy_cells(values, sd=20.0, seed=6))
    released = ~np.isnan(out["median"])
    assert released.sum() > 150
    out = {name: values[released] for name, values in out.items()}
    assert (out["p10"] <= out["median"]).all() and (out["median"] <= out["p90"]).all()
    for name, _ in QUANTILES:
        assert (out[f"{name}_ci_low"] <= out[name]).all() and (out[name] <= out[f"{name}_ci_high"]).all()
        assert (out[f"{name}_ci_low"] >= LOWER).all() and (out[f"{name}_ci_high"] <= UPPER).all()


def test_no_quantiles_without_a_clearly_positive_count_or_from_a_histogram_that_is_mostly_noise() -> None:
    empty = histogram_quantiles(np.zeros((BINS, 2)) - 1.0, bin_sd=np.ones(2), lower=np.zeros(2), upper=np.ones(2),
                                count=np.array([-1.0, 1.0]))
    assert np.isnan(empty["median"]).all() and np.isnan(empty["p90_ci_high"]).all()
    # 24 readings over 16 bins with a bin SD of 4 readings: 1.5 readings a bin, under 0.4 bin SDs.
    rng = np.random.default_rng(8)
    noisy = quantiles_of(noisy_cells([rng.normal(80, 10, 24) for _ in range(50)], sd=4.0, seed=8))
    assert np.isnan(noisy["p10"]).all()
    clearer = quantiles_of(noisy_cells([rng.normal(80, 10, 240) for _ in range(50)], sd=4.0, seed=8))
    assert not np.isnan(clearer["p10"]).any()


def test_a_tail_quantile_of_few_readings_is_not_dragged_to_the_empty_end_of_the_range() -> None:
    """24 readings in the upper third of the range, a bin SD of 2.7 readings (epsilon 4 on hourly weather): the
    raw noisy CDF crossed 10% somewhere in the thirteen empty bins below (p10's median error 7.9 bins, its
    intervals covering 96.0%, every miss above). Now: within half a bin (measured: p10 0.20 bins), covering 97.9%."""
    rng = np.random.default_rng(9)
    values = [np.round(rng.normal(130, 5, 24), 1) for _ in range(1000)]
    out = quantiles_of(noisy_cells(values, sd=2.7, seed=9))
    released = ~np.isnan(out["p10"])
    assert released.mean() > 0.6
    for name, q in QUANTILES:
        truth = np.array([inverse_cdf(v, q) for v in values])[released]
        error = np.abs(out[name][released] - truth)
        assert np.median(error) <= 0.5 * WIDTH, (name, np.median(error))
        covered = (out[f"{name}_ci_low"][released] <= truth) & (truth <= out[f"{name}_ci_high"][released])
        assert covered.mean() >= 0.95, (name, covered.mean())


@pytest.mark.parametrize("seed", [1, 2])
def test_intervals_cover_true_quantiles_of_many_readings(seed: int) -> None:
    """Known truth (skewed: gamma), real Skellam noise on every slot, 200-600 readings a cell at a bin SD of 5.
    Measured over seeds 1-2: p10 97.3-97.4%, median 98.4-98.8%, p90 92.4-92.6%, misses of p90 mostly above: the
    thin right tail (one or two readings a bin) is often taken for noise. A known shortfall, stated in the README."""
    rng = np.random.default_rng(seed)
    values = [np.round(rng.gamma(4.0, 12.0, size=int(rng.integers(200, 600))), 1) for _ in range(2000)]
    out = quantiles_of(noisy_cells(values, sd=5.0, seed=seed))
    floor = {"p10": 0.96, "median": 0.97, "p90": 0.88}
    for name, q in QUANTILES:
        truth = np.array([inverse_cdf(v, q) for v in values])
        covered = (out[f"{name}_ci_low"] <= truth) & (truth <= out[f"{name}_ci_high"])
        assert floor[name] <= covered.mean() <= 0.995, (name, covered.mean())
        assert np.median(np.abs(out[name] - truth)) <= 0.5 * WIDTH


def irradiance_days(seed: int, cells: int) -> list[np.ndarray]:
    """Days of 24 hourly readings shaped like irradiance in the test's range [0, 160]: 10-16 night-time zeros (a
    pile at the lower bound) and a daylight arch of 8-14 readings (peak 40-150, thinned by clouds)."""
    rng = np.random.default_rng(seed)
    days = []
    for _ in range(cells):
        light = int(rng.integers(8, 15))
        hours = (np.arange(light) + rng.uniform(0.2, 0.8)) / light
        daylight = rng.uniform(40, 150) * np.sin(np.pi * hours) * rng.uniform(0.6, 1.0, size=light)
        days.append(np.round(np.concatenate([np.zeros(24 - light), daylight]), 1))
    return days


def test_a_pile_at_a_clamp_bound_is_estimated_there_and_the_thin_tail_above_it_is_kept() -> None:
    """A bound's bin is two cells of the composition (the readings exactly at the bound, and the rest). p10 of
    these days is 0 (a night-time zero): it was estimated inside the first bin (never 0) and is now 0 (measured:
    99.8% of cells), its interval reaching 0 in every cell. The thin daylight tail above the pile was taken for
    noise: p90 covered 90.9% (109 misses above, 5 below); now 96.9% (29 above, 10 below)."""
    days = irradiance_days(1, 1500)
    out = quantiles_of(noisy_cells(days, sd=2.6, seed=1))
    released = ~np.isnan(out["p10"])
    assert released.mean() > 0.8
    assert (out["p10"][released] == LOWER).mean() >= 0.99 and (out["p10_ci_low"][released] == LOWER).all()
    truth = np.array([inverse_cdf(v, 0.9) for v in days])[released]
    low, high = out["p90_ci_low"][released], out["p90_ci_high"][released]
    covered = (low <= truth) & (truth <= high)
    assert 0.95 <= covered.mean() <= 0.98, covered.mean()
    assert (truth > high).sum() <= 0.8 * (~covered).sum()


def test_a_quantile_exactly_at_the_upper_bound_is_estimated_and_covered_there() -> None:
    """Humid days: 6-12 of 24 readings exactly at the upper bound (clamped, like relative humidity at 100%), the rest
    spread below it. p90 is the bound itself. The CDF just left of the bound had counted the bound's pile as below
    it, so the estimate stopped 1.6 short of the bound (median) and the interval 0.06 below it: every such truth was
    missed, by a hair (at epsilon 16 on real hourly humidity, half of p90's misses). Now both reach it (measured:
    every cell)."""
    rng = np.random.default_rng(12)
    days = [np.round(np.concatenate([np.full(int(rng.integers(6, 13)), UPPER),
                                     rng.uniform(100, UPPER - 2, 24)]), 1)[:24] for _ in range(400)]
    out = quantiles_of(noisy_cells(days, sd=0.8, seed=12))
    released = ~np.isnan(out["p90"])
    assert released.mean() > 0.9
    truth = np.array([inverse_cdf(v, 0.9) for v in days])[released]
    assert (truth == UPPER).all()
    assert (out["p90_ci_high"][released] == UPPER).mean() >= 0.99
    assert (out["p90"][released] == UPPER).mean() >= 0.9
