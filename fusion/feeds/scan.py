"""Scanning an institution's feeds in one DuckDB pass per file: every row validated, and each accepted reading
reduced to what its contribution needs (its cell, its encoded slot values, a hash of the reading for
de-duplication and of its entity for bounding) for one scan shard.

A scan shard is a hash partition of the institution's readings: equal readings (and, at entity level, all of an
entity's readings) always fall in the same shard, so each shard is de-duplicated, bounded and packed on its own
and the shards' vectors simply add up. No readings are shuffled between workers. Parquet files on the local file
system are read by DuckDB directly; CSV and JSON lines (whose unparseable lines become dead letters) and files on
other file systems are read as Arrow batches first.

An institution small enough for one shard (`pipeline.shard_rows`) is scanned in one pass. A bigger one is split
into several shards, and each of its files is first staged (`FeedScanner.stage`): scanned once (parsed,
validated, encoded, its rejects counted and dead-lettered) with its encoded rows written as one Arrow file per
shard (and a text file's parsed rows kept beside them, for `readings_at`), in the institution's private
dead-letter area (deleted after the contribution); each shard then reads its own files. That costs less than
each shard scanning every file for its own partition, for Parquet as for text.

The encodings computed here in SQL are the ones `privacy.encoding` computes in NumPy (round half to even,
clamping, integer bins); tests check both agree value for value.
"""

from __future__ import annotations

import hashlib
import lzma
import secrets
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from math import ceil
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zstandard
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

from fusion.config.federation import FeedConfig, FeedFormat, InstitutionConfig, PrivacyUnit
from fusion.errors import FusionError, InternalError
from fusion.feeds.files import (
    AmbiguousColumns,
    absent_columns,
    feed_listing,
    mapped_columns,
    read_feed_file,
)
from fusion.feeds.report import FileTally, merge_tallies
from fusion.release.exchange import delete_if_exists, exists
from fusion.release.plan import ReleasePlan
from privacy.encoding import MetricEncoding
from privacy.layout import SUMSQ, PartitionLayout
from schemas.readings import (
    ENTITY_ID,
    EVENT_TIME,
    METRIC,
    READING_SCHEMA,
    REGION,
    SENSOR_ID,
    VALUE,
    folded_name,
)
from schemas.reasons import REASON_PRECEDENCE, FileReason, RejectReason
from schemas.validation import (
    DUCKDB_INFINITY_US,
    ROW_COLUMN,
    ReadingRules,
    checked_sql,
    connect,
    dead_letters,
    duckdb_input,
    register_rules,
    take_rows,
)

#: Estimated bytes per row of a text feed, plain and compressed, to size its shards from its files' sizes (on
#: the low side: too many shards only re-read a file, too few could exhaust a worker's memory).
TEXT_BYTES_PER_ROW = 48
COMPRESSED_BYTES_PER_ROW = 4
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".zstd", ".deflate", ".lz4", ".xz")

#: Columns of the encoded rows (ENCODED_BASE always; the others when the layout or the privacy unit needs them).
SOURCE, ROW, CELL, SUM, KEY, ENTITY, BIN = "src", "row", "cell", "sum", "key", "entity", "bin"
#: The scan shard of each row, when one pass encodes the rows of every shard (staging).
SHARD = "shard"
#: What the scan query gives for each row beside its hashes, from which `encode_scanned` encodes accepted ones.
METRIC_IDX, REGION_IDX, TIME_US = "metric_idx", "region_idx", "time_us"


@dataclass
class ShardScan:
    """One scan shard of an institution: its accepted readings encoded, what was rejected, and per file what was
    read and rejected (`files`, by path; `unreadable`: the files that could not be read, none of whose readings
    is used)."""

    encoded: list[pa.Table] = field(default_factory=list)
    rows_read: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    dead_letters: list[tuple[str, pa.Table]] = field(default_factory=list)  # (name, rows in the dead-letter shape)
    files: dict[str, FileTally] = field(default_factory=dict)
    unreadable: set[str] = field(default_factory=set)

    def table(self, schema: pa.Schema) -> pa.Table:
        return pa.concat_tables(self.encoded) if self.encoded else schema.empty_table()

    def add(self, other: ShardScan) -> None:
        self.encoded += other.encoded
        self.rows_read += other.rows_read
        self.rejected.update(other.rejected)
        self.dead_letters += other.dead_letters
        merge_tallies(self.files, other.files)
        self.unreadable |= other.unreadable


@dataclass(frozen=True)
class SourceListing:
    """An institution's files for an interval: (feed index, file) pairs, a file's position being its `src` in the
    encoded rows; and the paths that matched no file (`feed_listing`'s `missing`, per feed and day)."""

    sources: list[tuple[int, str]]
    missing: list[str]


def list_sources(plan: ReleasePlan, institution: InstitutionConfig) -> SourceListing:
    """Every file of every feed of the institution that the interval needs, and what is missing. A file that two
    of its feeds match (overlapping globs) is listed once, with the first of them, and read once, as the stream
    reads it."""
    sources: list[tuple[int, str]] = []
    missing: list[str] = []
    listed: set[str] = set()
    for index, feed in enumerate(institution.feeds):
        listing = feed_listing(plan.config.resolve(feed.path), plan.layout.start, plan.layout.end)
        sources += [(index, path) for path in listing.paths if path not in listed]
        listed.update(listing.paths)
        missing += listing.missing
    return SourceListing(sources, missing)


def feed_sources(plan: ReleasePlan, institution: InstitutionConfig) -> list[tuple[int, str]]:
    """(feed index, file) for every file of every feed of the institution that the interval needs (missing ones
    left out: see `list_sources`)."""
    return list_sources(plan, institution).sources


