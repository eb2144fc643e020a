"""Streaming on a distributed runner: Kafka or Pub/Sub -> Beam's windows -> the spool, with a marker per pane.

On Flink or Dataflow the watermark is Beam's: messages (JSON lines; Pub/Sub attribute `institution`, or the
Kafka record key) are validated, stamped and windowed by the same transforms as the local stream, and each
window's readings are spooled to a shared location (gs://, s3://). Behind the spool, a per-institution count
per window is combined with the AfterWatermark trigger; when it fires, a pane marker is written, so a window's
ON_TIME marker means every on-time reading of it has been spooled (it shows the job's progress; releases do not
wait for it). `fusion stream --releases-only` (the key holder's side, any machine that reaches the spool, the
exchange and the store) releases the public grid of windows by the processing clock, like the local stream, and
counts readings spooled after a release as late. Readings beyond the allowed lateness (the watermark past their
window's end plus the lateness) are not spooled: they are dead-lettered and counted as `late` in the job's reject
counts, which the release side adds to the institution's local state like any other reject (`RouteTooLate`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam import coders
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms import userstate

from fusion.config.federation import Config, FeedConfig, FeedFormat, StreamSource
from fusion.errors import FusionError
from fusion.feeds.files import read_jsonl_lines
from fusion.feeds.stream_state import add_counts, window_start
from fusion.release.exchange import join, write_json
from pipelines.broker_journal import message_lines
from pipelines.stream import (
    DEAD,
    LATE,
    REJECTS,
    SPOOL_WINDOW_FORMAT,
    RejectWindows,
    SpoolWindow,
    StampWindows,
    WindowReadings,
    WriteDeadLetter,
    spool_dir,
    stream_rules,
    validated_outputs,
)
from schemas.reasons import RejectReason
from schemas.validation import ReadingRules, ReadingValidator, readings_as_dead_letters

MARKERS = "_panes"
#: Per institution in the spool: the reject counts of each message (named by its digest, so a redelivered
#: message rewrites its own file), which the release side adds to the institution's local state:
#: {"rejects": {reason: rows}, "windows": {window start: {reason: rows}}} (those rows that belong to a window).
REJECT_COUNTS = "_rejects"


class MessagesToReadings(beam.DoFn):
    """(institution, payload of JSON lines) -> (institution, key, accepted readings); rejects and dead letters
    tagged. The key hashes the payload, so a redelivered message rewrites the same spool file."""

    def __init__(self, config: Config, dead_letter_dirs: dict[str, str]) -> None:
        self._config = config
        self._dead = dead_letter_dirs

    def _rules(self) -> ReadingRules:
        """A reading stamped before the grid's start (`stream.start`, when set) or beyond the processing clock
        plus max_clock_skew is rejected (out_of_interval)."""
        start = self._config.stream.start
        grid = None if start is None else window_start(start, self._config.stream_window)
        return stream_rules(self._config, now=datetime.now(UTC), start=grid)

    def setup(self) -> None:
        self._validator = ReadingValidator(self._rules())
        self._reject_windows = RejectWindows(self._validator.rules, self._config.stream_window)
        self._feeds = {
            i.id: FeedConfig(
                name="messages",
                path="-",
                format=FeedFormat.JSONL,
                time_format=i.feeds[0].time_format,
                columns=i.feeds[0].columns,
            )
            for i in self._config.institutions
        }

    def process(self, element: tuple[str, bytes]) -> Iterator[Any]:
        institution, payload = element
        if institution not in self._feeds:
            return  # not a member of this federation: nothing of it may reach the spool (counted by the runner)
        self._validator.rules = self._rules()
        digest = hashlib.sha256(institution.encode() + b"\0" + payload).hexdigest()[:16]
        # As a broker source's message is, and a JSON-lines file: a byte-order mark dropped, lines ending at \n, \r\n
        # or \r only (a U+2028 inside a string is part of the value), a message that is not UTF-8 one malformed record
        lines = message_lines(payload, name=digest, max_bytes=None)  # Kafka and Pub/Sub bound a message's size
        batches = read_jsonl_lines(lines, self._feeds[institution], batch_rows=self._config.pipeline.batch_rows)
        rejected: Counter[str] = Counter()
        windowed: dict[str, dict[str, int]] = {}
        for number, raw in enumerate(batches):
            for output in validated_outputs(
                self._validator,
                self._reject_windows,
                institution,
                self._feeds[institution],
                raw,
                key=f"m{digest}-{number:05d}",
                source=f"message {digest}",
                row_offset=0,
                dead_letter_dir=self._dead[institution],
            ):
                if isinstance(output, TaggedOutput) and output.tag == REJECTS:
                    rejected.update(output.value[1])
                    for start, counts in output.value[2].items():
                        add_counts(windowed.setdefault(start, {}), counts)
                else:
                    yield output
        if rejected:
            yield TaggedOutput(REJECTS, (institution, digest, {"rejects": dict(rejected), "windows": windowed}))


class WriteRejectCounts(beam.DoFn):
    """(institution, message digest, counts as in REJECT_COUNTS) -> a JSON file in the institution's spool."""

    def __init__(self, config: Config) -> None:
        self._config = config

    def process(self, element: tuple[str, str, dict[str, Any]]) -> Iterator[str]:
        institution, digest, counts = element
        path = join(self._config.stream_spool_path, institution, REJECT_COUNTS, f"{digest}.json")
        write_json(path, counts)
        yield path


