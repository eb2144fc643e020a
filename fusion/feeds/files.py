"""Reading an institution's feed files through Beam FileSystems, as Arrow batches of raw columns.

Every mapped column is read as text for CSV and JSONL (so a bad value cannot fail a whole block), and in its
own type for Parquet; typing is validation's job. Lines that cannot be parsed at all (a CSV row that is not
UTF-8 among them) come back as malformed rows so they reach the dead-letter output too, and the rest of the file
is read.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import io
import json
import lzma
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import zstandard
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from fusion.config.federation import FeedConfig, FeedFormat
from fusion.errors import FusionError, InternalError
from schemas.readings import ALL_FIELDS, REQUIRED_FIELDS


@dataclass(frozen=True)
class RawBatch:
    """Raw rows from one file (the feed's column names) and the lines that could not be parsed."""

    table: pa.Table
    malformed: tuple[tuple[int, str], ...] = ()  # (line number, text)
    # Mapped columns of required reading fields that the file's header or schema lacks: no row of it is a reading.
    missing_columns: tuple[str, ...] = ()

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


@dataclass(frozen=True)
class FeedListing:
    """A feed's files for an interval, and what matched nothing: each day's expanded pattern for a `{date}`
    feed, the pattern itself otherwise."""

    paths: tuple[str, ...]
    missing: tuple[str, ...] = ()


def feed_listing(pattern: str, start: datetime, end: datetime) -> FeedListing:
    """Files of a feed for [start, end). A `{date}` placeholder (YYYY-MM-DD, UTC) is expanded to every day the
    interval touches, so daily-partitioned feeds read only the days they need; a day without files is missing."""
    if "{date}" not in pattern:
        paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
        return FeedListing(tuple(paths), () if paths else (pattern,))
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    found: list[str] = []
    missing: list[str] = []
    day = start.date()
    while datetime.combine(day, datetime.min.time(), tzinfo=UTC) < end:
        expanded = pattern.replace("{date}", day.isoformat())
        paths = sorted(m.path for m in FileSystems.match([expanded])[0].metadata_list)
        found += paths
        if not paths:
            missing.append(expanded)
        day += timedelta(days=1)
    return FeedListing(tuple(found), tuple(missing))


def feed_files(pattern: str, start: datetime, end: datetime) -> list[str]:
    """Files of a feed for [start, end) (see `feed_listing`); refuses an empty match, naming the paths tried."""
    listing = feed_listing(pattern, start, end)
    if not listing.paths:
        raise FusionError(
            f"no feed files match {', '.join(listing.missing)} for {start.isoformat()} .. {end.isoformat()}; "
            "check the feed's path"
        )
    return list(listing.paths)


def mapped_columns(feed: FeedConfig) -> dict[str, str]:
    return {field: feed.column_for(field) for field in ALL_FIELDS}


def absent_columns(feed: FeedConfig, names: Iterable[str]) -> tuple[str, ...]:
    """The feed's columns of required reading fields that are not among a file's column `names`."""
    present = set(names)
    return tuple(c for c in dict.fromkeys(feed.column_for(f) for f in REQUIRED_FIELDS) if c not in present)


def read_feed_file(path: str, feed: FeedConfig, *, batch_rows: int) -> Iterator[RawBatch]:
    """Stream one file as RawBatches of at most about `batch_rows` rows. A CSV or Parquet file that lacks a
    required column yields its rows all the same, with `missing_columns` set (at least one batch, even empty)."""
    wanted = list(dict.fromkeys(mapped_columns(feed).values()))
    if feed.format is FeedFormat.PARQUET:
        yield from _read_parquet(path, wanted, feed, batch_rows)
    elif feed.format is FeedFormat.CSV:
        yield from _read_csv(path, wanted, feed, batch_rows)
    else:
        yield from _read_jsonl(path, wanted, batch_rows)


class _ReadableStream(io.RawIOBase):
    """Adapts a Beam file object (of any file system) to a standard binary stream."""

    def __init__(self, handle: Any) -> None:
        super().__init__()
        self._handle = handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._handle.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()


#: Bytes of a compressed file read at once.
COMPRESSED_READ_BYTES = 1 << 20


class TruncatedStream(EOFError):
    """A compressed feed file that ends before its compressed stream does (cut off in a copy or a transfer): what
    it holds is not the file that was written, so the scan dead-letters it whole (an EOFError is damage)."""


def _decompressor(compression: str) -> Any:
    """A fresh decompressor of one stream (one gzip member, one zstd frame...) of `compression`, as Beam's."""
    if compression == CompressionTypes.GZIP:
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if compression == CompressionTypes.DEFLATE:
        return zlib.decompressobj()
    if compression == CompressionTypes.BZIP2:
        return bz2.BZ2Decompressor()
    if compression == CompressionTypes.LZMA:
        return lzma.LZMADecompressor()
    if compression == CompressionTypes.ZSTD:
        return zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
    raise InternalError(f"no decompressor for {compression}")


class _DecompressedStream(io.RawIOBase):
    """The decompressed bytes of a compressed file (a Beam file object opened uncompressed), one stream after
    another (concatenated gzip members, as `cat a.gz b.gz`). Unlike Beam's CompressedFile, which ends quietly
    where the file is cut, a file that ends inside a stream raises TruncatedStream: its last line would be read
    cut short (5.1 as 5), and the rest of it not at all."""

    def __init__(self, handle: Any, compression: str, path: str) -> None:
        super().__init__()
        self._handle, self._compression, self._path = handle, compression, path
        self._decompressor: Any = None  # None: between streams
        self._pending, self._at = b"", 0  # decompressed bytes not yet read, and how far they were read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._at == len(self._pending):
            if not self._refill():
                return 0
        size = min(len(buffer), len(self._pending) - self._at)
        buffer[:size] = memoryview(self._pending)[self._at : self._at + size]
        self._at += size
        return size

    def _refill(self) -> bool:
        """Decompress more of the file into `_pending`; False at the end of the file after a whole stream."""
        unused = self._decompressor.unused_data if self._decompressor is not None else b""
        data = unused or self._handle.read(COMPRESSED_READ_BYTES)
        if self._decompressor is not None and self._decompressor.eof:
            self._decompressor = None  # the stream is whole: what follows starts the next one
        if not data:
            if self._decompressor is not None:
                raise TruncatedStream(
                    f"feed file {self._path} ends inside its {self._compression} stream: it is truncated"
                )
            return False
        if self._decompressor is None:
            self._decompressor = _decompressor(self._compression)
        self._pending, self._at = self._decompressor.decompress(data), 0
        return True

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()


def _open_stream(path: str) -> io.BufferedReader:
    """A buffered binary stream of the file's (decompressed) bytes; compression is inferred from the name."""
    handle = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    compression = CompressionTypes.detect_compression_type(path)
    if compression == CompressionTypes.UNCOMPRESSED:
        return io.BufferedReader(_ReadableStream(handle))
    return io.BufferedReader(_DecompressedStream(handle, compression, path))


class AmbiguousColumns(FusionError):
    """A feed file names a mapped column more than once: the file is dead-lettered whole (the scan treats it
    like a damaged file), and the run goes on."""


def refuse_duplicate_columns(path: str, names: list[str], wanted: Iterable[str]) -> None:
    """Refuse a file in which a mapped column appears more than once: which of them holds the reading's field
    is ambiguous (CSV readers take the first, JSON the last), so no reading of it is taken."""
    for column in wanted:
        if names.count(column) > 1:
            raise AmbiguousColumns(
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


def _read_parquet(path: str, wanted: list[str], feed: FeedConfig, batch_rows: int) -> Iterator[RawBatch]:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        refuse_duplicate_columns(path, names, wanted)
        present = [c for c in wanted if c in names]
        missing = absent_columns(feed, names)
        yielded = False
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=present):
            _refuse_invalid_columns(batch)
            yielded = True
            yield RawBatch(pa.Table.from_batches([batch]), missing_columns=missing)
        if missing and not yielded:
            yield RawBatch(parquet.schema_arrow.empty_table().select(present), missing_columns=missing)


def _refuse_invalid_columns(batch: pa.RecordBatch) -> None:
    """Raise ArrowInvalid, naming the column, where a batch read from Parquet holds what Arrow's full validation
    refuses, such as text that is not UTF-8 (written by a writer that does not check it): pyarrow reads it as it
    is, and DuckDB, given it, fails beyond recovery ("database has been invalidated"). The file is damaged."""
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid as exc:
            raise pa.ArrowInvalid(f"column '{name}' is invalid ({exc})") from None


def _read_csv(path: str, wanted: list[str], feed: FeedConfig, batch_rows: int) -> Iterator[RawBatch]:
    malformed: list[tuple[int, str]] = []

    def keep_malformed(row: pacsv.InvalidRow) -> str:
        malformed.append((row.number if row.number is not None else -1, row.text))
        return "skip"

    header = _csv_header(path)
    refuse_duplicate_columns(path, header, wanted)
    missing = absent_columns(feed, header)
    with _open_stream(path) as handle:
        if not handle.peek(1):  # an empty file (no header either) holds no rows; pyarrow would refuse it
            return
        try:
            reader = pacsv.open_csv(
                handle,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                parse_options=pacsv.ParseOptions(invalid_row_handler=keep_malformed),
                convert_options=pacsv.ConvertOptions(
                    # Bytes, checked for UTF-8 here: as strings, one undecodable field would fail the whole file.
                    column_types={c: pa.binary() for c in wanted},
                    include_columns=wanted,
                    include_missing_columns=True,
                    null_values=[""],  # only empty fields are missing: "NaN" or "n/a" must reach validation
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=False,
                ),
            )
        except pa.ArrowInvalid:
            # pyarrow refuses a header without its line end, or a byte-order mark or blank lines alone ("Empty CSV
            # file"): no rows either, as with the line end or in an empty file (a header still names its columns).
            if not _one_line_at_most(path):
                raise
            if header and missing:
                yield RawBatch(pa.schema([(c, pa.string()) for c in wanted]).empty_table(), missing_columns=missing)
            return
        schema = pa.schema([pa.field(name, pa.string()) for name in reader.schema.names])
        pending: list[pa.RecordBatch] = []
        size = rows = 0  # rows: the file's rows parsed so far, to number a row that is not UTF-8
        yielded = False
        for batch in reader:
            text, undecodable = _utf8_rows(batch, schema, first_line=rows + 2)  # line 1 is the header
            rows += batch.num_rows
            malformed += undecodable
            pending.append(text)
            size += text.num_rows
            if size >= batch_rows:
                yield RawBatch(pa.Table.from_batches(pending, schema=schema), tuple(malformed), missing)
                yielded = True
                pending, size = [], 0
                malformed.clear()
        if pending or malformed or (missing and not yielded):
            yield RawBatch(pa.Table.from_batches(pending, schema=schema), tuple(malformed), missing)


#: Bytes of a CSV file read to tell whether it holds one line at most (a header is far shorter).
HEADER_BYTES = 1 << 20


def _one_line_at_most(path: str) -> bool:
    """Whether a file holds one line that is not blank at most (a byte-order mark aside)."""
    with _open_stream(path) as handle:
        data = handle.read(HEADER_BYTES + 1)
    if len(data) > HEADER_BYTES:
        return False
    lines = data.removeprefix(codecs.BOM_UTF8).replace(b"\r", b"\n").split(b"\n")
    return sum(1 for line in lines if line.strip()) <= 1


def _utf8_rows(
    batch: pa.RecordBatch, schema: pa.Schema, *, first_line: int
) -> tuple[pa.RecordBatch, list[tuple[int, str]]]:
    """A batch of CSV fields read as bytes -> (its rows that are UTF-8, as text in `schema`; the others as
    malformed lines: (line number, their fields with each undecodable byte written \\xNN)). A row's line
    number is `first_line` plus its index: exact when no earlier line of the file was malformed or quoted a
    line break."""
    try:
        return batch.cast(schema), []
    except pa.ArrowInvalid:  # some field is not UTF-8: find its rows (Python, on this batch only)
        pass
    bad = np.zeros(batch.num_rows, dtype=bool)
    for column in batch.columns:
        try:
            column.cast(pa.string())
            continue
        except pa.ArrowInvalid:
            pass
        for index, value in enumerate(column.to_pylist()):
            if value is not None and not _is_utf8(value):
                bad[index] = True
    lines = []
    for row in np.flatnonzero(bad).tolist():
        fields = [batch.column(c)[row].as_py() for c in range(batch.num_columns)]
        text = io.StringIO()
        csv.writer(text, lineterminator="").writerow(
            ["" if f is None else f.decode("utf-8", errors="backslashreplace") for f in fields]
        )
        lines.append((first_line + row, text.getvalue()))
    return batch.filter(pa.array(~bad)).cast(schema), lines


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_BLANK_LINE = re.compile(rb"^[ \t\r\x0b\x0c]*$", re.MULTILINE)  # what bytes.strip() empties (the last line too)
_BLANK_INSIDE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")  # a blank line followed by another line
# A first line, and a later line (after its "\n"), whose first character after JSON whitespace is not "{". The
# literal "\n" keeps the search at memchr speed, where "^" with re.MULTILINE is several times slower.
_NOT_AN_OBJECT_FIRST = re.compile(rb"[ \t]*[^{ \t\n]")
_NOT_AN_OBJECT_LATER = re.compile(rb"\n[ \t]*[^{ \t\n]")
#: What JSON counts as whitespace: a line holding nothing else is blank.
_JSON_WHITESPACE = " \t\r\n"
#: Bytes of JSON lines parsed at once (cut at a line end): Arrow's JSON reader parses a block in C++.
JSONL_BLOCK_BYTES = 16 << 20


def _read_jsonl(path: str, wanted: list[str], batch_rows: int) -> Iterator[RawBatch]:
    """A JSONL file in blocks of whole lines; each block parsed at once (Arrow), or line by line where Arrow
    could read it otherwise than `json.loads` does (then the per-line reader decides, exactly as for any line)."""
    with _open_stream(path) as handle:
        first_line, rest, head = 1, b"", True
        while True:
            block = handle.read(JSONL_BLOCK_BYTES)
            data = rest + block
            if block:
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    rest = data
                    continue
                data, rest = data[:cut], data[cut:]
            if head and data:  # a byte-order mark before the first record is not part of it (utf-8-sig)
                data, head = data.removeprefix(codecs.BOM_UTF8), False
            yield from _jsonl_block(data, wanted, batch_rows, first_line)
            first_line += data.count(b"\n")
            if not block:
                return


def _jsonl_block(data: bytes, wanted: list[str], batch_rows: int, first_line: int) -> Iterator[RawBatch]:
    table = _parsed_at_once(data, wanted)
    if table is None:
        text = io.StringIO(data.decode("utf-8", errors="replace"), newline=None)  # universal newlines, as a file
        yield from _jsonl_batches(text, wanted, batch_rows, first_line=first_line)
        return
    for offset in range(0, table.num_rows, batch_rows):
        yield RawBatch(table.slice(offset, batch_rows))


def _content_lines(data: bytes) -> int:
    """How many lines of `data` hold more than whitespace (what `bytes.strip` empties), as `split(b"\\n")` cuts
    them; fast when no line in the middle is blank."""
    if _BLANK_INSIDE.search(b"\n" + data) is None:  # no blank line but perhaps the last
        return data.count(b"\n") + (1 if data.rsplit(b"\n", 1)[-1].strip() else 0)
    return data.count(b"\n") + 1 - len(_BLANK_LINE.findall(data))


def _objects_only(data: bytes) -> bool:
    """Whether every content line of the block starts with "{" (after JSON whitespace). Arrow must not see any other
    line: `null` first in a block crashes the process (a segfault in its JSON reader), and `null` later is read as a
    record missing every field where `json.loads` finds a malformed record."""
    if b"\r" in data:  # Arrow ends a line at "\r" as at "\n"
        data = data.replace(b"\r", b"\n")
    return _NOT_AN_OBJECT_FIRST.match(data) is None and _NOT_AN_OBJECT_LATER.search(data) is None


def _text_fields(data: bytes, wanted: list[str]) -> list[str]:
    """The wanted fields whose value in the block's first line is a JSON string (none if it is not an object)."""
    try:
        first = json.loads(data[: data.find(b"\n")] if b"\n" in data else data)
    except (ValueError, RecursionError):  # nested deeper than Python's parser goes: not a reading either
        return []
    return [c for c in wanted if isinstance(first, dict) and isinstance(first.get(c), str)]


def _parsed_at_once(data: bytes, wanted: list[str]) -> pa.Table | None:
    """The wanted columns of a block of JSON lines as text, parsed by Arrow, as `_jsonl_batches` would read
    them; None where Arrow might differ: a line that is not exactly one object (malformed to `json.loads`), a
    repeated key, invalid UTF-8, NaN, a mapped column holding an object or array, or types mixed in a column."""
    rows = _content_lines(data)
    if rows == 0 or not _objects_only(data):
        return None
    options = pajson.ReadOptions(use_threads=False, block_size=len(data) + 1)
    try:
        # Mapped columns holding text in the first record are declared text: Arrow would otherwise read a time
        # into a timestamp (and a later number there is an error: the lines are then read one by one).
        parse = pajson.ParseOptions(explicit_schema=pa.schema([(c, pa.string()) for c in _text_fields(data, wanted)]))
        table = pajson.read_json(io.BytesIO(data), read_options=options, parse_options=parse)
        inferred = [f for f in table.schema if pa.types.is_temporal(f.type)]
        if inferred:  # text that looks like a time: read it again as the text it is
            schema = pa.schema([pa.field(f.name, pa.string()) if f in inferred else f for f in table.schema])
            parse = pajson.ParseOptions(explicit_schema=schema)
            table = pajson.read_json(io.BytesIO(data), read_options=options, parse_options=parse)
        if table.num_rows != rows:  # two objects on one line, or one across lines
            return None
        columns = {}
        for name in wanted:
            if name not in table.column_names:
                columns[name] = pa.nulls(rows, pa.string())
                continue
            column = table.column(name)
            kind = column.type
            if not (
                pa.types.is_string(kind)
                or pa.types.is_integer(kind)
                or pa.types.is_floating(kind)
                or pa.types.is_boolean(kind)
                or pa.types.is_null(kind)
            ):
                return None
            if pa.types.is_string(kind):
                column.validate(full=True)  # Arrow's JSON reader passes invalid UTF-8 through; json.loads replaces it
            text = column.cast(pa.string())
            if pa.types.is_floating(kind):  # written as Python writes a float (2.0, not 2): the same text
                whole = pc.match_substring_regex(text, r"^-?[0-9]+$")
                text = pc.if_else(whole, pc.binary_join_element_wise(text, ".0", ""), text)
            columns[name] = text
        return pa.table(columns)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None


def read_jsonl_lines(lines: Iterable[str], feed: FeedConfig, *, batch_rows: int) -> Iterator[RawBatch]:
    """JSON lines from anywhere (a message payload, standard input) as RawBatches, like a JSONL feed file."""
    yield from _jsonl_batches(lines, list(dict.fromkeys(mapped_columns(feed).values())), batch_rows)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: {"value": 1, "value": 9} is ambiguous (a malformed record), not 9."""
    record = dict(pairs)
    if len(record) != len(pairs):
        raise ValueError("duplicate key")
    return record


def _field_text(value: Any) -> str | None:
    """A JSON field's value as the text a batch holds (a string as it is, anything else as JSON). A string that is
    not Unicode text (a lone surrogate escape, `"\\ud800"`, which `json.loads` takes) raises UnicodeEncodeError, a
    ValueError: its line is a malformed record, where it used to make the whole file unreadable."""
    if value is None:
        return None
    if isinstance(value, str):
        value.encode("utf-8")
        return value
    return json.dumps(value)  # ASCII: a surrogate inside is written as its escape


def _jsonl_batches(
    lines: Iterable[str], wanted: list[str], batch_rows: int, *, first_line: int = 1
) -> Iterator[RawBatch]:
    columns: dict[str, list[str | None]] = {c: [] for c in wanted}
    malformed: list[tuple[int, str]] = []

    def flush() -> RawBatch:
        table = pa.table({c: pa.array(v, pa.string()) for c, v in columns.items()})
        batch = RawBatch(table, tuple(malformed))
        for values in columns.values():
            values.clear()
        malformed.clear()
        return batch

    for number, line in enumerate(lines, start=first_line):
        if not line.strip(_JSON_WHITESPACE):  # a line of other white space (a form feed, U+2028) is malformed
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            fields = [_field_text(record.get(c)) for c in wanted]
        # RecursionError: a line nested deeper than Python's parser goes ("[[[[..."), a malformed record like any
        # other (it escaped, and a stream that had journalled it failed on it at every restart).
        except (ValueError, RecursionError):  # the whole line is kept: the dead letter lets the institution recover it
            malformed.append((number, line.rstrip("\n")))
            continue
        for c, v in zip(wanted, fields, strict=True):
            columns[c].append(v)
        if len(columns[wanted[0]]) >= batch_rows:
            yield flush()
    if columns[wanted[0]] or malformed:
        yield flush()
