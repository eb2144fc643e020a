"""The daily-profile model on simulated releases of a known signal with known noise: it recovers the signal, weighs
each cell by its known noise, smooths its profile only as much as the noise asks, carries a departure forward
and lets it decay, skips missing cells, and is what `fusion forecast` uses by default, recorded as such."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forecasting.backtest import backtest, calibrated, learned_calibration
from forecasting.intervals import Calibration
from forecasting.models import History, SeriesTooShort, fit_forecast
from forecasting.run import run_backtests, run_forecasts
from fusion.config.forecasting import ForecastingConfig, ModelName
from tests.forecasting.conftest import federation, release_table, released

DAY = 24


def weather(
    seed: int, n: int, *, noise: tuple[float, float], day_sd: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, releases, noise SDs): a daily cycle of three harmonics on a level that wanders from day to day (an
    AR(1) of the daily mean, persistence 0.6, shocks of SD `day_sd`) and an hourly AR(1) departure, released with
    noise SDs drawn uniformly from `noise` cell by cell."""
    rng = np.random.default_rng(seed)
    days = n // DAY + 1
    daily = np.zeros(days)
    for d in range(1, days):
        daily[d] = 0.6 * daily[d - 1] + rng.normal(0.0, day_sd)
    hourly = np.zeros(n)
    for t in range(1, n):
        hourly[t] = 0.8 * hourly[t - 1] + rng.normal(0.0, 0.2)
    hours = np.arange(n)
    cycle = 4.0 * np.sin(2 * np.pi * hours / DAY) + 1.5 * np.cos(4 * np.pi * hours / DAY) + 0.5 * np.sin(
        6 * np.pi * hours / DAY
    )
    truth = 15.0 + np.repeat(daily, DAY)[:n] + hourly + cycle
    sd = rng.uniform(*noise, n)
    return truth, truth + rng.normal(0.0, 1.0, n) * sd, sd


def test_the_profile_model_recovers_a_known_signal_through_heavy_noise() -> None:
    """Four weeks of hourly releases with noise SD 2 to 3 a cell (about the daily cycle's amplitude): the next two
    days' forecast is far closer to the truth than the noise and than seasonal naive, over 6 seeds."""
    ours, naive, noise = [], [], []
    for seed in range(6):
        truth, releases, sd = weather(seed, 30 * DAY, noise=(2.0, 3.0))
        history = History(releases[: 28 * DAY], sd[: 28 * DAY] ** 2, DAY)
        future = truth[28 * DAY :]
        ours.append(np.abs(fit_forecast(ModelName.PROFILE, history, 2 * DAY).mean - future).mean())
        naive.append(np.abs(fit_forecast(ModelName.SEASONAL_NAIVE, history, 2 * DAY).mean - future).mean())
        noise.append(np.abs(releases[28 * DAY :] - future).mean())
    assert np.mean(ours) < 0.6 * np.mean(noise)
    assert np.mean(ours) < 0.5 * np.mean(naive)


