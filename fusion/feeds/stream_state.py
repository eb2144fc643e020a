"""The stream driver's durable progress, and the public grid of windows it releases.

Which windows the stream releases, and when, is a function of public things only: the config (window size,
allowed lateness, `stream.start`), the moment the state was created, the processing clock and the command line's
`--until`. A window [s, e) of the grid is released once the clock reaches e + allowed lateness, whether or not any
reading fell in it (every institution then contributes zeros), exactly as a batch release covers every window of
its interval. Neither the readings that arrived nor their event times decide a release: two feeds one reading
apart release the same windows at the same moments and are charged the same budget. Event times still decide
what is not released: which window a reading is spooled to, and that a reading whose window has closed is late.

The state records the grid its windows were cut on (the window's length and the grid's first window) and refuses
a config with another while it holds windows (`adopt_grid`): windows are keyed, and spooled, by their start only.

The state is one JSON file replaced atomically (write, fsync, rename). The driver commits it before a
micro-batch writes anything (the spool files and dead letters it will write, by input), after its readings are
spooled, and before a window's release starts, so a kill at any point either replays a micro-batch (what it wrote
is removed first, and its inputs still there are read again: nothing doubles, and an input moved or renamed
meanwhile leaves no reading that no count holds) or re-runs a release (idempotent: sealed envelopes are reused,
the store refuses a second release of an interval). One process at a time holds the state directory
(`StateLock`).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from enum import StrEnum
from itertools import pairwise
from pathlib import Path
from typing import Any

from fusion.errors import FusionError
from fusion.runtime.durations import EPOCH, floor_to_grid
from fusion.runtime.locks import take_exclusive
from schemas.reasons import PUBLISHED_REASONS

#: Reasons decided after the event time was parsed and found inside the stream's interval: such a row belongs to
#: the window of its event time, so its count is carried by that window's release (as noisy tallies of it: the
#: reasons a release publishes). Rows refused before their time was known (malformed, missing or mistyped fields,
#: unparseable or out-of-interval times) belong to no window, and late rows to a window already released: their
#: counts stay local.
WINDOWED_REASONS: frozenset[str] = frozenset(r.value for r in PUBLISHED_REASONS)


class WindowStatus(StrEnum):
    OPEN = "open"  # readings may still arrive
    CLOSING = "closing"  # closed to readings (later ones are late); its release is running or must re-run
    RELEASED = "released"
    REFUSED = "refused"  # the release was refused (e.g. the period's budget is spent); recorded, not retried


@dataclass
class WindowState:
    status: WindowStatus = WindowStatus.OPEN
    closable_at: str | None = None  # when (processing time) it was closed (latency is measured from here)
    release_id: str | None = None  # the release holding it (at event level, windows due together share one)
    released_at: str | None = None
    reason: str | None = None
    # institution -> {reason: rows}: validation rejects attributed to this window by their event time, late
    # readings, and the spooled copies its release took as duplicates. Exact counts: they stay in the institution's
    # local state, never in a shared place.
    rejects: dict[str, dict[str, int]] = field(default_factory=dict)
    # institution -> {reason: rows}: the rejects (of WINDOWED_REASONS) this window's release carries, fixed when
    # it closed so that a release re-run after a crash carries what the first run sealed
    carried: dict[str, dict[str, int]] = field(default_factory=dict)
    # institution -> the spool files its release read (files spooled later hold late readings)
    files: dict[str, list[str]] = field(default_factory=dict)
    # institution -> rows found in spool files added after the release (`fusion stream --releases-only`), a part of
    # its `late` count (the streaming job counts readings beyond the allowed lateness itself, in the rest)
    late_spooled: dict[str, int] = field(default_factory=dict)

    def add_rejects(self, institution: str, counts: dict[str, int]) -> None:
        add_counts(self.rejects.setdefault(institution, {}), counts)

    def close(self, now: datetime) -> None:
        """Closed to readings at processing time `now`: what its release carries is fixed from here on."""
        self.status = WindowStatus.CLOSING
        self.closable_at = self.closable_at or now.isoformat()
        self.carried = {
            institution: carried
            for institution, counts in sorted(self.rejects.items())
            if (carried := {r: n for r, n in sorted(counts.items()) if r in WINDOWED_REASONS and n})
        }


@dataclass(frozen=True)
class InputStamp:
    """What tells an input file's content apart without reading it: its size in bytes, and where the file system
    says them, its modification time (ns) and inode. A file replaced under its name (archived, another landed)
    changes at least one of them even at the same size; a state written before they were recorded knows the size
    only, and a stamp is compared on what both stamps know."""

    size: int
    mtime_ns: int | None = None
    inode: int | None = None

    def differs(self, other: InputStamp) -> bool:
        """Whether `other`, taken later of the same path, shows another file or another content."""
        known = [(a, b) for a, b in ((self.mtime_ns, other.mtime_ns), (self.inode, other.inode)) if None not in (a, b)]
        return self.size != other.size or any(a != b for a, b in known)

    def to_doc(self) -> int | dict[str, int]:
        """The size alone when that is all it knows (as states before the other fields were recorded hold it)."""
        if self.mtime_ns is None and self.inode is None:
            return self.size
        known = {"size": self.size, "mtime_ns": self.mtime_ns, "inode": self.inode}
        return {name: value for name, value in known.items() if value is not None}

    @classmethod
    def from_doc(cls, doc: int | dict[str, int]) -> InputStamp:
        return cls(int(doc)) if isinstance(doc, int) else cls(int(doc["size"]), doc.get("mtime_ns"), doc.get("inode"))


def add_counts(into: dict[str, int], counts: dict[str, int]) -> None:
    """Add per-reason row counts into `into` (zeros are not recorded)."""
    for reason, n in counts.items():
        if n:
            into[reason] = into.get(reason, 0) + int(n)


@dataclass
class StreamState:
    """Everything the driver must remember across restarts. Times are ISO 8601 UTC strings."""

    created_at: str | None = None  # processing time the state was created: the grid starts there by default
    # The grid the windows were cut on: the window's length (seconds) and the first window's start, recorded when
    # the state was created (None: written before they were recorded; see `adopt_grid`)
    window_seconds: int | None = None
    grid_start: str | None = None
    processed: dict[str, InputStamp] = field(default_factory=dict)  # input file -> its stamp when it was listed
    max_event: dict[str, str] = field(default_factory=dict)  # institution -> latest accepted event time
    windows: dict[str, WindowState] = field(default_factory=dict)  # window start -> its state
    stdin_sequence: int = 0  # journal files written from standard input
    readings: int = 0  # accepted readings spooled (less the copies releases took as duplicates), all time
    rejected: int = 0  # rejected rows (validation, late, duplicates found by a release), all time
    # institution -> {reason: rows}: rejects that belong to no window (refused before their event time was known,
    # or outside the grid); counted here, locally, and nowhere else
    unwindowed: dict[str, dict[str, int]] = field(default_factory=dict)
    # input file -> its stamp when it was seen changed after it was spooled (ignored: inputs are immutable once
    # landed; a replaced or appended file is reported, not read again, which could count its rows twice)
    changed: dict[str, InputStamp] = field(default_factory=dict)
    # input file -> the patterns of the spool files and dead letters a micro-batch is writing from it, recorded
    # before it writes any and cleared with the save of its progress: what a micro-batch left when it never
    # saved (a kill, a failed step) is removed before the next one (`StreamDriver._discard_unsaved`)
    spooling: dict[str, list[str]] = field(default_factory=dict)

    def window(self, start: datetime) -> WindowState:
        return self.windows.setdefault(start.isoformat(), WindowState())

    def closed(self) -> frozenset[str]:
        """Window starts (ISO text) that no longer take readings: a reading of one of them is late."""
        return frozenset(w for w, s in self.windows.items() if s.status is not WindowStatus.OPEN)

    def advance(self, institution: str, latest: datetime) -> None:
        current = self.max_event.get(institution)
        if current is None or latest > datetime.fromisoformat(current):
            self.max_event[institution] = latest.isoformat()

    def to_doc(self) -> dict[str, Any]:
        return {
            "created_at": self.created_at,
            "window_seconds": self.window_seconds,
            "grid_start": self.grid_start,
            "processed": {path: stamp.to_doc() for path, stamp in self.processed.items()},
            "max_event": self.max_event,
            "windows": {w: {**vars(s), "status": s.status.value} for w, s in sorted(self.windows.items())},
            "stdin_sequence": self.stdin_sequence,
            "readings": self.readings,
            "rejected": self.rejected,
            "unwindowed": self.unwindowed,
            "changed": {path: stamp.to_doc() for path, stamp in self.changed.items()},
            "spooling": self.spooling,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> StreamState:
        known = {f.name for f in fields(WindowState)}  # a state written before a field was dropped still loads
        windows = {
            w: WindowState(**{**{k: v for k, v in s.items() if k in known}, "status": WindowStatus(s["status"])})
            for w, s in doc["windows"].items()
        }
        for w, window in windows.items():  # written before the job counted late readings: all of them were spooled
            if "late_spooled" not in doc["windows"][w] and window.status is WindowStatus.RELEASED:
                window.late_spooled = {i: c["late"] for i, c in window.rejects.items() if c.get("late")}
        unwindowed = doc.get("unwindowed", doc.get("pending_rejects", {}))
        return cls(
            created_at=doc.get("created_at"),
            window_seconds=doc.get("window_seconds"),
            grid_start=doc.get("grid_start"),
            processed={path: InputStamp.from_doc(stamp) for path, stamp in doc["processed"].items()},
            max_event=dict(doc["max_event"]),
            windows=windows,
            stdin_sequence=int(doc["stdin_sequence"]),
            readings=int(doc["readings"]),
            rejected=int(doc["rejected"]),
            unwindowed={i: dict(c) for i, c in unwindowed.items()},
            changed={path: InputStamp.from_doc(stamp) for path, stamp in doc.get("changed", {}).items()},
            spooling={path: list(patterns) for path, patterns in doc.get("spooling", {}).items()},
        )


def load_state(path: Path) -> StreamState:
    return StreamState.from_doc(json.loads(path.read_text())) if path.exists() else StreamState()


def save_state(path: Path, state: StreamState) -> None:
    """Replace the state file atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w") as handle:
        json.dump(state.to_doc(), handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)  # the rename itself must reach the disk too
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


