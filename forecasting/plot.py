"""A PNG of one series: its releases with their 95% intervals, and its latest forecast with the 80% and 95% bands
of the true value and the 95% band of the next release. The releases drawn are what the forecast predicts and is
scored against: each window's latest release of the series' column (the mean's unclipped `ratio_mean`, not the
clipped `mean`), with the band value +- 1.96 noise SD. Read through fusion.api; drawn with matplotlib's Agg
renderer (no display needed), imported only here."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa

from forecasting.intervals import Z95
from forecasting.series import quoted
from fusion.config.federation import Config
from fusion.config.forecasting import SERIES_COLUMNS, Statistic
from fusion.errors import FusionError
from fusion.store.access import FusedStore, open_store


def released(store: FusedStore, metric: str, region: str, statistic: Statistic, since: datetime) -> pa.Table:
    """Each window's latest release of the series from `since`, as forecast and scored (forecasting.series):
    window_start, value and sd (SERIES_COLUMNS), low and high (value -+ Z95 sd); a window whose latest release
    withheld the value is left out."""
    value, sd = SERIES_COLUMNS[statistic]
    return store.sql(
        f"SELECT window_start, value, sd, value - {Z95!r} * sd AS low, value + {Z95!r} * sd AS high FROM ("
        f"SELECT window_start, {value} AS value, {sd} AS sd FROM releases WHERE metric = {quoted(metric)} "
        f"AND region = {quoted(region)} AND window_start >= TIMESTAMPTZ '{since.isoformat()}' "
        "QUALIFY row_number() OVER (PARTITION BY window_start ORDER BY released_at DESC, release_id DESC) = 1) "
        "WHERE value IS NOT NULL ORDER BY window_start"
    )


def plot_series(
    config: Config, metric: str, region: str, path: Path, *, statistic: str = "mean", days: float = 7.0
) -> Path:
    """Draw the last `days` of releases of (metric, statistic, region) and its latest forecast to `path`."""
    if statistic not in {str(s) for s in Statistic}:
        raise FusionError(f"statistic '{statistic}' is not one of {sorted(str(s) for s in Statistic)}")
    with open_store(config) as store:
        forecast = store.forecasts(metric, region, statistic=statistic)
        series = f"metric = {quoted(metric)} AND region = {quoted(region)}"
        end = store.sql(f"SELECT max(window_end) AS t FROM releases WHERE {series}").column("t")[0].as_py()
        if end is None:
            raise FusionError(f"nothing released yet for {metric} in {region}: nothing to plot")
        releases = released(store, metric, region, Statistic(statistic), end - timedelta(days=days))
    value = SERIES_COLUMNS[Statistic(statistic)][0]
    from matplotlib.figure import Figure  # without pyplot: no global backend or figure state

    fig = Figure(figsize=(11, 4.5), dpi=110)
    ax = fig.subplots()
    r = releases.to_pydict()
    ax.fill_between(r["window_start"], _floats(r["low"]), _floats(r["high"]), color="0.87", step="mid",
                    label="release 95% interval (1.96 noise SD)")
    ax.plot(r["window_start"], _floats(r["value"]), ".", color="0.2", markersize=3, label=f"released {value}")
    unit = ""
    if forecast.num_rows:
        f = forecast.to_pydict()
        unit = f["unit"][0]
        t = f["window_start"]
        # Opaque, nested bands: each reads as its own colour.
        ax.fill_between(t, f["release_ci95_low"], f["release_ci95_high"], color="#fdd0a2", label="next release, 95%")
        ax.fill_between(t, f["ci95_low"], f["ci95_high"], color="#9ecae1", label="true value, 95%")
        ax.fill_between(t, f["ci80_low"], f["ci80_high"], color="#6baed6", label="true value, 80%")
        ax.plot(t, f["mean"], color="#08519c", linewidth=1.5,
                label=f"forecast ({f['model'][0]}, x{f['calibration_factor'][0]:.2f})")
        ax.axvline(f["origin"][0], color="0.4", linestyle=":", linewidth=1)
    ax.set_title(f"{metric} ({statistic}) in {region}: releases and forecast")
    ax.set_ylabel(unit or metric)
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")  # matplotlib's Agg renderer
    return path


def _floats(values: list[float | None]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


__all__ = ["plot_series", "released"]