#: What reading a damaged file raises (truncated, random bytes, corrupt pages, a broken compressed stream): the
#: file is dead-lettered whole, as one malformed record, and the run goes on, if reading the file again on its
#: own fails too (`FeedScanner._damaged`: DuckDB's errors name no kind, and an OSError may be a full disk's).
DAMAGE_ERRORS: tuple[type[BaseException], ...] = (
    pa.ArrowException, OSError, UnicodeError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError, duckdb.Error,
    AmbiguousColumns
)
#: Errors a later run may not meet (permissions, a file moved away, the network): raised, never dead-lettered.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    PermissionError, FileNotFoundError, ConnectionError, TimeoutError, BeamIOError
)

class FeedUnavailable(FusionError):
    """A feed file that was listed cannot be read now (permissions, moved away, the network): the run stops,
    naming it; nothing is dead-lettered, since a later run may read it."""


def file_damaged(exc: BaseException, path: str, feed: FeedConfig, *, batch_rows: int) -> bool:
    """Whether `exc`, raised while the feed file at `path` was read, says that the file itself is damaged: reading
    it again, on its own, fails too (a DuckDB error may be the query's, an OSError a full disk's). A damaged file is
    dead-lettered whole and none of its readings is used; anything else is raised."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return False
    if isinstance(exc, AmbiguousColumns):  # found in the file's header: no second reading needed
        return True
    try:  # as batches, validated (pyarrow passes Parquet text that is not UTF-8, which DuckDB refuses)
        for _ in read_feed_file(path, feed, batch_rows=batch_rows):
            pass
    except TRANSIENT_ERRORS:
        return False
    except DAMAGE_ERRORS:
        return True
    return False


#: Characters DuckDB's read_parquet takes as a glob: a file named with them is read as Arrow batches instead.
GLOB_CHARACTERS = frozenset("*?[]{}")


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _read_by_duckdb(path: str, feed: FeedConfig) -> bool:
    """Whether DuckDB reads the file itself: local Parquet whose name it cannot mistake for a pattern, whose
    mapped columns it binds to themselves (see `_binds_exactly`), and whose times fit DuckDB's (see
    `_times_fit`)."""
    if not (feed.format is FeedFormat.PARQUET and _is_local(path) and not GLOB_CHARACTERS & set(path)):
        return False
    metadata = pq.read_metadata(_local(path))
    schema = metadata.schema.to_arrow_schema()
    return _binds_exactly(schema.names, feed) and _times_fit(metadata, schema, feed)


#: Columns DuckDB's read_parquet adds of its own (`file_row_number = true`, and `file_index` over a list of files):
#: a file column of either name clashes with them (an error), or stands in for them (scan_windows' file_index).
DUCKDB_FILE_COLUMNS = frozenset({"file_row_number", "file_index"})


def _binds_exactly(names: Sequence[str], feed: FeedConfig) -> bool:
    """Whether DuckDB binds each mapped column of a file with these column `names` to that very column. It matches
    names ignoring ASCII case, renaming the later of `Value` and `value` to value_1: the mapped "value" would read
    `Value`, and a file holding only `VALUE` would give it `VALUE`. Such a file is read as Arrow batches, which
    select columns by their exact names (and refuse a mapped column named twice), as is one with a column named like
    DuckDB's own (DUCKDB_FILE_COLUMNS)."""
    folded = [folded_name(name) for name in names]
    mapped = set(mapped_columns(feed).values())
    mapped_folded = {folded_name(column) for column in mapped}
    return (
        len(set(folded)) == len(folded)
        and not DUCKDB_FILE_COLUMNS & set(folded)
        and all(name in mapped for name, key in zip(names, folded, strict=True) if key in mapped_folded)
    )


def _times_fit(metadata: pq.FileMetaData, schema: pa.Schema, feed: FeedConfig) -> bool:
    """Whether, by its footer's statistics (`metadata`, and its `schema` in Arrow), every millisecond timestamp of
    the mapped columns of a Parquet file fits DuckDB's microseconds: its read_parquet fails the whole query on one
    that does not (10^16 ms, year 318,857). A file where one may not is read as Arrow batches, where such a time is
    unparseable_time (`duckdb_input`). Parquet stores seconds as milliseconds; micro- and nanoseconds always fit."""
    wanted = set(mapped_columns(feed).values())
    bound = (DUCKDB_INFINITY_US - 1) // 1_000
    for index in range(metadata.num_columns):
        column = metadata.schema.column(index)
        # A top-level column, whose path is its name (a nested one's is longer): names may hold dots, and
        # `event.time` is one column, not `time` in a column `event`.
        if column.path != column.name or column.name not in wanted:
            continue
        if schema.get_field_index(column.name) < 0:
            continue
        arrow_type = schema.field(column.name).type
        if not (pa.types.is_timestamp(arrow_type) and arrow_type.unit in ("s", "ms")):
            continue
        for group in range(metadata.num_row_groups):
            statistics = metadata.row_group(group).column(index).statistics
            if statistics is None or not statistics.has_min_max:
                if statistics is not None and statistics.null_count == metadata.row_group(group).num_rows:
                    continue
                return False
            if not -bound <= statistics.min_raw <= statistics.max_raw <= bound:
                return False
    return True


def _local(path: str) -> str:
    return path.removeprefix("file://")


def estimated_rows(sources: list[tuple[int, str]], feeds: tuple[FeedConfig, ...]) -> int:
    """Rows in the files: exact for Parquet (its footer), estimated from the size for text."""
    total = 0
    for feed_index, path in sources:
        if feeds[feed_index].format is FeedFormat.PARQUET:
            try:
                with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                    total += pq.ParquetFile(handle).metadata.num_rows
                continue
            except DAMAGE_ERRORS as exc:  # its footer is damaged: the scan dead-letters the file
                if isinstance(exc, TRANSIENT_ERRORS):
                    raise
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
        per_row = COMPRESSED_BYTES_PER_ROW if path.lower().endswith(COMPRESSED_SUFFIXES) else TEXT_BYTES_PER_ROW
        total += ceil(size / per_row)
    return total


def scan_shards(
    plan: ReleasePlan, institution: InstitutionConfig, sources: list[tuple[int, str]] | None = None
) -> int:
    """How many scan shards the institution's readings for the interval (its `sources`, listed when None) are
    split into."""
    rows = estimated_rows(feed_sources(plan, institution) if sources is None else sources, institution.feeds)
    return max(1, ceil(rows / plan.config.shard_rows))


