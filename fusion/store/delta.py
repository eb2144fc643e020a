"""The common-knowledge store: versioned, append-only Delta Lake tables under one directory.

Inserts are keyed: only rows whose key is not yet in the table are appended, as the very next table version
(a compare-and-swap), so re-running a release never duplicates a row and two writers racing for the same
release cannot both insert it (the second commit fails and re-reads). The budget ledger's conditional update
uses a Delta merge (fusion/store/ledger.py).

Schemas evolve: a table created by an earlier version of Fusion is brought up to its schema in
schemas/tables.py the first time a Store opens it for writing (`Store._evolve`). Columns the schema gained are
added (they must be nullable: the table's earlier rows hold NULL there); columns it retired stay in the table
(earlier rows keep their values), lose any NOT NULL, and are written as NULL from then on. Readers need nothing:
a scan with the current schema reads a missing column as NULL.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import operator
import os
import random
import re
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs
from deltalake import CommitProperties, DeltaTable, Schema, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, SchemaMismatchError, TableNotFoundError

from fusion.errors import FusionError, InternalError, StoreUnreadable
from fusion.store.failures import read_failure
from schemas.tables import TABLE_SCHEMAS

if TYPE_CHECKING:  # imported where used: pyarrow.dataset loads pandas (about 0.15 s), which `fusion sql` may skip
    import pyarrow.dataset as ds

_COMMIT_ATTEMPTS = 20
#: Local tables this process found at their current schema (`Store._evolve`): `ensure_tables` then only checks
#: that each is still there (its log folder), instead of opening it (a Delta log read, about 1-2 ms a table).
_CURRENT: set[str] = set()
_ROW = "__fusion_row"
#: Rows per Parquet row group. Inserts arrive in key order (metric, region, window for releases), so small row
#: groups have narrow min/max statistics and a filtered scan (a time series of one metric and region) decodes
#: little beyond what it returns; measured in bench/ (the SQL query), 16k rows beat 122,880 by 2.5x.
ROW_GROUP_ROWS = 16_384
#: A table with this many data files is compacted (`Store.compact`) by the release and the scheduler.
COMPACT_FILES = 64

#: The columns that identify a row of each table (merge keys).
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "releases": ("release_id", "metric", "region", "window_start"),
    "audit": ("event_id",),
    "rejects": ("release_id", "institution", "reason"),
    "budget": ("period",),
    "runs": ("run_id",),
    "forecasts": ("forecast_id", "window_start", "issued_at"),  # a forecast may be issued again (forecasting.issues)
    "forecast_scores": ("forecast_id", "window_start"),
    "recommendations": ("recommendation_id", "item_type", "item_key"),
    "decisions": ("decision_id", "signer"),
    "models": ("model_id", "round"),
}

#: Columns whose value follows from a row's key (a release's reject tallies all carry its interval): bounded by the
#: new rows' values like the keys, they let an insert skip the files of other intervals although no key is a time.
TABLE_LOCATORS: dict[str, tuple[str, ...]] = {"rejects": ("interval_start",)}


#: Each thread's open local tables: path -> (SHA-256 of the log's first commit, table). Opening a table reads its
#: log (on the demo store about 9 ms for a table holding two weeks of releases: 0.23 s of a release's 27 opens);
#: bringing an open one up to date reads only the commits since (about 0.5 ms). Per thread: a DeltaTable is not
#: meant to be shared between threads. And each table's last Arrow dataset (`Store._arrow_dataset`).
#:
#: The caches are this module's, by thread (thread -> {"tables": ..., "datasets": ...}), not thread-locals: a
#: thread's locals are freed by the thread itself as it ends, and a thread ending as the interpreter finalises (a
#: server's idle worker, stopped as the server stops) would free its Arrow datasets then. A dataset's deallocation
#: releases the GIL, and taking it back during finalisation ends the thread through a C++ frame: the process
#: aborted after its work was done ("terminate called without an active exception", exit -6; about one
#: `fusion serve`-like process in fifteen here). Here an ended thread's caches are freed by a live thread (the next
#: to make its own), and every cache is dropped at exit, before finalisation, by the exiting thread.
_caches: dict[int, tuple[threading.Thread, dict[str, dict]]] = {}
_caches_lock = threading.Lock()


def _thread_cache(name: str) -> dict:
    """This thread's cache `name` ("tables" or "datasets"), made on first use."""
    thread = threading.current_thread()
    kept = _caches.get(thread.ident or 0)
    if kept is not None and kept[0] is thread:
        return kept[1].setdefault(name, {})
    with _caches_lock:
        ended = [ident for ident, (owner, _) in _caches.items() if owner is not thread and not owner.is_alive()]
        freed = [_caches.pop(ident) for ident in ended]  # freed below, outside the lock
        _caches[thread.ident or 0] = (thread, {})
        cache = _caches[thread.ident or 0][1].setdefault(name, {})
    del freed
    return cache


