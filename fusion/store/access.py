"""Read access to a federation's store through the sandboxed SQL surface (`FusedStore`, `open_store`),
and the derived tables that modules reading the store may write (`write_derived`). fusion.api
re-exports them: this is the Python API's read surface, on the store's floor."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from fusion.config.federation import Config, load_config
from fusion.config.sql_limits import SqlLimits
from fusion.errors import FusionError
from fusion.store.delta import DataFile, Store
from fusion.store.sql import SqlSandbox


def _config(config: Config | str | Path, *, check_release: bool = True) -> Config:
    return config if isinstance(config, Config) else load_config(config, check_release=check_release)


class FusedStore:
    """Read access to a federation's common-knowledge store through the sandboxed SQL surface, each query under
    `limits` (default: the config's [sql] block)."""

    def __init__(
        self,
        config: Config | str | Path,
        *,
        versions: Mapping[str, int | None] | None = None,
        limits: SqlLimits | None = None,
    ) -> None:
        self.config = _config(config, check_release=False)  # reading needs no noise calibration
        self.store = Store(self.config.store_path)  # read only: a table not created yet reads as empty
        self._sandbox = SqlSandbox(self.store, versions=versions, limits=limits or self.config.sql)

    @property
    def versions(self) -> dict[str, int | None]:
        """The Delta version of each table this store reads (None: a table not created yet, read as empty). Pass
        them back as `open_store(..., versions=...)` to read the same snapshot again (a None too: that table is read
        as empty, whatever was written to it since)."""
        return dict(self._sandbox.snapshot)

    def data_files(self, table: str) -> tuple[DataFile, ...]:
        """The data files of `table` at the version this store reads, each (path, size in bytes, modification time
        in ns) as found now; none for a table not created yet. A file rewritten in place, without a Delta commit,
        changes these but not the version: a reader that keeps what it computed per version (the dashboard) keys
        it on them too."""
        self.store.table_path(table)  # refuses a table the store does not have
        version = self.versions.get(table)
        return () if version is None else self.store.data_files(table, version=version)

    @property
    def limits(self) -> SqlLimits:
        """The limits each query of this store runs under."""
        return self._sandbox.limits

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
    config: Config | str | Path, *, versions: Mapping[str, int | None] | None = None, limits: SqlLimits | None = None
) -> FusedStore:
    """Open the store of a federation config for SQL (optionally at given Delta versions per table, None for a
    table read as empty, as `FusedStore.versions` gives them; and under other limits than the config's [sql] block)."""
    return FusedStore(config, versions=versions, limits=limits)


#: The tables that modules reading the store may write their results to: post-processing of the releases, which
#: spends no budget. forecasting/ writes DERIVED_TABLES, mechanisms/ DECISION_TABLES (its recommendations and the
#: institutions' signed decisions on them). Every other table is written only by Fusion's own roles.
DERIVED_TABLES = frozenset({"forecasts", "forecast_scores"})
DECISION_TABLES = frozenset({"recommendations", "decisions"})


def write_derived(config: Config | str | Path, table: str, rows: pa.Table) -> int:
    """Append rows to a table of DERIVED_TABLES or DECISION_TABLES whose key is not there yet; returns how many
    were added (one commit). Refuses any other table."""
    if table not in DERIVED_TABLES | DECISION_TABLES:
        raise FusionError(f"'{table}' is not a derived table; modules that read the store write only to "
                          f"{sorted(DERIVED_TABLES | DECISION_TABLES)}")
    cfg = _config(config, check_release=False)
    return Store(cfg.store_path).insert_new(table, rows)