def staged_sources(
    plan: ReleasePlan, institution: InstitutionConfig, shards: int, sources: list[tuple[int, str]] | None = None
) -> list[int]:
    """The `src` of every file of the institution (its `sources`, listed when None) to stage, i.e. scan once for
    all its `shards` scan shards: every file, once there are two shards or more. (Re-reading each file once per
    shard costs more even for Parquet: on the bench data, 8.3 s against 6.6 s for 30M readings in 2 shards an
    institution, 2.7 s against 2.4-2.7 s for 10M in 2, 3.5 s against 2.4-2.6 s for 10M in 4; text far more.)"""
    if shards < 2:
        return []
    return list(range(len(feed_sources(plan, institution) if sources is None else sources)))


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def encoded_sql(
    checked: str, *, layout: PartitionLayout, entity_level: bool, shard: int | None, shards: int
) -> str:
    """Over `checked` (see schemas.validation.checked_sql), the rows of scan shard `shard`: reason (NULL when
    accepted), row, and what `encode_scanned` encodes accepted rows from (metric and region index, time in epoch
    microseconds, value), a 64-bit hash of the whole reading and, at entity level, of its entity. With `shard`
    None, the rows of every shard, each with its shard number (column SHARD)."""
    partition = _partition(entity_level)
    columns = _scanned_columns(entity_level, row="c.row_id")
    if shard is None:
        columns.append(f"CAST({partition} % {shards} AS INTEGER) AS {SHARD}")
    where = f"WHERE {partition} % {shards} = {shard}" if shards > 1 and shard is not None else ""
    return f"""
        WITH c AS ({checked})
        SELECT {", ".join(columns)}
        FROM c
        {where}
    """


def _partition(entity_level: bool) -> str:
    """The hash a row's scan shard is taken from: its entity's at entity level, the whole reading's otherwise."""
    return f"hash({ENTITY_ID})" if entity_level else _KEY_HASH


# Validation typed the value with -0.0 made 0.0, so equal readings hash alike.
_KEY_HASH = f"hash({ENTITY_ID}, {SENSOR_ID}, {REGION}, {METRIC}, {EVENT_TIME}, {VALUE})"


def _scanned_columns(entity_level: bool, *, row: str) -> list[str]:
    """The columns `encoded_sql` selects from `c` (a `checked_sql` relation): `row` is the row number's
    expression. Only the hashes are computed here; a reading's cell and encoded values are computed from its
    indices, time and value in NumPy (`encode_scanned`), for accepted rows only: the same arithmetic in SQL (with
    each metric's encoding constants joined to every row) cost 30% of the scan query's time."""
    columns = [
        f"{row} AS {ROW}",
        "c.reason",
        f"CAST(c.metric_idx AS INTEGER) AS {METRIC_IDX}",
        f"CAST(c.region_idx AS INTEGER) AS {REGION_IDX}",
        f"epoch_us({EVENT_TIME}) AS {TIME_US}",
        f"{VALUE} AS {VALUE}",
        f"{_KEY_HASH} AS {KEY}",
    ]
    if entity_level:
        columns.append(f"{_partition(entity_level)} AS {ENTITY}")
    return columns


@dataclass(frozen=True)
class ScanEncoding:
    """What `encode_scanned` needs: per metric (layout order) the constants of its encoding, as arrays indexed by
    metric index, and the layout's grid. The arithmetic is privacy.encoding's (round half to even after clamping,
    integer bins over resolution steps); tests check the scan's vectors against `aggregate_readings` value for
    value."""

    lower: np.ndarray
    upper: np.ndarray
    resolution: np.ndarray
    centre: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    low_steps: np.ndarray
    span_steps: np.ndarray
    regions: int
    windows: int
    start_us: int
    window_us: int
    squares: bool
    bins: int

    @classmethod
    def of(cls, layout: PartitionLayout, encodings: Sequence[MetricEncoding]) -> ScanEncoding:
        def steps(value: float, resolution: float) -> int:
            return round(float(np.rint(value / resolution)))

        low = [steps(e.lower, e.resolution) for e in encodings]
        span = [max(steps(e.upper, e.resolution) - lo, 1) for e, lo in zip(encodings, low, strict=True)]
        return cls(
            lower=np.array([e.lower for e in encodings], dtype=np.float64),
            upper=np.array([e.upper for e in encodings], dtype=np.float64),
            resolution=np.array([e.resolution for e in encodings], dtype=np.float64),
            centre=np.array([e.centre_units for e in encodings], dtype=np.int64),
            scale=np.array([e.scale for e in encodings], dtype=np.int64),
            weight=np.array([e.count_weight for e in encodings], dtype=np.int64),
            low_steps=np.array(low, dtype=np.int64),
            span_steps=np.array(span, dtype=np.int64),
            regions=len(layout.regions),
            windows=layout.windows,
            start_us=int(layout.start.timestamp() * 1_000_000),
            window_us=int(layout.window.total_seconds() * 1_000_000),
            squares=layout.has(SUMSQ),
            bins=layout.bins,
        )


def encode_scanned(
    metric_idx: np.ndarray, region_idx: np.ndarray, time_us: np.ndarray, values: np.ndarray, encoding: ScanEncoding
) -> dict[str, np.ndarray]:
    """The CELL, SUM (and SUMSQ, BIN when the layout has them) columns of accepted readings (every index in
    range, every time inside the layout's interval, every value finite), as privacy.encoding computes them."""
    metric = metric_idx.astype(np.intp)
    cell = np.subtract(time_us, encoding.start_us, dtype=np.int64)
    np.floor_divide(cell, encoding.window_us, out=cell)
    cell += (metric * encoding.regions + region_idx) * encoding.windows
    scaled = np.clip(values, encoding.lower.take(metric), encoding.upper.take(metric))
    np.divide(scaled, encoding.resolution.take(metric), out=scaled)
    steps = np.rint(scaled, out=scaled).astype(np.int64)
    centred = steps - encoding.centre.take(metric)
    centred *= encoding.scale.take(metric)
    columns = {CELL: cell, SUM: centred}
    if encoding.squares:
        # Squared in float64: exact below 2^53, correctly rounded above (privacy.encoding.encode_squares).
        q = centred.astype(np.float64)
        columns[SUMSQ] = np.rint(q * q / encoding.weight.take(metric)).astype(np.int64)
    if encoding.bins:
        bins = (steps - encoding.low_steps.take(metric)) * encoding.bins // encoding.span_steps.take(metric)
        columns[BIN] = np.clip(bins, 0, encoding.bins - 1)
    return columns


