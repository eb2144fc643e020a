"""The Python API: open a federation's store and query it, or run a batch release."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from fusion.config.federation import Config, load_config
from fusion.config.sql_limits import SqlLimits
from fusion.errors import FusionError
from fusion.store.delta import Store
from fusion.store.sql import SqlSandbox


def _config(config: Config | str | Path, *, check_release: bool = True) -> Config:
    return config if isinstance(config, Config) else load_config(config, check_release=check_release)


class FusedStore:
    """Read access to a federation's common-knowledge store through the sandboxed SQL surface, each query under
    `limits` (default: the config's [sql] block)."""

    def __init__(
        self, config: Config | str | Path, *, versions: dict[str, int] | None = None, limits: SqlLimits | None = None
    ) -> None:
        self.config = _config(config, check_release=False)  # reading needs no noise calibration
        self.store = Store(self.config.store_path)  # read only: a table not created yet reads as empty
        self._sandbox = SqlSandbox(self.store, versions=versions, limits=limits or self.config.sql)

    @property
    def versions(self) -> dict[str, int | None]:
        """The Delta version of each table this store reads (None: a table not created yet, read as empty). Pass
        the numbers back as `open_store(..., versions=...)` to read the same snapshot again."""
        return dict(self._sandbox.snapshot)

    def sql(self, query: str) -> pa.Table:
        """Run one query over the store's tables; returns an Arrow table (SqlLimitExceeded past a limit)."""
        return self._sandbox.query(query)

    @contextmanager
    def sql_batches(self, query: str) -> Iterator[pa.RecordBatchReader]:
        """The same result batch by batch, as DuckDB produces it, for results too large to hold: read it inside
        the `with` block, where the limits hold."""
        with self._sandbox.stream(query) as reader:
            yield reader

    def sql_pandas(self, query: str) -> Any:
        """The same result as a pandas DataFrame."""
        return self.sql(query).to_pandas()

    def forecasts(
        self,
        metric: str | None = None,
        region: str | None = None,
        *,
        statistic: str | None = "mean",
        purpose: str = "forecast",
        latest: bool = True,
    ) -> pa.Table:
        """Rows of `forecasts` (schemas/tables.py), ordered by metric, statistic, region and window: those of one
        metric, region or statistic (None: all); with `latest`, only each series' most recently issued forecast.
        `purpose` "backtest" reads the backtests' forecasts instead."""
        from fusion.store.forecast_queries import forecasts_query
        from schemas.tables import FORECASTS_SCHEMA

        rows = self.sql(forecasts_query(metric=metric, region=region, statistic=statistic, purpose=purpose,
                                        latest=latest))
        return rows.cast(FORECASTS_SCHEMA)  # the table's own types (DuckDB names list items differently)

    def forecasts_pandas(self, metric: str | None = None, region: str | None = None, **options: Any) -> Any:
        """The same as `forecasts`, as a pandas DataFrame."""
        return self.forecasts(metric, region, **options).to_pandas()

    def close(self) -> None:
        self._sandbox.close()

    def __enter__(self) -> FusedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(
    config: Config | str | Path, *, versions: dict[str, int] | None = None, limits: SqlLimits | None = None
) -> FusedStore:
    """Open the store of a federation config for SQL (optionally at given Delta versions per table, and under
    other limits than the config's [sql] block)."""
    return FusedStore(config, versions=versions, limits=limits)


#: The tables that modules reading the store (forecasting/) may write their results to: post-processing of the
#: releases, which spends no budget. Every other table is written only by Fusion's own roles.
DERIVED_TABLES = frozenset({"forecasts", "forecast_scores"})


def write_derived(config: Config | str | Path, table: str, rows: pa.Table) -> int:
    """Append rows to a derived table (DERIVED_TABLES) whose key is not there yet; returns how many were added.
    Refuses any other table."""
    if table not in DERIVED_TABLES:
        raise FusionError(f"'{table}' is not a derived table; modules that read the store write only to "
                          f"{sorted(DERIVED_TABLES)}")
    cfg = _config(config, check_release=False)
    return Store(cfg.store_path).insert_new(table, rows)


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


def verify(config: Config | str | Path, *, release_id: str | None = None, seen: int = 0) -> list[Any]:
    """What `fusion verify` reports on the releases: each (or `release_id`) checked against the key holder's
    registered signing keys, a list of fusion.store.provenance.ReleaseCheck. Reads the store and the registry only;
    refused when no key holder signing key is registered (nothing can be verified)."""
    from fusion.keys.registry import load_key_holder_public_keys, load_unsigned_releases
    from fusion.store.provenance import verify_releases

    cfg = _config(config, check_release=False)
    keys = load_key_holder_public_keys(cfg)
    if not keys:
        raise FusionError(f"no key holder signing key is registered in {cfg.registry_path}: nothing can be verified "
                          "(the key holder's `fusion keys --release-signing` registers one)")
    return verify_releases(Store(cfg.store_path), keys, unsigned=load_unsigned_releases(cfg), release_id=release_id,
                           seen=seen)


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