class WritePaneMarker(beam.DoFn):
    """(institution, rows spooled in this pane) -> a marker file in the window's spool: the pane's index and
    timing (ON_TIME once the watermark passed the end; LATE for each late firing)."""

    def __init__(self, config: Config) -> None:
        self._config = config

    def process(
        self, element: tuple[str, int], win: Any = beam.DoFn.WindowParam, pane: Any = beam.DoFn.PaneInfoParam
    ) -> Iterator[str]:
        institution, rows = element
        start = win.start.to_utc_datetime().replace(tzinfo=UTC)
        timing = {0: "EARLY", 1: "ON_TIME", 2: "LATE", 3: "UNKNOWN"}[int(pane.timing)]
        path = join(spool_dir(self._config, institution, start), MARKERS, f"{pane.index:06d}-{timing}.json")
        write_json(path, {"rows": rows, "timing": timing, "index": pane.index})
        yield path


class RouteTooLate(beam.DoFn):
    """(institution, (institution, key, readings of one window)) -> the slice, or, when the watermark has passed
    its window's end plus the allowed lateness, a tagged LATE slice (institution, key, readings, window start).

    Beam's windowing drops such readings only at a grouping (its runner counts them, nothing else does), and the
    spool is written before any grouping: without this step a too-late reading would be spooled, and released if
    the release side had not released its window yet. Per institution (in the global window) it keeps the windows
    with readings not yet expired and an event-time timer at the earliest expiry; a fired timer proves the
    watermark passed that moment, so a reading of a window expiring no later than it is too late. (A reading of a
    window that never had an on-time reading, arriving before any later window expired, passes; the release side
    counts it as late if it lands after its window's release.)"""

    PENDING = userstate.BagStateSpec("pending", coders.FloatCoder())  # window starts (s) not yet expired
    EXPIRED = userstate.ReadModifyWriteStateSpec("expired", coders.FloatCoder())  # watermark known past this
    EXPIRY = userstate.TimerSpec("expiry", userstate.TimeDomain.WATERMARK)

    def __init__(self, size: timedelta, lateness: timedelta) -> None:
        self._span = (size + lateness).total_seconds()

    def process(
        self,
        element: tuple[str, tuple[str, str, pa.Table]],
        timestamp: Any = beam.DoFn.TimestampParam,
        pending: Any = beam.DoFn.StateParam(PENDING),  # noqa: B008 (Beam's way to ask for state)
        expired: Any = beam.DoFn.StateParam(EXPIRED),  # noqa: B008
        expiry: Any = beam.DoFn.TimerParam(EXPIRY),  # noqa: B008
    ) -> Iterator[Any]:
        _, (institution, key, piece) = element
        start = float(timestamp.micros) / 1_000_000  # StampWindows stamps a slice with its window's start
        if start + self._span <= (expired.read() or float("-inf")):
            yield TaggedOutput(LATE, (institution, key, piece, start))
            return
        starts = {*pending.read(), start}
        pending.clear()
        for s in sorted(starts):
            pending.add(s)
        expiry.set(min(starts) + self._span)
        yield institution, key, piece

    @userstate.on_timer(EXPIRY)
    def expire(
        self,
        fired: Any = beam.DoFn.TimestampParam,
        pending: Any = beam.DoFn.StateParam(PENDING),  # noqa: B008 (Beam's way to ask for state)
        expired: Any = beam.DoFn.StateParam(EXPIRED),  # noqa: B008
        expiry: Any = beam.DoFn.TimerParam(EXPIRY),  # noqa: B008
    ) -> Iterator[Any]:
        moment = float(fired.micros) / 1_000_000
        expired.write(max(moment, expired.read() or float("-inf")))
        left = [s for s in pending.read() if s + self._span > moment]
        pending.clear()
        for s in sorted(left):
            pending.add(s)
        if left:
            expiry.set(min(left) + self._span)
        return iter(())