def test_each_cell_counts_by_its_known_noise() -> None:
    """A steady daily cycle, every other day released with noise SD 20 and the rest with SD 0.2: told each cell's
    noise, the model all but ignores the noisy days; told one typical noise for every cell, it is several times
    further off."""
    truth, _, _ = weather(1, 30 * DAY, noise=(0.0, 0.0), day_sd=0.0)
    rng = np.random.default_rng(2)
    sd = np.where((np.arange(28 * DAY) // DAY) % 2 == 0, 20.0, 0.2)
    releases = truth[: 28 * DAY] + rng.normal(0.0, 1.0, 28 * DAY) * sd
    future = truth[28 * DAY :]
    told = fit_forecast(ModelName.PROFILE, History(releases, sd**2, DAY), 2 * DAY)
    flat = fit_forecast(ModelName.PROFILE, History(releases, np.full(sd.size, np.mean(sd**2)), DAY), 2 * DAY)
    assert np.abs(told.mean - future).mean() < 0.3 * np.abs(flat.mean - future).mean()


def test_the_profile_keeps_its_detail_when_exact_and_is_smoothed_when_noisy() -> None:
    """A square daily profile (12 hours at 10, 12 at 0) released exactly: reproduced hour by hour, each of its
    harmonics kept. Released with noise SD 5: harmonics hardly larger than their noise are shrunk or dropped, and
    the profile is closer to the truth than the plain mean of each hour."""
    hours = np.arange(14 * DAY)
    square = np.where(hours % DAY < 12, 10.0, 0.0)
    exact = fit_forecast(ModelName.PROFILE, History(square, np.zeros(hours.size), DAY), DAY)
    assert np.allclose(exact.mean, square[:DAY], atol=1e-6)
    assert exact.params["harmonics_kept"] == 6  # a square wave's: the odd harmonics of a day of 24 windows
    noisy = square + np.random.default_rng(0).normal(0.0, 5.0, hours.size)
    smoothed = fit_forecast(ModelName.PROFILE, History(noisy, np.full(hours.size, 25.0), DAY), DAY)
    assert smoothed.params["harmonics_kept"] < 12
    hourly_mean = noisy.reshape(-1, DAY).mean(axis=0)
    assert np.abs(smoothed.mean - square[:DAY]).mean() < 0.8 * np.abs(hourly_mean - square[:DAY]).mean()


def test_a_warm_day_is_carried_forward_and_decays_toward_the_usual_level() -> None:
    """Eight weeks of a level that persists from day to day (the daily means an AR(1), persistence 0.6): the fitted
    persistence is positive, and the forecast departs from the usual level the way the last day did, less on
    the second day than the first."""
    for seed in range(4):
        _, releases, sd = weather(seed, 56 * DAY, noise=(0.3, 0.3))
        prediction = fit_forecast(ModelName.PROFILE, History(releases, sd**2, DAY), 2 * DAY)
        usual = prediction.params["level"]
        last = releases[-DAY:].mean() - usual
        first, second = prediction.mean[:DAY].mean() - usual, prediction.mean[DAY:].mean() - usual
        assert 0.15 < prediction.params["day_persistence"] < 0.95
        assert 0 < second / last < first / last < 1


def test_missing_cells_and_a_missing_day_are_skipped_not_read_as_zero() -> None:
    truth, releases, sd = weather(5, 30 * DAY, noise=(0.5, 1.0))
    rng = np.random.default_rng(9)
    gaps = rng.random(28 * DAY) < 0.2
    gaps[10 * DAY : 11 * DAY] = True  # a whole day
    gaps[-3:] = True  # and the latest cells
    holed = np.where(gaps, np.nan, releases[: 28 * DAY])
    future = truth[28 * DAY :]
    full = fit_forecast(ModelName.PROFILE, History(releases[: 28 * DAY], sd[: 28 * DAY] ** 2, DAY), 2 * DAY)
    sparse = fit_forecast(ModelName.PROFILE, History(holed, np.where(gaps, np.nan, sd[: 28 * DAY] ** 2), DAY), 2 * DAY)
    assert np.all(np.isfinite(sparse.mean)) and np.all(np.isfinite(sparse.signal_var))
    assert np.abs(sparse.mean - future).mean() < 1.3 * np.abs(full.mean - future).mean() + 0.1
    with pytest.raises(SeriesTooShort, match="a forecast needs at least 48"):
        fit_forecast(ModelName.PROFILE, History(releases[:30], sd[:30] ** 2, DAY), DAY)


def test_calibrated_intervals_cover_the_truth_on_later_origins() -> None:
    """Rolling origins a day apart on 8 seeded series, each origin's intervals calibrated on the origins before it
    (as `fusion backtest` does): on the later half, the 95% interval covers the truth about 95% of the time and the
    80% about 80% (correlated windows: tolerances of a few standard errors)."""
    hits80, hits95 = [], []
    for seed in range(8):
        truth, releases, sd = weather(10 + seed, 44 * DAY, noise=(0.5, 1.5))
        origins = [28 * DAY + k * DAY for k in range(14)]
        made = backtest(
            releases, sd**2, DAY, models=[ModelName.PROFILE], origins=origins, horizon=2 * DAY, history=28 * DAY
        )
        for forecast, (_, bands) in list(zip(made, calibrated(made, releases, sd**2), strict=True))[7:]:
            true = truth[forecast.origin : forecast.origin + 2 * DAY]
            hits80.append((true >= bands.ci80[0]) & (true <= bands.ci80[1]))
            hits95.append((true >= bands.ci95[0]) & (true <= bands.ci95[1]))
    assert 0.72 <= np.mean(hits80) <= 0.88
    assert 0.90 <= np.mean(hits95) <= 0.99


def test_profile_is_the_default_model_and_a_forecast_records_it(tmp_path: Path) -> None:
    """Without a `[forecasting]` block the profile model forecasts (first of the default models); after a backtest
    the forecast row records the model, its version, its fitted parameters and the backtest's choice."""
    assert ForecastingConfig().models[0] is ModelName.PROFILE
    fed = federation(tmp_path / "default")
    hours = np.arange(21 * DAY)
    sds = np.full(hours.size, 1.0)
    fed.store.insert_new("releases", release_table(hours, released(hours, sds, seed=1), sds))
    run = run_forecasts(fed.config)
    issued = run.outcomes[0].forecast
    assert issued is not None and issued.model is ModelName.PROFILE
    rows = fed.store.read("forecasts").to_pylist()
    assert {r["model"] for r in rows} == {"profile"} and {r["model_version"] for r in rows} == {"1"}
    fitted = json.loads(rows[0]["params"])["fitted"]
    assert {"level", "day_persistence", "hour_persistence", "harmonics_kept"} <= fitted.keys()

    chosen = federation(tmp_path / "chosen", forecasting='models = ["profile", "seasonal_naive"]\nbacktest_origins = 4')
    chosen.store.insert_new("releases", release_table(hours, released(hours, sds, seed=1), sds))
    (outcome,) = run_backtests(chosen.config).outcomes
    assert {str(s.model) for s in outcome.scores} == {"profile", "seasonal_naive"}
    assert outcome.chosen is ModelName.PROFILE  # the signal is a clean daily cycle: the profile is far better
    issued = run_forecasts(chosen.config).outcomes[0].forecast
    assert issued is not None and issued.model is ModelName.PROFILE and issued.factor != 1.0
    (params,) = {r["params"] for r in chosen.store.read("forecasts").to_pylist() if r["purpose"] == "forecast"}
    params = json.loads(params)
    assert params["calibrated"] is True and set(params["backtest_mae"]) == {"profile", "seasonal_naive"}


def test_release_errors_drowned_in_noise_never_narrow_the_model() -> None:
    """Release errors that are almost all the cells' own noise (its variance 10 times the model's): a factor below
    1 learned from them would be chance, so the calibration keeps at least the model's SD; where the model's part
    is large, a narrower factor is still learned."""
    rng = np.random.default_rng(3)
    signal_var, noise_var = np.full(2000, 1.0), np.full(2000, 10.0)
    errors = rng.normal(0.0, np.sqrt(0.25 * signal_var + noise_var))  # the model's SD is twice too wide
    assert Calibration.fit(errors, signal_var, noise_var).factor == 1.0
    clear = rng.normal(0.0, np.sqrt(0.25 * signal_var + 0.1))
    assert Calibration.fit(clear, signal_var, np.full(2000, 0.1)).factor == pytest.approx(0.5, abs=0.1)


def test_an_origin_can_be_calibrated_on_its_latest_earlier_origins_only() -> None:
    """`calibrated(..., latest=k)` learns each origin's calibration on the k latest origins released before it,
    as a forecast learns it on the latest `backtest_origins`."""
    _, releases, sd = weather(6, 40 * DAY, noise=(0.5, 1.0))
    origins = [28 * DAY + k * DAY for k in range(10)]
    made = backtest(releases, sd**2, DAY, models=[ModelName.PROFILE], origins=origins, horizon=DAY, history=28 * DAY)
    latest, every = calibrated(made, releases, sd**2, latest=3), calibrated(made, releases, sd**2)
    assert latest[-1][0] == learned_calibration(made[-4:-1], releases, sd**2)
    assert every[-1][0] == learned_calibration(made[:-1], releases, sd**2)
    assert latest[0][0] == every[0][0] == Calibration()