def encoded_schema(layout: PartitionLayout, entity_level: bool) -> pa.Schema:
    fields = [
        pa.field(SOURCE, pa.int32()),
        pa.field(ROW, pa.int64()),
        pa.field(CELL, pa.int64()),
        pa.field(SUM, pa.int64()),
        pa.field(KEY, pa.uint64()),
    ]
    if layout.has(SUMSQ):
        fields.append(pa.field(SUMSQ, pa.int64()))
    if layout.bins:
        fields.append(pa.field(BIN, pa.int64()))
    if entity_level:
        fields.append(pa.field(ENTITY, pa.uint64()))
    return pa.schema(fields)


def scan_connection(plan: ReleasePlan, *, threads: int = 2) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the plan's lookup tables (metrics, regions, encodings) registered; a worker keeps
    one for all the shards it scans."""
    con = connect(threads)
    register_rules(con, plan.rules, plan.layout.metrics)
    return con


def staged_path(prefix: str, shard: int) -> str:
    """The Arrow file holding scan shard `shard`'s encoded rows of the file staged under `prefix`."""
    return f"{prefix}-s{shard:04d}.arrow"


def staged_raw_path(prefix: str) -> str:
    """The Arrow file holding the raw rows (the feed's columns, as parsed, and ROW_COLUMN) of a file read as
    batches (text, or Parquet not read by DuckDB) and staged under `prefix`: what `readings_at` types again for
    the few rows whose hashes collide, instead of parsing the file once more."""
    return f"{prefix}-raw.arrow"


@dataclass(frozen=True)
class _Piece:
    """A relation one file is read through: SQL over the file itself, or `fusion_raw`, a registered batch."""

    relation: str
    types: dict[str, pa.DataType]  # Arrow types of the mapped columns present
    batch: pa.Table | None = None  # the raw batch behind `fusion_raw`, with a row-number column
    malformed: tuple[tuple[int, str], ...] = ()  # the batch's unparseable lines (line number, text)
    missing: tuple[str, ...] = ()  # required columns the file lacks: every row of it is refused (missing_column)


