"""The models on simulated releases of a known signal with known noise: the signal is recovered, the intervals
cover at their stated rates when the model fits, missing cells are skipped, a short series is refused."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import forecasting.backtest
import forecasting.intervals
import fusion.store.forecast_queries
from forecasting.intervals import Z80, Z95, Calibration, calibration_factor, intervals
from forecasting.models import History, SeriesTooShort, fit_forecast
from fusion.config.forecasting import ModelName

DAY = 24


def simulated(
    seed: int, n: int, *, level_sd: float = 0.05, ar_sd: float = 0.4, noise: tuple[float, float] = (0.5, 2.0)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, releases, noise SDs): a random-walk level, an AR(1) term and a two-harmonic daily cycle (the UC
    model's own structure), released with noise SDs drawn uniformly from `noise` cell by cell."""
    rng = np.random.default_rng(seed)
    level = np.cumsum(rng.normal(0.0, level_sd, n))
    ar = np.zeros(n)
    shocks = rng.normal(0.0, ar_sd, n)
    for t in range(1, n):
        ar[t] = 0.9 * ar[t - 1] + shocks[t]
    hours = np.arange(n)
    truth = 10.0 + level + ar + 3.0 * np.sin(2 * np.pi * hours / DAY) + np.cos(4 * np.pi * hours / DAY)
    sd = rng.uniform(*noise, n)
    return truth, truth + rng.normal(0.0, 1.0, n) * sd, sd


def test_the_uc_model_recovers_a_known_signal_through_noise() -> None:
    """Two weeks of hourly releases, noise SD 1 to 2 a cell, around a daily cycle on a slowly wandering level:
    the next two days' forecast is far closer to the true value than the noise is, and than seasonal naive."""
    truth, releases, sd = simulated(3, 16 * DAY, level_sd=0.02, ar_sd=0.1, noise=(1.0, 2.0))
    history = History(releases[: 14 * DAY], sd[: 14 * DAY] ** 2, DAY)
    uc = fit_forecast(ModelName.UC, history, 2 * DAY)
    naive = fit_forecast(ModelName.SEASONAL_NAIVE, history, 2 * DAY)
    future = truth[14 * DAY :]
    noise = np.abs(releases[14 * DAY :] - future).mean()  # about 1.2
    assert np.abs(uc.mean - future).mean() < 0.4 * noise
    assert np.abs(uc.mean - future).mean() < 0.4 * np.abs(naive.mean - future).mean()
    assert np.all(uc.signal_var > 0) and uc.signal_var.max() < 1.0  # below a single cell's noise


def test_intervals_cover_the_truth_and_the_next_release_at_their_stated_rates() -> None:
    """12 seeded series simulated from the model's own structure (fitted, not told its parameters): the 80% and
    95% intervals of the true value and the 95% interval of the next release cover at about their rates (48
    correlated windows a series: tolerances of about two standard errors)."""
    hits80, hits95, release95 = [], [], []
    for seed in range(12):
        truth, releases, sd = simulated(seed, 14 * DAY + 48)
        history = History(releases[: 14 * DAY], sd[: 14 * DAY] ** 2, DAY)
        prediction = fit_forecast(ModelName.UC, history, 48)
        bands = intervals(prediction.mean, prediction.signal_var, noise_var=history.noise_var())
        true, noisy = truth[14 * DAY :], releases[14 * DAY :]
        hits80.append((true >= bands.ci80[0]) & (true <= bands.ci80[1]))
        hits95.append((true >= bands.ci95[0]) & (true <= bands.ci95[1]))
        release95.append((noisy >= bands.release_ci95[0]) & (noisy <= bands.release_ci95[1]))
    assert 0.72 <= np.mean(hits80) <= 0.88
    assert 0.90 <= np.mean(hits95) <= 0.99
    assert 0.90 <= np.mean(release95) <= 0.99


