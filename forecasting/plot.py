"""A PNG of one series: its releases with their 95% intervals, and its latest forecast with the 80% and 95% bands
of the true value and the 95% band of the next release. The releases drawn are what the forecast predicts and is
scored against, read as it reads them (forecasting.series.released_points): each window's latest release of the
series' column (the mean's unclipped `ratio_mean`, not the clipped `mean`), with the band value +- 1.96 noise SD,
and where a release-signing key is registered only releases `fusion verify` calls verified or legacy (the others
are named in the title). Read through fusion.api; drawn with matplotlib's Agg renderer (no display needed),
imported only here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pyarrow as pa

from forecasting.series import SeriesKey, latest_release_end, quoted, released_points
from forecasting.trust import left_out, listed, with_status
from fusion.config.federation import Config
from fusion.config.forecasting import SERIES_COLUMNS, Statistic
from fusion.errors import FusionError
from fusion.store.access import open_store
from fusion.trust import unverified_releases


@dataclass(frozen=True)
class Plotted:
    """What `plot_series` draws of a series: its releases (window_start, value, sd, low, high), its latest
    forecast (`FusedStore.forecasts`), and the releases left out as not verified, with their status."""

    releases: pa.Table
    forecast: pa.Table
    skipped: dict[str, str]


def plotted(config: Config, metric: str, region: str, *, statistic: str = "mean", days: float = 7.0) -> Plotted:
    """The last `days` of releases of (metric, statistic, region), as its forecasts read them, and its latest
    forecast."""
    if statistic not in {str(s) for s in Statistic}:
        raise FusionError(f"statistic '{statistic}' is not one of {sorted(str(s) for s in Statistic)}")
    unverified = unverified_releases(config)  # what forecasts leave out (forecasting.run)
    with open_store(config) as store:
        forecast = store.forecasts(metric, region, statistic=statistic)
        end = latest_release_end(store, f"metric = {quoted(metric)} AND region = {quoted(region)}", unverified or ())
        if end is None:
            left = f" (releases not verified, left out: {listed(unverified)})" if unverified else ""
            raise FusionError(f"nothing released yet for {metric} in {region}{left}: nothing to plot")
        releases, skipped = released_points(store, SeriesKey(metric, Statistic(statistic), region),
                                            since=end - timedelta(days=days), unverified=unverified or ())
    return Plotted(releases, forecast, with_status(skipped, unverified))


def plot_series(
    config: Config, metric: str, region: str, path: Path, *, statistic: str = "mean", days: float = 7.0
) -> Path:
    """Draw the last `days` of releases of (metric, statistic, region) and its latest forecast to `path`."""
    shown = plotted(config, metric, region, statistic=statistic, days=days)
    releases, forecast = shown.releases, shown.forecast
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
    title = f"{metric} ({statistic}) in {region}: releases and forecast"
    ax.set_title(title + (f"\n{left_out(shown.skipped, most=3)}" if shown.skipped else ""))
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


__all__ = ["Plotted", "plot_series", "plotted"]
