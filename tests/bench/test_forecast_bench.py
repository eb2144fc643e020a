"""bench.forecast's measurement helpers: the confidence interval of a coverage resamples whole origins, and the
year-round table's coverage by hour of the day averages to its coverage over all hours."""

from __future__ import annotations

import numpy as np

from bench.forecast import BACKTEST_STEP, CALIBRATION_ORIGINS, HISTORY, HORIZON, resampled_interval, year_round


def test_the_resampled_interval_of_a_mean_is_its_normal_95_percent_interval() -> None:
    rng = np.random.default_rng(5)
    rows = rng.normal([0.8, 0.95], [0.2, 0.1], size=(400, 2))
    low, high = resampled_interval(rows)
    se = rows.std(axis=0) / np.sqrt(len(rows))
    assert np.all(low < rows.mean(axis=0)) and np.all(rows.mean(axis=0) < high)
    np.testing.assert_allclose(high - low, 2 * 1.96 * se, rtol=0.15)


def test_year_round_coverage_by_hour_averages_to_its_coverage_over_all_hours() -> None:
    """Every origin's 48 windows hold each hour of the day twice, so the hours weigh alike."""
    rng = np.random.default_rng(1)
    first = HISTORY + CALIBRATION_ORIGINS * BACKTEST_STEP + HORIZON
    hours = first + 10 * 24
    day = np.sin(2 * np.pi * np.arange(hours) / 24)
    weather = np.repeat(np.cumsum(rng.normal(0, 0.3, hours // 24 + 1))[: hours // 24 + 1], 24)[:hours]
    truth = 10 + 5 * day + weather + rng.normal(0, 0.5, hours)
    out = year_round({"synthetic": truth}, [0.3])["0.3"]
    assert out["origins"] == len(range(first, hours - HORIZON + 1, 24))
    for level in ("80", "95"):
        by_hour = np.array(out[f"coverage{level}_by_hour"])
        assert by_hour.shape == (24,) and np.all((by_hour >= 0) & (by_hour <= 1))
        assert abs(by_hour.mean() - out[f"coverage{level}"]) < 1e-12
        low, high = out[f"coverage{level}_ci"]
        assert low <= out[f"coverage{level}"] <= high