def test_missing_and_withheld_cells_are_skipped_not_read_as_zero() -> None:
    """A fifth of the cells missing (NaN), a whole afternoon among them: the forecast is as good as with every
    cell, and nowhere near what zeros would make of it."""
    truth, releases, sd = simulated(5, 14 * DAY + DAY)
    rng = np.random.default_rng(9)
    gaps = rng.random(14 * DAY) < 0.2
    gaps[200:210] = True
    holed = np.where(gaps, np.nan, releases[: 14 * DAY])
    full = fit_forecast(ModelName.UC, History(releases[: 14 * DAY], sd[: 14 * DAY] ** 2, DAY), DAY)
    sparse = fit_forecast(ModelName.UC, History(holed, np.where(gaps, np.nan, sd[: 14 * DAY] ** 2), DAY), DAY)
    future = truth[14 * DAY :]
    assert np.all(np.isfinite(sparse.mean))
    assert np.abs(sparse.mean - future).mean() < 1.5 * np.abs(full.mean - future).mean() + 0.2
    zeros = fit_forecast(
        ModelName.UC, History(np.where(gaps, 0.0, releases[: 14 * DAY]), sd[: 14 * DAY] ** 2, DAY), DAY
    )
    assert np.abs(zeros.mean - future).mean() > np.abs(sparse.mean - future).mean()
    for model in (ModelName.SEASONAL_NAIVE, ModelName.SAME_HOUR_MEAN, ModelName.ETS):  # the baselines too
        assert np.all(np.isfinite(fit_forecast(model, History(holed, sd[: 14 * DAY] ** 2, DAY), DAY).mean))


def test_a_series_too_short_to_fit_is_refused_with_a_clear_message() -> None:
    values = np.arange(30.0)
    with pytest.raises(SeriesTooShort, match=r"30 released window\(s\) in the history; a forecast needs at least 48"):
        fit_forecast(ModelName.UC, History(values, np.ones(30), DAY), DAY)
    mostly_missing = np.where(np.arange(100) % 3 == 0, 1.0, np.nan)  # 100 windows, 34 released
    with pytest.raises(SeriesTooShort, match="34 released"):
        fit_forecast(ModelName.SEASONAL_NAIVE, History(mostly_missing, np.ones(100), DAY), DAY)


def test_the_baselines_forecast_what_they_say() -> None:
    """Seasonal naive repeats the last day (the latest released value of each hour); the same-hour mean averages
    the last 7 days' values of each hour."""
    days = np.repeat(np.arange(10.0), DAY) + np.tile(np.arange(DAY) / 100, 10)  # day d, hour h: d + h/100
    history = History(days, np.full(days.size, 0.01), DAY)
    naive = fit_forecast(ModelName.SEASONAL_NAIVE, history, 2 * DAY)
    assert np.allclose(naive.mean, np.tile(9.0 + np.arange(DAY) / 100, 2))
    mean = fit_forecast(ModelName.SAME_HOUR_MEAN, history, DAY)
    assert np.allclose(mean.mean, 6.0 + np.arange(DAY) / 100)  # days 3..9
    holed = days.copy()
    holed[-DAY + 5] = np.nan  # hour 5 of the last day withheld: the day before stands in
    assert fit_forecast(ModelName.SEASONAL_NAIVE, History(holed, history.variances, DAY), DAY).mean[5] == 8.05


def test_calibration_learns_the_factor_on_the_model_sd_and_keeps_the_noise_known() -> None:
    """Errors against releases whose model part is 1.5x wider than the model said: the factor is 1.5; scaled by
    it the 95% release interval covers 95%. Errors of noise alone (the model exact) give the lower bound."""
    rng = np.random.default_rng(1)
    signal_var, noise_var = np.full(40_000, 2.0), rng.uniform(0.5, 3.0, 40_000)
    errors = rng.normal(0.0, np.sqrt(1.5**2 * signal_var + noise_var))
    factor = calibration_factor(errors, signal_var, noise_var)
    assert factor == pytest.approx(1.5, rel=0.03)
    covered = np.abs(errors) <= Z95 * np.sqrt(factor**2 * signal_var + noise_var)
    assert covered.mean() == pytest.approx(0.95, abs=0.005)
    assert calibration_factor(rng.normal(0.0, np.sqrt(noise_var)), signal_var, noise_var) < 0.3
    assert calibration_factor(np.array([np.nan]), np.array([1.0]), np.array([1.0])) == 1.0


