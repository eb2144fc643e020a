"""The Python API: open a federation's store and query it, or run a batch release."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from fusion.config import Config, load_config
from fusion.plan import parse_time, plan_release
from fusion.sql import SqlSandbox
from fusion.store import Store


def _config(config: Config | str | Path) -> Config:
    return config if isinstance(config, Config) else load_config(config)


class FusedStore:
    """Read access to a federation's common-knowledge store through the sandboxed SQL surface."""

    def __init__(self, config: Config | str | Path, *, versions: dict[str, int] | None = None) -> None:
        self.config = _config(config)
        self.store = Store(self.config.store_path)  # read only: a table not created yet reads as empty
        self._sandbox = SqlSandbox(self.store, versions=versions)

    def sql(self, query: str) -> pa.Table:
        """Run one SELECT over the store's tables; returns an Arrow table."""
        return self._sandbox.query(query)

    def sql_pandas(self, query: str) -> Any:
        """The same result as a pandas DataFrame."""
        return self.sql(query).to_pandas()

    def close(self) -> None:
        self._sandbox.close()

    def __enter__(self) -> FusedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(config: Config | str | Path, *, versions: dict[str, int] | None = None) -> FusedStore:
    """Open the store of a federation config for SQL (optionally at given Delta versions per table)."""
    return FusedStore(config, versions=versions)


def batch(
    config: Config | str | Path, start: str | datetime, end: str | datetime, *, beam_args: Sequence[str] = ()
) -> Any:
    """Run every role for [start, end) on this machine; returns a BatchSummary."""
    from pipelines.batch import run_batch

    cfg = _config(config)
    begin = parse_time(start) if isinstance(start, str) else start
    finish = parse_time(end) if isinstance(end, str) else end
    return run_batch(plan_release(cfg, begin, finish), beam_args=beam_args)
