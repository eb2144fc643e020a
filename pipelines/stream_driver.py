"""`fusion stream`: micro-batches of newly arrived feed data, windowed, spooled, and released per window.

Each step: (1) find input files not yet spooled (every feed's glob, `{date}` matching any day, plus standard
input journalled to files); (2) validate, window and spool them (one bounded Beam pipeline on a named runner;
on the local DirectRunner the same DoFns in process); (3) commit the progress (inputs, watermarks, reject
counts); (4) close every window of the public grid whose end plus the allowed lateness the processing clock has
passed, readings or not, once every broker source has read what its broker held for it (see `_held_sources`: a
restarted stream, or a source back from an outage, first takes the backlog the broker kept, whose readings are on
time), and release all of them in one run (pipelines/stream_release.py: contribute, aggregate,
unmask, release over the windows' spools, committed together; at event level contiguous due windows are one
release, at entity level each window is its own, see `StreamDriver._release_groups`). Which windows are
released, and which are released together, depends on the config, the clock and `--until` only, never on the
readings (fusion/feeds/stream_state.py); an input that cannot be read now, or a broker source down or catching up,
only delays them. Releases spend from the
ledger like batch ones; a refused window is recorded and the stream goes on. Exact reject counts (validation
and late) stay in the stream's local state; a window's release carries those of its rows that belong to it as
noisy slots.

Feed files must appear atomically (written elsewhere, then renamed in); names starting with '.' or ending in
'.tmp' are ignored until renamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems
from deltalake.exceptions import DeltaError

from fusion.config.federation import Config, FeedConfig, FeedFormat, InstitutionConfig
from fusion.config.privacy import PrivacyUnit
from fusion.errors import FusionError, ReleaseRefused
from fusion.feeds.scan import FeedUnavailable
from fusion.feeds.stream_state import (
    InputStamp,
    StateLock,
    StreamState,
    WindowStatus,
    add_counts,
    adopt_grid,
    backlog,
    due_windows,
    load_state,
    release_bound,
    save_state,
    window_start,
)
from fusion.release.exchange import exists, glob_escape, is_local, join, list_files, read_bytes, write_bytes
from fusion.release.plan import ReleasePlan, period_of, plan_release
from fusion.runtime.faults import crash_point
from fusion.store.delta import Store
from fusion.store.failures import check_writable, store_failure
from fusion.store.mode import bind_store_mode
from pipelines.broker_sources import SourceReader
from pipelines.run import beam_options, names_runner
from pipelines.sealing import refuse_overlap, sealed_envelope
from pipelines.stream import (
    SPOOL_WINDOW_FORMAT,
    run_micro_batch,
    run_micro_batch_in_process,
    spool_dir,
    spool_key,
    stdin_feed,
)
from pipelines.stream_release import release_rejects, release_windows
from pipelines.stream_sources import MARKERS, REJECT_COUNTS
from schemas.readings import READING_SCHEMA

_log = logging.getLogger(__name__)
#: With --drain, a broker source unreachable this long (seconds, across its reconnect attempts) ends the run.
DRAIN_WAIT_S = 30.0


@dataclass(frozen=True)
class StreamStatus:
    """What the status line shows after each step."""

    windows_open: int
    last_release: str | None  # window start of the latest release
    last_latency_s: float | None  # from the window becoming closable to its release being queryable (None:
    # released before this process started)
    lag_s: float | None  # processing time minus the latest event time seen
    rows_per_s: float
    readings: int
    rejected: int
    changed_inputs: tuple[str, ...] = ()  # input files that changed after they were spooled (not read again)
    released: int = 0  # windows released, all time
    refused: tuple[str, ...] = ()  # why each refused window was refused (budget, overlap, quorum), oldest first
    sources: tuple[str, ...] = ()  # each broker source's health: "<institution> <broker>: connected" or down
    unavailable: str | None = None  # why the last step failed on an input that cannot be read now (None: it did not)
    held: tuple[str, ...] = ()  # the broker sources due windows wait for (down, or not caught up since connecting)


def _latest_release(state: StreamState) -> tuple[str, float | None] | None:
    """The latest released window on record (its start; latency unknown): what a restarted stream shows."""
    released = [w for w, s in state.windows.items() if s.status is WindowStatus.RELEASED]
    return (datetime.fromisoformat(max(released)).isoformat(), None) if released else None


def _stamp(meta: FileMetadata) -> InputStamp | None:
    """A listed file's stamp: on this machine from the OS (size, mtime in ns, inode), None if it is gone; elsewhere
    its size and last update as the file system lists them."""
    if is_local(meta.path):
        try:
            status = os.stat(meta.path)
        except FileNotFoundError:
            return None
        return InputStamp(status.st_size, status.st_mtime_ns, status.st_ino)
    return InputStamp(meta.size_in_bytes, round((meta.last_updated_in_seconds or 0.0) * 1e9))


def _parquet_rows(path: str) -> int:
    with FileSystems.open(path) as handle:
        return int(pq.ParquetFile(handle).metadata.num_rows)


class StdinJournal:
    """Reads JSON lines from a stream on a thread; each step, and the driver's close (Ctrl-C, SIGTERM, the end of
    a run), writes what arrived to a journal file (fsynced), which is then an ordinary input, durable from that
    moment on. Lines read from the pipe but not yet journalled are lost only on a kill (`kill -9`, a crash)."""

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
        _write_durably(Path(self.directory) / f"{sequence:010d}.jsonl", "".join(lines).encode())
        return sequence


def _write_durably(path: Path, data: bytes) -> None:
    """Write a local file atomically and durably: a temporary sibling fsynced, renamed in, the directory fsynced.
    (Its name starts with '.', which discovery ignores, until it is renamed.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class StreamDriver:
    """Runs the stream for a federation on this machine (every role, like `fusion batch`)."""

    def __init__(
        self,
        config: Config,
        *,
        beam_args: Sequence[str] = (),
        stdin: tuple[str, IO[str]] | None = None,  # (institution, stream)
        releases_only: bool = False,  # a streaming job (Kafka, Pub/Sub) fills the spool; only release here
        until: datetime | None = None,  # release no window ending after this; stop once all up to it are done
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_status: Callable[[StreamStatus], None] = lambda status: None,
        on_notice: Callable[[str], None] = _log.info,  # says how many windows a step is about to release
        drain_wait_s: float = DRAIN_WAIT_S,  # with --drain, how long a broker source may stay unreachable
    ) -> None:
        self.config = config
        self.releases_only = releases_only
        self.until = until
        self.drain_wait_s = drain_wait_s
        self._beam_args = list(beam_args)
        self._clock = clock
        self._on_status = on_status
        self._on_notice = on_notice
        self._root = Path(config.stream_state_path)
        self._lock = StateLock(self._root)  # one process a state: refused while another stream holds it
        try:
            with self._store_failures():
                self._start(config, stdin=stdin)
        except BaseException:
            self._lock.release()
            raise

    def _start(self, config: Config, *, stdin: tuple[str, IO[str]] | None) -> None:
        """Load the state, check the grid and the store, and start the inputs (the broker readers among them)."""
        clock = self._clock
        self._state_file = self._root / "state.json"
        self.state: StreamState = load_state(self._state_file)
        created = self.state.created_at is None
        if created:  # the grid's default start: fixed once, at the stream's first run
            self.state.created_at = clock().isoformat()
        # Refuses a window length or grid start other than the one the state's windows were cut on (at start, before
        # any reading is spooled to a window of another grid); records them while it holds no window.
        grid = adopt_grid(self.state, size=config.stream_window, grid_start=self.grid_start, state_dir=str(self._root))
        if created or grid:
            save_state(self._state_file, self.state)
        check_writable(config.store_path)  # a store path that is a file, or read-only, refused in one line
        self._store = Store(config.store_path)
        self._store.ensure_tables()
        bind_store_mode(self._store, config.privacy.mode)  # refused at start, not at the first window
        self._dead = {i.id: join(config.dead_letter_path(i), "stream") for i in config.institutions}
        self._feeds: list[tuple[str, FeedConfig]] = [(i.id, f) for i in config.institutions for f in i.feeds]
        self._stdin: StdinJournal | None = None
        if stdin is not None:
            config.institution(stdin[0])  # refuses an unknown institution
        for institution in config.institutions:  # journalled lines are inputs, with --stdin or without
            journal = join(config.stream_state_path, "stdin", institution.id)  # local: the state's privacy
            if stdin is not None and stdin[0] == institution.id:
                self._stdin = StdinJournal(stdin[1], journal)
            elif not Path(journal).is_dir():
                continue
            self._feeds.append((institution.id, stdin_feed(config, institution.id, journal)))
        self._readers: list[SourceReader] = []
        # Each reader's connection (its number) since which it has caught up and its journal was read in.
        self._caught_up: dict[SourceReader, int] = {}
        self._held: tuple[SourceReader, ...] = ()  # the sources the latest step's due windows waited for
        # a journal of a source no longer declared is read too, when it holds files not read yet
        journals = any(i.sources for i in config.institutions) or (self._root / "brokers").is_dir()
        if not self.releases_only and journals:
            from pipelines.broker_sources import start_readers  # lazily: the brokers' clients

            for reader, feed in start_readers(config, self._on_notice, self.state.processed):  # journals, then acks
                self._readers.append(reader)
                self._feeds.append((reader.institution, feed))
        # The latest release (window start, seconds from closable to queryable); after a restart, the state's.
        self._last_release: tuple[str, float | None] | None = _latest_release(self.state)
        self._discard_unsaved()  # what a micro-batch killed before it saved its progress wrote
        self._rows_per_s = 0.0
        self._unavailable: tuple[float, str] | None = None  # since when (monotonic) steps fail on an input, and why
        self.stop_requested = False

    @property
    def grid_start(self) -> datetime:
        """The first window of the public grid: the one holding `stream.start`, or else the moment this stream's
        state was created (processing time, recorded in the state)."""
        assert self.state.created_at is not None  # set when the driver is made
        start = self.config.stream.start or datetime.fromisoformat(self.state.created_at)
        return window_start(start, self.config.stream_window)

    # -- inputs -------------------------------------------------------------------------------------------
    def _discover(self) -> list[tuple[str, FeedConfig, str, InputStamp]]:
        """The inputs not spooled yet: (institution, feed, path, its stamp when listed), by path. The stamp listed
        is the one recorded as processed: a file that grows (or goes) while it is read is then seen as changed
        (or simply gone) at the next step, never taken for the larger file. A file two feeds of one institution
        match is its input once, read as its first feed (in config order) reads it."""
        found = []
        listed: set[tuple[str, str]] = set()  # (institution, path)
        for institution, feed in self._feeds:
            pattern = self.config.resolve(feed.path).replace("{date}", "*")
            for meta in FileSystems.match([pattern])[0].metadata_list:
                name = meta.path.rsplit("/", 1)[-1]
                if name.startswith(".") or ".tmp" in name or (institution, meta.path) in listed:
                    continue
                listed.add((institution, meta.path))
                stamp = _stamp(meta)
                if stamp is None:  # gone since it was listed
                    continue
                if meta.path in self.state.processed:
                    if self.state.processed[meta.path].differs(stamp):
                        self._report_changed(meta.path, stamp)
                    continue
                found.append((institution, feed, meta.path, stamp))
        return sorted(found, key=lambda x: x[2])

    def _report_changed(self, path: str, stamp: InputStamp) -> None:
        """An input changed after it was spooled (grown, rewritten, or replaced by another file of the same size):
        say so, once per stamp. Its rows are not read again (those already spooled would count twice); a feed adds
        new files instead of rewriting or reusing old ones."""
        if self.state.changed.get(path) == stamp:
            return
        self.state.changed[path] = stamp
        save_state(self._state_file, self.state)
        read = self.state.processed[path]
        how = (
            f"{read.size} -> {stamp.size} bytes"
            if read.size != stamp.size
            else f"replaced or rewritten at the same size, {stamp.size} bytes"
        )
        message = (
            f"stream input {path} changed after it was read ({how}); it is not read again: land new readings as new "
            "files, under names not used before"
        )
        _log.warning(message)
        self._on_notice(f"warning: {message}")  # the log's root level is ERROR: this is what reaches the user

    def _written_from(self, institution: str, path: str) -> list[str]:
        """Patterns of the spool files (in any window) and dead letters a micro-batch writes from input `path`:
        their names start with its spool key."""
        prefix = f"{spool_key(path)}-*.parquet"
        spool = join(glob_escape(join(self.config.stream_spool_path, institution)), "*", prefix)
        return [spool, join(glob_escape(self._dead[institution]), prefix)]

    def _discard_unsaved(self) -> None:
        """Remove the spool files and dead letters of a micro-batch whose progress was never saved (the process was
        killed, or the step failed, after it wrote them). Its inputs were not recorded as processed: those still
        there are read again, under the same names; one moved or renamed meanwhile (archived, landed again under
        another name) leaves nothing behind, so no window releases readings the state never counted."""
        if not self.state.spooling:
            return
        patterns = [pattern for written in self.state.spooling.values() for pattern in written]
        found = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
        if found:
            FileSystems.delete([glob_escape(path) for path in found])
        self.state.spooling = {}
        save_state(self._state_file, self.state)

    def _journal_stdin(self) -> None:
        """Write the lines standard input delivered since the last call to a journal file (an input from then on)."""
        if self._stdin is not None and (used := self._stdin.flush(self.state.stdin_sequence)) is not None:
            self.state.stdin_sequence = used + 1
            save_state(self._state_file, self.state)  # the journal file is written: never reuse its number

    def ingest(self) -> int:
        """One micro-batch over every new input; returns the rows it read (accepted and rejected)."""
        if self.releases_only:
            return self._scan_spool()
        self._discard_unsaved()
        self._journal_stdin()
        discovered = self._discover()
        if not discovered:
            return 0
        inputs = [(institution, feed, path) for institution, feed, path, _ in discovered]
        self.state.spooling = {path: self._written_from(institution, path) for institution, _, path in inputs}
        save_state(self._state_file, self.state)  # before any spool file is written: a restart removes them
        started = time.monotonic()
        if names_runner(self._beam_args):
            batch = run_micro_batch(
                self.config,
                inputs,
                closed=self.state.closed(),
                dead_letter_dirs=self._dead,
                summary_path=join(str(self._root), "micro-batch.json"),
                options=beam_options(self._beam_args),
                now=self._clock(),
                start=self.grid_start,  # earlier readings are out_of_interval: no release will ever hold them
            )
        else:  # the local DirectRunner: the same steps in process, without a pipeline's cost per micro-batch
            batch = run_micro_batch_in_process(
                self.config,
                inputs,
                closed=self.state.closed(),
                dead_letter_dirs=self._dead,
                now=self._clock(),
                start=self.grid_start,
            )
        rows = 0
        for institution, start, n, latest in batch.spooled:
            self.state.window(datetime.fromisoformat(start))
            self.state.advance(institution, datetime.fromisoformat(latest))
            self.state.readings += n
            rows += n
        for institution, start, n in batch.late:  # its window has closed: counted here, never released
            self.state.window(datetime.fromisoformat(start)).add_rejects(institution, {"late": n})
            self.state.rejected += n
            rows += n
        for institution, counts, windowed in batch.rejects:
            rows += sum(counts.values())
            self._count_rejects(institution, counts, windowed)
        crash_point("stream_after_spool")
        for _, _, path, stamp in discovered:
            self.state.processed[path] = stamp
        self.state.spooling = {}
        save_state(self._state_file, self.state)
        self._rows_per_s = rows / max(time.monotonic() - started, 1e-9)
        return rows

    def _count_rejects(self, institution: str, counts: dict[str, int], windowed: dict[str, dict[str, int]]) -> None:
        """Add an institution's rejects to the local state: those that belong to a window (`windowed`, by window
        start) to that window, the rest to the institution's unwindowed counts. Exact counts stay here."""
        self.state.rejected += sum(counts.values())
        rest = dict(counts)
        for start, by_reason in windowed.items():
            self.state.window(datetime.fromisoformat(start)).add_rejects(institution, by_reason)
            for reason, n in by_reason.items():
                rest[reason] = rest.get(reason, 0) - n
        if any(rest.values()):
            add_counts(self.state.unwindowed.setdefault(institution, {}), rest)

    def _scan_spool(self) -> int:
        """Releases-only mode: count the job's rejects and the readings spooled after their window's release
        (late); an ON_TIME pane marker moves its institution's watermark (shown as lag, deciding nothing)."""
        size, lateness = self.config.stream_window, self.config.allowed_lateness
        spool = glob_escape(self.config.stream_spool_path)  # a pattern: a path may hold [ ] * ?
        pattern = join(spool, "*", "*", MARKERS, "*-ON_TIME.json")
        changed = 0
        for meta in FileSystems.match([pattern])[0].metadata_list:
            parts = meta.path.rstrip("/").split("/")
            institution, window_name = parts[-4], parts[-3]
            start = datetime.strptime(window_name, SPOOL_WINDOW_FORMAT).replace(tzinfo=UTC)
            before = self.state.max_event.get(institution)
            self.state.advance(institution, start + size + lateness)  # its watermark has passed the end
            changed += int(before != self.state.max_event.get(institution))
        # The job's reject counts, one file per message: each is added once (it is then a processed input).
        for meta in FileSystems.match([join(spool, "*", REJECT_COUNTS, "*.json")])[0].metadata_list:
            if meta.path in self.state.processed:
                continue
            institution = meta.path.rstrip("/").split("/")[-3]
            doc = json.loads(read_bytes(meta.path))
            if not isinstance(doc.get("rejects"), dict):  # written before windowed counts: {reason: rows}
                doc = {"rejects": doc, "windows": {}}
            self._count_rejects(
                institution,
                {reason: int(n) for reason, n in doc["rejects"].items()},
                {w: {r: int(n) for r, n in c.items()} for w, c in doc.get("windows", {}).items()},
            )
            self.state.processed[meta.path] = InputStamp(meta.size_in_bytes)
            changed += 1
        for start_text, window in self.state.windows.items():
            if window.status is not WindowStatus.RELEASED:
                continue
            for institution in self.config.institutions:
                directory = spool_dir(self.config, institution.id, datetime.fromisoformat(start_text))
                extra = sorted(set(list_files(directory, ".parquet")) - set(window.files.get(institution.id, [])))
                late = sum(_parquet_rows(path) for path in extra)
                counted = window.late_spooled.get(institution.id, 0)  # the job's own late counts come apart
                if late != counted:
                    window.add_rejects(institution.id, {"late": late - counted})
                    window.late_spooled[institution.id] = late  # cumulative: set, not add
                    self.state.rejected += late - counted
                    changed += 1
        if changed:
            save_state(self._state_file, self.state)
        return 0

    # -- releases -----------------------------------------------------------------------------------------
    def window_plan(self, start: datetime) -> ReleasePlan:
        """The release of one window alone (`release_plan` of that window)."""
        return self.release_plan([start])

    def release_plan(self, starts: Sequence[datetime]) -> ReleasePlan:
        """The batch release of the contiguous windows starting at `starts` (one interval, its layout holding each
        window's cells), reading those windows' spool files instead of the feeds, and carrying the rejects that
        belong to them (fixed when each closed) as noisy slots of the release.

        Each window's feeds are the spool files on record for it (`WindowState.files`, listed when its release
        began, one feed a file), never the spool as it is when the release reads it: a file a streaming job spools
        in between holds late readings, counted as late (`_scan_spool`), and is not released. A window whose files
        are not on record yet (its release has not begun) reads its spool as it is."""
        several = len(starts) > 1
        institutions = tuple(
            i.model_copy(
                update={
                    "feeds": tuple(
                        FeedConfig(name=f"spool-{k}" if several else "spool", path=path, format=FeedFormat.PARQUET)
                        for k, start in enumerate(starts)
                        for path in self._spool_files(i.id, start)
                    )
                }
            )
            for i in self.config.institutions
        )
        config = self.config.model_copy(update={"institutions": institutions})
        plan = plan_release(config, starts[0], starts[-1] + self.config.stream_window)
        carried: dict[str, dict[str, int]] = {}
        for start in starts:
            window = self.state.windows.get(start.isoformat())
            for institution, counts in (window.carried if window is not None else {}).items():
                add_counts(carried.setdefault(institution, {}), counts)
        if carried:
            plan = dataclasses.replace(plan, carried_rejects={i: carried[i] for i in sorted(carried)})
        return plan

    def _spool_files(self, institution_id: str, start: datetime) -> list[str]:
        """The spool files the release of the window at `start` reads for an institution: those on record, or
        (none on record yet) every Parquet file of its spool directory; as feed paths, which are patterns."""
        window = self.state.windows.get(start.isoformat())
        recorded = window.files.get(institution_id) if window is not None else None
        if recorded:
            return [glob_escape(path) for path in recorded]
        return [join(glob_escape(spool_dir(self.config, institution_id, start)), "*.parquet")]

    def _release_groups(self, starts: list[datetime]) -> list[list[datetime]]:
        """The windows of `starts` grouped into releases. A window whose release a crash interrupted keeps the
        release recorded for it (its institutions may have sealed that interval). The others: at event level
        (`privacy.unit = "reading"`), each run of contiguous windows of one privacy period is one release, unless
        an institution already sealed an interval overlapping it (then each window goes alone, and a window that
        overlaps is refused on its own); at entity level each window is its own release (contributions are
        bounded per release, so a grouped release would bound differently from its windows released alone).

        At event level a release of k contiguous windows is the same mechanism on every cell as k releases of one
        window each: a reading moves one cell, the noise is calibrated per cell, and releases of disjoint
        intervals compose in parallel, so the ledger charges the group what it charges one window. What it saves
        is every per-release step (an envelope per institution, an unmask round, a decryption, a signature) but
        one. Which windows are grouped depends on the clock only (which windows are due together), never on
        the readings."""
        size = self.config.stream_window
        recorded: dict[str, list[datetime]] = {}
        fresh: list[datetime] = []
        for start in starts:
            release_id = self.state.windows[start.isoformat()].release_id
            if release_id:
                recorded.setdefault(release_id, []).append(start)
            else:
                fresh.append(start)
        groups = list(recorded.values())
        if self.config.privacy.unit is not PrivacyUnit.READING:
            return sorted(groups + [[start] for start in fresh])
        runs: list[list[datetime]] = []
        for start in fresh:
            last = runs[-1][-1] if runs else None
            if last is not None and start == last + size and self._period(start) == self._period(runs[-1][0]):
                runs[-1].append(start)
            else:
                runs.append([start])
        for run in runs:
            if len(run) > 1 and not self._sealable(run):
                groups.extend([start] for start in run)
            else:
                groups.append(run)
        return sorted(groups)

    def _period(self, start: datetime) -> str:
        return period_of(self.config, start, start + self.config.stream_window).name

    def _sealable(self, starts: list[datetime]) -> bool:
        """Whether every institution may seal the interval of `starts` (none sealed an interval overlapping it)."""
        plan = self.release_plan(starts)
        try:
            for institution in plan.config.institutions:
                refuse_overlap(plan, institution)
        except ReleaseRefused:
            return False
        return True

    def _release(self, starts: list[datetime]) -> None:
        """Release the windows starting at `starts` in one run (pipelines/stream_release.py), grouped into
        releases by `_release_groups`; all of them queryable at the same moment."""
        plans = []
        groups = self._release_groups(starts)
        for group in groups:
            for start in group:
                for institution in self.config.institutions:  # an institution without readings contributes zeros
                    directory = spool_dir(self.config, institution.id, start)
                    if not list_files(directory, ".parquet"):
                        sink = pa.BufferOutputStream()
                        pq.write_table(READING_SCHEMA.empty_table(), sink)
                        write_bytes(join(directory, "empty.parquet"), sink.getvalue().to_pybytes())
            sealed: dict[str, bool] = {}
            if any(self.state.windows[start.isoformat()].files for start in group):  # a release a crash interrupted
                recorded = self.release_plan(group)  # the release id: the same whatever files it reads
                sealed = {i.id: _sealed_or_refused(recorded, i) for i in recorded.config.institutions}
            for start in group:
                window = self.state.windows[start.isoformat()]
                listed = {
                    i.id: list_files(spool_dir(self.config, i.id, start), ".parquet") for i in self.config.institutions
                }
                if not window.files:
                    window.files = listed
                else:  # a release a crash interrupted: an institution that sealed keeps the files it sealed from;
                    for institution_id, files in listed.items():  # one that did not reads the spool as it is now
                        if not sealed[institution_id]:
                            window.files[institution_id] = files
            plan = self.release_plan(group)  # exactly the files now on record: a file spooled later is late
            for start in group:
                self.state.windows[start.isoformat()].release_id = plan.key.release_id
            plans.append(plan)
        save_state(self._state_file, self.state)  # what the releases read is on record before anything is sealed
        check_writable(self.config.store_path)  # a read-only or full store refused before Delta writes to it
        outcomes = release_windows(plans)
        now = self._clock()
        for group, outcome, plan in zip(groups, outcomes, plans, strict=True):
            for start in group:
                window = self.state.windows[start.isoformat()]
                if outcome.status == "refused":
                    window.status, window.reason = WindowStatus.REFUSED, outcome.reason
                else:
                    window.status = WindowStatus.RELEASED
                window.released_at = now.isoformat()
                if window.status is WindowStatus.RELEASED and window.closable_at:
                    latency = (now - datetime.fromisoformat(window.closable_at)).total_seconds()
                    self._last_release = (start.isoformat(), latency)
            if outcome.status != "refused":
                self._count_release_rejects(plan, group)
        save_state(self._state_file, self.state)  # the windows released and their rejects, at once: counted once

    def _count_release_rejects(self, plan: ReleasePlan, starts: list[datetime]) -> None:
        """Move the spooled readings a release rejected (exact duplicates) from the accepted readings to the
        rejects of their windows, so that rows read = accepted + rejected in the state and the status line."""
        for institution, windows in release_rejects(plan, starts).items():
            for start, counts in windows.items():
                self.state.window(start).add_rejects(institution, counts)
                self.state.readings -= sum(counts.values())
                self.state.rejected += sum(counts.values())

    def close_windows(self, *, drain: bool = False) -> list[datetime]:
        """Close and release every window of the grid that is due now (see `release_bound`), readings or not,
        and any whose release a crash interrupted. Refuses a backlog larger than `stream.max_backlog`."""
        size = self.config.stream_window
        now = self._clock()
        bound = release_bound(now=now, lateness=self.config.allowed_lateness, until=self.until, drain=drain)
        grid_start = self.grid_start
        pending = backlog(self.state, grid_start=grid_start, size=size, bound=bound)
        if pending > self.config.stream.max_backlog:
            raise FusionError(
                f"{pending} windows of the stream's grid are due, from {grid_start.isoformat()} to "
                f"{bound.isoformat()}, more than stream.max_backlog = {self.config.stream.max_backlog}: each is a "
                "release (charged to the budget) whether or not it holds readings. Set stream.start later (the grid "
                "starts at the window holding it), bound the run with --until, or raise stream.max_backlog"
            )
        ready = due_windows(self.state, grid_start=grid_start, size=size, bound=bound) if pending else []
        held = self._held_sources() if ready else ()
        if held and held != self._held:
            when = ready[0].isoformat() + (f" and {len(ready) - 1} more" if len(ready) > 1 else "")
            sources = "; ".join(_waiting(r) for r in held)
            text = (
                f"the windows due ({when}) wait for {sources}: none closes before every broker source has read what "
                "its broker held for it since it (re)connected, so readings on time are not counted late"
            )
            (_log.warning if any(r.down_since is not None for r in self._readers) else _log.info)(text)
            self._on_notice(text)
        self._held = held
        if held:
            ready = []
        interrupted = [
            datetime.fromisoformat(w) for w, s in self.state.windows.items() if s.status is WindowStatus.CLOSING
        ]
        if len(ready) > 1:
            last = ready[-1] + size
            self._on_notice(f"releasing {len(ready)} windows of the grid, {ready[0].isoformat()} to {last.isoformat()}")
        for start in ready:
            self.state.window(start).close(now)
        save_state(self._state_file, self.state)  # from here on, readings for these windows are late
        if ready:
            crash_point("stream_after_close")
        if interrupted or ready:  # every window closable now, and any a crash interrupted: one release run
            self._release(sorted(set(interrupted) | set(ready)))
            self._remove_released_journals()
        self._refresh_forecasts(sorted(set(interrupted) | set(ready)))
        return sorted(set(interrupted) | set(ready))

    def _held_sources(self) -> tuple[SourceReader, ...]:
        """The broker sources that due windows wait for, as an input that cannot be read now holds them: a source
        that is down, or has not caught up (read everything its broker held, JetStream's messages a killed reader
        fetched included once `ack_wait` redelivers them) since it last connected, or whose journal was not read in
        since. Every window is every institution's, so each source holds every window."""
        return tuple(
            r for r in self._readers if r.down_since is not None or self._caught_up.get(r) != r.connections
        )

    def _remove_released_journals(self) -> None:
        """Remove the broker journal segments that are spooled and whose every window is released: none of the
        spool files of a window still open or being released came from them (spool files are named after their
        input, `pipelines/stream.py` `_key`)."""
        if not self._readers:
            return
        unreleased = {
            name.rsplit("/", 1)[-1].split("-", 1)[0]
            for start, window in self.state.windows.items()
            if window.status in (WindowStatus.OPEN, WindowStatus.CLOSING)
            for institution in self.config.institutions
            for name in list_files(spool_dir(self.config, institution.id, datetime.fromisoformat(start)), ".parquet")
        }
        removed = False
        for reader in self._readers:
            for segment in reader.journal.segments():
                path = str(segment)
                if path in self.state.processed and spool_key(path) not in unreleased:
                    reader.journal.remove(segment)
                    if not segment.exists():
                        del self.state.processed[path]  # never seen again: numbers are not reused
                        removed = True
        if removed:
            save_state(self._state_file, self.state)

    def _refresh_forecasts(self, starts: list[datetime]) -> None:
        """Forecast the released series again, once per step ([forecasting] refresh; off without the block)."""
        windows = [self.state.windows[start.isoformat()] for start in starts]
        released = list(
            dict.fromkeys(w.release_id for w in windows if w.status is WindowStatus.RELEASED and w.release_id)
        )
        if released and self.config.forecasting is not None:
            from forecasting.refresh import refresh_forecasts

            note = refresh_forecasts(self.config, released)
            if note:
                self._on_notice(note)

    def finished(self) -> bool:
        """With `until`: every window of the grid that ends at or before it has been closed."""
        if self.until is None:
            return False
        done = backlog(self.state, grid_start=self.grid_start, size=self.config.stream_window, bound=self.until)
        return done == 0

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
                w.reason or "refused" for _, w in sorted(self.state.windows.items()) if w.status is WindowStatus.REFUSED
            ),
            sources=tuple(f"{r.institution} {r.label}: {r.health}" for r in self._readers),
            unavailable=self._unavailable[1] if self._unavailable is not None else None,
            held=tuple(_waiting(r) for r in self._held),
        )

    def step(self, *, drain: bool = False) -> int:
        # Before the ingest: a reader caught up now has journalled all the broker held, which the ingest reads.
        marks = [(reader, reader.connections, reader.caught_up) for reader in self._readers]
        rows = self.ingest()
        for reader, connection, caught_up in marks:
            if caught_up and reader.connections == connection:  # not reconnected meanwhile
                self._caught_up[reader] = connection
        self.close_windows(drain=drain)
        self._on_status(self.status())
        return rows

    def run(self, *, drain: bool = False, sleep: Callable[[float], None] = time.sleep) -> StreamStatus:
        """Step until stopped, or with `until` until every window up to it is released; with `drain`, until
        the inputs are exhausted (stdin closed, no new files), then release every window of the grid up to
        `until` (or up to the clock without it)."""
        try:
            with self._store_failures():
                return self._run(drain=drain, sleep=sleep)
        finally:
            self.close()

    @contextlib.contextmanager
    def _store_failures(self) -> Iterator[None]:
        """Say in one line that the store cannot be used now (read-only, full, failing), naming it, instead of
        Delta's traceback; and likewise for a disk error of the stream's other files (its state, spool, dead
        letters, the institutions' keys, the exchange). The stream then stops where a kill would: windows being
        released stay closing and are released (and charged) once when it runs again."""
        try:
            yield
        except (OSError, DeltaError) as exc:
            failure = store_failure(exc, self.config.store_path)
            if failure is not None:
                raise failure from exc
            if not isinstance(exc, OSError) or exc.errno is None:
                raise
            where = f" ({os.fsdecode(exc.filename)})" if isinstance(exc.filename, str | bytes) else ""
            raise FusionError(
                f"fusion stream could not use its files{where}: {os.strerror(exc.errno)} (os error {exc.errno}). "
                "It stopped where a kill would: nothing read is lost and nothing is released or charged twice. Free "
                "space, or make the directory writable, then run it again"
            ) from exc

    def _run(self, *, drain: bool, sleep: Callable[[float], None]) -> StreamStatus:
        if drain:
            self._check_until_reached()
        while not self.stop_requested:
            # Before the step, which reads what was journalled. Standard input is caught up once closed: the
            # ingest that met its end journalled and read every line before it.
            caught_up = all(reader.idle for reader in self._readers) and (self._stdin is None or self._stdin.closed)
            try:
                if drain and not caught_up:  # a backlog on the brokers, or stdin open: take it before any window
                    self._check_drainable()  # closes
                    self.ingest()
                    self._unavailable = None
                    self._on_status(self.status())
                    sleep(0.1)
                    continue
                rows = self.step()
            except FeedUnavailable as exc:  # the step failed as a whole (nothing of it kept, no window closed)
                self._input_unavailable(exc, drain=drain)
                self._on_status(self.status())
                sleep(self.config.stream_poll.total_seconds())
                continue
            self._unavailable = None
            if drain and rows == 0 and caught_up:
                self.step(drain=True)
                if not self._held:  # a source went down since: wait for it (or give up on it) as above
                    break
            if self.finished():
                break
            if rows == 0:
                sleep(self.config.stream_poll.total_seconds())
        return self.status()

    def _input_unavailable(self, exc: FeedUnavailable, *, drain: bool) -> None:
        """A step failed on an input that cannot be read now (EIO, EMFILE, a permission, the network): say so, once
        per error, and let the next poll read it again. No window closes meanwhile, so none is released without
        readings that landed in time. Draining, an input unreadable for `drain_wait_s` ends the run."""
        now = time.monotonic()
        since = self._unavailable[0] if self._unavailable is not None else now
        if self._unavailable is None or self._unavailable[1] != str(exc):
            _log.warning("%s", exc)
            self._on_notice(f"warning: {exc}")
        self._unavailable = (since, str(exc))
        if drain and now - since > self.drain_wait_s:
            raise FeedUnavailable(
                f"--drain: {exc}, for more than {self.drain_wait_s:.0f} s: no window was released. Make the file "
                "readable (or move it out of the feed) and run `fusion stream --drain` again"
            ) from exc

    def _check_until_reached(self) -> None:
        """Draining releases every window up to `until` without waiting: refuse an `until` the clock has not
        reached, whose last windows have not ended (or begun) and would be released without their readings."""
        now = self._clock()
        if self.until is not None and self.until > now:
            reached = window_start(now, self.config.stream_window)
            raise FusionError(
                f"--drain --until {self.until.isoformat()}: the clock is at {now.isoformat()}, and draining releases "
                "every window up to --until at once, so windows that have not ended would be released without "
                f"readings still to come. Drain up to a time the clock has passed (--until {reached.isoformat()}, "
                "the end of the last window it has passed), or leave out --drain: the stream then releases each "
                "window up to --until as the clock passes its end (and the allowed lateness) and stops"
            )

    def _check_drainable(self) -> None:
        """Draining waits for each broker source to catch up; one that has not been reachable for
        `drain_wait_s` cannot be drained: stop, saying so, rather than wait for it forever. What the readers
        journalled so far stays spooled and the windows stay open; nothing unacknowledged is lost."""
        now = time.monotonic()
        down = [r for r in self._readers if r.down_since is not None and now - r.down_since > self.drain_wait_s]
        if down:
            raise FusionError(
                f"--drain: {'; '.join(f'source {r.institution} {r.label} is {r.health}' for r in down)}, for more "
                f"than {self.drain_wait_s:.0f} s: its backlog cannot be drained and no window was released. Start "
                "the broker (or fix the source's url, credentials or TLS settings) and run `fusion stream --drain` "
                "again; every message not yet journalled is still on the broker"
            )

    def close(self) -> None:
        """Journal the lines read from standard input since the last step (a restart reads them), and stop the
        broker readers (what they journalled is acknowledged; the rest is redelivered)."""
        try:
            with self._store_failures():  # a full disk said in one line here too
                self._journal_stdin()
            for reader in self._readers:
                reader.stop()
            for reader in self._readers:
                reader.join(timeout=5)
        finally:
            self._lock.release()


def _waiting(reader: SourceReader) -> str:
    """A source that due windows wait for, and why."""
    why = "catching up" if reader.down_since is None else reader.health
    return f"source {reader.institution} {reader.label} ({why})"


def _sealed_or_refused(plan: ReleasePlan, institution: InstitutionConfig) -> bool:
    """Whether the institution sealed its envelope for the plan already, or will refuse to (the release says why):
    either way the spool files on record for it stay as they are."""
    try:
        return sealed_envelope(plan, institution) is not None
    except FusionError:
        return True