def test_a_mixture_calibrates_heavy_tailed_errors_at_80_and_95_percent() -> None:
    """Errors of the true value that are calm 70% of the time (0.6 x the model's SD) and stormy otherwise (2 x),
    seen only through releases with known noise: one variance-matched factor covers the truth too often at 80%,
    the fitted mixture covers it at 80% and 95% (learned on one half of the errors, checked on the other)."""
    rng = np.random.default_rng(4)
    n = 20_000
    signal_var, noise_var = rng.uniform(1.0, 4.0, n), rng.uniform(0.2, 1.0, n)
    truth_errors = rng.normal(0.0, np.sqrt(np.where(rng.random(n) < 0.7, 0.36, 4.0) * signal_var))
    errors = truth_errors + rng.normal(0.0, np.sqrt(noise_var))
    learn, check = slice(0, n // 2), slice(n // 2, n)
    factor = calibration_factor(errors[learn], signal_var[learn], noise_var[learn])
    gaussian = np.abs(truth_errors[check]) <= Z80 * factor * np.sqrt(signal_var[check])
    assert gaussian.mean() > 0.84  # one factor: too wide at 80%
    calibration = Calibration.fit(errors[learn], signal_var[learn], noise_var[learn])
    assert calibration.weight == pytest.approx(0.7, abs=0.05) and calibration.low < 0.8 < 1.7 < calibration.high
    bands = intervals(np.zeros(n - n // 2), signal_var[check], noise_var=0.0, factor=calibration)
    inside80 = (bands.ci80[0] <= truth_errors[check]) & (truth_errors[check] <= bands.ci80[1])
    inside95 = (bands.ci95[0] <= truth_errors[check]) & (truth_errors[check] <= bands.ci95[1])
    assert inside80.mean() == pytest.approx(0.80, abs=0.015) and inside95.mean() == pytest.approx(0.95, abs=0.01)
    # Release intervals add each cell's noise to both components.
    release = calibration.half_width(0.95, signal_var[check], noise_var[check])
    assert np.mean(np.abs(errors[check]) <= release) == pytest.approx(0.95, abs=0.01)
    # Few errors, or Gaussian ones: the plain factor.
    assert Calibration.fit(errors[:50], signal_var[:50], noise_var[:50]).weight == 1.0
    plain = rng.normal(0.0, np.sqrt(1.3**2 * signal_var + noise_var))
    assert Calibration.fit(plain, signal_var, noise_var).factor == pytest.approx(1.3, rel=0.05)


@pytest.mark.parametrize("module", [forecasting.intervals, forecasting.backtest, fusion.store.forecast_queries])
def test_doctests(module: object) -> None:
    failures, _ = doctest.testmod(module)  # type: ignore[arg-type]
    assert failures == 0


def test_the_paired_test_allows_for_origins_whose_windows_overlap() -> None:
    """Origins a day apart, 48 windows ahead: neighbours score the same day, so their differences are correlated
    and a plain paired t finds a difference between equally good models too often (about 11% of backtests at -2,
    against about 4% where origins share no window). With the overlap allowed for (Diebold-Mariano variance, Harvey,
    Leybourne and Newbold's factor) it is rarer; with an overlap of 1 it is the plain paired t."""
    from forecasting.backtest import origin_overlap, paired_t

    assert origin_overlap(48, 24) == 2 and origin_overlap(48, 168) == 1
    rng = np.random.default_rng(5)
    plain = allowed = 0
    draws = 1500
    for _ in range(draws):
        days = [rng.normal(0.0, 1.0, (9, 24)) + rng.normal(0.0, 1.0, (9, 1)) for _ in range(2)]
        first, second = ({o: d[o : o + 2].ravel() for o in range(8)} for d in days)
        plain += paired_t(first, second) <= -2
        allowed += paired_t(first, second, overlap=2) <= -2
    assert plain / draws > 0.08
    assert allowed / draws < 0.075
    # An overlap of 1: the plain paired t of the per-origin differences.
    d = np.array([np.mean(first[o] ** 2) - np.mean(second[o] ** 2) for o in range(8)])
    assert paired_t(first, second, overlap=1) == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(8)))


def test_another_model_replaces_the_first_only_where_it_is_better_origin_by_origin() -> None:
    from forecasting.backtest import paired_t, preferred

    rng = np.random.default_rng(3)
    noise = rng.normal(0.0, 0.3, (8, 48))  # each origin's releases carry the same noise for every model
    truth_error = {m: rng.normal(0.0, 1.0, (8, 48)) for m in (ModelName.PROFILE, ModelName.ETS)}

    def errors(scale: np.ndarray) -> dict[ModelName, dict[int, np.ndarray]]:
        return {
            ModelName.PROFILE: {o: noise[o] + truth_error[ModelName.PROFILE][o] for o in range(8)},
            ModelName.ETS: {o: noise[o] + scale[o] * truth_error[ModelName.ETS][o] for o in range(8)},
        }

    # Better at every origin: chosen, whatever the releases' noise adds to both.
    steady = errors(np.full(8, 0.2))
    assert paired_t(steady[ModelName.ETS], steady[ModelName.PROFILE]) < -2
    assert preferred(steady, default=ModelName.PROFILE, margin=0.1) is ModelName.ETS
    # Far better at five origins, worse at the other three: a lower MAE over all of them (the rule before), but not
    # consistently better, so the first model is kept.
    patchy = errors(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 1.5, 1.5, 1.5]))
    mae = {m: np.mean(np.abs(np.concatenate(list(e.values())))) for m, e in patchy.items()}
    assert mae[ModelName.ETS] < 0.9 * mae[ModelName.PROFILE]
    assert preferred(patchy, default=ModelName.PROFILE, margin=0.1) is ModelName.PROFILE
    # Two origins are too few to tell.
    two = {m: {o: e[o] for o in (0, 1)} for m, e in steady.items()}
    assert np.isnan(paired_t(two[ModelName.ETS], two[ModelName.PROFILE]))
    assert preferred(two, default=ModelName.PROFILE, margin=0.1) is ModelName.PROFILE
    # Windows line up by position: a window one model lacks (NaN) leaves the pair out at that origin only.
    gappy = {m: {o: e[o].copy() for o in e} for m, e in steady.items()}
    gappy[ModelName.ETS][0][:10] = np.nan
    assert paired_t(gappy[ModelName.ETS], gappy[ModelName.PROFILE]) < -2