def _forget_caches_after_fork() -> None:
    """In a forked child: start with no caches, without freeing the parent's (their threads are not here, and
    their objects' locks may be held by them)."""
    global _caches, _caches_lock
    _forked_away.append(_caches)
    _caches, _caches_lock = {}, threading.Lock()


_forked_away: list[object] = []
os.register_at_fork(after_in_child=_forget_caches_after_fork)


@atexit.register
def _empty_thread_caches() -> None:
    """Drop every thread's cached tables and datasets at exit, from this thread, before finalisation begins."""
    with _caches_lock:
        caches = [c for _, c in _caches.values()]
    for cache in caches:
        for kept in list(cache.values()):
            kept.clear()


#: A data file of a table's snapshot as found now: (path, size in bytes, modification time in ns), size and time -1
#: where it is missing. A file rewritten in place, without a Delta commit, leaves the table's version as it was,
#: but not its size and time.
DataFile = tuple[str, int, int]


def _data_files(table: DeltaTable, *, local: bool) -> tuple[DataFile, ...]:
    """The data files of `table`'s loaded version as found now (an object store's through its file system)."""
    if not local:
        dataset = table.to_pyarrow_dataset()
        return tuple((info.path, info.size if info.size is not None else -1, info.mtime_ns or -1)
                     for info in dataset.filesystem.get_file_info(list(dataset.files)))
    found = []
    for uri in table.file_uris():
        path = uri.removeprefix("file://")
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            found.append((path, -1, -1))
        else:
            found.append((path, stat.st_size, stat.st_mtime_ns))
    return tuple(found)


def _opened(path: str, *, local: bool) -> DeltaTable:
    """The Delta table at `path` at its latest version, as `DeltaTable(path)` opens it (TableNotFoundError if
    there is none). A local table this thread opened before is brought up to date instead of opened again, unless
    its log's first commit is not the one it was opened from (the table was deleted and made again)."""
    if not local:
        return DeltaTable(path)
    tables: dict[str, tuple[bytes, DeltaTable]] = _thread_cache("tables")
    try:  # the first commit names the table (its metadata id, a UUID drawn when it was created)
        with open(os.path.join(path, "_delta_log", "0" * 20 + ".json"), "rb") as handle:
            identity: bytes | None = hashlib.sha256(handle.read()).digest()
    except OSError:  # no table, or its first commits were cleaned up: opened each time
        identity = None
    kept = tables.get(path)
    if identity is not None and kept is not None and kept[0] == identity:
        try:
            kept[1].update_incremental()
            return kept[1]
        except DeltaError:
            pass
    tables.pop(path, None)
    table = DeltaTable(path)
    if identity is not None:
        tables[path] = (identity, table)
    return table


#: The type of `releases.window_start` (a release's cells lie in its interval: its windows select its rows).
_WINDOW_TYPE = TABLE_SCHEMAS["releases"].field("window_start").type
#: At most this many distinct values of a text key are pushed down to a scan as a set (more: not filtered on).
_PUSHED_VALUES = 1024


#: A text column and the values it must hold (pushed down to a scan as a set).
TextBound = tuple[str, pa.Array]


def _key_bounds(rows: pa.Table, keys: Sequence[str]) -> tuple[list[pc.Expression], list[TextBound]]:
    """(on numbers and times, on text): bounds that every row holding one of `rows`' keys satisfies. Each time or
    integer key lies between the rows' least and greatest value, each text key among their values (up to
    _PUSHED_VALUES of them). NULLs are left out: a NULL key matches no row in the anti-join."""
    bounds: list[pc.Expression] = []
    text: list[TextBound] = []
    for key in keys:
        column, field = rows.column(key), pc.field(key)
        if pa.types.is_temporal(column.type) or pa.types.is_integer(column.type):
            extremes = pc.min_max(column)
            if extremes["min"].is_valid:
                bounds.append((field >= extremes["min"]) & (field <= extremes["max"]))
        elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            values = pc.unique(column.drop_null())
            if len(values) <= _PUSHED_VALUES:
                text.append((key, values))
    return bounds, text