#: The state directories this process holds a `StateLock` on: the lock file's descriptor and how many holders.
_HELD: dict[Path, tuple[int, int]] = {}
_HELD_GUARD = threading.Lock()


class StateLock:
    """An exclusive lock on a stream's state directory (`flock` of `<directory>/lock`), held while a driver runs.
    Two processes on one state would each journal, spool, save and release over the other's progress: readings
    acknowledged to the broker were lost. A second process is refused; drivers of one process share the lock."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory.resolve() / "lock"
        with _HELD_GUARD:
            descriptor, holders = _HELD.get(self.path) or (os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), 0)
            if not holders:
                holder = take_exclusive(descriptor)
                if holder is not None:
                    raise FusionError(
                        f"another `fusion stream` (process {holder}) is running on the stream state in {directory}: "
                        "two streams on one state would each journal, spool and release over the other's progress, "
                        "losing readings the brokers were told are safe. Stop that one first, or give this stream a "
                        "state directory of its own (stream.state)"
                    )
            _HELD[self.path] = (descriptor, holders + 1)
        self._held = True

    def release(self) -> None:
        """Let go of the lock (once; the process lets go of the directory with its last holder)."""
        with _HELD_GUARD:
            if not self._held:
                return
            self._held = False
            descriptor, holders = _HELD.pop(self.path)
            if holders > 1:
                _HELD[self.path] = (descriptor, holders - 1)
            else:
                os.close(descriptor)  # closing it releases the flock


def adopt_grid(state: StreamState, *, size: timedelta, grid_start: datetime, state_dir: str) -> bool:
    """Check that the config's grid (windows of `size`, the first at `grid_start`) is the one the state's windows
    were cut on, and record it if the state holds no window yet; returns whether the record changed (save it).

    Windows are kept, and spooled, by their start only: on another grid a window of the old one is never due (its
    spooled readings neither released nor counted late) or is taken for a window of the new one (a released 1h
    window at 00:00 for a released 2h window at 00:00). So while the state holds windows a change is refused,
    naming `stream.window` or `stream.start`. A state written before the grid was recorded: its window is
    inferred from the windows on record (`_inferred_window`) and accepted when they are too few to tell; its start
    is refused only if it would leave an open window before the grid."""
    recorded = (int(size.total_seconds()), grid_start.isoformat())
    if state.windows:
        old_size = timedelta(seconds=state.window_seconds) if state.window_seconds is not None else None
        _refuse_other_window(state, size, old_size, state_dir)
        if state.grid_start is not None and datetime.fromisoformat(state.grid_start) != grid_start:
            _refuse_other_start(grid_start, datetime.fromisoformat(state.grid_start), state_dir)
        stranded = [
            moment
            for start, window in state.windows.items()
            if window.status is WindowStatus.OPEN and (moment := datetime.fromisoformat(start)) < grid_start
        ]
        if stranded:  # only a state from before the grid was recorded gets here: its start is not on record
            _refuse_other_start(grid_start, min(stranded), state_dir)
    changed = (state.window_seconds, state.grid_start) != recorded
    state.window_seconds, state.grid_start = recorded
    return changed


def _refuse_other_window(state: StreamState, size: timedelta, old_size: timedelta | None, state_dir: str) -> None:
    """Refuse windows of `size` when the state's (`old_size`, or inferred when not recorded) differ."""
    if old_size is None:
        old_size = _inferred_window(state, size)
    if old_size == size:
        return
    held = f"windows of {_duration_text(old_size)}" if old_size else "windows off that grid"
    raise FusionError(
        f"stream.window is {_duration_text(size)}, but the stream state in {state_dir} holds {held}: windows are "
        "kept by their start, so on another grid its open windows would never be released (their spooled readings "
        "neither released nor counted late) and its closed ones would be taken for windows of the new length. "
        + (f"Set stream.window back to {_duration_text(old_size)}, or finish" if old_size else "Finish")
        + " this stream first (`fusion stream --drain --until <the end of its last window>`) and start the new "
        "window in a new state directory (stream.state; and a new stream.spool if it is set), with stream.start at "
        "or after the end of the old stream's last release"
    )


