"""The Forecasts view: one series' recent releases with their 95% intervals (read as its forecasts read them,
forecasting.series.released_points: where a release-signing key is registered, only releases `fusion verify` calls
verified or legacy), its latest forecast (forecasting/, the `forecasts` table) with the 95% bands of the true value
and of the next noisy release, and the scores of the forecasts and backtests once their windows were released
(`forecast_scores`)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from dashboard import params
from dashboard.formatting import finite
from dashboard.provenance import unverified
from dashboard.snapshot import Snapshot
from forecasting.series import SeriesKey, released_points
from forecasting.trust import left_out, with_status
from fusion.config.forecasting import MAX_HORIZON_WINDOWS, Statistic

#: The statistics forecast (fusion/store/forecast_queries.py).
STATISTICS = ("mean", "sum", "count")
#: The chart's series, in legend order.
SERIES = ("released", "forecast: true value", "forecast: next release")
#: Released history shown before the forecast's origin.
HISTORY_DAYS = 7


class ForecastWindow(BaseModel):
    window_start: datetime
    window_end: datetime
    horizon: int
    mean: float
    sd: float  # of the true value
    ci80_low: float
    ci80_high: float
    ci95_low: float
    ci95_high: float
    noise_sd: float  # the expected noise of a future release
    release_sd: float  # the next release's spread: the true value's and the noise
    release_ci95_low: float
    release_ci95_high: float


class ReleasedPoint(BaseModel):
    """A window's latest release of what the series forecasts and is scored against: the mean's unclipped
    `ratio_mean` with `mean_sd` (not the clipped `mean`), or the sum or count with their sd; low and high are
    value -+ 1.96 sd."""

    window_start: datetime
    value: float
    sd: float | None
    low: float | None
    high: float | None


class Score(BaseModel):
    """The forecast windows of one purpose and model scored against their releases."""

    purpose: str  # forecast | backtest
    model: str
    windows: int
    mae: float | None  # mean absolute error, the statistic's unit
    mase: float | None  # mean absolute scaled error (1: as good as the seasonal naive forecast)
    mean_z: float | None  # mean of error / release sd (0: unbiased)
    coverage80: float | None  # share of released values inside the 80% / 95% release intervals
    coverage95: float | None


class ForecastsView(BaseModel):
    metric: str | None
    region: str | None
    statistic: str
    unit: str | None
    metrics: list[str]
    regions: list[str]  # those forecast for the metric
    statistics: list[str]  # those forecast for the metric and region
    forecast_id: str | None
    model: str | None
    model_version: str | None
    issued_at: datetime | None
    origin: datetime | None
    calibration_factor: float | None
    windows: list[ForecastWindow]
    released: list[ReleasedPoint]  # the series' releases from HISTORY_DAYS before the origin
    scores: list[Score]  # this series'
    note: str | None = None
    skipped_releases: dict[str, str] = {}  # releases of `released`'s span left out as not verified: their status
    left_out: str | None = None  # what the page says of them, as `fusion forecast` says it


def forecast_choices(snapshot: Snapshot) -> dict[str, dict[str, dict[str, str]]]:
    """metric -> region -> statistic -> unit, of the series forecast (once per version of `forecasts`)."""

    def compute(shot: Snapshot) -> dict[str, dict[str, dict[str, str]]]:
        choices: dict[str, dict[str, dict[str, str]]] = {}
        for row in shot.rows("SELECT DISTINCT metric, region, statistic, unit FROM forecasts "
                                 "WHERE purpose = 'forecast' ORDER BY ALL"):
            choices.setdefault(row["metric"], {}).setdefault(row["region"], {})[row["statistic"]] = row["unit"]
        return choices

    return snapshot.cached("forecast series", ["forecasts"], compute)


def forecasts_view(snapshot: Snapshot, *, metric: str | None = None, region: str | None = None,
                   statistic: str | None = None) -> ForecastsView:
    choices = forecast_choices(snapshot)
    metrics = sorted(choices)
    chosen_metric = params.choice("metric", metric, metrics, default=metrics[0] if metrics else None)
    regions = sorted(choices.get(chosen_metric or "", {}))
    chosen_region = params.choice("region", region, regions, default=regions[0] if regions else None)
    offered = [s for s in STATISTICS if s in choices.get(chosen_metric or "", {}).get(chosen_region or "", {})]
    chosen_stat = params.choice("statistic", statistic, offered, default="mean" if "mean" in offered else
                                (offered[0] if offered else None))
    view = ForecastsView(
        metric=chosen_metric, region=chosen_region, statistic=chosen_stat or "mean", unit=None, metrics=metrics,
        regions=regions, statistics=offered, forecast_id=None, model=None, model_version=None, issued_at=None,
        origin=None, calibration_factor=None, windows=[], released=[], scores=[],
        note=None if metrics else "no forecasts yet: `fusion forecast --config <federation.toml>` forecasts every "
        "released series (and `fusion backtest` scores the models on the released history)",
    )
    if chosen_metric is None or chosen_region is None or chosen_stat is None:
        return view
    rows = _latest(snapshot, chosen_metric, chosen_region, chosen_stat)
    first = rows[0]
    windows = [ForecastWindow(**{k: r[k] for k in ForecastWindow.model_fields}) for r in rows]
    untrusted = unverified(snapshot)
    points, skipped = released_points(snapshot.store, SeriesKey(chosen_metric, Statistic(chosen_stat), chosen_region),
                                      since=first["origin"] - timedelta(days=HISTORY_DAYS),
                                      until=max(w.window_end for w in windows), unverified=untrusted or ())
    skipped_releases = with_status(skipped, untrusted)
    return view.model_copy(update={
        "unit": first["unit"], "forecast_id": first["forecast_id"], "model": first["model"],
        "model_version": first["model_version"], "issued_at": first["issued_at"], "origin": first["origin"],
        "calibration_factor": first["calibration_factor"], "windows": windows,
        "released": [ReleasedPoint(**row) for row in points.to_pylist()],
        "scores": _scores(snapshot, chosen_metric, chosen_region, chosen_stat),
        "skipped_releases": skipped_releases, "left_out": left_out(skipped_releases) if skipped_releases else None,
    })


#: The columns of the latest forecast the view shows: its header and each window's bands (not the releases it read).
SHOWN = ("forecast_id", "unit", "model", "model_version", "issued_at", "origin", "calibration_factor",
         *ForecastWindow.model_fields)


def _latest(snapshot: Snapshot, metric: str, region: str, statistic: str) -> list[dict[str, Any]]:
    """The series' latest forecast, its first MAX_HORIZON_WINDOWS windows: no forecast reaches further now, and
    a longer one issued before that bound (the store keeps it) must not stall the page."""
    series = (f"purpose = 'forecast' AND metric = {params.sql_text(metric)} AND region = {params.sql_text(region)} "
              f"AND statistic = {params.sql_text(statistic)}")
    return snapshot.rows(  # the latest issue's windows (its latest origin), found by a top-1 rather than a ranking
        f"SELECT {', '.join(SHOWN)} FROM forecasts WHERE {series} AND (issued_at, origin) = (SELECT (issued_at, "
        f"origin) FROM forecasts WHERE {series} ORDER BY issued_at DESC, origin DESC LIMIT 1) "
        f"ORDER BY window_start LIMIT {MAX_HORIZON_WINDOWS}"
    )


def _scores(snapshot: Snapshot, metric: str, region: str, statistic: str) -> list[Score]:
    rows = snapshot.rows(
        "SELECT purpose, model, count(value) AS windows, avg(abs(error)) AS mae, avg(abs(scaled_error)) AS mase, "
        "avg(z) AS mean_z, avg(covered80::DOUBLE) AS coverage80, avg(covered95::DOUBLE) AS coverage95 "
        f"FROM forecast_scores WHERE metric = {params.sql_text(metric)} AND region = {params.sql_text(region)} "
        f"AND statistic = {params.sql_text(statistic)} GROUP BY purpose, model ORDER BY purpose DESC, mase NULLS LAST"
    )
    return [Score(**row) for row in rows]


def chart_points(view: ForecastsView) -> list[dict[str, Any]]:
    """Released values with their 95% intervals; the forecast's mean with the 95% band of the true value, and
    again with the wider 95% band of the next release."""
    points: list[dict[str, Any]] = [
        {"series": SERIES[0], "t": _ms(p.window_start), "value": finite(p.value), "sd": finite(p.sd),
         "low": finite(p.low), "high": finite(p.high)}
        for p in view.released
    ]
    for w in view.windows:
        points.append({"series": SERIES[1], "t": _ms(w.window_start), "value": finite(w.mean),
                       "sd": finite(w.sd), "low": finite(w.ci95_low), "high": finite(w.ci95_high)})
        points.append({"series": SERIES[2], "t": _ms(w.window_start), "value": finite(w.mean),
                       "sd": finite(w.release_sd), "low": finite(w.release_ci95_low),
                       "high": finite(w.release_ci95_high)})
    return points


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)
