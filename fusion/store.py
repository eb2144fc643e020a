"""The common-knowledge store: versioned, append-only Delta Lake tables under one directory.

Writes are conditional merges on each table's key, so re-running a release never duplicates a row and two
writers racing for the same release cannot both insert it (Delta's optimistic concurrency refuses one).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from fusion.errors import FusionError, InternalError
from schemas.tables import TABLE_SCHEMAS

_COMMIT_ATTEMPTS = 20

#: The columns that identify a row of each table (merge keys).
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "releases": ("release_id", "metric", "region", "window_start"),
    "audit": ("event_id",),
    "rejects": ("release_id", "institution", "reason"),
    "budget": ("period",),
    "runs": ("run_id",),
}


class Store:
    """Opens (creating on first use) the store's tables at `path`: a local directory or an object-store URL
    that deltalake understands (s3://, gs://, az://; credentials from the environment)."""

    def __init__(self, path: str | Path) -> None:
        self.uri = str(path).rstrip("/") if "://" in str(path) else None
        self.path = Path(path) if self.uri is None else Path(str(path).split("://", 1)[1])

    def table_path(self, name: str) -> str:
        if name not in TABLE_SCHEMAS:
            raise FusionError(f"unknown store table '{name}'; the store's tables are {sorted(TABLE_SCHEMAS)}")
        return f"{self.uri}/{name}" if self.uri else str(self.path / name)

    def _table(self, name: str, *, create: bool) -> DeltaTable | None:
        try:
            return DeltaTable(self.table_path(name))
        except TableNotFoundError:
            if not create:
                return None
            write_deltalake(self.table_path(name), TABLE_SCHEMAS[name].empty_table(), mode="append")
            return DeltaTable(self.table_path(name))

    def delta_table(self, name: str) -> DeltaTable:
        """The Delta table itself (created if missing), for writers that need more than insert_new."""
        table = self._table(name, create=True)
        assert table is not None
        return table

    def ensure_tables(self) -> None:
        for name in TABLE_SCHEMAS:
            self._table(name, create=True)

    def insert_new(self, name: str, rows: pa.Table) -> int:
        """Insert the rows whose key is not yet in the table; returns how many were inserted."""
        self.table_path(name)  # refuses unknown tables
        schema = TABLE_SCHEMAS[name]
        if rows.num_rows == 0:
            return 0
        rows = rows.select(schema.names).cast(schema)
        keys = list(TABLE_KEYS[name])
        if rows.group_by(keys).aggregate([]).num_rows != rows.num_rows:
            raise InternalError(f"rows for '{name}' repeat a key {keys}; this is probably a bug")
        table = self._table(name, create=True)
        assert table is not None
        predicate = " AND ".join(f"t.{k} = s.{k}" for k in TABLE_KEYS[name])
        for attempt in range(_COMMIT_ATTEMPTS):
            try:
                metrics = (
                    table.merge(rows, predicate=predicate, source_alias="s", target_alias="t")
                    .when_not_matched_insert_all()
                    .execute()
                )
                return int(metrics["num_target_rows_inserted"])
            except CommitFailedError:  # another writer committed first; the merge is idempotent, so retry
                if attempt == _COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.01, 0.1))
                table = DeltaTable(self.table_path(name))
        raise InternalError("unreachable")

    def upsert_counts(self, name: str, rows: pa.Table, *, column: str) -> None:
        """Insert rows, or raise an existing row's `column` to the new value if it is larger. Writers send
        cumulative counts, so re-sending (after a crash, or from a racing writer) never counts twice."""
        self.table_path(name)
        schema = TABLE_SCHEMAS[name]
        if rows.num_rows == 0:
            return
        rows = rows.select(schema.names).cast(schema)
        table = self.delta_table(name)
        predicate = " AND ".join(f"t.{k} = s.{k}" for k in TABLE_KEYS[name])
        for attempt in range(_COMMIT_ATTEMPTS):
            try:
                (
                    table.merge(rows, predicate=predicate, source_alias="s", target_alias="t")
                    .when_matched_update(updates={column: f"s.{column}"}, predicate=f"s.{column} > t.{column}")
                    .when_not_matched_insert_all()
                    .execute()
                )
                return
            except CommitFailedError:
                if attempt == _COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.01, 0.1))
                table = DeltaTable(self.table_path(name))

    def dataset(self, name: str, *, version: int | None = None, string_view: bool = False) -> ds.Dataset:
        """A lazily scanned Arrow dataset of a table (empty if the table does not exist yet).

        `string_view=True` exposes text columns as string_view: Delta merges write some files with string_view
        columns, and DuckDB's scan of a mixed table needs one text type.
        """
        self.table_path(name)
        schema = TABLE_SCHEMAS[name]
        if string_view:
            schema = pa.schema([f.with_type(pa.string_view()) if f.type == pa.string() else f for f in schema])
        table = self._table(name, create=False)
        if table is None:
            return ds.dataset(schema.empty_table())
        if version is not None:
            table.load_as_version(version)
        return table.to_pyarrow_dataset(schema=schema)

    def read(self, name: str, *, version: int | None = None, filter: ds.Expression | None = None) -> pa.Table:
        """A table's rows (text as string). The filter is applied after reading: pyarrow cannot evaluate
        filters on the string_view columns some Delta commits write."""
        table = self.dataset(name, version=version).to_table().cast(TABLE_SCHEMAS[name])
        return table if filter is None else table.filter(filter)

    def version(self, name: str) -> int | None:
        table = self._table(name, create=False)
        return None if table is None else table.version()

    def has_release(self, release_id: str) -> bool:
        ids = self.dataset("releases").to_table(columns=["release_id"]).column("release_id")
        return bool(pc.any(pc.equal(pc.cast(ids, pa.string()), release_id)).as_py())
