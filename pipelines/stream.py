"""Streaming transforms: validated readings -> event-time fixed windows -> a durable spool per window.

The windowing is Beam's: each Arrow slice of readings is stamped with its event-time window and goes through
`WindowReadings` (FixedWindows, an AfterWatermark trigger with a late firing per late element, the configured
allowed lateness), so the same transforms run unbounded on Flink or Dataflow. Locally, `fusion stream` drives
them on micro-batches of newly arrived files (bounded pipelines on the DirectRunner); which windows are closed
is kept by the driver (fusion/feeds/stream_state.py: a public grid closed by the processing clock), and readings for
a window that has already closed are routed to the dead letters as `late` and counted, never dropped.

Elements are Arrow tables, never single readings.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms import trigger, window

from fusion.config.federation import Config, FeedConfig, FeedFormat
from fusion.errors import FusionError
from fusion.feeds.files import RawBatch, mapped_columns, read_feed_file
from fusion.feeds.scan import TRANSIENT_ERRORS, FeedUnavailable, malformed_letters
from fusion.feeds.stream_state import WINDOWED_REASONS
from fusion.release.exchange import glob_escape, join, read_bytes, write_bytes, write_json
from schemas.readings import EVENT_TIME, READING_SCHEMA
from schemas.reasons import FileReason, RejectReason
from schemas.validation import (
    ROW_COLUMN,
    ReadingRules,
    ReadingValidator,
    checked_sql,
    connect,
    dead_letters,
    duckdb_input,
    readings_as_dead_letters,
    register_rules,
)

DEAD = "dead"
SPOOL_WINDOW_FORMAT = "%Y%m%dT%H%M%SZ"
REJECTS = "rejects"
LATE = "late"
#: The open interval a stream validates against: any time Beam can represent.
STREAM_START = datetime(1971, 1, 1, tzinfo=UTC)
STREAM_END = datetime(9999, 1, 1, tzinfo=UTC)


#: The resolution of event times (Arrow and DuckDB microseconds): the rules' end is exclusive, so the latest time
#: accepted is the end less this.
TIME_RESOLUTION = timedelta(microseconds=1)


def stream_rules(config: Config, *, now: datetime | None = None, start: datetime | None = None) -> ReadingRules:
    """What a stream accepts: times from `start` (the grid's first window; any time Beam can represent when None)
    up to `now` plus the config's `max_clock_skew`, that moment included: only a reading stamped later is rejected
    (no bound when `now` is None)."""
    return ReadingRules(
        plausible={m.name: m.plausible for m in config.metrics},
        regions=config.regions,
        start=STREAM_START if start is None else max(STREAM_START, start),
        end=STREAM_END if now is None else min(STREAM_END, now + config.max_clock_skew + TIME_RESOLUTION),
    )


class RejectWindows:
    """Counts a raw batch's rows rejected for a reason of `WINDOWED_REASONS` per event-time window: those rows
    had a valid time, so their counts belong to that window (and travel with its release). Holds a DuckDB
    connection: create one per worker."""

    def __init__(self, rules: ReadingRules, size: timedelta) -> None:
        self._con = connect()
        register_rules(self._con, rules, tuple(sorted(rules.plausible)))
        self._size_us = int(size.total_seconds() * 1_000_000)

    def count(
        self, raw: pa.Table, *, rules: ReadingRules, columns: Mapping[str, str], time_format: str
    ) -> dict[str, dict[str, int]]:
        """{window start (ISO): {reason: rows}} for `raw` validated under `rules` (the query the validator ran)."""
        types = {f: raw.schema.field(c).type for f, c in columns.items() if c in raw.column_names}
        checked = checked_sql("fusion_raw", rules=rules, columns=columns, types=types, time_format=time_format)
        reasons = ", ".join(f"'{r}'" for r in sorted(WINDOWED_REASONS))
        self._con.register("fusion_raw", duckdb_input(raw.append_column(ROW_COLUMN, pa.array(np.arange(raw.num_rows)))))
        try:
            rows = self._con.sql(
                f"SELECT epoch_us(event_time) // {self._size_us} AS w, reason, count(*) FROM ({checked}) "
                f"WHERE reason IN ({reasons}) GROUP BY ALL ORDER BY ALL"
            ).fetchall()
        finally:
            self._con.unregister("fusion_raw")
        counts: dict[str, dict[str, int]] = {}
        for number, reason, n in rows:  # times are after 1971 (the stream's interval): // is the floor
            start = datetime.fromtimestamp(number * self._size_us / 1_000_000, UTC).isoformat()
            counts.setdefault(start, {})[reason] = int(n)
        return counts


def stdin_feed(config: Config, institution_id: str, journal: str) -> FeedConfig:
    """Standard input, journalled to files: JSON lines with the institution's first feed's column mapping."""
    first = config.institution(institution_id).feeds[0]
    return FeedConfig(
        name="stdin",
        path=join(glob_escape(journal), "*.jsonl"),  # a pattern: the state's path may hold [ ] * ?
        format=FeedFormat.JSONL,
        time_format=first.time_format,
        columns=first.columns,
    )


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def spool_key(path: str) -> str:
    """The prefix of the names of the spool files (and dead letters) made from input file `path`."""
    return _key(path)


def validated_outputs(
    validator: ReadingValidator,
    reject_windows: RejectWindows,
    institution: str,
    feed: FeedConfig,
    raw: RawBatch,
    *,
    key: str,
    source: str,
    row_offset: int,
    dead_letter_dir: str,
) -> Iterator[Any]:
    """One raw batch -> (institution, key, accepted readings); its reject counts (tagged REJECTS: institution,
    {reason: rows} of every reject, {window start: {reason: rows}} of those that belong to a window) and dead
    letters (tagged DEAD). The rows of a file that lacks a required column are all rejected (missing_column)."""
    columns = mapped_columns(feed)
    rejected: Counter[str] = Counter()
    if raw.malformed:
        rejected[RejectReason.MALFORMED_RECORD.value] += len(raw.malformed)
        letters = malformed_letters(raw.malformed, source)
        yield TaggedOutput(DEAD, (join(dead_letter_dir, f"{key}-malformed.parquet"), letters))
    if raw.missing_columns:  # a schema error of the file: none of its rows is a reading, none has a window
        if raw.table.num_rows:
            rows = raw.table.num_rows
            letters = dead_letters(
                raw.table,
                pa.array([FileReason.MISSING_COLUMN.value] * rows, pa.string()),
                pa.array(np.arange(rows, dtype=np.int64) + row_offset),
                source=source,
            )
            rejected[FileReason.MISSING_COLUMN.value] += rows
            yield TaggedOutput(DEAD, (join(dead_letter_dir, f"{key}-missing-column.parquet"), letters))
        if rejected:
            yield TaggedOutput(REJECTS, (institution, dict(rejected), {}))
        return
    checked = validator.validate(
        raw.table, columns=columns, time_format=feed.time_format.value, source=source, row_offset=row_offset
    )
    rejected.update(checked.reasons)
    windowed = {}
    if WINDOWED_REASONS & set(checked.reasons):
        windowed = reject_windows.count(
            raw.table, rules=validator.rules, columns=columns, time_format=feed.time_format.value
        )
    if checked.rejected.num_rows:
        yield TaggedOutput(DEAD, (join(dead_letter_dir, f"{key}-invalid.parquet"), checked.rejected))
    if rejected:
        yield TaggedOutput(REJECTS, (institution, dict(rejected), windowed))
    if checked.accepted.num_rows:
        yield institution, key, checked.accepted


class StreamValidate(beam.DoFn):
    """(institution, feed, path) -> (institution, slice key, accepted readings); rejects counted, dead letters
    tagged."""

    def __init__(
        self,
        config: Config,
        dead_letter_dirs: dict[str, str],
        *,
        now: datetime | None = None,
        start: datetime | None = None,
    ) -> None:
        """`now`: the processing time of this micro-batch (readings stamped later than it plus the config's
        `max_clock_skew` are rejected); `start`: the grid's first window (earlier readings are rejected)."""
        self._config = config
        self._dead = dead_letter_dirs
        self._now = now
        self._start = start

    def setup(self) -> None:
        rules = stream_rules(self._config, now=self._now, start=self._start)
        self._validator = ReadingValidator(rules)
        self._reject_windows = RejectWindows(rules, self._config.stream_window)

    def process(self, element: tuple[str, FeedConfig, str]) -> Iterator[Any]:
        institution, feed, path = element
        offset = 0
        try:
            for number, raw in enumerate(read_feed_file(path, feed, batch_rows=self._config.pipeline.batch_rows)):
                yield from validated_outputs(
                    self._validator,
                    self._reject_windows,
                    institution,
                    feed,
                    raw,
                    key=f"{_key(path)}-{number:05d}",
                    source=path,
                    row_offset=offset,
                    dead_letter_dir=self._dead[institution],
                )
                offset += raw.table.num_rows
        except (pa.ArrowException, OSError, UnicodeError, EOFError, zlib.error, FusionError) as exc:
            if cannot_read_now(exc):  # not the file's fault: the step fails and the next poll reads it again
                raise FeedUnavailable(
                    f"stream input {path} cannot be read now ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                    "nothing of it is kept, and the stream reads it again at its next step"
                ) from exc
            # An unreadable file (truncated, corrupt, not the feed's format) must not stop every institution's
            # stream at each restart: what could not be read is one malformed record, dead-lettered with the
            # error, and the file counts as processed. Rows read before the damage stay accepted.
            yield from unreadable_outputs(institution, path, offset, exc, dead_letter_dir=self._dead[institution])


def cannot_read_now(exc: BaseException) -> bool:
    """Whether `exc`, raised while a feed file was read, says that the file cannot be read now rather than that its
    content is damaged: a missing file, permissions, the network, or any error the operating system reported
    (an OSError with an errno: EIO from a failing disk, EMFILE, ESTALE on NFS). A parser's complaint about the
    bytes (Arrow's errors, a broken compressed stream, Parquet's "couldn't deserialize thrift") carries none."""
    return isinstance(exc, TRANSIENT_ERRORS) or (isinstance(exc, OSError) and exc.errno is not None)


def unreadable_outputs(
    institution: str, path: str, row: int, exc: BaseException, *, dead_letter_dir: str
) -> Iterator[Any]:
    """The rest of a file that could not be read, from row `row` on: one malformed record, dead-lettered with the
    error that stopped the read."""
    letters = malformed_letters(((row, f"unreadable from row {row}: {type(exc).__name__}: {exc}"),), path)
    yield TaggedOutput(DEAD, (join(dead_letter_dir, f"{_key(path)}-unreadable.parquet"), letters))
    yield TaggedOutput(REJECTS, (institution, {RejectReason.MALFORMED_RECORD.value: 1}, {}))


class StampWindows(beam.DoFn):
    """(institution, key, readings) -> one timestamped slice per event-time window the readings fall in."""

    def __init__(self, size: timedelta) -> None:
        self._size_us = int(size.total_seconds() * 1_000_000)

    def process(self, element: tuple[str, str, pa.Table]) -> Iterator[window.TimestampedValue]:
        institution, key, table = element
        micros = pc.cast(table.column(EVENT_TIME), pa.int64()).to_numpy()
        starts = micros - micros % self._size_us  # epoch-aligned window starts, vectorised
        order = np.argsort(starts, kind="stable")
        bounds = np.flatnonzero(np.diff(starts[order])) + 1
        for chunk in np.split(order, bounds):
            start_us = int(starts[chunk[0]])
            piece = table.take(pa.array(chunk))
            yield window.TimestampedValue((institution, key, piece), start_us / 1_000_000)


class WindowReadings(beam.PTransform):
    """Beam's event-time windowing for Fusion: fixed windows, fired when the watermark passes the end, and once
    more for each late element within the allowed lateness; later elements are Beam's to drop (the local
    driver routes them to `late` before they get here)."""

    def __init__(self, size: timedelta, allowed_lateness: timedelta) -> None:
        super().__init__(label="WindowReadings")
        self._size = size.total_seconds()
        self._lateness = allowed_lateness.total_seconds()

    def expand(self, readings: beam.PCollection) -> beam.PCollection:
        return readings | beam.WindowInto(
            window.FixedWindows(self._size),
            trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
            allowed_lateness=self._lateness,
            accumulation_mode=trigger.AccumulationMode.DISCARDING,
        )


def spool_dir(config: Config, institution: str, start: datetime) -> str:
    return join(config.stream_spool_path, institution, start.strftime(SPOOL_WINDOW_FORMAT))


class SpoolWindow(beam.DoFn):
    """A windowed slice -> a Parquet file in its window's spool (same name on replay), or `late` if the window
    has closed."""

    def __init__(self, config: Config, closed: Container[str], dead_letter_dirs: dict[str, str]) -> None:
        self._config = config
        self._closed = closed
        self._dead = dead_letter_dirs

    def process(self, element: tuple[str, str, pa.Table], win: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        institution, key, piece = element
        start = win.start.to_utc_datetime().replace(tzinfo=UTC)
        if start.isoformat() in self._closed:
            letters = readings_as_dead_letters(piece, RejectReason.LATE, source=f"window {start.isoformat()}")
            name = f"{key}-late-{start.strftime('%Y%m%dT%H%M%SZ')}.parquet"
            yield TaggedOutput(DEAD, (join(self._dead[institution], name), letters))
            yield TaggedOutput(LATE, (institution, start.isoformat(), piece.num_rows))
            return
        sink = pa.BufferOutputStream()
        pq.write_table(piece.cast(READING_SCHEMA), sink)
        write_bytes(join(spool_dir(self._config, institution, start), f"{key}.parquet"), sink.getvalue().to_pybytes())
        latest = pc.max(piece.column(EVENT_TIME)).as_py()
        yield institution, start.isoformat(), piece.num_rows, latest.isoformat()


class WriteDeadLetter(beam.DoFn):
    def process(self, element: tuple[str, pa.Table]) -> Iterator[str]:
        path, table = element
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_bytes(path, sink.getvalue().to_pybytes())
        yield path


@dataclass
class MicroBatch:
    """What one micro-batch did: readings spooled per (institution, window), late ones, rejects per institution."""

    spooled: list[tuple[str, str, int, str]] = field(default_factory=list)  # institution, window, rows, latest
    late: list[tuple[str, str, int]] = field(default_factory=list)  # institution, window, rows
    # institution, {reason: rows} (every reject), {window start: {reason: rows}} (those that belong to a window)
    rejects: list[tuple[str, dict[str, int], dict[str, dict[str, int]]]] = field(default_factory=list)


class _Summarise(beam.DoFn):
    def __init__(self, path: str) -> None:
        self._path = path

    def process(self, _: Any, spooled: list[Any], late: list[Any], rejects: list[Any]) -> Iterator[str]:
        write_json(self._path, {"spooled": spooled, "late": late, "rejects": rejects})
        yield self._path


def run_micro_batch(
    config: Config,
    inputs: Sequence[tuple[str, FeedConfig, str]],
    *,
    closed: Container[str],
    dead_letter_dirs: dict[str, str],
    summary_path: str,
    options: Any,
    now: datetime | None = None,
    start: datetime | None = None,
) -> MicroBatch:
    """Validate, window and spool `inputs` ((institution, feed, file) triples) in one bounded Beam pipeline;
    readings for a window in `closed` (ISO starts) are late, and readings stamped before `start` or after `now`
    plus the config's `max_clock_skew` are rejected (out_of_interval)."""
    from pipelines.run import beam_scratch  # here: pipelines.run imports the role pipelines

    with beam_scratch(), beam.Pipeline(options=options) as pipeline:
        validated = (
            pipeline
            | "Inputs" >> beam.Create(list(inputs))
            | "Reshuffle" >> beam.Reshuffle()
            | "Validate"
            >> beam.ParDo(StreamValidate(config, dead_letter_dirs, now=now, start=start)).with_outputs(
                DEAD, REJECTS, main="ok"
            )
        )
        spooled = (
            validated.ok
            | "Stamp" >> beam.ParDo(StampWindows(config.stream_window))
            | WindowReadings(config.stream_window, config.allowed_lateness)
            | "Spool" >> beam.ParDo(SpoolWindow(config, closed, dead_letter_dirs)).with_outputs(DEAD, LATE, main="ok")
        )
        _ = validated[DEAD] | "WriteInvalid" >> beam.ParDo(WriteDeadLetter())
        _ = spooled[DEAD] | "WriteLate" >> beam.ParDo(WriteDeadLetter())  # windowed: not flattened with the above

        def global_list(pcoll: beam.PCollection, label: str) -> beam.pvalue.AsList:
            return beam.pvalue.AsList(pcoll | f"Global{label}" >> beam.WindowInto(window.GlobalWindows()))

        _ = (
            pipeline
            | "Once" >> beam.Create([None])
            | "Summarise"
            >> beam.ParDo(
                _Summarise(summary_path),
                spooled=global_list(spooled.ok, "Spooled"),
                late=global_list(spooled[LATE], "Late"),
                rejects=beam.pvalue.AsList(validated[REJECTS]),
            )
        )
    doc = json.loads(read_bytes(summary_path))
    return MicroBatch(
        spooled=[tuple(x) for x in doc["spooled"]],
        late=[tuple(x) for x in doc["late"]],
        rejects=[(i, dict(c), {w: dict(r) for w, r in windowed.items()}) for i, c, windowed in doc["rejects"]],
    )


def run_micro_batch_in_process(
    config: Config,
    inputs: Sequence[tuple[str, FeedConfig, str]],
    *,
    closed: Container[str],
    dead_letter_dirs: dict[str, str],
    now: datetime | None = None,
    start: datetime | None = None,
) -> MicroBatch:
    """`run_micro_batch` without Beam: the same DoFns called in order in this process (pipelines/local.py does
    the same for a window's release). On the local DirectRunner building and running a pipeline per micro-batch
    costs more than the work (seconds per step); windows are assigned as `WindowReadings` assigns them."""
    from pipelines.local import run_dofn  # here: pipelines.local imports the role pipelines

    validate = StreamValidate(config, dead_letter_dirs, now=now, start=start)
    accepted, tagged = run_dofn(validate, inputs)
    stamp = StampWindows(config.stream_window)
    spool = SpoolWindow(config, closed, dead_letter_dirs)
    size = config.stream_window.total_seconds()
    result = MicroBatch(rejects=[(i, dict(c), dict(w)) for i, c, w in tagged[REJECTS]])
    dead = list(tagged[DEAD])
    spool.setup()
    for element in accepted:
        for stamped in stamp.process(element):
            begin = float(stamped.timestamp)
            for out in spool.process(stamped.value, window.IntervalWindow(begin, begin + size)):
                if not isinstance(out, TaggedOutput):
                    result.spooled.append(out)
                elif out.tag == LATE:
                    result.late.append(out.value)
                else:
                    dead.append(out.value)
    run_dofn(WriteDeadLetter(), dead)
    return result
