"""Forecasting models over one series of released cells, each cell's noise variance known.

Every model takes a `History` (values with NaN where a cell is missing or withheld, and each cell's noise variance)
and returns a `Prediction`: the forecast of the true value and its variance for each window ahead. The variance of
the next noisy release is that plus the noise of a future cell (`forecasting.intervals`). statsmodels is imported
inside the models that need it (it takes about a second), never at module import.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import numpy as np

from fusion.config.forecasting import FIT_PERIODS, PERIOD_WITHOUT_CYCLE, ModelName
from fusion.errors import FusionError

#: Days the same-hour mean averages over.
SAME_HOUR_DAYS = 7
#: Harmonics of the daily cycle in the UC model (fewer if a day has fewer windows).
HARMONICS = 3
#: Latest cells whose mean anomaly the profile model carries forward, decaying hour by hour.
RECENT_CELLS = 3


class SeriesTooShort(FusionError):
    """A series holds too few released windows to fit a model."""


@dataclass(frozen=True)
class History:
    """One series on a regular grid of windows, oldest first: `values` (NaN where missing or withheld) and each
    cell's noise variance `variances` (NaN where missing); `period` windows per day (None: no daily cycle)."""

    values: np.ndarray
    variances: np.ndarray
    period: int | None

    @property
    def observed(self) -> int:
        return int(np.isfinite(self.values).sum())

    def noise_var(self) -> float:
        """The typical noise variance of a cell: the median over the last 7 days' observed cells (the models'
        own variances use it; a future cell's expected noise is `noise_ahead`)."""
        recent = self.variances[-(self.period or 24) * SAME_HOUR_DAYS :]
        recent = recent[np.isfinite(recent)]
        if recent.size == 0:
            recent = self.variances[np.isfinite(self.variances)]
        return float(np.median(recent)) if recent.size else 0.0

    def noise_ahead(self, horizon: int) -> np.ndarray:
        """The noise variance expected of each of the next `horizon` cells, shape (horizon,): the median over the
        last 7 days of the cells of the same window of the day (a night of few readings is noisier than the day),
        scaled to the latest day's cells' noise relative to that profile (an epsilon changed since shows at once).
        Without a daily cycle, the latest 24 cells' median. A window of the day never released takes the typical
        noise (`noise_var`).

        >>> night = np.tile(np.where(np.arange(24) < 6, 16.0, 0.16), 7)
        >>> ahead = History(np.zeros(night.size), night, 24).noise_ahead(26)
        >>> float(ahead[0]), float(ahead[6]), float(ahead[24])
        (16.0, 0.16, 16.0)
        >>> cut = np.where(np.arange(night.size) >= 6 * 24, 16 * night, night)  # epsilon cut for the latest day
        >>> float(History(np.zeros(cut.size), cut, 24).noise_ahead(1)[0])
        256.0
        """
        period = self.period if self.period is not None and self.period > 1 else 1
        typical = self.noise_var()
        known = np.where(np.isfinite(self.variances), self.variances, np.nan)
        n = known.size
        if period == 1:
            latest = known[-PERIOD_WITHOUT_CYCLE:]
            latest = latest[np.isfinite(latest)]
            return np.full(horizon, float(np.median(latest)) if latest.size else typical)
        recent = known[-period * SAME_HOUR_DAYS :]
        phase_of = (np.arange(n - recent.size, n)) % period
        profile = np.full(period, typical)
        for phase in range(period):
            cells = recent[(phase_of == phase) & np.isfinite(recent)]
            if cells.size:
                profile[phase] = float(np.median(cells))
        latest = known[-period:]
        latest_phase = np.arange(n - latest.size, n) % period
        usable = np.isfinite(latest) & (profile[latest_phase] > 0)
        level = float(np.median(latest[usable] / profile[latest_phase][usable])) if usable.any() else 1.0
        return level * profile[np.arange(n, n + horizon) % period]