class CountTooLate(beam.DoFn):
    """(institution, key, too-late readings, window start) -> dead letters (DEAD) and the job's reject counts for
    them: `late` in their window, like the local stream's late readings."""

    def __init__(self, dead_letter_dirs: dict[str, str]) -> None:
        self._dead = dead_letter_dirs

    def process(self, element: tuple[str, str, pa.Table, float]) -> Iterator[Any]:
        institution, key, piece, start_s = element
        start = datetime.fromtimestamp(start_s, UTC)
        letters = readings_as_dead_letters(piece, RejectReason.LATE, source=f"window {start.isoformat()}")
        name = f"{key}-late-{start.strftime(SPOOL_WINDOW_FORMAT)}"
        yield TaggedOutput(DEAD, (join(self._dead[institution], f"{name}.parquet"), letters))
        n = piece.num_rows
        late = RejectReason.LATE.value
        yield institution, name, {"rejects": {late: n}, "windows": {start.isoformat(): {late: n}}}


class SpoolUnbounded(beam.PTransform):
    """(institution, payload) messages -> validated, windowed readings in the spool, with pane markers."""

    def __init__(self, config: Config) -> None:
        super().__init__(label="SpoolUnbounded")
        self._config = config
        self._dead = {i.id: join(config.dead_letter_path(i), "stream") for i in config.institutions}

    def expand(self, messages: beam.PCollection) -> beam.PCollection:
        config = self._config
        validated = messages | "Validate" >> beam.ParDo(MessagesToReadings(config, self._dead)).with_outputs(
            DEAD, REJECTS, main="ok"
        )
        _ = validated[DEAD] | "WriteInvalid" >> beam.ParDo(WriteDeadLetter())
        _ = validated[REJECTS] | "WriteRejectCounts" >> beam.ParDo(WriteRejectCounts(config))
        stamped = (
            validated.ok
            | "Stamp" >> beam.ParDo(StampWindows(config.stream_window))
            | "ByInstitution" >> beam.Map(lambda piece: (piece[0], piece))
            | "RouteTooLate"
            >> beam.ParDo(RouteTooLate(config.stream_window, config.allowed_lateness)).with_outputs(LATE, main="ok")
        )
        late = stamped[LATE] | "CountTooLate" >> beam.ParDo(CountTooLate(self._dead)).with_outputs(DEAD, main="ok")
        _ = late[DEAD] | "WriteTooLate" >> beam.ParDo(WriteDeadLetter())
        _ = late.ok | "WriteLateCounts" >> beam.ParDo(WriteRejectCounts(config))
        spooled = (
            stamped.ok
            | WindowReadings(config.stream_window, config.allowed_lateness)
            | "Spool" >> beam.ParDo(SpoolWindow(config, set(), self._dead)).with_outputs(DEAD, main="ok")
        )
        # Downstream of the spool writes: the trigger fires only once every on-time slice has been written.
        return (
            spooled.ok
            | "RowsPerInstitution" >> beam.Map(lambda spool: (spool[0], spool[2]))
            | "PerPane" >> beam.CombinePerKey(sum)
            | "Mark" >> beam.ParDo(WritePaneMarker(config))
        )


def read_messages(config: Config) -> beam.PTransform:
    """The configured unbounded source, as (institution, payload bytes) pairs."""
    stream = config.stream
    if stream.source is StreamSource.PUBSUB:
        from apache_beam.io.gcp.pubsub import ReadFromPubSub

        return ReadFromPubSub(subscription=stream.pubsub_subscription, with_attributes=True) | "ByInstitution" >> (
            beam.Map(lambda message: (message.attributes.get("institution", ""), message.data))
        )
    if stream.source is StreamSource.KAFKA:
        from apache_beam.io.kafka import ReadFromKafka

        assert stream.kafka_bootstrap_servers and stream.kafka_topic  # checked at config load
        return ReadFromKafka(
            consumer_config={"bootstrap.servers": stream.kafka_bootstrap_servers, "group.id": config.federation.id},
            topics=[stream.kafka_topic],
        ) | "ByInstitution" >> beam.Map(lambda record: ((record[0] or b"").decode(), record[1]))
    raise FusionError(
        "stream.source is 'files': run `fusion stream` without --source-job (it micro-batches the feeds itself)"
    )


def run_unbounded(config: Config, options: Any) -> None:
    """The streaming Beam job of `fusion stream --source-job` (e.g. with --runner=DataflowRunner --streaming)."""
    with beam.Pipeline(options=options) as pipeline:
        _ = pipeline | "Read" >> read_messages(config) | SpoolUnbounded(config)