def test_release_intervals_cover_cells_whose_noise_differs_by_hour_and_after_an_epsilon_cut() -> None:
    """Seeded: a daily cycle with weather that persists, released with noise SD 4.0 at night (00-05, few readings)
    and 0.4 by day, or with SD 0.5 until an epsilon cut three days before the origin and 2.0 since. A forecast's
    release interval expects each window's own noise (`OriginForecast.noise_var`, as a backtest and a forecast
    issue it), so its 95% interval covers the night's releases and all of them at about 95%, and after the cut
    too; one noise SD for every window (the latest week's median) covered the night's at 0.71 and after the cut
    0.77. 30 series x 4 origins x 48 windows, correlated within an origin: tolerances of about two standard errors."""
    rng = np.random.default_rng(7)
    n, horizon = 32 * DAY, 48
    hours = np.arange(n)

    def weather() -> np.ndarray:
        daily = np.zeros(n // DAY + 1)
        for day in range(1, daily.size):
            daily[day] = 0.7 * daily[day - 1] + rng.normal(0.0, 1.5)
        hourly = np.zeros(n)
        for t in range(1, n):
            hourly[t] = 0.8 * hourly[t - 1] + rng.normal(0.0, 0.5)
        return 10.0 + 5.0 * np.sin(2 * np.pi * (hours % DAY) / DAY) + daily[hours // DAY] + hourly

    night = np.where(hours % DAY < 6, 4.0, 0.4)
    cut = np.where(hours >= n - horizon - 3 * DAY, 2.0, 0.5)
    for sd, count in ((night, 4), (cut, 1)):
        hits, at_night = [], []
        for _ in range(30 if count > 1 else 60):
            releases = weather() + rng.normal(0.0, 1.0, n) * sd
            origins = forecasting.backtest.rolling_origins(n, horizon=horizon, step=DAY, count=count,
                                                           min_history=2 * DAY)
            for made in forecasting.backtest.backtest(releases, sd**2, DAY, models=[ModelName.PROFILE],
                                                      origins=origins, horizon=horizon, history=28 * DAY):
                bands = intervals(made.prediction.mean, made.prediction.signal_var, noise_var=made.noise_var)
                window = releases[made.origin : made.origin + horizon]
                hits.append((window >= bands.release_ci95[0]) & (window <= bands.release_ci95[1]))
                at_night.append(hours[made.origin : made.origin + horizon] % DAY < 6)
        inside, dark = np.concatenate(hits), np.concatenate(at_night)
        assert 0.92 <= inside.mean() <= 0.99, count
        if count > 1:
            assert 0.92 <= inside[dark].mean() <= 0.99