def _refuse_other_start(grid_start: datetime, held: datetime, state_dir: str) -> None:
    raise FusionError(
        f"stream.start puts the grid's first window at {grid_start.isoformat()}, but the stream state in "
        f"{state_dir} holds windows of a grid from {held.isoformat()}: a window before the new start would never "
        "be released, and one after the old start may already have rejected readings as out_of_interval. Set "
        f"stream.start back to a time in the window starting at {held.isoformat()} (or remove it, if the state was "
        "created without it), or finish this stream first (`fusion stream --drain --until <the end of its last "
        "window>`) and start the new grid in a new state directory (stream.state; and a new stream.spool if it is "
        "set)"
    )


def _inferred_window(state: StreamState, size: timedelta) -> timedelta | None:
    """The window length of a state that did not record it: the smallest gap between two closed windows (the grid
    closes every window in turn, so two in a row are one window apart). With fewer than two closed windows: `size`
    if every window on record lies on its grid (too few to tell: accepted), else None (another grid, length
    unknown)."""
    closed = sorted(datetime.fromisoformat(w) for w, s in state.windows.items() if s.status is not WindowStatus.OPEN)
    if len(closed) > 1:
        return min(later - earlier for earlier, later in pairwise(closed))
    starts = [datetime.fromisoformat(w) for w in state.windows]
    return size if all((start - EPOCH) % size == timedelta(0) for start in starts) else None


