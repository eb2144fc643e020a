"""The stream's public grid: which windows are due depends on the config, the clock and --until, never on data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.config.federation import load_config
from fusion.errors import ConfigError, FusionError
from fusion.feeds.stream_state import (
    InputStamp,
    StreamState,
    WindowState,
    WindowStatus,
    adopt_grid,
    backlog,
    due_windows,
    release_bound,
    window_start,
)
from tests.conftest import START, config_text

HOUR = timedelta(hours=1)


def slow_due(state: StreamState, *, grid_start: datetime, size: timedelta, bound: datetime) -> list[datetime]:
    """The obvious reference: every window start of the grid in [grid_start, bound - size], minus closed ones."""
    starts = [grid_start + k * size for k in range(10_000) if grid_start + (k + 1) * size <= bound]
    return [s for s in starts if state.windows.get(s.isoformat(), WindowState()).status is WindowStatus.OPEN]


def test_every_window_the_clock_has_passed_is_due_with_or_without_readings() -> None:
    """Two states one reading apart (an OPEN window made by a spooled reading, and none) have the same due
    windows at every moment; the allowed lateness delays them; draining releases up to --until or the clock,
    whichever is earlier."""
    lateness = timedelta(minutes=10)
    with_reading, without = StreamState(), StreamState()
    with_reading.window(START + HOUR).add_rejects("alpha", {"out_of_range": 1})
    with_reading.advance("alpha", START + 5 * HOUR)  # an event time far ahead moves no release
    for minutes in range(0, 5 * 60, 7):
        now = START + timedelta(minutes=minutes)
        bound = release_bound(now=now, lateness=lateness, until=None, drain=False)
        due = due_windows(with_reading, grid_start=START, size=HOUR, bound=bound)
        assert due == due_windows(without, grid_start=START, size=HOUR, bound=bound)
        assert due == [START + k * HOUR for k in range(5) if START + (k + 1) * HOUR + lateness <= now]
    later = START + 3 * HOUR
    assert release_bound(now=later, lateness=lateness, until=START + 2 * HOUR, drain=False) == START + 2 * HOUR
    assert release_bound(now=later, lateness=lateness, until=None, drain=True) == later
    assert release_bound(now=START, lateness=lateness, until=START + 6 * HOUR, drain=True) == START  # not ended yet


@settings(max_examples=200, deadline=None)
@given(
    size_h=st.integers(1, 4),
    start_k=st.integers(0, 20),
    bound_h=st.integers(-10, 120),
    closed=st.sets(st.integers(-5, 40), max_size=12),
    opened=st.sets(st.integers(-5, 40), max_size=6),
)
def test_due_windows_and_backlog_match_the_obvious_grid(
    size_h: int, start_k: int, bound_h: int, closed: set[int], opened: set[int]
) -> None:
    size = size_h * HOUR
    grid_start = window_start(START, size) + start_k * size
    bound = grid_start + bound_h * HOUR
    state = StreamState()
    for k in opened:
        state.window(grid_start + k * size)
    for k in closed:
        state.window(grid_start + k * size).status = WindowStatus.RELEASED
    due = due_windows(state, grid_start=grid_start, size=size, bound=bound)
    assert due == slow_due(state, grid_start=grid_start, size=size, bound=bound)
    assert backlog(state, grid_start=grid_start, size=size, bound=bound) == len(due)


def test_a_closed_window_carries_only_the_rejects_that_belong_to_it_as_they_stood_when_it_closed() -> None:
    window = WindowState()
    window.add_rejects("alpha", {"out_of_range": 2, "unknown_metric": 1})
    window.add_rejects("beta", {"late": 4})
    window.close(START)
    assert window.status is WindowStatus.CLOSING and window.closable_at == START.isoformat()
    assert window.carried == {"alpha": {"out_of_range": 2, "unknown_metric": 1}}
    window.add_rejects("alpha", {"out_of_range": 5})  # after the close: counted locally, not carried
    assert window.carried == {"alpha": {"out_of_range": 2, "unknown_metric": 1}}
    assert window.rejects["alpha"]["out_of_range"] == 7


def test_a_state_written_before_the_public_grid_still_loads() -> None:
    doc = {
        "processed": {}, "max_event": {"alpha": START.isoformat()}, "stdin_sequence": 0, "readings": 3,
        "rejected": 1, "pending_rejects": {"gamma": {"malformed_record": 1}},
        "windows": {START.isoformat(): {"status": "released", "quorum_at": START.isoformat(), "rejects": {}}},
    }
    state = StreamState.from_doc(doc)
    assert state.created_at is None and state.unwindowed == {"gamma": {"malformed_record": 1}}
    assert state.windows[START.isoformat()].status is WindowStatus.RELEASED
    assert StreamState.from_doc(state.to_doc()) == state


def test_an_input_recorded_by_its_size_alone_is_compared_on_its_size() -> None:
    """A state written before inputs were stamped with their modification time and inode records sizes: those
    still load, compare on the size only, and are written back as they were."""
    doc = {"processed": {"/feeds/a.jsonl": 120, "/feeds/b.jsonl": {"size": 80, "mtime_ns": 5, "inode": 9}},
           "changed": {"/feeds/c.jsonl": 7}, "max_event": {}, "stdin_sequence": 0, "readings": 0, "rejected": 0,
           "windows": {}}
    state = StreamState.from_doc(doc)
    assert state.processed == {"/feeds/a.jsonl": InputStamp(120), "/feeds/b.jsonl": InputStamp(80, 5, 9)}
    assert not state.processed["/feeds/a.jsonl"].differs(InputStamp(120, 1, 2))
    assert state.processed["/feeds/a.jsonl"].differs(InputStamp(121, 1, 2))
    assert state.processed["/feeds/b.jsonl"].differs(InputStamp(80, 6, 9))  # replaced: another modification time
    assert state.processed["/feeds/b.jsonl"].differs(InputStamp(80, 5, 10))  # another file under the name
    assert not state.processed["/feeds/b.jsonl"].differs(InputStamp(80, 5, 9))
    written = state.to_doc()
    assert (written["processed"], written["changed"]) == (doc["processed"], doc["changed"])


def test_the_grid_is_recorded_and_another_one_refused_while_the_state_holds_windows() -> None:
    """A new state records its grid; while it holds no window another grid replaces it; once it holds windows
    another window length or grid start is refused, naming the setting."""
    state = StreamState()
    assert adopt_grid(state, size=HOUR, grid_start=START, state_dir="s")
    assert (state.window_seconds, state.grid_start) == (3600, START.isoformat())
    assert not adopt_grid(state, size=HOUR, grid_start=START, state_dir="s")  # the same grid: nothing to save
    assert adopt_grid(state, size=2 * HOUR, grid_start=START + 2 * HOUR, state_dir="s")  # no window yet
    state = StreamState()
    adopt_grid(state, size=HOUR, grid_start=START, state_dir="s")
    state.window(START + HOUR)
    with pytest.raises(FusionError, match=r"^stream.window is 2h, but the stream state in s holds windows of 1h"):
        adopt_grid(state, size=2 * HOUR, grid_start=START, state_dir="s")
    with pytest.raises(FusionError, match=r"^stream.start puts the grid's first window at 2026-01-01T02:00:00\+00"):
        adopt_grid(state, size=HOUR, grid_start=START + 2 * HOUR, state_dir="s")
    assert (state.window_seconds, state.grid_start) == (3600, START.isoformat())


def test_a_state_that_did_not_record_its_grid_is_checked_against_the_windows_it_holds() -> None:
    """Written before the grid was recorded: two closed windows in a row give the window's length; a window off the
    configured grid is refused; too few windows to tell are accepted (and the grid recorded); an open window before
    the configured start is refused, since it would never be released."""

    def legacy(*windows: tuple[datetime, WindowStatus]) -> StreamState:
        state = StreamState(created_at=START.isoformat())
        for start, status in windows:
            state.window(start).status = status
        return state

    released = WindowStatus.RELEASED
    two_in_a_row = legacy((START, released), (START + HOUR, released), (START + 2 * HOUR, WindowStatus.OPEN))
    with pytest.raises(FusionError, match=r"^stream.window is 2h, but .* holds windows of 1h"):
        adopt_grid(two_in_a_row, size=2 * HOUR, grid_start=START, state_dir="s")
    assert adopt_grid(two_in_a_row, size=HOUR, grid_start=START, state_dir="s")
    assert (two_in_a_row.window_seconds, two_in_a_row.grid_start) == (3600, START.isoformat())
    off_grid = legacy((START + HOUR, WindowStatus.OPEN))
    with pytest.raises(FusionError, match=r"^stream.window is 2h, but .* holds windows off that grid"):
        adopt_grid(off_grid, size=2 * HOUR, grid_start=START, state_dir="s")
    too_few = legacy((START + 2 * HOUR, WindowStatus.OPEN))
    assert adopt_grid(too_few, size=2 * HOUR, grid_start=START, state_dir="s")
    assert too_few.window_seconds == 7200
    with pytest.raises(FusionError, match=r"^stream.start puts .* holds windows of a grid from 2026-01-01T02:00"):
        adopt_grid(legacy((START + 2 * HOUR, WindowStatus.OPEN)), size=HOUR, grid_start=START + 3 * HOUR, state_dir="s")


def write(tmp_path: Path, stream: str) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2) + stream)
    return path


def test_stream_start_and_max_backlog_are_validated_at_load(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '\n[stream]\nstart = "2026-01-01T00:30"\n'))
    assert config.stream.start == datetime(2026, 1, 1, 0, 30, tzinfo=UTC)  # naive: UTC
    config = load_config(write(tmp_path, "\n[stream]\nstart = 2026-01-01T02:00:00+02:00\n"))  # a TOML datetime
    assert config.stream.start == START and config.stream.max_backlog == 168
    with pytest.raises(ConfigError, match=r"stream.start"):
        load_config(write(tmp_path, '\n[stream]\nstart = "yesterday"\n'))
    with pytest.raises(ConfigError, match=r"stream.max_backlog"):
        load_config(write(tmp_path, "\n[stream]\nmax_backlog = 0\n"))
