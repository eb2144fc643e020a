"""Reading an institution's feed files through Beam FileSystems, as Arrow batches of raw columns.

Every mapped column is read as text for CSV and JSONL (so a bad value cannot fail a whole block), and in its
own type for Parquet; typing is validation's job. Lines that cannot be parsed at all come back as malformed
rows so they reach the dead-letter output too.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from fusion.config import FeedConfig, FeedFormat
from fusion.errors import FusionError
from schemas.readings import ALL_FIELDS


@dataclass(frozen=True)
class RawBatch:
    """Raw rows from one file (the feed's column names) and the lines that could not be parsed."""

    table: pa.Table
    malformed: tuple[tuple[int, str], ...] = ()  # (line number, text)

    @property
    def rows(self) -> int:
        return self.table.num_rows + len(self.malformed)


def list_feed_files(pattern: str) -> list[str]:
    """Files matching a path or glob (local or any Beam FileSystems URL), sorted; refuses an empty match."""
    matches = FileSystems.match([pattern])[0].metadata_list
    paths = sorted(m.path for m in matches)
    if not paths:
        raise FusionError(f"no feed files match '{pattern}'; check the feed's path in the config")
    return paths


def feed_files(pattern: str, start: datetime, end: datetime) -> list[str]:
    """Files of a feed for [start, end). A `{date}` placeholder (YYYY-MM-DD, UTC) is expanded to every day the
    interval touches, so daily-partitioned feeds read only the days they need."""
    if "{date}" not in pattern:
        return list_feed_files(pattern)
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    paths: list[str] = []
    day = start.date()
    while datetime.combine(day, datetime.min.time(), tzinfo=UTC) < end:
        expanded = pattern.replace("{date}", day.isoformat())
        paths += sorted(m.path for m in FileSystems.match([expanded])[0].metadata_list)
        day += timedelta(days=1)
    if not paths:
        raise FusionError(
            f"no feed files match '{pattern}' for {start.isoformat()} .. {end.isoformat()}; check the feed's path"
        )
    return paths


def mapped_columns(feed: FeedConfig) -> dict[str, str]:
    return {field: feed.column_for(field) for field in ALL_FIELDS}


def read_feed_file(path: str, feed: FeedConfig, *, batch_rows: int) -> Iterator[RawBatch]:
    """Stream one file as RawBatches of at most about `batch_rows` rows."""
    wanted = list(dict.fromkeys(mapped_columns(feed).values()))
    if feed.format is FeedFormat.PARQUET:
        yield from _read_parquet(path, wanted, batch_rows)
    elif feed.format is FeedFormat.CSV:
        yield from _read_csv(path, wanted, batch_rows)
    else:
        yield from _read_jsonl(path, wanted, batch_rows)


class _ReadableStream(io.RawIOBase):
    """Adapts Beam's file objects (a CompressedFile for .gz/.bz2/... feeds) to a standard binary stream."""

    def __init__(self, handle: Any) -> None:
        super().__init__()
        self._handle = handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._handle.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _open_stream(path: str) -> io.BufferedReader:
    """A buffered binary stream of the file's (decompressed) bytes; compression is inferred from the name."""
    return io.BufferedReader(_ReadableStream(FileSystems.open(path, compression_type=CompressionTypes.AUTO)))


def refuse_duplicate_columns(path: str, names: list[str], wanted: Iterable[str]) -> None:
    """Refuse a file in which a mapped column appears more than once: which of them holds the reading's field
    is ambiguous (CSV readers take the first, JSON the last), so no reading of it is taken."""
    for column in wanted:
        if names.count(column) > 1:
            raise FusionError(
                f"feed file {path}: column '{column}' appears {names.count(column)} times; each reading field must "
                "come from one column (rename or drop the others)"
            )


def _csv_header(path: str) -> list[str]:
    with _open_stream(path) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="replace", newline="")
        try:
            return next(csv.reader(text), [])
        except csv.Error as exc:  # e.g. a quote the header never closes
            raise FusionError(f"feed file {path}: unreadable CSV header ({exc})") from None


def _read_parquet(path: str, wanted: list[str], batch_rows: int) -> Iterator[RawBatch]:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        parquet = pq.ParquetFile(handle)
        refuse_duplicate_columns(path, parquet.schema_arrow.names, wanted)
        present = [c for c in wanted if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=present):
            yield RawBatch(pa.Table.from_batches([batch]))


def _read_csv(path: str, wanted: list[str], batch_rows: int) -> Iterator[RawBatch]:
    malformed: list[tuple[int, str]] = []

    def keep_malformed(row: pacsv.InvalidRow) -> str:
        malformed.append((row.number if row.number is not None else -1, row.text))
        return "skip"

    refuse_duplicate_columns(path, _csv_header(path), wanted)
    with _open_stream(path) as handle:
        if not handle.peek(1):  # an empty file (no header either) holds no rows; pyarrow would refuse it
            return
        reader = pacsv.open_csv(
            handle,
            read_options=pacsv.ReadOptions(block_size=1 << 22),
            parse_options=pacsv.ParseOptions(invalid_row_handler=keep_malformed),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in wanted},
                include_columns=wanted,
                include_missing_columns=True,
                null_values=[""],  # only empty fields are missing: "NaN" or "n/a" must reach validation
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
        pending: list[pa.RecordBatch] = []
        size = 0
        for batch in reader:
            pending.append(batch)
            size += batch.num_rows
            if size >= batch_rows:
                yield RawBatch(pa.Table.from_batches(pending), tuple(malformed))
                pending, size = [], 0
                malformed.clear()
        if pending or malformed:
            yield RawBatch(pa.Table.from_batches(pending, schema=reader.schema), tuple(malformed))


def _read_jsonl(path: str, wanted: list[str], batch_rows: int) -> Iterator[RawBatch]:
    with _open_stream(path) as handle:
        # utf-8-sig: a byte-order mark before the first record is not part of it.
        text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="replace")
        yield from _jsonl_batches(text, wanted, batch_rows)


def read_jsonl_lines(lines: Iterable[str], feed: FeedConfig, *, batch_rows: int) -> Iterator[RawBatch]:
    """JSON lines from anywhere (a message payload, standard input) as RawBatches, like a JSONL feed file."""
    yield from _jsonl_batches(lines, list(dict.fromkeys(mapped_columns(feed).values())), batch_rows)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: {"value": 1, "value": 9} is ambiguous (a malformed record), not 9."""
    record = dict(pairs)
    if len(record) != len(pairs):
        raise ValueError("duplicate key")
    return record


def _jsonl_batches(lines: Iterable[str], wanted: list[str], batch_rows: int) -> Iterator[RawBatch]:
    columns: dict[str, list[str | None]] = {c: [] for c in wanted}
    malformed: list[tuple[int, str]] = []

    def flush() -> RawBatch:
        table = pa.table({c: pa.array(v, pa.string()) for c, v in columns.items()})
        batch = RawBatch(table, tuple(malformed))
        for values in columns.values():
            values.clear()
        malformed.clear()
        return batch

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:  # the whole line is kept: the dead letter must let the institution recover the row
            malformed.append((number, line.rstrip("\n")))
            continue
        for c in wanted:
            v = record.get(c)
            columns[c].append(None if v is None else (v if isinstance(v, str) else json.dumps(v)))
        if len(columns[wanted[0]]) >= batch_rows:
            yield flush()
    if columns[wanted[0]] or malformed:
        yield flush()