class FeedScanner:
    """Scans one institution's feed files for a release plan, on a connection from `scan_connection` (its own
    when none is given), taken when it is first needed."""

    def __init__(
        self,
        plan: ReleasePlan,
        institution: InstitutionConfig,
        *,
        connection: duckdb.DuckDBPyConnection | None = None,
        connect: Callable[[], duckdb.DuckDBPyConnection] | None = None,
        threads: int = 2,
        sources: list[tuple[int, str]] | None = None,
        staged: Mapping[int, str] | None = None,
    ) -> None:
        """`connect`: where the connection comes from when `connection` is None (called once, when it is first
        needed; its own otherwise). `sources`: the institution's files (`feed_sources`), listed once by whoever
        plans the scan so that every shard of a run reads the same ones; listed here when None. `staged`: for
        files already staged (`stage`), their prefix by `src`: a shard reads its Arrow file instead of scanning
        the file (their rows, rejects and dead letters were counted when they were staged)."""
        self.plan = plan
        self.institution = institution
        self.entity_level = plan.config.privacy.unit is PrivacyUnit.ENTITY
        self.sources = feed_sources(plan, institution) if sources is None else list(sources)
        self.schema = encoded_schema(plan.layout, self.entity_level)
        self._encoding = ScanEncoding.of(plan.layout, plan.params.encodings)
        self._rules: ReadingRules = plan.rules
        self._owned = connection is None and connect is None
        self._connection = connection
        self._connect = connect or (lambda: scan_connection(plan, threads=threads))
        self._staged = dict(staged or {})

    @property
    def _con(self) -> duckdb.DuckDBPyConnection:
        if self._connection is None:
            self._connection = self._connect()
        return self._connection

    def close(self) -> None:
        if self._owned and self._connection is not None:
            self._connection.close()

    def _pieces(self, src: int) -> Iterator[_Piece]:
        """File `src` as the relations it is read through: the whole file for Parquet that DuckDB reads, one
        registered Arrow batch at a time otherwise."""
        feed_index, path = self.sources[src]
        feed = self.institution.feeds[feed_index]
        columns = mapped_columns(feed)
        if _read_by_duckdb(path, feed):
            local = _local(path)
            schema = pq.read_schema(local)
            types = {f: schema.field(c).type for f, c in columns.items() if c in schema.names}
            # No Hive partitioning: a folder named like region=north must not stand in for the file's own column.
            scan = f"read_parquet({_quote(local)}, file_row_number = true, hive_partitioning = false)"
            wanted = ", ".join(
                '"' + c.replace('"', '""') + '"' for c in dict.fromkeys(columns.values()) if c in schema.names
            )
            yield _Piece(
                f"(SELECT {wanted + ', ' if wanted else ''}file_row_number AS {ROW_COLUMN} FROM {scan})",
                types,
                missing=absent_columns(feed, schema.names),
            )
            return
        offset = 0  # rows of the file already read, so row numbers point into the file
        for raw in read_feed_file(path, feed, batch_rows=self.plan.config.pipeline.batch_rows):
            table = raw.table.append_column(
                ROW_COLUMN, pa.array(np.arange(raw.table.num_rows, dtype=np.int64) + offset)
            )
            types = {f: raw.table.schema.field(c).type for f, c in columns.items() if c in raw.table.column_names}
            yield _Piece("fusion_raw", types, table, raw.malformed, raw.missing_columns)
            offset += raw.table.num_rows

    def stage(self, src: int, prefix: str, shards: int, counts: ShardScan) -> Iterator[tuple[str, pa.Table]]:
        """Scan file `src` once for all `shards` scan shards: its encoded rows go to one Arrow file per shard
        (`staged_path(prefix, shard)`), written as DuckDB streams them, and, for a file read as batches, its raw
        rows to `staged_raw_path(prefix)`; all are complete once this generator is exhausted. Rows read and
        rejects are added to `counts`, and dead letters yielded as they are found. A file that cannot be read
        stages no rows (see `_file_rows`)."""
        scanned = ShardScan()  # this file's counts
        paths = [staged_path(prefix, shard) for shard in range(shards)]
        temporaries = {path: f"{path}.tmp-{secrets.token_hex(6)}" for path in [*paths, staged_raw_path(prefix)]}
        handles: dict[str, Any] = {}
        raw: list[tuple[pa.RecordBatchFileWriter, pa.Schema]] = []

        def keep_raw(piece: _Piece) -> None:
            if piece.batch is None:
                return
            if not raw:
                path = staged_raw_path(prefix)
                handles[path] = FileSystems.create(temporaries[path], compression_type=CompressionTypes.UNCOMPRESSED)
                raw.append((pa.ipc.new_file(handles[path], piece.batch.schema), piece.batch.schema))
            writer, schema = raw[0]
            writer.write_table(piece.batch.cast(schema))

        try:
            for path in paths:
                handles[path] = FileSystems.create(temporaries[path], compression_type=CompressionTypes.UNCOMPRESSED)
            writers = [pa.ipc.new_file(handles[path], self.schema) for path in paths]
            for rows in self._file_rows(src, None, shards, scanned, every_line=True, on_piece=keep_raw):
                order = pc.sort_indices(rows.column(SHARD))  # stable: each shard's rows keep the file's order
                rows = rows.take(order)
                ends = np.cumsum(np.bincount(rows.column(SHARD).to_numpy(), minlength=shards))
                for shard, writer in enumerate(writers):
                    start = int(ends[shard - 1]) if shard else 0
                    if ends[shard] > start:
                        writer.write_table(self._encoded(rows.slice(start, int(ends[shard]) - start), src))
                yield from scanned.dead_letters
                scanned.dead_letters.clear()
            yield from scanned.dead_letters
            scanned.dead_letters.clear()
            for writer in writers + [w for w, _ in raw]:
                writer.close()
            for handle in handles.values():
                handle.close()
            done = list(handles)
            if scanned.unreadable:  # none of its readings is used: each shard's file is written again, empty
                done = paths
                for path in paths:
                    handle = handles[path] = FileSystems.create(
                        temporaries[path], compression_type=CompressionTypes.UNCOMPRESSED
                    )
                    pa.ipc.new_file(handle, self.schema).close()
                    handle.close()
            for path in done:
                delete_if_exists(path)
                FileSystems.rename([temporaries[path]], [path])
            counts.add(scanned)
        finally:
            for handle in handles.values():
                if not handle.closed:
                    handle.close()
            for temporary in temporaries.values():
                delete_if_exists(temporary)

    def _read_staged(self, src: int, shard: int) -> pa.Table:
        return _read_arrow(staged_path(self._staged[src], shard))

    def _staged_raw(self, src: int, rows: np.ndarray) -> _Piece | None:
        """The raw rows at `rows` of a staged file read as batches, from its staged copy (None when there is no
        copy: the file is not staged, or DuckDB reads it directly, which costs little)."""
        if src not in self._staged or not exists(raw_path := staged_raw_path(self._staged[src])):
            return None
        table = _read_arrow(raw_path)
        numbers = table.column(ROW_COLUMN).to_numpy()
        at = np.searchsorted(numbers, rows)
        if np.any(at >= len(numbers)) or np.any(numbers[np.minimum(at, len(numbers) - 1)] != rows):
            raise InternalError(f"staged copy {raw_path} lacks rows it was scanned with")
        feed = self.institution.feeds[self.sources[src][0]]
        types = {f: table.schema.field(c).type for f, c in mapped_columns(feed).items() if c in table.column_names}
        return _Piece("fusion_raw", types, take_rows(table, at))

    def _checked(self, src: int, relation: str, types: dict[str, pa.DataType]) -> str:
        feed = self.institution.feeds[self.sources[src][0]]
        return checked_sql(
            relation,
            rules=self._rules,
            columns=mapped_columns(feed),
            types=types,
            time_format=feed.time_format.value,
        )

    # --- scanning --------------------------------------------------------------------------------------------

    def scan(self, shard: int, shards: int) -> ShardScan:
        """Every file of the institution, for scan shard `shard` of `shards`. Unparseable lines belong to
        shard 0. A staged file contributes its shard's encoded rows only (it was counted when staged)."""
        result = ShardScan()
        for src in range(len(self.sources)):
            if src in self._staged:
                result.encoded.append(self._read_staged(src, shard))
                continue
            scanned = ShardScan()  # this file's counts
            for rows in self._file_rows(src, shard, shards, scanned, every_line=shard == 0):
                scanned.encoded.append(self._encoded(rows, src))
            if scanned.unreadable:
                scanned.encoded.clear()
            result.add(scanned)
        return result

    def _file_rows(
        self,
        src: int,
        shard: int | None,
        shards: int,
        counts: ShardScan,
        *,
        every_line: bool,
        on_piece: Callable[[_Piece], None] | None = None,
    ) -> Iterator[pa.Table]:
        """`_scanned` over file `src`, counting into `counts` (empty: this file's alone), with its tally in
        `counts.files`. A file that cannot be read (DAMAGE_ERRORS) is dead-lettered whole: `counts.unreadable`
        names it and none of the rows it yielded may be used; rejects recorded before the damage stay counted,
        and, with `every_line`, the file adds one malformed record saying what failed."""
        path = self.sources[src][1]
        try:
            yield from self._scanned(src, shard, shards, counts, every_line=every_line, on_piece=on_piece)
        except TRANSIENT_ERRORS as exc:  # not the file's fault: say which file, and stop (a later run may read it)
            raise FeedUnavailable(
                f"feed file {path} cannot be read now ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                "check that it exists and this user may read it, then run the interval again"
            ) from None
        except DAMAGE_ERRORS as exc:
            if not self._damaged(src, exc):
                raise
            error = " ".join(f"{type(exc).__name__}: {exc}".split())
            counts.unreadable.add(path)
            counts.rows_read = sum(counts.rejected.values())  # its accepted rows (and rejects not recorded) go
            if every_line:
                counts.rows_read += 1
                counts.rejected[RejectReason.MALFORMED_RECORD.value] += 1
                letters = malformed_letters(((0, f"unreadable file, none of its readings used: {error}"),), path)
                counts.dead_letters.append((f"{self._letter_name(src, shard)}-unreadable", letters))
            fault = f"unreadable ({error}); none of its readings is used"
            counts.files.setdefault(path, FileTally()).refuse(RejectReason.MALFORMED_RECORD.value, fault)
        tally = counts.files.setdefault(path, FileTally())
        tally.read, tally.rejected = counts.rows_read, Counter(counts.rejected)

    def _damaged(self, src: int, exc: BaseException) -> bool:
        """Whether `exc`, raised while file `src` was scanned, says that the file itself is damaged: reading it
        again, on its own, fails too. (A DuckDB error may be the query's, an OSError a full disk's.)"""
        feed_index, path = self.sources[src]
        feed = self.institution.feeds[feed_index]
        return file_damaged(exc, path, feed, batch_rows=self.plan.config.pipeline.batch_rows)

    def _letter_name(self, src: int, shard: int | None) -> str:
        feed_index, path = self.sources[src]
        label = "all" if shard is None else f"{shard:04d}"
        return f"{self.institution.feeds[feed_index].name}-{_short_hash(path)}-s{label}"

    def _refuse_rows(self, piece: _Piece, path: str, name: str, result: ShardScan) -> None:
        """Every row of a piece of a file that lacks a required column: refused as missing_column, and kept in
        the dead letters as read."""
        missing = ", ".join(f"'{c}'" for c in piece.missing)
        fault = f"lacks column(s) {missing}, mapped to required reading fields; none of its rows is a reading"
        result.files.setdefault(path, FileTally()).refuse(FileReason.MISSING_COLUMN.value, fault)
        tables: Iterable[pa.Table] = (
            [piece.batch]
            if piece.batch is not None
            else (
                pa.Table.from_batches([b])
                for b in self._con.sql(f"SELECT * FROM {piece.relation}").to_arrow_reader(
                    self.plan.config.pipeline.batch_rows
                )
            )
        )
        for number, table in enumerate(tables):
            if not table.num_rows:
                continue
            reasons = pa.array([FileReason.MISSING_COLUMN.value] * table.num_rows, pa.string())
            letters = dead_letters(table.drop_columns([ROW_COLUMN]), reasons, table.column(ROW_COLUMN), source=path)
            result.rows_read += table.num_rows
            result.rejected[FileReason.MISSING_COLUMN.value] += table.num_rows
            result.dead_letters.append((f"{name}-{number:05d}-missing-column", letters))

    def _scanned(
        self,
        src: int,
        shard: int | None,
        shards: int,
        result: ShardScan,
        *,
        every_line: bool,
        on_piece: Callable[[_Piece], None] | None = None,
    ) -> Iterator[pa.Table]:
        """The accepted rows of file `src` in scan shard `shard` (all shards, with their SHARD, when None), one
        table per piece (per streamed batch of a piece when None); rows read, rejects and dead letters are added
        to `result` (a piece's rejects once the piece is done), unparseable lines too when `every_line`;
        `on_piece` sees each piece before it is scanned."""
        path = self.sources[src][1]
        name = self._letter_name(src, shard)
        for number, piece in enumerate(self._pieces(src)):
            if on_piece is not None:
                on_piece(piece)
            relation, types, batch, malformed = piece.relation, piece.types, piece.batch, piece.malformed
            if malformed and every_line:
                result.rows_read += len(malformed)
                result.rejected[RejectReason.MALFORMED_RECORD.value] += len(malformed)
                result.dead_letters.append((f"{name}-{number:05d}-malformed", malformed_letters(malformed, path)))
            if piece.missing:  # a schema error of the file: its rows are refused, unread (shard 0 counts them)
                if every_line:
                    self._refuse_rows(piece, path, f"{name}-{number:05d}", result)
                continue
            if batch is not None and batch.num_rows == 0:
                continue
            if batch is not None:
                self._con.register("fusion_raw", duckdb_input(batch))
            try:
                sql = encoded_sql(
                    self._checked(src, relation, types),
                    layout=self.plan.layout,
                    entity_level=self.entity_level,
                    shard=shard,
                    shards=shards,
                )
                query = self._con.sql(sql)
                # A shard's rows are one table; staging (every shard at once) streams a whole file's rows.
                chunks: Iterable[pa.Table] = (
                    [query.to_arrow_table()]
                    if shard is not None
                    else (
                        pa.Table.from_batches([b])
                        for b in query.to_arrow_reader(self.plan.config.pipeline.batch_rows)
                    )
                )
                bad: list[pa.Table] = []
                for rows in chunks:
                    result.rows_read += rows.num_rows
                    reason = rows.column("reason")
                    if reason.null_count != rows.num_rows:
                        bad.append(rows.filter(pc.is_valid(reason)).select([ROW, "reason"]))
                        rows = rows.filter(pc.is_null(reason))
                    yield rows
                if bad:
                    rejects = pa.concat_tables(bad)
                    result.rejected.update(Counter(rejects.column("reason").to_pylist()))
                    raw = self._raw_rows(relation, batch, rejects.column(ROW))
                    letters = dead_letters(raw, rejects.column("reason"), rejects.column(ROW), source=path)
                    result.dead_letters.append((f"{name}-{number:05d}-invalid", letters))
            finally:
                if batch is not None:
                    self._con.unregister("fusion_raw")

    def scanned_rows(self, src: int, rows: pa.Table) -> ShardScan:
        """What `scan(0, 1)` makes of file `src` (a Parquet file DuckDB reads itself, with every required column)
        given its encoded rows (`encoded_sql`'s columns, every row of the file in the file's order) from a scan
        done elsewhere (`scan_windows`): its rows read, its rejects and their dead letters, its tally."""
        scanned = ShardScan()
        path = self.sources[src][1]
        scanned.rows_read = rows.num_rows
        reason = rows.column("reason")
        if reason.null_count != rows.num_rows:
            rejects = rows.filter(pc.is_valid(reason)).select([ROW, "reason"])
            rows = rows.filter(pc.is_null(reason))
            scanned.rejected.update(Counter(rejects.column("reason").to_pylist()))
            piece = next(self._pieces(src))
            raw = self._raw_rows(piece.relation, None, rejects.column(ROW))
            letters = dead_letters(raw, rejects.column("reason"), rejects.column(ROW), source=path)
            scanned.dead_letters.append((f"{self._letter_name(src, 0)}-{0:05d}-invalid", letters))
        scanned.encoded.append(self._encoded(rows, src))
        tally = scanned.files.setdefault(path, FileTally())
        tally.read, tally.rejected = scanned.rows_read, Counter(scanned.rejected)
        return scanned

    def _encoded(self, rows: pa.Table, src: int) -> pa.Table:
        """Accepted rows of file `src` (the scan query's columns) in the encoded schema: their cells and encoded
        values computed (`encode_scanned`), their hashes and row numbers as scanned."""

        def column(name: str) -> np.ndarray:
            values: np.ndarray = rows.column(name).to_numpy()
            return values

        encoded = encode_scanned(
            column(METRIC_IDX), column(REGION_IDX), column(TIME_US), column(VALUE), self._encoding
        )
        columns: dict[str, Any] = {SOURCE: pa.array(np.full(rows.num_rows, src, dtype=np.int32))}
        for name in self.schema.names[1:]:
            columns[name] = encoded[name] if name in encoded else rows.column(name)
        return pa.table(columns).cast(self.schema)

    def _raw_rows(self, relation: str, batch: pa.Table | None, rows: pa.ChunkedArray) -> pa.Table:
        """The raw columns (the feed's own names) of the given rows, in that order."""
        if batch is not None:
            position = pc.subtract(rows, batch.column(ROW_COLUMN)[0])
            return take_rows(batch.drop_columns([ROW_COLUMN]), position)
        self._con.register("fusion_wanted", pa.table({"want": rows, "ord": np.arange(len(rows), dtype=np.int64)}))
        try:
            table = self._con.sql(
                f"SELECT r.* FROM {relation} r JOIN fusion_wanted w ON r.{ROW_COLUMN} = w.want ORDER BY w.ord"
            ).to_arrow_table()
        finally:
            self._con.unregister("fusion_wanted")
        return table.drop_columns([ROW_COLUMN])

    def readings_at(self, src: int, rows: np.ndarray) -> pa.Table:
        """The typed readings (READING_SCHEMA) at the given rows of file `src`, in the order of `rows`; used for
        the few rows whose hashes collide, to compare them in full. A staged file read as batches is typed again
        from its staged raw rows, not parsed again."""
        wanted = pa.table({"want": pa.array(rows, pa.int64()), "ord": np.arange(len(rows), dtype=np.int64)})
        pieces = []
        staged = self._staged_raw(src, np.asarray(rows, dtype=np.int64))
        self._con.register("fusion_wanted", wanted)
        try:
            for piece in [staged] if staged is not None else self._pieces(src):
                relation, types, batch = piece.relation, piece.types, piece.batch
                if batch is not None:
                    self._con.register("fusion_raw", duckdb_input(batch))
                try:
                    sql = self._checked(src, relation, types)
                    pieces.append(
                        self._con.sql(
                            f"SELECT c.*, w.ord FROM ({sql}) c JOIN fusion_wanted w ON c.row_id = w.want"
                        ).to_arrow_table()
                    )
                finally:
                    if batch is not None:
                        self._con.unregister("fusion_raw")
        finally:
            self._con.unregister("fusion_wanted")
        found = pa.concat_tables(pieces).sort_by("ord")
        return found.select(list(READING_SCHEMA.names)).cast(READING_SCHEMA)


