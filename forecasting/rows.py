"""Rows of the `forecasts` and `forecast_scores` tables (schemas/tables.py) from forecasts and the releases that
score them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from forecasting.intervals import Intervals
from forecasting.series import Series, SeriesKey
from fusion.config.forecasting import ModelName
from schemas.tables import FORECAST_SCORES_SCHEMA, FORECASTS_SCHEMA


class Purpose:
    FORECAST = "forecast"  # `fusion forecast`, and the refresh after a release
    BACKTEST = "backtest"  # `fusion backtest`: one per rolling origin and model


@dataclass(frozen=True)
class IssuedForecast:
    """One model's forecast of one series from `origin` (an index into the series: the first window forecast)."""

    series: Series
    purpose: str
    model: ModelName
    model_version: str
    params: dict[str, Any]
    origin: int
    bands: Intervals
    factor: float
    mase_scale: float | None
    input_release_ids: list[str]

    @property
    def forecast_id(self) -> str:
        """Names the forecast by what determines it, so issuing it again (nothing new released) adds nothing: the
        series, model, origin and horizon, the releases read, and `params` (the history's length in windows, the
        fitted parameters, the calibration's shape): a forecast fitted on a shorter history of the same releases,
        or calibrated otherwise, is another forecast."""
        return forecast_id_of(self.purpose, str(self.model), self.model_version, self.series.key,
                              self.series.window(self.origin), int(self.bands.mean.size), self.input_release_ids,
                              self.factor, self.params)


def forecast_id_of(purpose: str, model: str, model_version: str, key: SeriesKey, origin: datetime, horizon: int,
                   input_release_ids: list[str], factor: float, params: dict[str, Any]) -> str:
    """The forecast_id of a forecast so determined (IssuedForecast.forecast_id); forecasting.replay recomputes it
    from what a forecast's rows record."""
    text = json.dumps([purpose, model, model_version, key.metric, str(key.statistic), key.region, origin.isoformat(),
                       horizon, input_release_ids, round(factor, 12), params], sort_keys=True)
    return "f-" + hashlib.sha256(text.encode()).hexdigest()[:24]


def forecast_rows(forecast: IssuedForecast, issued_at: datetime) -> pa.Table:
    """The forecast's rows, one per window ahead."""
    series, bands = forecast.series, forecast.bands
    h = bands.mean.size
    starts = [series.window(forecast.origin + i) for i in range(h)]
    columns: dict[str, Any] = {
        "forecast_id": [forecast.forecast_id] * h,
        "purpose": [forecast.purpose] * h,
        "model": [str(forecast.model)] * h,
        "model_version": [forecast.model_version] * h,
        "params": [json.dumps(forecast.params, sort_keys=True)] * h,
        "metric": [series.key.metric] * h,
        "statistic": [str(series.key.statistic)] * h,
        "unit": [series.unit] * h,
        "region": [series.key.region] * h,
        "issued_at": [issued_at] * h,
        "origin": [series.window(forecast.origin)] * h,
        "window_start": starts,
        "window_end": [s + series.step for s in starts],
        "horizon": np.arange(1, h + 1, dtype=np.int32),
        "mean": bands.mean,
        "sd": bands.sd,
        "ci80_low": bands.ci80[0],
        "ci80_high": bands.ci80[1],
        "ci95_low": bands.ci95[0],
        "ci95_high": bands.ci95[1],
        "noise_sd": bands.noise_sd,
        "release_sd": bands.release_sd,
        "release_ci80_low": bands.release_ci80[0],
        "release_ci80_high": bands.release_ci80[1],
        "release_ci95_low": bands.release_ci95[0],
        "release_ci95_high": bands.release_ci95[1],
        "calibration_factor": [forecast.factor] * h,
        "mase_scale": [forecast.mase_scale] * h,
        "releases_version": [series.releases_version] * h,
        "input_release_ids": [forecast.input_release_ids] * h,
    }
    return pa.table(columns, schema=FORECASTS_SCHEMA)


def score_rows(forecasts: pa.Table, series: Series, scored_at: datetime) -> pa.Table:
    """Scores of the `forecasts` rows (columns of FORECASTS_SCHEMA) whose windows `series` holds a release of:
    the released value (NULL where withheld), error, z against the release SD, and the release intervals' hits."""
    rows: dict[str, list[Any]] = {name: [] for name in FORECAST_SCORES_SCHEMA.names}
    for row in forecasts.to_pylist():
        i = series.index(row["window_start"])
        if not 0 <= i < series.values.size or series.release_ids[i] is None:
            continue  # not released yet: scored later
        value = float(series.values[i]) if np.isfinite(series.values[i]) else None
        error = None if value is None else value - row["mean"]
        rows["forecast_id"].append(row["forecast_id"])
        rows["window_start"].append(row["window_start"])
        for name in ("purpose", "model", "metric", "statistic", "region", "origin", "horizon"):
            rows[name].append(row[name])
        rows["release_id"].append(series.release_ids[i])
        rows["value"].append(value)
        rows["noise_sd"].append(float(np.sqrt(series.variances[i])) if value is not None else None)
        rows["error"].append(error)
        scale = row["mase_scale"]
        rows["scaled_error"].append(abs(error) / scale if error is not None and scale else None)
        rows["z"].append(error / row["release_sd"] if error is not None and row["release_sd"] > 0 else None)
        rows["covered80"].append(
            None if value is None else bool(row["release_ci80_low"] <= value <= row["release_ci80_high"]))
        rows["covered95"].append(
            None if value is None else bool(row["release_ci95_low"] <= value <= row["release_ci95_high"]))
        rows["scored_at"].append(scored_at)
        rows["releases_version"].append(series.releases_version)
    return pa.table(rows, schema=FORECAST_SCORES_SCHEMA)


__all__ = ["IssuedForecast", "Purpose", "forecast_id_of", "forecast_rows", "score_rows"]