@dataclass(frozen=True)
class Prediction:
    """The forecast of the true value for `horizon` windows: `mean` and `signal_var` (variance of the true value
    about the mean), each of shape (horizon,), and the fitted parameters; for a model fitted by an optimiser, the
    log-likelihood of its (standardised) history at them, `loglike` (None for the closed-form models)."""

    mean: np.ndarray
    signal_var: np.ndarray
    params: dict[str, float] = field(default_factory=dict)
    loglike: float | None = None


def seasonal_naive_scale(history: History) -> float | None:
    """The in-sample mean absolute error of the seasonal naive forecast (one day back): MASE's denominator."""
    lag = history.period or 1
    diffs = np.abs(history.values[lag:] - history.values[:-lag])
    diffs = diffs[np.isfinite(diffs)]
    return float(diffs.mean()) if diffs.size and diffs.mean() > 0 else None


def _phase_values(values: np.ndarray, period: int, horizon: int, days: int) -> np.ndarray:
    """For each window ahead, the values of the same window on each of the last `days` days: (horizon, days),
    NaN where missing. Window h ahead (1-based) is at index n - 1 + h; k days back is k * period earlier."""
    n = values.size
    out = np.full((horizon, days), np.nan)
    for h in range(1, horizon + 1):
        for k in range(days):
            back = math.ceil(h / period) + k  # whole days back that land in the history
            index = n - 1 + h - back * period
            if 0 <= index < n:
                out[h - 1, k] = values[index]
    return out


def _centre(history: History) -> float:
    return float(np.nanmean(history.values))