def _repeats_a_key(rows: pa.Table, keys: Sequence[str]) -> bool:
    """Whether two of `rows` share a key (NULL a value like any other, as grouping counts it): each key column
    dictionary-encoded, the codes folded column by column into one integer a row. What `group_by(keys)` tells,
    without Arrow's query engine, whose first use in a process costs 40-50 ms (a release inserts into three
    tables, in a fresh process for each `fusion batch`)."""
    codes = np.zeros(rows.num_rows, dtype=np.int64)
    for key in keys:
        encoded = pc.dictionary_encode(rows.column(key).combine_chunks(), null_encoding="encode")
        index = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        codes = np.unique(codes * len(encoded.dictionary) + index, return_inverse=True)[1].reshape(-1)
    return np.unique(codes).size != rows.num_rows


def _all_of(expressions: Sequence[pc.Expression]) -> pc.Expression | None:
    """The conjunction of `expressions` (None, no filter, when there are none)."""
    combined = None
    for expression in expressions:
        combined = expression if combined is None else combined & expression
    return combined


def _plain_text(table: pa.Table) -> pa.Table:
    """`table` with string_view columns cast to string (which pyarrow filters)."""
    for index, field in enumerate(table.schema):
        if pa.types.is_string_view(field.type):
            table = table.set_column(index, field.with_type(pa.string()), pc.cast(table.column(index), pa.string()))
    return table


#: An absolute path (or file URL) in an error's text, its file's name kept.
_PATH = re.compile(r"(?<![^\s'\"])(?:file://)?/(?:[^\s'/]+/)*([^\s'/]+)")


def _unreadable(name: str, dataset: ds.Dataset, exc: BaseException) -> StoreUnreadable:
    """The error for a table whose data files could not be read, naming the file (by its name: where the store
    lies is not every reader's to know) that Arrow names or, failing that, the first of the snapshot's files that
    cannot be read on its own (a column of another type than the log's, say), which only a failed read pays for."""
    lines = str(exc).strip().splitlines()
    reason = _PATH.sub(r"\1", lines[0] if lines else type(exc).__name__)
    named = re.search(r"[^\s'/]+\.parquet", reason)
    culprit = named.group(0) if named else None
    for fragment in () if culprit else dataset.get_fragments():
        try:
            fragment.to_table(schema=dataset.schema).cast(TABLE_SCHEMAS[name])
        except (OSError, pa.ArrowException):
            culprit = Path(fragment.path).name
            reason = f"{culprit}: {reason}"
            break
    return StoreUnreadable(
        f"the store's table {name} cannot be read: a data file is damaged, missing or was rewritten outside Delta "
        f"({reason}); restore it (or the whole store) from a backup"
    )


