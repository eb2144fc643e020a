"""`fusion stream`: micro-batches of newly arrived feed data, windowed, spooled, and released per window.

Each step: (1) find input files not yet spooled (every feed's glob, `{date}` matching any day, plus standard
input journalled to files); (2) validate, window and spool them in one bounded Beam pipeline; (3) commit the
progress (inputs, watermarks, reject counts); (4) close every window the watermarks have passed and release it
through the batch pipeline (contribute, aggregate, unmask, release) over its spool. Releases spend from the
ledger like batch ones; a refused window is recorded and the stream goes on.

Feed files must appear atomically (written elsewhere, then renamed in); names starting with '.' or ending in
'.tmp' are ignored until renamed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from fusion.config import Config, FeedConfig, FeedFormat
from fusion.errors import FusionError, ReleaseRefused
from fusion.exchange import exists, join, list_files, read_bytes, write_bytes
from fusion.faults import crash_point
from fusion.ledger import BudgetExceeded
from fusion.plan import ReleasePlan, plan_release
from fusion.store import Store
from fusion.stream_state import (
    StreamState,
    WindowState,
    WindowStatus,
    add_counts,
    closable,
    load_state,
    save_state,
)
from pipelines.batch import run_batch
from pipelines.contribute import sealed_envelope
from pipelines.run import beam_options
from pipelines.stream import SPOOL_WINDOW_FORMAT, run_micro_batch, spool_dir, stdin_feed
from pipelines.stream_sources import MARKERS, REJECT_COUNTS
from schemas.readings import READING_SCHEMA
from schemas.tables import REJECTS_SCHEMA


@dataclass(frozen=True)
class StreamStatus:
    """What the status line shows after each step."""

    windows_open: int
    last_release: str | None  # window start of the latest release
    last_latency_s: float | None  # from the window becoming closable to its release being queryable
    lag_s: float | None  # processing time minus the latest event time seen
    rows_per_s: float
    readings: int
    rejected: int
    changed_inputs: tuple[str, ...] = ()  # input files that changed after they were spooled (not read again)
    released: int = 0  # windows released, all time
    refused: tuple[str, ...] = ()  # why each refused window was refused (budget, overlap, quorum), oldest first


def _parquet_rows(path: str) -> int:
    with FileSystems.open(path) as handle:
        return int(pq.ParquetFile(handle).metadata.num_rows)


class StdinJournal:
    """Reads JSON lines from a stream on a thread; each step writes what arrived to a journal file, which is
    then an ordinary input (durable from that moment on). Lines not yet journalled are lost on a kill."""

    def __init__(self, stream: IO[str], directory: str) -> None:
        self.directory = directory
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.closed = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def flush(self, sequence: int) -> int | None:
        """Journal the lines read so far as file number `sequence`, or the next number no journal file holds (a
        kill after a file was written but before its number was saved must not overwrite it); returns the number
        used, or None if nothing arrived."""
        lines: list[str] = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self.closed = True
                break
            lines.append(line if line.endswith("\n") else line + "\n")
        if not lines:
            return None
        while exists(join(self.directory, f"{sequence:010d}.jsonl")):
            sequence += 1
        write_bytes(join(self.directory, f"{sequence:010d}.jsonl"), "".join(lines).encode())
        return sequence


class StreamDriver:
    """Runs the stream for a federation on this machine (every role, like `fusion batch`)."""

    def __init__(
        self,
        config: Config,
        *,
        beam_args: Sequence[str] = (),
        stdin: tuple[str, IO[str]] | None = None,  # (institution, stream)
        releases_only: bool = False,  # a streaming job (Kafka, Pub/Sub) fills the spool; only release here
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_status: Callable[[StreamStatus], None] = lambda status: None,
    ) -> None:
        self.config = config
        self.releases_only = releases_only
        self._beam_args = list(beam_args)
        self._clock = clock
        self._on_status = on_status
        self._root = Path(config.stream_state_path)
        self._state_file = self._root / "state.json"
        self.state: StreamState = load_state(self._state_file)
        self._store = Store(config.store_path)
        self._store.ensure_tables()
        self._dead = {i.id: join(config.dead_letter_path(i), "stream") for i in config.institutions}
        self._feeds: list[tuple[str, FeedConfig]] = [(i.id, f) for i in config.institutions for f in i.feeds]
        self._stdin: StdinJournal | None = None
        if stdin is not None:
            institution, stream = stdin
            journal = join(config.stream_state_path, "stdin", institution)  # local: the state's privacy
            self._stdin = StdinJournal(stream, journal)
            self._feeds.append((institution, stdin_feed(config, institution, journal)))
        self._last_release: tuple[str, float] | None = None
        self._rows_per_s = 0.0
        self.stop_requested = False

    # -- inputs -------------------------------------------------------------------------------------------
    def _discover(self) -> list[tuple[str, FeedConfig, str]]:
        found = []
        for institution, feed in self._feeds:
            pattern = self.config.resolve(feed.path).replace("{date}", "*")
            for meta in FileSystems.match([pattern])[0].metadata_list:
                name = meta.path.rsplit("/", 1)[-1]
                if name.startswith(".") or ".tmp" in name:
                    continue
                if meta.path in self.state.processed:
                    if meta.size_in_bytes != self.state.processed[meta.path]:
                        self._report_changed(meta.path, meta.size_in_bytes)
                    continue
                found.append((institution, feed, meta.path))
        return sorted(found, key=lambda x: x[2])

    def _report_changed(self, path: str, size: int) -> None:
        """An input changed after it was spooled: say so, once per size. Its rows are not read again (those
        already spooled would count twice); a feed adds new files instead of rewriting old ones."""
        if self.state.changed.get(path) == size:
            return
        self.state.changed[path] = size
        save_state(self._state_file, self.state)
        logging.getLogger(__name__).warning(
            "stream input %s changed after it was read (%d -> %d bytes); it is not read again: land new readings "
            "as new files", path, self.state.processed[path], size,
        )

    def ingest(self) -> int:
        """One micro-batch over every new input; returns the rows it read (accepted and rejected)."""
        if self.releases_only:
            return self._scan_markers()
        if self._stdin is not None and (used := self._stdin.flush(self.state.stdin_sequence)) is not None:
            self.state.stdin_sequence = used + 1
            save_state(self._state_file, self.state)  # the journal file is written: never reuse its number
        inputs = self._discover()
        if not inputs:
            return 0
        started = time.monotonic()
        size = self.config.stream_window
        batch = run_micro_batch(
            self.config,
            inputs,
            closed=self.state.late_windows(
                [i.id for i in self.config.institutions], size=size, lateness=self.config.allowed_lateness
            ),
            dead_letter_dirs=self._dead,
            summary_path=join(str(self._root), "micro-batch.json"),
            options=beam_options(self._beam_args),
            now=self._clock(),
        )
        rows = 0
        for institution, start, n, latest in batch.spooled:
            self.state.window(datetime.fromisoformat(start))
            self.state.advance(institution, datetime.fromisoformat(latest))
            self.state.readings += n
            rows += n
        for institution, start, n in batch.late:
            if start not in self.state.windows:
                # Past every watermark before any of its readings came: it is never released, but its late
                # readings are counted (under the release id the window would have had).
                self.state.windows[start] = WindowState(
                    status=WindowStatus.REFUSED,
                    release_id=self.window_plan(datetime.fromisoformat(start)).key.release_id,
                    reason="every watermark had passed the window before any of its readings arrived",
                )
            self.state.windows[start].add_rejects(institution, {"late": n})
            self.state.rejected += n
            rows += n
        for institution, counts in batch.rejects:
            # Rows without a usable event time count against the window the institution's stream is in; before
            # its first accepted reading, against the first window it sends readings for.
            self.state.rejected += sum(counts.values())
            rows += sum(counts.values())
            add_counts(self.state.pending_rejects.setdefault(institution, {}), counts)
        self._attach_pending_rejects()
        crash_point("stream_after_spool")
        for _, _, path in inputs:
            self.state.processed[path] = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
        save_state(self._state_file, self.state)
        self._rows_per_s = rows / max(time.monotonic() - started, 1e-9)
        return rows

    def _attach_pending_rejects(self) -> None:
        """Rejects without an event time count against the latest window at or before the institution's latest
        event time (the window its stream is in); an institution with none keeps them pending."""
        for institution in list(self.state.pending_rejects):
            seen = self.state.max_event.get(institution)
            if seen is None:
                continue
            latest = datetime.fromisoformat(seen)
            starts = [w for w in self.state.windows if datetime.fromisoformat(w) <= latest]
            if starts:
                at = max(starts, key=datetime.fromisoformat)
                self.state.windows[at].add_rejects(institution, self.state.pending_rejects.pop(institution))

    def _scan_markers(self) -> int:
        """Releases-only mode: a window's ON_TIME pane marker from an institution means Beam's watermark passed
        its end with all its on-time readings spooled; readings spooled after its release are late."""
        size, lateness = self.config.stream_window, self.config.allowed_lateness
        pattern = join(self.config.stream_spool_path, "*", "*", MARKERS, "*-ON_TIME.json")
        changed = 0
        for meta in FileSystems.match([pattern])[0].metadata_list:
            parts = meta.path.rstrip("/").split("/")
            institution, window_name = parts[-4], parts[-3]
            start = datetime.strptime(window_name, SPOOL_WINDOW_FORMAT).replace(tzinfo=UTC)
            before = self.state.max_event.get(institution)
            self.state.window(start)
            self.state.advance(institution, start + size + lateness)  # its watermark has passed the end
            changed += int(before != self.state.max_event.get(institution))
        # The job's reject counts, one file per message: each is added once (it is then a processed input).
        for meta in FileSystems.match([join(self.config.stream_spool_path, "*", REJECT_COUNTS, "*.json")])[
            0
        ].metadata_list:
            if meta.path in self.state.processed:
                continue
            institution = meta.path.rstrip("/").split("/")[-3]
            counts = {reason: int(n) for reason, n in json.loads(read_bytes(meta.path)).items()}
            add_counts(self.state.pending_rejects.setdefault(institution, {}), counts)
            self.state.rejected += sum(counts.values())
            self.state.processed[meta.path] = meta.size_in_bytes
            changed += 1
        self._attach_pending_rejects()
        for start_text, window in self.state.windows.items():
            if window.status is not WindowStatus.RELEASED:
                continue
            for institution in self.config.institutions:
                directory = spool_dir(self.config, institution.id, datetime.fromisoformat(start_text))
                extra = sorted(set(list_files(directory, ".parquet")) - set(window.files.get(institution.id, [])))
                late = sum(_parquet_rows(path) for path in extra)
                if late != window.rejects.get(institution.id, {}).get("late", 0):
                    window.rejects.setdefault(institution.id, {})["late"] = late  # cumulative: set, not add
                    changed += 1
        if changed:
            save_state(self._state_file, self.state)
        return 0

    # -- releases -----------------------------------------------------------------------------------------
    def window_plan(self, start: datetime) -> ReleasePlan:
        """The batch release of one window, reading that window's spool instead of the feeds."""
        institutions = tuple(
            i.model_copy(
                update={
                    "feeds": (
                        FeedConfig(name="spool", path=join(spool_dir(self.config, i.id, start), "*.parquet"),
                                   format=FeedFormat.PARQUET),
                    )
                }
            )
            for i in self.config.institutions
        )
        config = self.config.model_copy(update={"institutions": institutions})
        return plan_release(config, start, start + self.config.stream_window)

    def _release(self, start: datetime) -> None:
        window = self.state.windows[start.isoformat()]
        for institution in self.config.institutions:  # an institution without readings contributes zeros
            directory = spool_dir(self.config, institution.id, start)
            if not list_files(directory, ".parquet"):
                sink = pa.BufferOutputStream()
                pq.write_table(READING_SCHEMA.empty_table(), sink)
                write_bytes(join(directory, "empty.parquet"), sink.getvalue().to_pybytes())
        plan = self.window_plan(start)
        listed = {i.id: list_files(spool_dir(self.config, i.id, start), ".parquet") for i in self.config.institutions}
        if not window.files:
            window.files = listed
        else:  # a release a crash interrupted: an institution that sealed keeps the files it sealed from; one that
            for institution in plan.config.institutions:  # did not reads the spool as it is now (late panes too)
                with contextlib.suppress(FusionError):  # refused: the release below says why
                    if sealed_envelope(plan, institution) is None:
                        window.files[institution.id] = listed[institution.id]
        release_id: str = plan.key.release_id
        window.release_id = release_id
        save_state(self._state_file, self.state)  # what the release reads is on record before anything is sealed
        try:
            # A window's spool is small: its release runs the role steps in process (pipelines/local.py).
            run_batch(plan, beam_args=self._beam_args, in_process=True)
            window.status = WindowStatus.RELEASED
        except (BudgetExceeded, ReleaseRefused) as exc:
            window.status, window.reason = WindowStatus.REFUSED, str(exc)
        now = self._clock()
        window.released_at = now.isoformat()
        if window.status is WindowStatus.RELEASED and window.closable_at:
            latency = (now - datetime.fromisoformat(window.closable_at)).total_seconds()
            self._last_release = (start.isoformat(), latency)
        save_state(self._state_file, self.state)
        self._record_rejects(start)

    def _record_rejects(self, start: datetime) -> None:
        """Cumulative reject counts of a released or refused window into `rejects` (idempotent upsert)."""
        window = self.state.windows[start.isoformat()]
        if window.release_id is None or not window.rejects:
            return
        end = start + self.config.stream_window
        rows = [
            {
                "release_id": window.release_id,
                "institution": institution,
                "interval_start": start,
                "interval_end": end,
                "reason": reason,
                "rows": n,
                "recorded_at": self._clock(),
            }
            for institution, counts in sorted(window.rejects.items())
            for reason, n in sorted(counts.items())
        ]
        self._store.upsert_counts("rejects", pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA), column="rows")

    def close_windows(self, *, drain: bool = False) -> list[datetime]:
        """Release every window that may close now (and any whose release a crash interrupted)."""
        ready = closable(
            self.state,
            institutions=[i.id for i in self.config.institutions],
            size=self.config.stream_window,
            lateness=self.config.allowed_lateness,
            quorum=self.config.privacy.quorum,
            deadline=self.config.deadline,
            now=self._clock(),
            drain=drain,
        )
        interrupted = [
            datetime.fromisoformat(w) for w, s in self.state.windows.items() if s.status is WindowStatus.CLOSING
        ]
        for start in ready:
            self.state.windows[start.isoformat()].status = WindowStatus.CLOSING
        save_state(self._state_file, self.state)  # from here on, readings for these windows are late
        if ready:
            crash_point("stream_after_close")
        for start in sorted(set(interrupted) | set(ready)):
            self._release(start)
        for start_text, window in self.state.windows.items():  # late readings after the release
            if window.status is not WindowStatus.OPEN and window.release_id:
                self._record_rejects(datetime.fromisoformat(start_text))
        return sorted(set(interrupted) | set(ready))

    # -- the loop -----------------------------------------------------------------------------------------
    def status(self) -> StreamStatus:
        latest = max((datetime.fromisoformat(t) for t in self.state.max_event.values()), default=None)
        return StreamStatus(
            windows_open=sum(1 for w in self.state.windows.values() if w.status is WindowStatus.OPEN),
            last_release=self._last_release[0] if self._last_release else None,
            last_latency_s=self._last_release[1] if self._last_release else None,
            lag_s=(self._clock() - latest).total_seconds() if latest else None,
            rows_per_s=self._rows_per_s,
            readings=self.state.readings,
            rejected=self.state.rejected,
            changed_inputs=tuple(sorted(self.state.changed)),
            released=sum(1 for w in self.state.windows.values() if w.status is WindowStatus.RELEASED),
            refused=tuple(
                w.reason or "refused"
                for _, w in sorted(self.state.windows.items())
                if w.status is WindowStatus.REFUSED
            ),
        )

    def step(self, *, drain: bool = False) -> int:
        rows = self.ingest()
        self.close_windows(drain=drain)
        self._on_status(self.status())
        return rows

    def run(self, *, drain: bool = False, sleep: Callable[[float], None] = time.sleep) -> StreamStatus:
        """Step until stopped; with `drain`, until the inputs are exhausted (stdin closed, no new files), then
        close and release every remaining window."""
        while not self.stop_requested:
            rows = self.step()
            if drain and rows == 0 and (self._stdin is None or self._stdin.closed):
                self.step(drain=True)
                break
            if rows == 0:
                sleep(self.config.stream_poll.total_seconds())
        return self.status()
