"""Coverage of every released statistic's 95% interval on real hourly weather, end to end without Beam.

Data (real): the two NREL TMY3 hourly files that ship inside pvlib (Greensboro NC, Sand Point AK; read as
fusion/demo/data.py reads them): global horizontal irradiance, air temperature, relative humidity and wind speed.
A cell is one station, metric and day: the day's 24 hourly readings (2 x 4 x 365 = 2,920 cells). They are encoded
exactly as Fusion encodes them (fusion/release/contribution.py `aggregate_readings`, the demo's clamp bounds and
resolutions, SUMSQ and 16 histogram bins), every slot gets Skellam noise calibrated to epsilon 4 (test-seeded),
and `decode_release` decodes them; each statistic is compared with the truth of the cell's clamped readings.

Binomial SD of a coverage over ~2,000 cells: about 0.5%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from fusion.config.parameters import ReleaseParameters
from fusion.demo.data import LIMITS, RESOLUTION, load_station
from fusion.release.contribution import aggregate_readings
from fusion.release.estimates import decode_release
from privacy.accountant import calibrate_variance
from privacy.encoding import balanced_encodings, event_level_sensitivity
from privacy.layout import BASE_COMPONENTS, SUMSQ, PartitionLayout, bin_components
from privacy.skellam import SkellamNoise, seeded_generator

START = datetime(2026, 1, 1, tzinfo=UTC)
METRICS = ("ghi", "air_temp", "humidity", "wind_speed")
STATIONS = ("greensboro", "sandpoint")
DAYS = 365
BINS = 16
EPSILON = 4.0


@dataclass(frozen=True)
class Decoded:
    rows: dict[str, np.ndarray]  # column -> values per cell (NaN for NULL)
    truth: dict[str, np.ndarray]  # statistic -> true value per cell
    metric: np.ndarray  # metric index per cell
    lower: np.ndarray
    upper: np.ndarray


def _true_quantile(values: np.ndarray, q: float) -> float:
    """The ceil(q n)-th smallest reading."""
    ordered = np.sort(values)
    return float(ordered[max(0, math.ceil(q * ordered.size - 1e-9) - 1)])


def _decode(*, window_days: int, components: tuple[str, ...], seeds: tuple[int, ...]) -> Decoded:
    """The stations' hourly readings in cells of `window_days` days, aggregated once and released once per noise
    seed (each seed its own release), the decoded rows of every release concatenated."""
    stations = {s: load_station(s) for s in STATIONS}
    encodings = tuple(balanced_encodings([(*LIMITS[m], RESOLUTION[m]) for m in METRICS]))
    days = DAYS // window_days * window_days
    layout = PartitionLayout.for_interval(METRICS, STATIONS, START, START + timedelta(days=days),
                                          timedelta(days=window_days), components)
    sensitivity = event_level_sensitivity(list(encodings), components=4)  # count, sum, sumsq, one bin
    variance = calibrate_variance(epsilon=EPSILON, delta=1e-6, l1=sensitivity.l1, l2=sensitivity.l2)
    params = ReleaseParameters(encodings=encodings, sensitivity=sensitivity, total_variance=variance, quorum=1,
                               epsilon=EPSILON, delta=1e-6, noise=True)
    hours = np.datetime64("2026-01-01T00:00", "us") + np.arange(days * 24) * np.timedelta64(3600_000_000, "us")
    pieces, truth_values = [], {}
    for station in STATIONS:
        series = stations[station]
        order = np.argsort(series["hour_of_year"])
        for m, metric in enumerate(METRICS):
            values = np.round(series[metric][order][: days * 24] / RESOLUTION[metric]) * RESOLUTION[metric]
            pieces.append(pa.table({
                "entity_id": pa.array([station] * values.size),
                "region": pa.array([station] * values.size),
                "metric": pa.array([metric] * values.size),
                "event_time": pa.array(hours, pa.timestamp("us", tz="UTC")),
                "value": pa.array(values),
            }))
            truth_values[(m, station)] = np.clip(values, *LIMITS[metric]).reshape(days // window_days,
                                                                                  24 * window_days)
    vector = aggregate_readings(pa.concat_tables(pieces), layout=layout, encodings=encodings)
    metric_idx, region_idx, window_idx = layout.cell_coordinates()
    cells = [truth_values[(int(m), STATIONS[int(r)])][int(w)] for m, r, w in zip(metric_idx, region_idx, window_idx,
                                                                               strict=True)]
    truth = {
        "count": np.array([c.size for c in cells], dtype=float),
        "sum": np.array([c.sum() for c in cells]),
        "mean": np.array([c.mean() for c in cells]),
        "stddev": np.array([c.std() for c in cells]),
        **{name: np.array([_true_quantile(c, q) for c in cells]) for name, q in (("p10", 0.1), ("median", 0.5),
                                                                                  ("p90", 0.9))},
    }
    releases = []
    for seed in seeds:
        noisy = vector + SkellamNoise(variance, generator=seeded_generator(seed)).sample(layout.slots)
        table = decode_release(noisy, layout=layout, params=params, units=("W/m2", "degC", "%", "m/s"),
                               noise_variance=variance, contributors=1, release_id="coverage", released_at=START)
        releases.append({name: np.array([np.nan if v is None else v for v in table.column(name).to_pylist()],
                                        dtype=float)
                         for name in table.column_names if pa.types.is_floating(table.schema.field(name).type)})
    rows = {name: np.concatenate([r[name] for r in releases]) for name in releases[0]}
    copies = len(seeds)
    lower = np.array([LIMITS[METRICS[m]][0] for m in metric_idx])
    upper = np.array([LIMITS[METRICS[m]][1] for m in metric_idx])
    return Decoded(rows, {k: np.tile(v, copies) for k, v in truth.items()}, np.tile(metric_idx, copies),
                   np.tile(lower, copies), np.tile(upper, copies))


@pytest.fixture(scope="module")
def decoded() -> Decoded:
    """Day cells, every optional statistic, one release (seed 2026)."""
    return _decode(window_days=1, components=(*BASE_COMPONENTS, SUMSQ, *bin_components(BINS)), seeds=(2026,))


@pytest.fixture(scope="module")
def weekly() -> Decoded:
    """Week cells (168 readings), count, sum and sum of squares: 26 releases (seeds 0-25) of 2 x 4 x 52 cells."""
    return _decode(window_days=7, components=(*BASE_COMPONENTS, SUMSQ), seeds=tuple(range(26)))


def _misses(d: Decoded, name: str) -> tuple[np.ndarray, int, int]:
    """(covered per released cell, misses above the interval, misses below it) of one statistic."""
    released = ~np.isnan(d.rows[name])
    truth = d.truth[name][released]
    low, high = d.rows[f"{name}_ci_low"][released], d.rows[f"{name}_ci_high"][released]
    return (low <= truth) & (truth <= high), int((truth > high).sum()), int((truth < low).sum())


@pytest.mark.parametrize("name", ["count", "sum", "mean"])
def test_counts_sums_and_means_cover_95_percent_on_both_sides(decoded: Decoded, name: str) -> None:
    """Measured (this seed): count 94.7%, sum 94.6%, mean 94.6%."""
    covered, above, below = _misses(decoded, name)
    assert covered.size >= 2000
    assert 0.93 <= covered.mean() <= 0.97, (name, covered.mean())
    assert max(above, below) <= 0.65 * (above + below), (name, above, below)


def test_a_day_cells_stddev_is_noise_so_only_its_interval_is_released(decoded: Decoded) -> None:
    """At 24 readings a cell and epsilon 4 the variance's noise SD is 10-40 times the readings' variance (air
    temperature: about 800 degC^2 against 1-25), and the estimate, never negative, was above the truth on average
    (+0.23 of its SD pooled, +0.6 to +0.9 for temperature and wind). It is withheld in every cell; the interval,
    which holds every spread the sums allow, is still released and covers (measured 95.3%, 16 misses above, 120
    below: at a spread of 0 it reaches 40-60% of the half range, so what it says is how wide a day's spread cannot
    be)."""
    released = ~np.isnan(decoded.rows["stddev"])
    assert not released.any(), released.sum()
    interval = ~np.isnan(decoded.rows["stddev_ci_low"]) & ~np.isnan(decoded.rows["stddev_ci_high"])
    assert interval.sum() >= 2000
    truth = decoded.truth["stddev"][interval]
    covered = (decoded.rows["stddev_ci_low"][interval] <= truth) & (truth <= decoded.rows["stddev_ci_high"][interval])
    assert 0.93 <= covered.mean() <= 0.97, covered.mean()


def test_where_the_stddev_is_released_it_is_unbiased_and_its_interval_covers_on_both_sides(weekly: Decoded) -> None:
    """Week cells (168 readings): irradiance's and humidity's spreads are well above their noise and their estimates
    are released, temperature's and wind's are not. Over the released cells of 26 noise draws, 95% coverage within
    93-97%, neither side over 65% of the misses, and the mean error under 0.1 of its SD (issue 17's targets).
    Measured: 2,704 cells (Greensboro's irradiance and humidity: Sand Point's spreads pool below the threshold),
    coverage 94.6%, misses 65 above / 81 below, mean error +0.018 of its SD."""
    covered, above, below = _misses(weekly, "stddev")
    assert covered.size >= 2000
    assert 0.93 <= covered.mean() <= 0.97, covered.mean()
    assert max(above, below) <= 0.65 * (above + below), (above, below)
    released = ~np.isnan(weekly.rows["stddev"])
    error = (weekly.rows["stddev"] - weekly.truth["stddev"])[released]
    assert abs(error.mean()) < 0.1 * error.std(), (error.mean(), error.std())
    shown = {METRICS[m] for m in np.unique(weekly.metric[released])}
    assert {"ghi", "humidity"} <= shown and "air_temp" not in shown, shown


@pytest.mark.parametrize("cells", ["decoded", "weekly"])
def test_the_signed_variance_averages_to_the_truth_and_its_sd_weights_without_bias(
    cells: str, request: pytest.FixtureRequest
) -> None:
    """`variance` is never clipped, so where the stddev estimate is withheld (day cells) averages of it over cells
    are still unbiased: per metric, the mean error within 3 of its standard errors (measured: -0.1 to 0.6 on day
    cells, -0.1 to 1.8 over the 26 week releases). Its `variance_sd` is the noise SD of a cell with its count and
    its pool's spread and mean, so the error over it averages near 0 (measured +0.047 day cells, +0.022 week
    cells; over each cell's own delta-method SD +0.15, which weighting would turn into a bias), with an SD near 1
    (1.10 / 1.03: cells whose mean is far from their pool's have more noise than it says)."""
    d: Decoded = request.getfixturevalue(cells)
    released = ~np.isnan(d.rows["variance"])
    assert released.sum() >= 2000
    error = (d.rows["variance"] - d.truth["stddev"] ** 2)[released]
    z = error / d.rows["variance_sd"][released]
    assert abs(z.mean()) < 0.1 and 0.9 < z.std() < 1.2, (z.mean(), z.std())
    for m in np.unique(d.metric[released]):
        own = error[d.metric[released] == m]
        assert abs(own.mean()) < 3 * own.std() / np.sqrt(own.size), (METRICS[m], own.mean(), own.std())


def test_quantile_estimates_are_within_half_a_bin_where_the_count_is_clear(decoded: Decoded) -> None:
    """Where the noisy count is at least 3 count SDs, the median absolute error of p10, median and p90 is at most
    half a bin (was 0.5-0.9 bins, p10 of temperature and humidity five bins and more towards the empty end).
    Measured: p10 0.04, median 0.30, p90 0.27 bins (p10 0.39 before a bound's pile counted as cells of its own:
    night-time irradiance and calm wind are now estimated at the bound)."""
    width = (decoded.upper - decoded.lower) / BINS
    clear = decoded.rows["count"] >= 3 * decoded.rows["count_sd"]
    for name in ("p10", "median", "p90"):
        released = clear & ~np.isnan(decoded.rows[name])
        assert released.sum() >= 1500
        error = np.abs(decoded.rows[name] - decoded.truth[name])[released] / width[released]
        assert np.median(error) <= 0.5, (name, np.median(error))


def test_quantile_intervals_cover_their_true_quantiles(decoded: Decoded) -> None:
    """Every released quantile's interval, over every cell that releases one (humidity's histograms, a bin SD of
    3.8 readings against 1.5 readings a bin, release none). Measured (this seed): p10 99.2% (12 misses above, 3
    below), median 97.4% (12, 35), p90 97.6% (6, 36); over three noise seeds 98.6-99.2%, 97.4-98.4%, 97.2-97.7%,
    and on real data the tests do not use (Miami's TMY2 file; the two stations' direct-normal irradiance and dew
    point) 98.9%, 96.7-97.2%, 96.0-96.7%. Never below the 95% claimed, but not within 93-97% with misses balanced:
    p10 cannot be (next test), and the uniform composition prior leaves the misses of medians and of the tail
    quantiles of compact days on one side (fusion/release/quantiles.py says which and why)."""
    for name in ("p10", "median", "p90"):
        covered, above, below = _misses(decoded, name)
        assert covered.size >= 1500
        assert 0.95 <= covered.mean() <= 0.995, (name, covered.mean(), above, below)


def _at_a_bound(d: Decoded, name: str) -> np.ndarray:
    return ~np.isnan(d.rows[name]) & ((d.truth[name] == d.lower) | (d.truth[name] == d.upper))


def test_quantiles_at_a_clamp_bound_are_covered_and_estimated_there(decoded: Decoded) -> None:
    """Night-time irradiance and calm wind are exactly 0, the lower bound: 47% of released p10 truths, 18% of the
    medians. Whether a bound's bin holds its readings at the bound or above it is not observed, so the interval
    holds both and covers these cells by construction (100%): over all cells p10 cannot come below 97% unless the
    other half missed 6% and more. Over the cells whose interval reaches neither bound it covers 97.6% (10 misses
    above, 3 below). p10 is now estimated at the bound where it is there (99.8%; was never, the estimate inside
    the first bin)."""
    at_bound = _at_a_bound(decoded, "p10")
    assert at_bound.sum() >= 0.4 * (~np.isnan(decoded.rows["p10"])).sum()
    assert (decoded.rows["p10"][at_bound] == decoded.truth["p10"][at_bound]).mean() >= 0.99
    for name in ("p10", "median", "p90"):
        at_bound = _at_a_bound(decoded, name)
        covered = (decoded.rows[f"{name}_ci_low"] <= decoded.truth[name]) & (
            decoded.truth[name] <= decoded.rows[f"{name}_ci_high"])
        assert covered[at_bound].mean() >= 0.99 if at_bound.any() else True
    low, high = decoded.rows["p10_ci_low"], decoded.rows["p10_ci_high"]
    inside = ~np.isnan(decoded.rows["p10"]) & (low > decoded.lower) & (high < decoded.upper)
    truth = decoded.truth["p10"][inside]
    covered = (low[inside] <= truth) & (truth <= high[inside])
    assert inside.sum() >= 400
    assert 0.93 <= covered.mean() <= 0.99, covered.mean()


def test_irradiance_p90_keeps_the_thin_daylight_tail(decoded: Decoded) -> None:
    """Above the pile of night-time zeros, irradiance has a thin daylight tail of one or two readings a bin that
    the posterior took for noise: p90 covered 92.9% (37 misses above, 8 below). The pile now counts as cells of
    their own, and the tail is kept: 97.0% (4 above, 15 below; 96.2-97.6% over three seeds)."""
    ghi = decoded.metric == METRICS.index("ghi")
    released = ghi & ~np.isnan(decoded.rows["p90"])
    truth = decoded.truth["p90"][released]
    covered = (decoded.rows["p90_ci_low"][released] <= truth) & (truth <= decoded.rows["p90_ci_high"][released])
    assert released.sum() >= 500
    assert 0.95 <= covered.mean() <= 0.98, covered.mean()


def test_mean_sd_matches_the_spread_of_the_ratio(decoded: Decoded) -> None:
    """(ratio_mean - true mean) / mean_sd over the released means: SD 1 within 0.05."""
    released = ~np.isnan(decoded.rows["mean_sd"])
    z = (decoded.rows["ratio_mean"] - decoded.truth["mean"])[released] / decoded.rows["mean_sd"][released]
    assert released.sum() >= 2000
    assert abs(np.std(z) - 1.0) < 0.05 and abs(np.mean(z)) < 0.1