#: A scan of several windows numbers each row `file << WINDOW_FILE_SHIFT | row in its file` (files hold < 2^40 rows).
WINDOW_FILE_SHIFT = 40


def scan_windows(
    plans: Sequence[ReleasePlan],
    institution_id: str,
    sources: Sequence[list[tuple[int, str]]],
    connection: duckdb.DuckDBPyConnection,
) -> list[ShardScan] | None:
    """One institution's files of several release plans (disjoint intervals of one layout's shape, such as a
    stream's windows: `sources[i]` are plan i's files) scanned in one DuckDB pass; per plan what
    `FeedScanner(plan, ...).scan(0, 1)` returns, the same rows in the same order (each row validated against its
    own plan's interval, encoded against its own plan's layout), the same rejects, dead letters and file tallies.
    None when they cannot be scanned together (a plan of another shape, a file DuckDB does not read itself, a
    file whose schema differs or lacks a column, a damaged file): then each plan's scan decides, as before.

    A query's fixed costs (parsing, binding, opening the files, scheduling threads) outweigh a small window's
    rows: a stream releasing a burst of windows pays them once per institution, not once per window, and a release
    of several windows (each its own spooled files) once, not once per file."""
    if not plans or len(plans) != len(sources):
        return None
    first = plans[0]
    entity_level = first.config.privacy.unit is PrivacyUnit.ENTITY
    shape = _shape(first)
    scanners = [
        FeedScanner(plan, plan.config.institution(institution_id), connection=connection, sources=list(files))
        for plan, files in zip(plans, sources, strict=True)
    ]
    files: list[tuple[int, int, str]] = []  # (plan, src, local path), in the order of the scan's file_index
    read: tuple[Any, ...] | None = None  # what every file must share: columns mapped, time format, schema
    try:
        for number, (plan, scanner) in enumerate(zip(plans, scanners, strict=True)):
            if _shape(plan) != shape or (plan.config.privacy.unit is PrivacyUnit.ENTITY) != entity_level:
                return None
            for src, (feed_index, path) in enumerate(scanner.sources):
                feed = scanner.institution.feeds[feed_index]
                if not _read_by_duckdb(path, feed):
                    return None
                schema = pq.read_schema(_local(path))
                columns = mapped_columns(feed)
                if absent_columns(feed, schema.names):
                    return None
                this = (tuple(columns.items()), feed.time_format, tuple(schema.names), tuple(schema.types))
                if read is None:
                    read = this
                elif this != read:
                    return None
                files.append((number, src, _local(path)))
    except DAMAGE_ERRORS:
        return None
    scans = [ShardScan() for _ in plans]
    if not files:
        return scans
    assert read is not None
    columns = dict(read[0])
    names, types_ = read[2], read[3]
    types = {f: types_[names.index(c)] for f, c in columns.items() if c in names}
    wanted = ", ".join('"' + c.replace('"', '""') + '"' for c in dict.fromkeys(columns.values()) if c in names)
    listed = ", ".join(_quote(path) for _, _, path in files)
    relation = (
        f"(SELECT {wanted + ', ' if wanted else ''}CAST(file_index AS BIGINT) * {1 << WINDOW_FILE_SHIFT} "
        f"+ file_row_number AS {ROW_COLUMN} FROM read_parquet([{listed}], file_row_number = true, "
        "hive_partitioning = false))"
    )
    # Validated against the span of every interval, then each row against its own: a row outside its interval
    # whose first reason in that span comes after out_of_interval (or that has none) is out_of_interval, exactly
    # as its own plan's scan finds it (the reasons are checked in REASON_PRECEDENCE order).
    span = ReadingRules(
        plausible=first.rules.plausible,
        regions=first.rules.regions,
        start=min(plan.layout.start for plan in plans),
        end=max(plan.layout.end for plan in plans),
    )
    checked = checked_sql(relation, rules=span, columns=columns, types=types, time_format=read[1].value)
    order = REASON_PRECEDENCE.index(RejectReason.OUT_OF_INTERVAL)
    later = ", ".join(_quote(r.value) for r in REASON_PRECEDENCE[order + 1 :])
    mask = (1 << WINDOW_FILE_SHIFT) - 1
    encoded = _scanned_columns(entity_level, row=f"c.row_id & {mask}")
    sql = f"""
        WITH checked AS ({checked}),
        c AS (
            SELECT checked.* REPLACE (
                CASE WHEN (checked.reason IS NULL OR checked.reason IN ({later}))
                          AND (checked.{EVENT_TIME} < w.w_start OR checked.{EVENT_TIME} >= w.w_end)
                     THEN {_quote(RejectReason.OUT_OF_INTERVAL.value)} ELSE checked.reason END AS reason
            )
            FROM checked JOIN fusion_windows w ON checked.row_id >> {WINDOW_FILE_SHIFT} = w.file
        )
        SELECT c.row_id >> {WINDOW_FILE_SHIFT} AS w_file, {", ".join(encoded)}
        FROM c
        ORDER BY c.row_id
    """
    starts = [plans[number].layout.start for number, _, _ in files]
    ends = [plans[number].layout.end for number, _, _ in files]
    windows = pa.table(
        {
            "file": pa.array(range(len(files)), pa.int64()),
            "w_start": pa.array(starts, pa.timestamp("us", tz="UTC")),
            "w_end": pa.array(ends, pa.timestamp("us", tz="UTC")),
        }
    )
    connection.register("fusion_windows", windows)
    try:
        table = connection.sql(sql).to_arrow_table()
    except (*DAMAGE_ERRORS, *TRANSIENT_ERRORS):  # each plan's own scan says which file, and what it does about it
        return None
    finally:
        connection.unregister("fusion_windows")
    bounds = np.searchsorted(table.column("w_file").to_numpy(), np.arange(len(files) + 1))
    for index, (number, src, _) in enumerate(files):
        rows = table.slice(int(bounds[index]), int(bounds[index + 1] - bounds[index]))
        scans[number].add(scanners[number].scanned_rows(src, rows))
    return scans