class Store:
    """Opens (creating on first use) the store's tables at `path`: a local directory or an object-store URL
    that deltalake understands (s3://, gs://, az://; credentials from the environment)."""

    def __init__(self, path: str | Path) -> None:
        self.uri = str(path).rstrip("/") if "://" in str(path) else None
        self.path = Path(path) if self.uri is None else Path(str(path).split("://", 1)[1])
        self._evolved: set[str] = set()  # tables already checked against their schema by this Store

    def table_path(self, name: str) -> str:
        if name not in TABLE_SCHEMAS:
            raise FusionError(f"unknown store table '{name}'; the store's tables are {sorted(TABLE_SCHEMAS)}")
        return f"{self.uri}/{name}" if self.uri else str(self.path / name)

    def _table(self, name: str, *, create: bool) -> DeltaTable | None:
        """The table, or None if it does not exist and `create` is false. With `create` (every writer's way in) an
        existing table is first brought up to its current schema."""
        try:
            table = _opened(self.table_path(name), local=self.uri is None)
        except TableNotFoundError:
            if not create:
                return None
            # Another process may create the table at the same moment, failing this commit: the table exists
            # then (if it does not, the failure was something else, and DeltaTable says what).
            with contextlib.suppress(CommitFailedError, DeltaError):
                write_deltalake(self.table_path(name), TABLE_SCHEMAS[name].empty_table(), mode="append")
            table = _opened(self.table_path(name), local=self.uri is None)
        return self._evolve(name, table) if create else table

    def _evolve(self, name: str, table: DeltaTable) -> DeltaTable:
        """Bring a table written by an earlier version up to TABLE_SCHEMAS[name]: add the nullable columns it
        lacks (earlier rows read NULL there), and drop NOT NULL from columns the schema retired (writes leave them
        NULL, see `_conform`). One commit per change; a racing writer that made the same change first makes the
        commit fail, and the table is read again. Checked once per Store and table."""
        if name in self._evolved:
            return table
        wanted = TABLE_SCHEMAS[name]
        for attempt in range(_COMMIT_ATTEMPTS):
            present = pa.schema(table.schema().to_arrow())
            missing = [field for field in wanted if field.name not in present.names]
            retired = [field.name for field in present if field.name not in wanted.names and not field.nullable]
            if not missing and not retired:
                self._evolved.add(name)
                if self.uri is None:
                    _CURRENT.add(self.table_path(name))
                return table
            required = [field.name for field in missing if not field.nullable]
            if required:
                raise InternalError(
                    f"table {name} lacks the non-nullable column(s) {required}, which cannot be added to its "
                    "existing rows; a schema change must add nullable columns; this is probably a bug"
                )
            try:
                if missing:
                    table.alter.add_columns(
                        list(Schema.from_arrow(pa.schema(missing)).fields),
                        commit_properties=CommitProperties(max_commit_retries=0),
                    )
                for column in retired:
                    table.alter.drop_column_not_null(column, commit_properties=CommitProperties(max_commit_retries=0))
            except (CommitFailedError, SchemaMismatchError, DeltaError):
                # Most likely another writer evolved the table first: read it again and check.
                if attempt == _COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.01, 0.1))
            table = _opened(self.table_path(name), local=self.uri is None)
        raise InternalError("unreachable")

    @staticmethod
    def _conform(table: DeltaTable, rows: pa.Table) -> pa.Table:
        """`rows` plus a NULL column for each column the table has beyond them (retired from the schema): an
        append must carry every column of the table."""
        present = pa.schema(table.schema().to_arrow())
        for field in present:
            if field.name not in rows.column_names:
                rows = rows.append_column(field.name, pa.nulls(rows.num_rows, field.type))
        return rows

    def delta_table(self, name: str) -> DeltaTable:
        """The Delta table itself (created if missing), for writers that need more than insert_new."""
        table = self._table(name, create=True)
        assert table is not None
        return table

    def ensure_tables(self) -> None:
        """Create every table that does not exist yet, and bring every one up to its current schema."""
        for name in TABLE_SCHEMAS:
            path = self.table_path(name)
            if path in _CURRENT and (Path(path) / "_delta_log").is_dir():
                continue
            self._table(name, create=True)

    def insert_new(self, name: str, rows: pa.Table) -> int:
        """Insert the rows whose key is not yet in the table; returns how many were inserted.

        A compare-and-swap on the table's version: the keys already present are read from one snapshot, the new
        rows are appended as the very next version and never rebased onto a later one (no commit retries inside
        delta-rs), so a concurrent writer makes the commit fail and the insert starts over from the newer
        snapshot. Appends write text as plain strings (Delta merges write string_view, which pyarrow cannot
        filter), so SQL filters reach the scan.
        """
        self.table_path(name)  # refuses unknown tables
        schema = TABLE_SCHEMAS[name]
        if rows.num_rows == 0:
            return 0
        rows = rows.select(schema.names).cast(schema)
        keys = list(TABLE_KEYS[name])
        if _repeats_a_key(rows, keys):
            raise InternalError(f"rows for '{name}' repeat a key {keys}; this is probably a bug")
        table = self._table(name, create=True)
        assert table is not None
        for attempt in range(_COMMIT_ATTEMPTS):
            fresh = self._new_rows(name, table, rows, keys)
            if fresh.num_rows == 0:
                return 0
            try:
                write_deltalake(
                    table,
                    self._conform(table, fresh),
                    mode="append",
                    commit_properties=CommitProperties(max_commit_retries=0),
                    writer_properties=WriterProperties(max_row_group_size=ROW_GROUP_ROWS),
                )
                return fresh.num_rows
            except CommitFailedError:  # another writer committed first: re-read its keys and try again
                if attempt == _COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.01, 0.1))
                table = _opened(self.table_path(name), local=self.uri is None)
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
                    table.merge(self._conform(table, rows), predicate=predicate, source_alias="s", target_alias="t")
                    .when_matched_update(updates={column: f"s.{column}"}, predicate=f"s.{column} > t.{column}")
                    .when_not_matched_insert_all()
                    .execute()
                )
                return
            except CommitFailedError:
                if attempt == _COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.01, 0.1))
                table = _opened(self.table_path(name), local=self.uri is None)

    def _new_rows(self, name: str, table: DeltaTable, rows: pa.Table, keys: list[str]) -> pa.Table:
        """The rows of `rows` (in their order) whose key is not in `table`'s snapshot. Only the rows whose keys
        lie within the bounds of the new rows' keys are read (`_key_bounds`): a release's windows select the
        files and row groups of its own interval, so inserting costs the same on a store holding years of
        releases as on a new one."""
        schema = TABLE_SCHEMAS[name]
        bounds, text = _key_bounds(rows, [*keys, *TABLE_LOCATORS.get(name, ())])
        present = self._scan_where(self._arrow_dataset(name, table, schema), keys, bounds, text)
        if present.num_rows == 0:
            return rows
        # Joined on the keys alone: Arrow's join cannot carry list columns (forecasts' input_release_ids).
        numbered = rows.select(keys).append_column(_ROW, pa.array(np.arange(rows.num_rows, dtype=np.int64)))
        fresh = numbered.join(present, keys=keys, join_type="left anti", use_threads=False)
        return rows.take(np.sort(fresh.column(_ROW).to_numpy())).select(schema.names)

    @staticmethod
    def _scan_where(
        dataset: ds.Dataset, columns: list[str], bounds: list[pc.Expression], text: list[TextBound]
    ) -> pa.Table:
        """`columns` of the rows satisfying every expression of `bounds` (on numbers and times) and holding one of
        the values of each `text` bound, pushed down to the scan: Delta's file statistics and Parquet's row-group
        statistics skip what cannot match. Files holding string_view text (Delta merges of older stores) cannot
        be filtered on text by pyarrow: there the text bounds are applied after the scan."""
        try:
            return dataset.to_table(columns=columns, filter=_all_of(bounds + [pc.field(c).isin(v) for c, v in text]))
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
            if not text:
                raise
        wide = [*columns, *(c for c, _ in text if c not in columns)]
        read = _plain_text(dataset.to_table(columns=wide, filter=_all_of(bounds)))
        for column, values in text:
            read = read.filter(pc.is_in(read.column(column), value_set=pc.cast(values, pa.string())))
        return read.select(columns)

    def compact(self, name: str, *, min_files: int = COMPACT_FILES) -> int:
        """Rewrite a table's small files into few once it has `min_files` or more; returns the files removed (0
        if it had fewer, or a concurrent writer won the commit: the next call tries again). Each release adds
        a file to `releases`, `audit` and `rejects`, and each scheduler attempt to `runs`: 1,000 attempts made
        reading `runs` take 2.4 s and each claim 0.6 s (0.05 s compacted). Readers are unaffected: the rows and
        their order stay, and earlier versions stay readable (time travel) until a vacuum."""
        table = self._table(name, create=False)
        if table is None or len(table.file_uris()) < min_files:
            return 0
        try:
            metrics = table.optimize.compact(writer_properties=WriterProperties(max_row_group_size=ROW_GROUP_ROWS))
        except (CommitFailedError, DeltaError):  # a writer committed meanwhile: its commit stands, retry later
            return 0
        return int(metrics.get("numFilesRemoved", 0))

    def dataset(self, name: str, *, version: int | None = None, string_view: bool | None = False) -> ds.Dataset:
        """A lazily scanned Arrow dataset of a table (empty if the table does not exist yet).

        Text columns are `string`, which pyarrow can filter in the scan, unless `string_view=True` or, with
        `string_view=None`, some file of the snapshot holds string_view text (written by a Delta merge: the
        ledger's, or the store's inserts before they became appends); a scan over mixed files needs one type.
        """
        self.table_path(name)
        schema = TABLE_SCHEMAS[name]
        table = self._table(name, create=False)
        if table is None:
            if version is not None:
                raise FusionError(f"table {name} has no versions yet; version {version} does not exist")
            import pyarrow.dataset as ds

            return ds.dataset(schema.empty_table())
        if version is not None:
            self._load_version(name, table, version)
        try:
            dataset = self._arrow_dataset(name, table, schema)
            # Each file's footer: whether it holds string_view text, and (travelling in time) whether it is there.
            footers = (
                []
                if string_view is not None and version is None
                else [fragment.physical_schema for fragment in dataset.get_fragments()]
            )
        except FileNotFoundError as exc:  # an old version whose data files a vacuum removed (or one deleted by hand)
            if version is None:
                raise
            gone = re.search(r"([^/'\s]+\.parquet)", str(exc))
            raise StoreUnreadable(
                f"table {name}: the data files of version {version} were removed"
                + (f" ({gone.group(1)} is gone)" if gone else "")
            ) from None
        if string_view is None:
            string_view = any(pa.types.is_string_view(field.type) for footer in footers for field in footer)
        if string_view:
            view = pa.schema([f.with_type(pa.string_view()) if f.type == pa.string() else f for f in schema])
            dataset = self._arrow_dataset(name, table, view)
        return dataset

    @staticmethod
    def _load_version(name: str, table: DeltaTable, version: int) -> None:
        latest = table.version()
        try:  # any integer (a NumPy one read back from a table included), but not a bool
            number = None if isinstance(version, bool) else operator.index(version)
        except TypeError:
            number = None
        if number is None or not 0 <= number <= latest:
            raise FusionError(f"table {name} has versions 0 to {latest}; version {version!r} does not exist")
        version = number
        try:
            table.load_as_version(version)
        except DeltaError as exc:  # e.g. its log entry was cleaned up
            raise FusionError(f"table {name}: version {version} cannot be read: {exc}") from None

    def _arrow_dataset(self, name: str, table: DeltaTable, schema: pa.Schema) -> ds.Dataset:
        """The table's snapshot as an Arrow dataset. A local store is read through Arrow's own file system:
        deltalake's default (a Python file system handler) hands Arrow Python-owned buffers, and Arrow's I/O
        threads may release the last of them after the scan returns; one released while the interpreter is
        exiting aborts the process ("terminate called without an active exception", exit -6) after its work
        is done. A short script that scans a table and exits aborted 232 times in 300 that way, 0 in 300
        through Arrow's file system. Object stores keep deltalake's handler (their credentials are its).

        The dataset of a local table is kept for its snapshot (this thread's open table, its version, the
        schema): making it turns each file's statistics into expressions (13 ms a call on a year of releases,
        twelve files), and a release asks for the same snapshot several times before it commits. It is kept while
        its data files are as they were (their sizes and times): a dataset holds each file's footer once read, and
        a file rewritten in place, without a Delta commit, would otherwise be read through its old footer
        ("Couldn't deserialize thrift") for as long as the version lasts."""
        if self.uri is not None:
            return table.to_pyarrow_dataset(schema=schema)
        datasets: dict[tuple[str, pa.Schema], tuple[DeltaTable, int, tuple[DataFile, ...], ds.Dataset]]
        datasets = _thread_cache("datasets")
        key, version, files = (self.table_path(name), schema), table.version(), _data_files(table, local=True)
        kept = datasets.get(key)
        if kept is not None and kept[0] is table and kept[1] == version and kept[2] == files:
            return kept[3]
        local = pa_fs.SubTreeFileSystem(str(Path(self.table_path(name)).resolve()), pa_fs.LocalFileSystem())
        dataset = table.to_pyarrow_dataset(schema=schema, filesystem=local)
        datasets[key] = (table, version, files, dataset)
        return dataset

    def read(self, name: str, *, version: int | None = None, filter: ds.Expression | None = None) -> pa.Table:
        """A table's rows (text as string). The filter is applied after reading: pyarrow cannot evaluate
        filters on the string_view columns that Delta merges write (the ledger's, and older stores').
        StoreUnreadable when a data file of the snapshot is damaged, missing or was rewritten outside Delta;
        StoreUnavailable (fusion.store.failures.read_failure) when the system refuses to read one (EACCES, EIO)."""
        try:
            dataset = self.dataset(name, version=version)
            try:
                table = dataset.to_table().cast(TABLE_SCHEMAS[name])
            except (OSError, pa.ArrowException) as exc:
                if isinstance(exc, OSError) and exc.errno not in (None, errno.ENOENT):
                    raise
                raise _unreadable(name, dataset, exc) from None
        except OSError as exc:  # the disk or its permissions (EACCES, EIO), not what a file holds
            if exc.errno in (None, errno.ENOENT):
                raise
            raise read_failure(self.uri or str(self.path), name, exc) from exc
        return table if filter is None else table.filter(filter)

    def table_property(self, name: str, key: str) -> str | None:
        """A property recorded in a table's Delta metadata; None if the table or the property is absent."""
        table = self._table(name, create=False)
        return None if table is None else table.metadata().configuration.get(key)

    def record_table_property(self, name: str, key: str, value: str) -> str:
        """Record `key` = `value` in a table's Delta metadata unless the table holds the key already; returns the
        value it holds now. A compare-and-swap on the table's version (no commit retries inside delta-rs): of
        writers racing to record different values, one commits first and the others read its value."""
        for attempt in range(_COMMIT_ATTEMPTS):
            table = self.delta_table(name)
            present = table.metadata().configuration.get(key)
            if present is not None:
                return str(present)
            try:
                table.alter.set_table_properties(
                    {key: value}, raise_if_not_exists=False, commit_properties=CommitProperties(max_commit_retries=0)
                )
                return value
            except CommitFailedError:  # another writer committed first: read its metadata again
                if attempt == _COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.01, 0.1))
        raise InternalError("unreachable")

    def version(self, name: str) -> int | None:
        table = self._table(name, create=False)
        return None if table is None else table.version()

    def data_files(self, name: str, *, version: int | None = None) -> tuple[DataFile, ...]:
        """Each data file of a table at `version` (None: the latest) as found now, with its size and modification
        time (`DataFile`); none for a table not created yet. What a reader that keeps results per table version
        adds to its key, so that a file rewritten in place is not read as the version's."""
        path = self.table_path(name)
        kept = _thread_cache("tables").get(path) if self.uri is None else None
        if kept is not None and version is not None and kept[1].version() == version:
            table = kept[1]  # this thread's table, at that version already: no need to read its log again
        else:
            table = self._table(name, create=False)
            if table is None:
                return ()
            if version is not None and version != table.version():
                self._load_version(name, table, version)
        return _data_files(table, local=self.uri is None)

    def release_ids(self) -> set[str]:
        """The ids of every release in `releases` (reads the whole column: `present_releases` asks about a few)."""
        ids = self.dataset("releases").to_table(columns=["release_id"]).column("release_id")
        return {str(i) for i in pc.unique(pc.cast(ids, pa.string())).to_pylist()}

    def present_releases(self, releases: Iterable[tuple[str, datetime, datetime]]) -> set[str]:
        """Which of `releases` (release id, interval start, interval end) the store holds. Every cell of a release
        lies in its interval (its windows), so only the files and row groups whose windows overlap the intervals
        are read: the same few milliseconds on a store holding a year of 15-minute releases (8.8M rows) as on a
        new one, where reading every release id took 0.16-0.65 s."""
        wanted = {release_id: (start, end) for release_id, start, end in releases}
        if not wanted:
            return set()
        first = min(start for start, _ in wanted.values())
        last = max(end for _, end in wanted.values())
        found = self.releases_within(list(wanted), (first, last), ["release_id"])
        return {str(i) for i in pc.unique(found.column("release_id")).to_pylist()}

    def releases_within(
        self, release_ids: Sequence[str], interval: tuple[datetime, datetime], columns: Sequence[str]
    ) -> pa.Table:
        """`columns` (text as string) of the rows of `release_ids` whose windows start in `interval` [start, end):
        every row of those releases when the interval holds theirs. Reads only the files and row groups of the
        interval (see `present_releases`)."""
        window = pc.field("window_start")
        start, end = (pa.scalar(t, _WINDOW_TYPE) for t in interval)
        ids = ("release_id", pa.array(list(release_ids), pa.string()))
        found = self._scan_where(self.dataset("releases"), list(columns), [(window >= start) & (window < end)], [ids])
        return _plain_text(found)

    def has_release(self, release_id: str, *, interval: tuple[datetime, datetime] | None = None) -> bool:
        """Whether the store holds the release; given its interval, reading only that interval's rows."""
        if interval is not None:
            return release_id in self.present_releases([(release_id, *interval)])
        ids = self.dataset("releases").to_table(columns=["release_id"]).column("release_id")
        return bool(pc.any(pc.equal(pc.cast(ids, pa.string()), release_id)).as_py())