class SeasonalNaive:
    """The same window one day earlier (or the latest day on which it was released)."""

    name = ModelName.SEASONAL_NAIVE
    version = "1"
    optimised = False

    def fit_forecast(self, history: History, horizon: int) -> Prediction:
        period = history.period or 1
        past = _phase_values(history.values, period, horizon, days=max(history.values.size // period, 1))
        # The most recent released value of each window's phase; the series mean where none was released.
        first = np.argmax(np.isfinite(past), axis=1)
        mean = past[np.arange(horizon), first]
        mean = np.where(np.isfinite(mean), mean, _centre(history))
        # Errors of y_t - y_{t-period} in the history carry two cells' noise and a day's change of the signal.
        diffs = history.values[period:] - history.values[:-period]
        noise = history.noise_var()
        change = max(float(np.nanvar(diffs)) - 2 * noise, 0.0) if np.isfinite(diffs).sum() > 1 else 0.0
        days_ahead = np.ceil(np.arange(1, horizon + 1) / period)
        return Prediction(mean, days_ahead * change + noise, {"day_change_var": change})


class SameHourMean:
    """The mean of the same window over the last 7 days on which it was released."""

    name = ModelName.SAME_HOUR_MEAN
    version = "1"
    optimised = False

    def fit_forecast(self, history: History, horizon: int) -> Prediction:
        period = history.period or 1
        past = _phase_values(history.values, period, horizon, days=SAME_HOUR_DAYS)
        counts = np.isfinite(past).sum(axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a phase never released: the series mean below
            mean = np.nanmean(past, axis=1)
        mean = np.where(counts > 0, mean, _centre(history))
        # In-sample residuals of the same rule, one day at a time: their spread less the noise of the cell itself.
        residuals = []
        values = history.values
        for t in range(period * 2, values.size):
            window = values[t - period * min(SAME_HOUR_DAYS, t // period) : t : period]
            if np.isfinite(values[t]) and np.isfinite(window).any():
                residuals.append(values[t] - np.nanmean(window))
        noise = history.noise_var()
        spread = float(np.var(residuals)) if len(residuals) > 1 else noise
        signal = max(spread - noise, noise / max(int(counts.max(initial=1)), 1))
        return Prediction(mean, np.full(horizon, signal), {"residual_var": spread})


def _interpolated(values: np.ndarray) -> np.ndarray:
    """Missing cells filled by linear interpolation (ends: the nearest value), for models that need every cell."""
    index = np.arange(values.size)
    known = np.isfinite(values)
    return np.interp(index, index[known], values[known])


class ExponentialSmoothing:
    """Additive exponential smoothing with a daily season (statsmodels ETSModel, error, trend none, season add);
    missing cells interpolated. Its variance is of the next observation, noise included: the cell noise is
    subtracted (a floor of a tenth keeps it positive), which calibration then corrects."""

    name = ModelName.ETS
    version = f"statsmodels-{version('statsmodels')}/1"
    optimised = True

    def fit_forecast(self, history: History, horizon: int, at: Mapping[str, float] | None = None) -> Prediction:
        import pandas as pd
        from statsmodels.tsa.exponential_smoothing.ets import ETSModel

        period = history.period
        values = _interpolated(history.values)
        centre, scale = float(values.mean()), float(values.std()) or 1.0
        seasonal = period is not None and period > 1 and values.size >= 2 * period
        model = ETSModel(
            pd.Series((values - centre) / scale),  # its prediction intervals need an index
            error="add",
            trend=None,
            seasonal="add" if seasonal else None,
            seasonal_periods=period if seasonal else None,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted = model.fit(disp=False, maxiter=200) if at is None else model.smooth(_vector(model, at))
            forecast = fitted.get_prediction(start=values.size, end=values.size + horizon - 1)
        mean = np.asarray(forecast.predicted_mean) * scale + centre
        var = np.asarray(forecast.var_pred_mean) * scale**2
        noise = history.noise_var()
        params = {str(k): float(v) for k, v in zip(fitted.param_names, fitted.params, strict=True)}
        return Prediction(mean, np.maximum(var - noise, var / 10), params, float(fitted.llf))


class KnownNoiseUC:
    """Unobserved components: a random-walk level, `HARMONICS` stochastic daily harmonics and an AR(1) term, with
    no estimated irregular: each cell's observation variance is its known DP noise variance (time-varying).
    Missing cells are skipped by the Kalman filter. The forecast variance is of the true value (the future cells'
    observation variance is set to zero)."""

    name = ModelName.UC
    version = f"statsmodels-{version('statsmodels')}/1"
    optimised = True

    def fit_forecast(self, history: History, horizon: int, at: Mapping[str, float] | None = None) -> Prediction:
        from statsmodels.tsa.statespace.structural import UnobservedComponents

        values = history.values
        known = np.isfinite(values)
        # Standardised: the optimiser's start values and tolerances are scale-free.
        centre, scale = float(values[known].mean()), float(values[known].std()) or 1.0
        endog = (values - centre) / scale
        variance = np.where(np.isfinite(history.variances), history.variances, 0.0) / scale**2
        variance = np.maximum(variance, 1e-10)  # exact cells (test mode without noise) still filter
        period = history.period
        seasonal = (
            [{"period": period, "harmonics": min(HARMONICS, period // 2)}]
            if period is not None and period > 1 else None
        )
        model = UnobservedComponents(
            endog, level=True, stochastic_level=True, freq_seasonal=seasonal, stochastic_freq_seasonal=[True]
            if seasonal else None, autoregressive=1, irregular=False,
        )
        model.ssm["obs_cov"] = variance.reshape(1, 1, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence notices: the backtest judges the fit
            fitted = model.fit(disp=False) if at is None else model.smooth(_vector(model, at))
            forecast = fitted.get_forecast(horizon, obs_cov=np.zeros((1, 1, horizon)))
        mean = np.asarray(forecast.predicted_mean) * scale + centre
        var = np.maximum(np.asarray(forecast.var_pred_mean) * scale**2, 0.0)
        params = {str(k): float(v) for k, v in zip(model.param_names, fitted.params, strict=True)}
        return Prediction(mean, var, params, float(fitted.llf))


def _vector(model: Any, at: Mapping[str, float]) -> np.ndarray:
    """`at` (parameters by name) as `model`'s parameter vector; refuses other names than the model's."""
    names = [str(n) for n in model.param_names]
    if sorted(names) != sorted(at):
        raise ValueError(f"parameters {sorted(at)} are not the model's {sorted(names)}")
    return np.array([float(at[n]) for n in names])


def _weighted_mean(values: np.ndarray, weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean of `values` along `axis` weighted by `weights` (zero where a value is missing), NaN where no value
    was released, and the variance weight of each mean (the sum of the weights)."""
    known = np.isfinite(values) & (weights > 0)
    w = np.where(known, weights, 0.0)
    total = w.sum(axis=axis)
    weighted = (np.where(known, values, 0.0) * w).sum(axis=axis)
    mean = np.divide(weighted, total, out=np.full(total.shape, np.nan), where=total > 0)
    return mean, total


def _lag_one(series: np.ndarray) -> tuple[float, float]:
    """The variance and lag-one autocovariance of `series` about its mean (missing entries skipped)."""
    centred = series - np.nanmean(series)
    both = np.isfinite(centred[1:]) & np.isfinite(centred[:-1])
    if not both.any():
        return float(np.nanvar(series)) if np.isfinite(series).any() else 0.0, 0.0
    return float(np.nanvar(series)), float(np.mean(centred[1:][both] * centred[:-1][both]))


class DailyProfile:
    """A slowly varying daily profile with decaying departures from it, every part weighted by the known noise.

    The history is cut into whole days ending at its latest cell. The profile's shape is the mean, over all of them,
    of each window's departure from its day's mean, each cell weighted by the inverse of its noise variance; its
    daily harmonics are shrunk toward zero by their known noise share (a harmonic no larger than its noise is
    dropped), so noisy releases give a smooth shape and exact ones keep its detail. The level is the mean of the
    daily means, each weighted by the inverse of its variance (the day-to-day spread plus its own noise). The
    latest day's departure from the level decays day by day with the lag-one autocorrelation of the daily means
    (weather persists for a day or two), and the latest cells' departure from their day's mean and the shape
    decays hour by hour with the lag-one autocorrelation of those departures; both autocorrelations have the
    noise's part taken out of their variance, and both departures are shrunk by their noise share. Without a daily
    cycle, each cell is a "day": the forecast decays from the latest cell toward the mean. No optimiser: a fit
    takes milliseconds. The variance is that of the true value about the forecast, from the same moments."""

    name = ModelName.PROFILE
    version = "1"
    optimised = False

    def fit_forecast(self, history: History, horizon: int) -> Prediction:
        period = history.period if history.period is not None and history.period > 1 else 1
        days = history.values.size // period
        cells = slice(history.values.size - days * period, None)
        values = history.values[cells].reshape(days, period)
        variances = history.variances[cells].reshape(days, period)
        weights = np.where(np.isfinite(variances) & (variances > 0), 1.0 / np.maximum(variances, 1e-300), 0.0)
        exact = np.isfinite(values) & np.isfinite(variances) & (variances <= 0)
        weights = np.where(exact, 1e12, weights)  # exact cells (test mode without noise): all but decisive
        daily, daily_weight = _weighted_mean(values, weights, axis=1)
        departure = values - daily[:, None]
        shape, shape_weight = _weighted_mean(departure, weights, axis=0)
        shape = np.where(np.isfinite(shape), shape, 0.0)
        kept = np.ones(period // 2 + 1)
        if period > 1:
            spectrum = np.fft.rfft(shape)
            shape_noise = float(np.mean(1.0 / np.maximum(shape_weight, 1e-300)))  # one window's noise in the shape
            power = np.maximum(np.abs(spectrum) ** 2, 1e-300)
            kept = np.clip(1.0 - period * shape_noise / power, 0.0, 1.0)
            kept[0] = 1.0
            shape = np.fft.irfft(spectrum * kept, period)
        # The level and its day-to-day persistence, from the daily means; each day's mean carries its cells' noise
        # (variance 1 / daily_weight), which the persistence and the weights allow for.
        known_days = np.isfinite(daily)
        daily_noise = 1.0 / np.maximum(daily_weight, 1e-300)
        daily_var, daily_cov = _lag_one(daily)
        day_signal = max(daily_var - float(np.mean(daily_noise[known_days])), 0.0)
        day_persistence = min(max(daily_cov / day_signal, 0.0), 0.99) if day_signal > 0 else 0.0
        level_weights = 1.0 / (day_signal + daily_noise[known_days])
        level = float(np.sum(level_weights * daily[known_days]) / np.sum(level_weights))
        last_day = int(np.flatnonzero(known_days)[-1])
        age = days - 1 - last_day  # whole days since the latest day with a released cell
        last_share = day_signal / (day_signal + daily_noise[last_day]) if day_signal > 0 else 0.0
        # The departure of each cell from its day's level and the shape, and its hour-to-hour persistence.
        anomaly = (departure - shape[None, :]).ravel()
        noise = history.noise_var()
        anomaly_var, anomaly_cov = _lag_one(anomaly)
        anomaly_signal = max(anomaly_var - noise, 0.0)
        hour_persistence = min(max(anomaly_cov / anomaly_signal, 0.0), 0.99) if anomaly_signal > 0 else 0.0
        recent = anomaly[-RECENT_CELLS:]
        seen = int(np.isfinite(recent).sum())
        latest = float(np.nanmean(recent)) if seen else 0.0
        latest_noise = noise / max(seen, 1)
        carried = anomaly_signal / (anomaly_signal + latest_noise) if seen and anomaly_signal > 0 else 0.0

        ahead = np.arange(1, horizon + 1)
        day_weight = day_persistence ** (age + ahead / period) * last_share
        hour_weight = hour_persistence**ahead * carried
        mean = level + day_weight * (daily[last_day] - level) + shape[(ahead - 1) % period] + hour_weight * latest
        # The variance is that of the whole history. It once followed the spread of the latest 7 days, but a
        # forecast's calibration already follows its latest days (a backtest of daily origins): adapting twice to
        # the same recent weather compounded both estimates' noise, and with the calibration a forecast issues,
        # 95% intervals covered the truth 0.905-0.922 in autumn (0.931-0.934 without; bench.forecast).
        signal_var = (
            np.maximum(day_signal - day_weight**2 * (day_signal + daily_noise[last_day]), 0.0)
            + np.maximum(anomaly_signal - hour_weight**2 * (anomaly_signal + latest_noise), 0.0)
            + noise / max(days, 1)  # the shape's own noise, about
        )
        params = {
            "days": float(days),
            "level": level,
            "day_persistence": day_persistence,
            "hour_persistence": hour_persistence,
            "harmonics_kept": float((kept[1:] > 0).sum()),
        }
        return Prediction(mean, signal_var, params)


MODELS: dict[ModelName, type[DailyProfile | SeasonalNaive | SameHourMean | ExponentialSmoothing | KnownNoiseUC]] = {
    ModelName.PROFILE: DailyProfile,
    ModelName.UC: KnownNoiseUC,
    ModelName.SEASONAL_NAIVE: SeasonalNaive,
    ModelName.SAME_HOUR_MEAN: SameHourMean,
    ModelName.ETS: ExponentialSmoothing,
}


def fit_forecast(
    model: ModelName, history: History, horizon: int, at: Mapping[str, float] | None = None
) -> Prediction:
    """Fit `model` to `history` and forecast `horizon` windows; refuses a history with fewer than two days (or,
    without a daily cycle, 48 windows) of released cells. `at`: for a model fitted by an optimiser (`optimised`),
    forecast at these parameters instead of fitting (replay evaluates a forecast's recorded parameters so); a
    closed-form model refuses it."""
    needed = FIT_PERIODS * (history.period or PERIOD_WITHOUT_CYCLE)
    if history.observed < needed:
        raise SeriesTooShort(
            f"{history.observed} released window(s) in the history; a forecast needs at least {needed} (two days)"
        )
    fitter = MODELS[model]()
    if at is None:
        return fitter.fit_forecast(history, horizon)
    if not isinstance(fitter, ExponentialSmoothing | KnownNoiseUC):
        raise ValueError(f"{model} is closed-form: it has no parameters to forecast at")
    return fitter.fit_forecast(history, horizon, at)


__all__ = ["MODELS", "History", "Prediction", "SeriesTooShort", "fit_forecast", "seasonal_naive_scale"]
