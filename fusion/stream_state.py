"""The stream driver's durable progress: which inputs are in the spool, the watermarks, each window's fate.

The state is one JSON file replaced atomically (write, fsync, rename). The driver commits it after a
micro-batch's readings are spooled, and before a window's release starts, so a kill at any point either
replays a micro-batch (its spool files are rewritten under the same names: nothing doubles) or re-runs a
release (idempotent: sealed envelopes are reused, the store refuses a second release of an interval).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class WindowStatus(StrEnum):
    OPEN = "open"  # readings may still arrive
    CLOSING = "closing"  # closed to readings (later ones are late); its release is running or must re-run
    RELEASED = "released"
    REFUSED = "refused"  # the release was refused (e.g. the period's budget is spent); recorded, not retried


@dataclass
class WindowState:
    status: WindowStatus = WindowStatus.OPEN
    quorum_at: str | None = None  # when (processing time) a quorum of watermarks first passed its end
    closable_at: str | None = None  # when it became closable (latency is measured from here)
    release_id: str | None = None
    released_at: str | None = None
    reason: str | None = None
    # institution -> {reason: rows}: validation rejects counted against this window, and late readings.
    rejects: dict[str, dict[str, int]] = field(default_factory=dict)
    # institution -> the spool files its release read (files spooled later hold late readings)
    files: dict[str, list[str]] = field(default_factory=dict)

    def add_rejects(self, institution: str, counts: dict[str, int]) -> None:
        add_counts(self.rejects.setdefault(institution, {}), counts)


def add_counts(into: dict[str, int], counts: dict[str, int]) -> None:
    """Add per-reason row counts into `into` (zeros are not recorded)."""
    for reason, n in counts.items():
        if n:
            into[reason] = into.get(reason, 0) + int(n)


@dataclass
class StreamState:
    """Everything the driver must remember across restarts. Times are ISO 8601 UTC strings."""

    processed: dict[str, int] = field(default_factory=dict)  # input file -> size when it was spooled
    max_event: dict[str, str] = field(default_factory=dict)  # institution -> latest accepted event time
    windows: dict[str, WindowState] = field(default_factory=dict)  # window start -> its state
    stdin_sequence: int = 0  # journal files written from standard input
    readings: int = 0  # accepted readings spooled, all time
    rejected: int = 0  # rejected rows (validation and late), all time
    # institution -> {reason: rows}: rejects without an event time from an institution with no accepted reading
    # yet; they join its first window with readings (a window of rejects alone is never released).
    pending_rejects: dict[str, dict[str, int]] = field(default_factory=dict)
    # input file -> its size when it was seen changed after it was spooled (ignored: inputs are immutable once
    # landed; a replaced or appended file is reported, not read again, which could count its rows twice)
    changed: dict[str, int] = field(default_factory=dict)

    def window(self, start: datetime) -> WindowState:
        return self.windows.setdefault(start.isoformat(), WindowState())

    def closed(self) -> set[str]:
        """Window starts that no longer take readings."""
        return {w for w, s in self.windows.items() if s.status is not WindowStatus.OPEN}

    def late_windows(self, institutions: Iterable[str], *, size: timedelta, lateness: timedelta) -> ClosedWindows:
        """The windows whose readings are late now: closed ones, and any not open yet whose end every
        institution's watermark has passed (it would close at once, so no reading of it may still be used)."""
        marks = [self.watermark(i, lateness) for i in institutions]
        cutoff = None if not marks or any(m is None for m in marks) else min(m for m in marks if m is not None)
        return ClosedWindows(
            closed=frozenset(self.closed()),
            open=frozenset(w for w, s in self.windows.items() if s.status is WindowStatus.OPEN),
            size_s=size.total_seconds(),
            cutoff=None if cutoff is None else cutoff.isoformat(),
        )

    def watermark(self, institution: str, lateness: timedelta) -> datetime | None:
        latest = self.max_event.get(institution)
        return None if latest is None else datetime.fromisoformat(latest) - lateness

    def advance(self, institution: str, latest: datetime) -> None:
        current = self.max_event.get(institution)
        if current is None or latest > datetime.fromisoformat(current):
            self.max_event[institution] = latest.isoformat()

    def to_doc(self) -> dict[str, Any]:
        return {
            "processed": self.processed,
            "max_event": self.max_event,
            "windows": {w: {**vars(s), "status": s.status.value} for w, s in sorted(self.windows.items())},
            "stdin_sequence": self.stdin_sequence,
            "readings": self.readings,
            "rejected": self.rejected,
            "pending_rejects": self.pending_rejects,
            "changed": self.changed,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> StreamState:
        windows = {w: WindowState(**{**s, "status": WindowStatus(s["status"])}) for w, s in doc["windows"].items()}
        return cls(
            processed=dict(doc["processed"]),
            max_event=dict(doc["max_event"]),
            windows=windows,
            stdin_sequence=int(doc["stdin_sequence"]),
            readings=int(doc["readings"]),
            rejected=int(doc["rejected"]),
            pending_rejects={i: dict(c) for i, c in doc.get("pending_rejects", {}).items()},
            changed=dict(doc.get("changed", {})),
        )


@dataclass(frozen=True)
class ClosedWindows:
    """`StreamState.late_windows`: a container of window starts (ISO text) that no longer take readings."""

    closed: frozenset[str]
    open: frozenset[str]
    size_s: float
    cutoff: str | None  # a window not open that ends at or before this is past every watermark

    def __contains__(self, start: object) -> bool:
        if not isinstance(start, str):
            return False
        if start in self.closed:
            return True
        if self.cutoff is None or start in self.open:
            return False
        end = datetime.fromisoformat(start) + timedelta(seconds=self.size_s)
        return end <= datetime.fromisoformat(self.cutoff)


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


def window_start(time: datetime, size: timedelta) -> datetime:
    """The start of the fixed event-time window (aligned to the Unix epoch, like Beam's FixedWindows)."""
    return EPOCH + ((time - EPOCH) // size) * size


def closable(
    state: StreamState,
    *,
    institutions: Iterable[str],
    size: timedelta,
    lateness: timedelta,
    quorum: int,
    deadline: timedelta,
    now: datetime,
    drain: bool = False,
) -> list[datetime]:
    """Open windows that may close now, oldest first: every institution's watermark has passed the window's
    end, or a quorum's has for at least `deadline` (processing time), or the stream is draining. Records when
    each window first reached a quorum."""
    members = list(institutions)
    ready = []
    for start_text, window in sorted(state.windows.items()):
        if window.status is not WindowStatus.OPEN:
            continue
        end = datetime.fromisoformat(start_text) + size
        passed = sum(
            1 for i in members if (mark := state.watermark(i, lateness)) is not None and mark >= end
        )
        if passed >= quorum and window.quorum_at is None:
            window.quorum_at = now.isoformat()
        waited = window.quorum_at is not None and now - datetime.fromisoformat(window.quorum_at) >= deadline
        if drain or passed == len(members) or (passed >= quorum and waited):
            window.closable_at = window.closable_at or now.isoformat()
            ready.append(datetime.fromisoformat(start_text))
    return ready
