"""The Python API: open a federation's store and query it, or run a batch release."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from fusion.config import Config, load_config
from fusion.sql import SqlSandbox
from fusion.sql_limits import SqlLimits
from fusion.store import Store


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


def batch(
    config: Config | str | Path, start: str | datetime, end: str | datetime, *, beam_args: Sequence[str] = ()
) -> Any:
    """Run every role for [start, end) on this machine; returns a BatchSummary."""
    from fusion.plan import parse_time, plan_release
    from pipelines.batch import run_batch

    cfg = _config(config)
    begin = parse_time(start) if isinstance(start, str) else start
    finish = parse_time(end) if isinstance(end, str) else end
    return run_batch(plan_release(cfg, begin, finish), beam_args=beam_args)
