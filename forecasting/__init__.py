"""Noise-aware forecasts of the store's released series, written back to its `forecasts` and `forecast_scores`
tables. Reads only through fusion.api (the sandboxed SQL surface), never feeds, envelopes or keys; spends no
privacy budget (post-processing of the releases). statsmodels and matplotlib are imported only when a model is
fitted or a plot drawn.

- `run_forecasts`, `run_backtests` (forecasting.run): `fusion forecast` and `fusion backtest`
- `refresh_forecasts` (forecasting.refresh): the refresh after scheduled and stream releases
- `plot_series` (forecasting.plot): a PNG of a series' releases and its latest forecast
- `ForecastReplay` (forecasting.replay): a stored forecast computed again from the releases it names and compared,
  the check its unsigned rows get where the mechanisms read them
- `fit_forecast`, `History`, `Prediction` (forecasting.models): the models over NumPy arrays
- `Calibration`, `calibration_factor` (forecasting.intervals); the modules `forecasting.intervals` and
  `forecasting.backtest` hold the interval and backtest functions of the same names
"""

from __future__ import annotations

from forecasting.intervals import Calibration, calibration_factor
from forecasting.models import History, Prediction, SeriesTooShort, fit_forecast
from forecasting.plot import plot_series
from forecasting.refresh import refresh_forecasts
from forecasting.replay import ForecastReplay
from forecasting.run import ForecastRun, run_backtests, run_forecasts

__all__ = [
    "Calibration",
    "ForecastReplay",
    "ForecastRun",
    "History",
    "Prediction",
    "SeriesTooShort",
    "calibration_factor",
    "fit_forecast",
    "plot_series",
    "refresh_forecasts",
    "run_backtests",
    "run_forecasts",
]