def _duration_text(length: timedelta) -> str:
    """A window length as a config writes it: '2h', '15m', '1d', '90s'."""
    seconds = int(length.total_seconds())
    for unit, unit_seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % unit_seconds == 0:
            return f"{seconds // unit_seconds}{unit}"
    return f"{seconds}s"


def window_start(time: datetime, size: timedelta) -> datetime:
    """The start of the fixed event-time window (aligned to the Unix epoch, like Beam's FixedWindows)."""
    return floor_to_grid(time, size)


def release_bound(*, now: datetime, lateness: timedelta, until: datetime | None, drain: bool) -> datetime:
    """The latest end a window released now may have. Running: the clock less the allowed lateness (a window's
    readings are on time until its end plus the lateness), never past `until`. Draining (no reading is still to
    come): the clock, or `until` if earlier; never a window the clock has not seen end, whose readings are still
    to come. Public inputs only."""
    if drain:
        return now if until is None else min(now, until)
    return now - lateness if until is None else min(now - lateness, until)


def backlog(state: StreamState, *, grid_start: datetime, size: timedelta, bound: datetime) -> int:
    """How many windows of the grid from `grid_start` that end at or before `bound` are not closed yet (counted
    without listing them: a grid start far in the past must be refused cheaply)."""
    total = max(0, (bound - grid_start) // size)
    closed = sum(
        1
        for start, window in state.windows.items()
        if window.status is not WindowStatus.OPEN
        and grid_start <= (moment := datetime.fromisoformat(start))
        and moment + size <= bound
        and (moment - EPOCH) % size == timedelta(0)
    )
    return total - closed


def due_windows(state: StreamState, *, grid_start: datetime, size: timedelta, bound: datetime) -> list[datetime]:
    """The windows of the grid from `grid_start` that end at or before `bound` and are not closed yet, oldest
    first: every one of them, readings or not."""
    due = []
    start = grid_start
    while start + size <= bound:
        window = state.windows.get(start.isoformat())
        if window is None or window.status is WindowStatus.OPEN:
            due.append(start)
        start += size
    return due
