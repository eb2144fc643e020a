"""Forecasting models over one series of released cells, each cell's noise variance known.

Every model takes a `History` (values with NaN where a cell is missing or withheld, and each cell's noise variance)
and returns a `Prediction`: the forecast of the true value and its variance for each window ahead. The variance of
the next noisy release is that plus the noise of a future cell (`forecasting.intervals`). statsmodels is imported
inside the models that need it (it takes about a second), never at module import.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version

import numpy as np

from fusion.config.forecasting import ModelName
from fusion.errors import FusionError

#: Days the same-hour mean averages over.
SAME_HOUR_DAYS = 7
#: Harmonics of the daily cycle in the UC model (fewer if a day has fewer windows).
HARMONICS = 3


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
        """The typical noise variance of a cell: the median over the last 7 days' observed cells."""
        recent = self.variances[-(self.period or 24) * SAME_HOUR_DAYS :]
        recent = recent[np.isfinite(recent)]
        if recent.size == 0:
            recent = self.variances[np.isfinite(self.variances)]
        return float(np.median(recent)) if recent.size else 0.0


@dataclass(frozen=True)
class Prediction:
    """The forecast of the true value for `horizon` windows: `mean` and `signal_var` (variance of the true value
    about the mean), each of shape (horizon,), and the fitted parameters."""

    mean: np.ndarray
    signal_var: np.ndarray
    params: dict[str, float] = field(default_factory=dict)


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

    def fit_forecast(self, history: History, horizon: int) -> Prediction:
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
            fitted = model.fit(disp=False, maxiter=200)
            forecast = fitted.get_prediction(start=values.size, end=values.size + horizon - 1)
        mean = np.asarray(forecast.predicted_mean) * scale + centre
        var = np.asarray(forecast.var_pred_mean) * scale**2
        noise = history.noise_var()
        params = {str(k): float(v) for k, v in zip(fitted.param_names, fitted.params, strict=True)}
        return Prediction(mean, np.maximum(var - noise, var / 10), params)


class KnownNoiseUC:
    """Unobserved components: a random-walk level, `HARMONICS` stochastic daily harmonics and an AR(1) term, with
    no estimated irregular: each cell's observation variance is its known DP noise variance (time-varying).
    Missing cells are skipped by the Kalman filter. The forecast variance is of the true value (the future cells'
    observation variance is set to zero)."""

    name = ModelName.UC
    version = f"statsmodels-{version('statsmodels')}/1"

    def fit_forecast(self, history: History, horizon: int) -> Prediction:
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
            fitted = model.fit(disp=False)
            forecast = fitted.get_forecast(horizon, obs_cov=np.zeros((1, 1, horizon)))
        mean = np.asarray(forecast.predicted_mean) * scale + centre
        var = np.maximum(np.asarray(forecast.var_pred_mean) * scale**2, 0.0)
        params = {str(k): float(v) for k, v in zip(model.param_names, fitted.params, strict=True)}
        return Prediction(mean, var, params)


MODELS: dict[ModelName, type[SeasonalNaive | SameHourMean | ExponentialSmoothing | KnownNoiseUC]] = {
    ModelName.UC: KnownNoiseUC,
    ModelName.SEASONAL_NAIVE: SeasonalNaive,
    ModelName.SAME_HOUR_MEAN: SameHourMean,
    ModelName.ETS: ExponentialSmoothing,
}


def fit_forecast(model: ModelName, history: History, horizon: int) -> Prediction:
    """Fit `model` to `history` and forecast `horizon` windows; refuses a history with fewer than two days (or,
    without a daily cycle, 48 windows) of released cells."""
    needed = 2 * (history.period or 24)
    if history.observed < needed:
        raise SeriesTooShort(
            f"{history.observed} released window(s) in the history; a forecast needs at least {needed} (two days)"
        )
    return MODELS[model]().fit_forecast(history, horizon)


__all__ = ["MODELS", "History", "Prediction", "SeriesTooShort", "fit_forecast", "seasonal_naive_scale"]