def _shape(plan: ReleasePlan) -> tuple[Any, ...]:
    """What a plan's scan depends on besides its interval and its files."""
    layout, rules = plan.layout, plan.rules
    cells = (layout.metrics, layout.regions, layout.window, layout.windows, layout.has(SUMSQ), layout.bins)
    return (*cells, plan.params.encodings, rules.plausible, rules.regions)


def _read_arrow(path: str) -> pa.Table:
    """An Arrow IPC file: memory-mapped when local (columns nobody reads are never paged in)."""
    if _is_local(path):
        return pa.ipc.open_file(pa.memory_map(_local(path))).read_all()
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return pa.ipc.open_file(pa.BufferReader(handle.read())).read_all()


def malformed_letters(lines: tuple[tuple[int, str], ...], source: str) -> pa.Table:
    """Unparseable lines in the dead-letter shape (their text, reason, file and line number)."""
    from schemas.readings import DEAD_LETTER_REASON, DEAD_LETTER_ROW, DEAD_LETTER_SOURCE

    return pa.table(
        {
            "_text": pa.array([text for _, text in lines], pa.string()),
            DEAD_LETTER_REASON: pa.array([RejectReason.MALFORMED_RECORD.value] * len(lines), pa.string()),
            DEAD_LETTER_SOURCE: pa.array([source] * len(lines), pa.string()),
            DEAD_LETTER_ROW: pa.array([n for n, _ in lines], pa.int64()),
        }
    )
