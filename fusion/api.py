"""The Python API: open a federation's store and query it, or run a batch release."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fusion.config.federation import Config

# Downstream modules keep their own sections of the federation's registry (a mechanism's authorities and their
# signing keys) and their own private files through these, never the institutions' keys.
from fusion.keys.registry import load_mechanism_sections, read_private, write_mechanism_sections, write_private
from fusion.store.access import (
    DECISION_TABLES,
    DERIVED_TABLES,
    DataFile,
    FusedStore,
    _config,
    open_store,
    write_derived,
)

# What `fusion verify` reports, and the releases it does not call verified or legacy (fusion/trust.py).
from fusion.trust import unverified_releases, verify

__all__ = [
    "DECISION_TABLES",
    "DERIVED_TABLES",
    "DataFile",
    "FusedStore",
    "batch",
    "forecast",
    "load_mechanism_sections",
    "open_store",
    "plot_forecast",
    "read_private",
    "unverified_releases",
    "verify",
    "write_derived",
    "write_mechanism_sections",
    "write_private",
]


def forecast(
    config: Config | str | Path,
    *,
    metrics: Sequence[str] | None = None,
    regions: Sequence[str] | None = None,
    statistics: Sequence[str] | None = None,
    horizon: str | None = None,
) -> Any:
    """Forecast every released series (or those of `metrics`, `regions` and `statistics`: mean, sum, count) and
    write the forecasts to the store; returns a forecasting.run.ForecastRun."""
    from forecasting.run import run_forecasts
    from fusion.config.forecasting import Statistic

    return run_forecasts(_config(config, check_release=False), metrics=metrics, regions=regions, horizon=horizon,
                         statistics=[Statistic(s) for s in statistics] if statistics else None)


def plot_forecast(config: Config | str | Path, metric: str, region: str, path: str | Path, **options: Any) -> Path:
    """Draw a series' releases with their 95% intervals, and its latest forecast with 80/95% bands of the true
    value and the 95% band of the next release, to a PNG at `path`; returns the path."""
    from forecasting.plot import plot_series

    return plot_series(_config(config, check_release=False), metric, region, Path(path), **options)


def batch(
    config: Config | str | Path, start: str | datetime, end: str | datetime, *, beam_args: Sequence[str] = ()
) -> Any:
    """Run every role for [start, end) on this machine; returns a BatchSummary."""
    from fusion.release.plan import parse_time, plan_release
    from pipelines.batch import run_batch

    cfg = _config(config)
    begin = parse_time(start) if isinstance(start, str) else start
    finish = parse_time(end) if isinstance(end, str) else end
    return run_batch(plan_release(cfg, begin, finish), beam_args=beam_args)
