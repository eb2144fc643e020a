"""Streaming: Beam's windowing under TestStream, the driver's watermarks, and `fusion stream` end to end."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from fusion.config.federation import load_config
from fusion.errors import FusionError
from fusion.feeds.stream_state import WindowStatus, load_state
from fusion.release.exchange import ReleaseKey
from fusion.runtime.faults import CRASH_ENV, CRASH_EXIT_CODE
from fusion.store.delta import Store
from pipelines import stream_driver
from pipelines.batch import run_batch
from pipelines.stream import StampWindows, WindowReadings, spool_dir
from pipelines.stream_driver import StreamDriver
from pipelines.stream_release import release_windows
from tests.conftest import END, START, Federation, write_feed

HOUR = timedelta(hours=1)
EXT = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}


def table_at(*seconds: int) -> pa.Table:
    times = [datetime.fromtimestamp(s, UTC) for s in seconds]
    return pa.table({"event_time": pa.array(times, pa.timestamp("us", tz="UTC")), "value": [1.0] * len(times)})


class PaneCounts(beam.DoFn):
    def process(
        self, element: tuple[str, int], win: Any = beam.DoFn.WindowParam, pane: Any = beam.DoFn.PaneInfoParam
    ) -> Any:
        yield int(win.start), pane.timing, element[1]


def test_beam_windowing_fires_on_time_and_late_and_drops_too_late() -> None:
    """Fixed 60 s windows, 30 s allowed lateness. Window [0, 60): readings on time (some early, long before its
    end), one late within the lateness (fires a late pane), one too late (Beam drops it: the local driver counts
    such readings as `late` before they reach Beam). Window [60, 120) gets a reading on time."""
    stream = (
        TestStream()
        .advance_watermark_to(0)
        .add_elements([TimestampedValue(("alpha", "a", table_at(5, 10, 50)), 5)])  # early and on time
        .add_elements([TimestampedValue(("beta", "b", table_at(70)), 70)])
        .advance_watermark_to(60)  # [0, 60) closes: on-time pane
        .add_elements([TimestampedValue(("alpha", "c", table_at(20, 21)), 20)])  # late, within the lateness
        .advance_watermark_to(125)  # past 60 + 30: [0, 60) is done; [60, 120) fires on time
        .add_elements([TimestampedValue(("gamma", "d", table_at(30)), 30)])  # too late: dropped by Beam
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=options) as pipeline:
        panes = (
            pipeline
            | stream
            | beam.ParDo(StampWindows(timedelta(seconds=60)))
            | WindowReadings(timedelta(seconds=60), timedelta(seconds=30))
            | beam.Map(lambda element: ("rows", element[2].num_rows))
            | beam.CombinePerKey(sum)
            | beam.ParDo(PaneCounts())
        )
        on_time, late = beam.utils.windowed_value.PaneInfoTiming.ON_TIME, beam.utils.windowed_value.PaneInfoTiming.LATE
        assert_that(panes, equal_to([(0, on_time, 3), (0, late, 2), (60, on_time, 1)]))


def test_stamp_windows_splits_a_batch_by_event_time_window() -> None:
    stamped = list(StampWindows(timedelta(seconds=60)).process(("alpha", "k", table_at(59, 0, 61, 119, 120))))
    assert [(v.timestamp, v.value[2].num_rows) for v in stamped] == [
        (Timestamp(0), 2),
        (Timestamp(60), 2),
        (Timestamp(120), 1),
    ]


# -- end to end --------------------------------------------------------------------------------------------

#: The grid starts at START, the first hour of the test feeds (stream.start); the tests bound it with a clock or
#: --until, since the real clock is far past the feeds' hours.
STREAM_CONFIG = f'\n[stream]\nallowed_lateness = "0s"\npoll = "1s"\nstart = "{START.isoformat()}"\n'


def stream_federation(
    make_federation: Any, subdir: str = "stream", cap: float = 50.0, noise: bool = False, stream: str = STREAM_CONFIG
) -> Federation:
    fed = make_federation(noise=noise, quorum=2, subdir=subdir, extra_privacy=f"epsilon_cap = {cap}", extra=stream)
    for inst in fed.config.institutions:  # the feeds arrive while the stream runs
        shutil.rmtree(fed.directory / "feeds" / inst.id)
    return fed


def land(fed: Federation, hour: int) -> None:
    """Every institution's readings of one hour, as a new file in its feed directory (written, then renamed)."""
    lo, hi = START + hour * HOUR, START + (hour + 1) * HOUR
    for inst in fed.config.institutions:
        table = fed.raw[inst.id]
        times = table.column("event_time")
        part = table.filter(pc.and_(pc.greater_equal(times, lo), pc.less(times, hi)))
        fmt = inst.feeds[0].format.value
        final = fed.directory / "feeds" / inst.id / f"hour-{hour:02d}.{EXT[fmt]}"
        temporary = final.with_name(f".{final.name}")
        write_feed(part, temporary, fmt)
        temporary.rename(final)


def cells(store_path: str) -> list[dict[str, Any]]:
    table = Store(store_path).read("releases").select(["metric", "region", "window_start", "count", "sum"])
    return table.sort_by([("metric", "ascending"), ("region", "ascending"), ("window_start", "ascending")]).to_pylist()


def fusion_stream(config: Path, *extra: str, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "fusion.cli", "stream", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def at(hours: float) -> datetime:
    return START + hours * HOUR


def window_starts(store_path: str) -> list[datetime]:
    return sorted(set(Store(store_path).read("releases").column("window_start").to_pylist()))


def released_once(store_path: str, windows: int) -> set[str]:
    """Check that `windows` hourly windows from START were released exactly once each (every window the same
    cells, in one release) and that every release was charged once; the release ids."""
    store = Store(store_path)
    rows = store.read("releases").to_pylist()
    per_window = Counter(r["window_start"] for r in rows)
    assert sorted(per_window) == [at(h) for h in range(windows)] and len(set(per_window.values())) == 1
    owners = {(r["window_start"], r["release_id"]) for r in rows}
    assert len(owners) == windows  # each window in one release
    ids = {r["release_id"] for r in rows}
    budget = store.read("budget").to_pylist()
    assert sum(b["releases"] for b in budget) == len(ids) and {i for b in budget for i in b["release_ids"]} == ids
    spends = Counter(a["release_id"] for a in store.read("audit").to_pylist() if a["action"] == "budget_spend")
    assert spends == Counter(dict.fromkeys(ids, 1))
    return ids


def exact_rejects_in_store(store_path: str) -> list[dict[str, Any]]:
    """Rows of `rejects` holding counts no release carries: late readings, and rows refused before their event
    time was known. The stream keeps these in its local state only."""
    never_carried = {
        "late",
        "malformed_record",
        "missing_field",
        "mistyped_field",
        "unparseable_time",
        "out_of_interval",
    }
    return [r for r in Store(store_path).read("rejects").to_pylist() if r["reason"] in never_carried]


def with_times(table: pa.Table, *times: datetime) -> pa.Table:
    table = table.slice(0, len(times))
    return table.set_column(
        table.schema.get_field_index("event_time"), "event_time", pa.array(list(times), pa.timestamp("us", tz="UTC"))
    )


@pytest.mark.e2e
def test_neighbouring_feeds_release_the_same_windows_and_are_charged_alike(make_federation):
    """Two feeds one reading apart, that reading alone in its window: the stream releases the same public grid
    (every window up to --until, readings or not) and the ledger charges both runs alike. A stream used to make
    windows only from accepted readings, so the one reading added a release and its charge."""
    runs: dict[str, tuple[pa.Table, list[dict[str, Any]]]] = {}
    notices: list[str] = []
    for name in ("without", "with"):
        fed = stream_federation(make_federation, subdir=name, noise=True)
        land(fed, 0)
        if name == "with":
            write_feed(
                with_times(hour_of(fed, "alpha", 0), at(2) + timedelta(minutes=10)),
                fed.directory / "feeds" / "alpha" / "one.parquet",
                "parquet",
            )
        StreamDriver(fed.config, until=at(3), on_notice=notices.append).run(drain=True)
        store = Store(fed.config.store_path)
        runs[name] = (store.read("releases"), store.read("budget").to_pylist())
    released = {
        name: sorted(set(zip(t.column("release_id").to_pylist(), t.column("window_start").to_pylist(), strict=True)))
        for name, (t, _) in runs.items()
    }
    assert released["with"] == released["without"]
    assert sorted(start for _, start in released["with"]) == [at(0), at(1), at(2)]
    charged = {
        name: [(b["period"], b["releases"], len(b["release_ids"]), b["epsilon_spent"]) for b in budget]
        for name, (_, budget) in runs.items()
    }
    # The three windows are due together: one release covers them (event level), charged once.
    assert charged["with"] == charged["without"] and charged["with"][0][1] == 1
    assert notices == [f"releasing 3 windows of the grid, {at(0).isoformat()} to {at(3).isoformat()}"] * 2
    # A window without a single reading is released like any other: counts near 0, with the usual noise sd.
    rows = runs["without"][0].to_pylist()
    empty = [r for r in rows if r["window_start"] == at(1)]
    full = {(r["metric"], r["region"]): r for r in rows if r["window_start"] == at(0)}
    assert len(empty) == len(full) == 6
    for row in empty:
        assert row["count_sd"] == full[row["metric"], row["region"]]["count_sd"] > 0
        assert abs(row["count"]) <= 5 * row["count_sd"]  # seeded test noise; 5 sd: 6e-7 per cell by chance


@pytest.mark.e2e
def test_fusion_stream_releases_each_window_like_the_batch_pipeline(make_federation):
    """Files land while the stream steps; each hour is released once the processing clock passes its end (never
    earlier, whatever the readings' times); `fusion stream --until` releases the last and stops by itself; the
    releases equal the batch pipeline's (noise off)."""
    batch = make_federation(noise=False, quorum=2, subdir="batch")
    from fusion.release.plan import plan_release

    run_batch(plan_release(batch.config, START, END))
    fed = stream_federation(make_federation)
    clock = [START]
    driver = StreamDriver(fed.config, clock=lambda: clock[0])
    for hour in range(5):
        land(fed, hour)
        land(fed, hour + 1) if hour == 4 else None  # readings of hour 5 move no release forward
        clock[0] = at(hour + 1) - timedelta(seconds=1)
        driver.step()
        assert driver.state.windows[at(hour).isoformat()].status is WindowStatus.OPEN
        clock[0] = at(hour + 1)
        driver.step()
        released = sorted(w for w, s in driver.state.windows.items() if s.status is WindowStatus.RELEASED)
        assert released == [at(h).isoformat() for h in range(hour + 1)]
    driver.close()  # one stream a state at a time
    done = fusion_stream(fed.config_path, "--until", END.isoformat())  # the real clock is past END
    assert done.returncode == 0, done.stdout + done.stderr
    assert "windows open: 0 | released: 6" in done.stdout
    assert cells(fed.config.store_path) == cells(batch.config.store_path)
    assert len(cells(fed.config.store_path)) == 36
    budget = Store(fed.config.store_path).read("budget").to_pylist()
    assert budget[0]["releases"] == 6


def test_a_second_stream_on_one_state_is_refused_until_the_first_stops(make_federation):
    """Two `fusion stream` processes on one state directory each journalled, spooled, saved and released over the
    other's progress: readings acknowledged to a broker were lost. The second is refused, naming the first."""
    fed = stream_federation(make_federation, subdir="two")
    first = StreamDriver(fed.config, clock=lambda: START)
    second = fusion_stream(fed.config_path, "--until", START.isoformat())
    assert second.returncode != 0 and f"another `fusion stream` (process {os.getpid()})" in second.stderr
    first.close()
    again = fusion_stream(fed.config_path, "--until", START.isoformat())  # nothing is due: it stops at once
    assert again.returncode == 0, again.stdout + again.stderr


@pytest.mark.e2e
def test_sigterm_stops_the_stream_and_readings_before_the_grid_are_out_of_interval(make_federation):
    """Without stream.start the grid starts at the window holding the state's creation (now): the feeds' hours
    are long past, so their readings are rejected as out_of_interval, and no window is due yet."""
    fed = stream_federation(make_federation, subdir="sigterm", stream='\n[stream]\npoll = "1s"\n')
    land(fed, 0)
    process = subprocess.Popen(
        [sys.executable, "-m", "fusion.cli", "stream", "--config", str(fed.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        state_file = Path(fed.config.stream_state_path) / "state.json"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (state_file.exists() and load_state(state_file).processed):
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, out + err
    state = load_state(state_file)
    rows = sum(hour_of(fed, i, 0).num_rows for i in fed.raw)
    assert state.readings == 0 and state.unwindowed == {
        i: {"out_of_interval": hour_of(fed, i, 0).num_rows} for i in fed.raw
    }
    assert "windows open: 0 | released: 0 | last release: none yet" in out and f"rejects: {rows:,}" in out
    assert datetime.fromisoformat(state.created_at or "") > END


def test_a_grid_start_far_in_the_past_is_refused_naming_the_setting(make_federation):
    fed = stream_federation(make_federation, subdir="backlog")
    driver = StreamDriver(fed.config)  # the real clock: every hour since START is due
    with pytest.raises(FusionError, match=r"windows of the stream's grid are due.*stream.max_backlog = 168"):
        driver.step()
    assert driver.state.windows == {}  # nothing closed, nothing charged
    assert Store(fed.config.store_path).read("budget").num_rows == 0


@pytest.mark.e2e
@pytest.mark.parametrize("crash_at", ["stream_after_spool", "stream_after_close", "after_ledger", "after_audit"])
def test_a_killed_stream_restarts_without_losing_or_repeating_anything(make_federation, crash_at):
    fed = stream_federation(make_federation)
    for hour in range(3):
        land(fed, hour)
    crashed = fusion_stream(fed.config_path, "--drain", "--until", at(3).isoformat(), crash_at=crash_at)
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stdout + crashed.stderr
    for hour in range(3, 6):
        land(fed, hour)
    rerun = fusion_stream(fed.config_path, "--drain", "--until", END.isoformat())
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(t.num_rows for t in fed.raw.values())
    released_once(fed.config.store_path, 6)  # each window released and charged once
    state = load_state(Path(fed.config.stream_state_path) / "state.json")
    assert state.readings == sum(t.num_rows for t in fed.raw.values())


class Killed(BaseException):
    """A kill at a crash point, in process: nothing after it runs, nothing catches it."""


@pytest.mark.parametrize("moved", ["archived", "landed again under another name"])
def test_a_micro_batch_killed_before_it_saved_leaves_no_spool_file_behind_once_its_input_moved(
    make_federation, monkeypatch, moved
):
    """Killed after a micro-batch's spool files were written but before its progress was saved, then the input
    moved before the restart: its spool files stayed, and the window released readings the state never counted
    (archived), or counted them as duplicates of the copy read under the new name. The micro-batch records what it
    writes before writing it, and the restart removes what it wrote: the spool holds the readings counted."""

    def kill_after_spool(step: str) -> None:
        if step == "stream_after_spool":
            raise Killed(step)

    fed = stream_federation(make_federation, subdir=f"unsaved-{moved.split()[0]}")
    land(fed, 0)
    monkeypatch.setattr(stream_driver, "crash_point", kill_after_spool)
    driver = StreamDriver(fed.config, clock=lambda: at(1))
    with pytest.raises(Killed):
        driver.ingest()
    driver.close()
    monkeypatch.undo()
    gamma = fed.directory / "feeds" / "gamma" / "hour-00.jsonl"
    if moved == "archived":
        gamma.rename(fed.directory / gamma.name)
    else:
        gamma.rename(gamma.with_name("hour-00-retry.jsonl"))
    restarted = StreamDriver(fed.config, clock=lambda: at(1))
    try:
        restarted.ingest()
    finally:
        restarted.close()
    institutions = [i for i in fed.raw if moved != "archived" or i != "gamma"]
    read = sum(hour_of(fed, i, 0).num_rows for i in institutions)
    spooled = sum(pq.read_metadata(p).num_rows for p in Path(fed.config.stream_spool_path).rglob("*.parquet"))
    assert restarted.state.readings == spooled == read and restarted.state.spooling == {}


@pytest.mark.e2e
def test_late_readings_are_counted_and_a_spent_budget_refuses_windows_but_the_stream_goes_on(make_federation):
    # A cap of one release per day: hours 1.. are refused (recorded), and the stream keeps ingesting. Entity level:
    # there a day's windows compose in sequence (at event level disjoint windows compose in parallel).
    fed = stream_federation(make_federation, cap=1.0, noise=True)
    entity = '[privacy]\nunit = "entity"\nmax_partitions = 3\nmax_readings_per_partition = 2\n'
    fed.config_path.write_text(fed.config_path.read_text().replace("[privacy]\n", entity))
    for hour in range(4):
        land(fed, hour)
    driver = StreamDriver(fed.config, clock=lambda: at(3))
    driver.run(drain=False, sleep=lambda s: setattr(driver, "stop_requested", True))
    windows = {datetime.fromisoformat(w): s for w, s in driver.state.windows.items()}
    assert [windows[at(h)].status for h in range(4)] == [WindowStatus.RELEASED] + [WindowStatus.REFUSED] * 2 + [
        WindowStatus.OPEN
    ]
    assert "needs epsilon" in (windows[START + HOUR].reason or "")
    status = driver.status()  # what the status line and the final summary of `fusion stream` show
    assert status.released == 1 and len(status.refused) == 2 and "needs epsilon" in status.refused[0]
    # Readings for hour 0 arrive after it was released: late, counted in the stream's state, kept as dead
    # letters; their exact count reaches no shared table.
    inst = fed.config.institutions[0]
    late = with_times(fed.raw[inst.id], *(START + timedelta(minutes=m) for m in range(5)))
    write_feed(
        late, fed.directory / "feeds" / inst.id / f"late.{EXT[inst.feeds[0].format.value]}", inst.feeds[0].format.value
    )
    driver.step()
    assert driver.state.windows[START.isoformat()].rejects == {inst.id: {"late": 5}}
    assert driver.status().rejected == 5
    assert exact_rejects_in_store(fed.config.store_path) == []
    dead = list((fed.directory / "deadletter" / inst.id / "stream").glob("*late*.parquet"))
    assert dead and sum(pq.read_table(p).num_rows for p in dead) == 5
    # Refused by the key holder's ledger, or before that by the institutions, which hold the cap by their own seal
    # records at entity level (pipelines/sealing.py): either way recorded, with the epsilon the window needs.
    audit = Store(fed.config.store_path).read("audit").to_pylist()
    refusals = [a for a in audit if a["action"] in ("budget_refused", "contribution_refused")]
    assert refusals and all("needs epsilon" in a["reason"] for a in refusals)


@pytest.mark.e2e
def test_json_lines_on_stdin_are_journalled_windowed_and_released(make_federation):
    """alpha's readings arrive as JSON lines on standard input (a closed pipe here); beta's and gamma's as
    files. Draining releases every hour up to --until with exactly the readings sent."""
    import io
    import json

    fed = stream_federation(make_federation)
    for hour in range(6):
        land(fed, hour)
    alpha = fed.config.institutions[0]
    for path in (fed.directory / "feeds" / alpha.id).iterdir():
        path.unlink()
    lines = [json.dumps({**row, "event_time": row["event_time"].isoformat()}) for row in fed.raw[alpha.id].to_pylist()]
    lines.append("{not json")  # a malformed line: dead-lettered and counted, never lost
    driver = StreamDriver(fed.config, stdin=(alpha.id, io.StringIO("\n".join(lines) + "\n")), until=END)
    driver.run(drain=True)
    journal = list((Path(fed.config.stream_state_path) / "stdin" / alpha.id).glob("*.jsonl"))
    assert journal
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(t.num_rows for t in fed.raw.values())
    assert driver.state.unwindowed == {alpha.id: {"malformed_record": 1}}
    assert exact_rejects_in_store(fed.config.store_path) == []


@pytest.mark.e2e
def test_a_state_path_holding_glob_characters_is_read_as_a_path(make_federation: Any) -> None:
    """stream.state (and so the spool under it) in a directory named `st[1]`: the stdin journal and the spool are
    read back through patterns, which took `[1]` for a class of characters and matched nothing (every reading
    journalled, none read; then every window refused for want of its spool files)."""
    import io
    import json

    fed = stream_federation(make_federation, subdir="brackets", stream=STREAM_CONFIG + 'state = "st[1]"\n')
    for hour in range(2):
        land(fed, hour)
    alpha = fed.config.institutions[0]
    for path in (fed.directory / "feeds" / alpha.id).iterdir():
        path.unlink()
    rows = pa.concat_tables([hour_of(fed, alpha.id, hour) for hour in range(2)]).to_pylist()
    lines = "".join(json.dumps({**row, "event_time": row["event_time"].isoformat()}) + "\n" for row in rows)
    assert fed.config.stream_state_path.endswith("/st[1]")
    driver = StreamDriver(fed.config, stdin=(alpha.id, io.StringIO(lines)), until=at(2))
    driver.run(drain=True)
    sent = sum(hour_of(fed, inst.id, hour).num_rows for inst in fed.config.institutions for hour in range(2))
    assert driver.state.readings == sent and driver.state.rejected == 0
    assert sum(Store(fed.config.store_path).read("releases").column("count").to_pylist()) == sent
    assert window_starts(fed.config.store_path) == [at(0), at(1)]


def test_a_streaming_jobs_spool_under_a_path_holding_glob_characters_is_scanned(make_federation: Any) -> None:
    """`--releases-only` over a spool in `sp[1]`: the job's reject counts and pane markers are found through
    patterns, which took `[1]` for a class of characters and found none."""
    import json

    from pipelines.stream_sources import MARKERS, REJECT_COUNTS

    fed = stream_federation(make_federation, subdir="spool-brackets", stream=STREAM_CONFIG + 'spool = "sp[1]"\n')
    first = fed.config.institutions[0].id
    counts = Path(fed.config.stream_spool_path) / first / REJECT_COUNTS
    counts.mkdir(parents=True)
    (counts / "message.json").write_text(json.dumps({"rejects": {"malformed_record": 2}, "windows": {}}))
    marker = Path(spool_dir(fed.config, first, START)) / MARKERS / "000000-ON_TIME.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    driver = StreamDriver(fed.config, releases_only=True, clock=lambda: START)
    driver.step()
    assert driver.state.unwindowed == {first: {"malformed_record": 2}} and driver.state.rejected == 2
    assert first in driver.state.max_event  # the marker moved its watermark


@pytest.mark.e2e
def test_draining_waits_for_stdin_to_close_before_releasing_a_window(make_federation):
    """`producer | fusion stream --stdin alpha --drain --until T` with a producer that writes a moment after the
    stream starts: every line is read before any window is released. The stream used to release every window up
    to --until from the files alone and exit, alpha's lines unread."""
    import json
    import threading

    fed = stream_federation(make_federation, subdir="stdin-late")
    for hour in range(2):
        land(fed, hour)
    alpha = fed.config.institutions[0]
    for path in (fed.directory / "feeds" / alpha.id).iterdir():
        path.unlink()
    rows = pa.concat_tables([hour_of(fed, alpha.id, hour) for hour in range(2)]).to_pylist()
    text = "".join(json.dumps({**row, "event_time": row["event_time"].isoformat()}) + "\n" for row in rows)
    read_end, write_end = os.pipe()

    def produce() -> None:
        time.sleep(1.5)  # the stream has seen every file by then
        with os.fdopen(write_end, "w") as pipe:
            pipe.write(text)

    producer = threading.Thread(target=produce)
    producer.start()
    with os.fdopen(read_end) as stdin:
        driver = StreamDriver(fed.config, stdin=(alpha.id, stdin), until=at(2))
        driver.run(drain=True)
    producer.join()
    sent = sum(hour_of(fed, inst.id, hour).num_rows for inst in fed.config.institutions for hour in range(2))
    assert driver.state.readings == sent and driver.state.rejected == 0
    assert sum(Store(fed.config.store_path).read("releases").column("count").to_pylist()) == sent


@pytest.mark.e2e
def test_a_streaming_job_spools_windows_and_the_release_side_releases_them(make_federation):
    """The distributed path with TestStream in place of Kafka/Pub/Sub: messages of JSON lines are windowed by
    Beam and spooled with pane markers; `--releases-only` releases the grid by the clock, carries the rejects
    that belong to a window with its release, and counts readings spooled after a release as late."""
    import json

    from apache_beam.testing.test_stream import TestStream

    from pipelines.stream_sources import SpoolUnbounded

    fed = stream_federation(make_federation)
    stream = TestStream().advance_watermark_to(START.timestamp())
    total = 0
    for hour in range(6):
        lo, hi = START + hour * HOUR, START + (hour + 1) * HOUR
        for inst in fed.config.institutions:
            table = fed.raw[inst.id]
            part = table.filter(
                pc.and_(pc.greater_equal(table.column("event_time"), lo), pc.less(table.column("event_time"), hi))
            )
            lines = [json.dumps({**r, "event_time": r["event_time"].isoformat()}) for r in part.to_pylist()]
            total += len(lines)
            if hour == 0 and inst.id == fed.config.institutions[0].id:  # a malformed line and an invalid row
                lines += ["{not json", json.dumps({**part.to_pylist()[0], "event_time": lo.isoformat(), "metric": "?"})]
            stream = stream.add_elements([TimestampedValue((inst.id, "\n".join(lines).encode()), lo.timestamp())])
        stream = stream.advance_watermark_to(hi.timestamp())
    stream = stream.add_elements([TimestampedValue(("mallory", b'{"x": 1}'), END.timestamp())])  # not a member
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=options) as pipeline:
        _ = pipeline | stream.advance_watermark_to_infinity() | SpoolUnbounded(fed.config)
    markers = list(Path(fed.config.stream_spool_path).rglob("*-ON_TIME.json"))
    assert len(markers) == 6 * len(fed.config.institutions)

    driver = StreamDriver(fed.config, releases_only=True, clock=lambda: END)
    driver.run(sleep=lambda s: setattr(driver, "stop_requested", True))
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == total
    assert window_starts(fed.config.store_path) == [at(h) for h in range(6)]
    assert all(w.status is WindowStatus.RELEASED for w in driver.state.windows.values())
    # The job's rejects are counted locally (read = accepted + rejected on this path as on the local one); the
    # row with a valid time belongs to hour 0, whose release carries it.
    first = fed.config.institutions[0].id
    assert driver.state.unwindowed == {first: {"malformed_record": 1}}
    assert driver.state.windows[START.isoformat()].carried == {first: {"unknown_metric": 1}}
    assert exact_rejects_in_store(fed.config.store_path) == []
    driver.step()  # counted once
    assert driver.state.rejected == 2
    # A late pane spools more readings of hour 0 after its release: counted as late, not released.
    late_dir = Path(fed.config.stream_spool_path) / first / START.strftime("%Y%m%dT%H%M%SZ")
    pq.write_table(pq.read_table(next(late_dir.glob("*.parquet"))).slice(0, 3), late_dir / "late-pane.parquet")
    driver.step()
    assert driver.state.windows[START.isoformat()].rejects[first] == {"late": 3, "unknown_metric": 1}
    assert driver.state.rejected == 5
    assert exact_rejects_in_store(fed.config.store_path) == []
    assert sum(Store(fed.config.store_path).read("releases").column("count").to_pylist()) == total


def test_the_streaming_job_splits_a_message_into_lines_as_a_broker_source_does(make_federation):
    """The Kafka/Pub/Sub job split a message with str.splitlines(): a U+2028 inside an entity id cut its reading
    into two malformed records, and a byte-order mark made the first line one. It splits a message as a broker
    source and a JSON-lines file do; a message that is not UTF-8 is one malformed record."""
    import json

    from apache_beam.pvalue import TaggedOutput

    from pipelines.stream import REJECTS
    from pipelines.stream_sources import MessagesToReadings

    fed = stream_federation(make_federation, subdir="job-lines")
    row = {**fed.raw["alpha"].to_pylist()[0], "event_time": START.isoformat()}

    def outcome(payload: bytes) -> tuple[int, dict[str, int]]:
        step = MessagesToReadings(fed.config, {i.id: str(fed.directory / "dead") for i in fed.config.institutions})
        step.setup()
        accepted, rejects = 0, {}
        for output in step.process(("alpha", payload)):
            if not isinstance(output, TaggedOutput):
                accepted += output[2].num_rows
            elif output.tag == REJECTS:
                rejects = output.value[2]["rejects"]
        return accepted, rejects

    assert outcome(json.dumps({**row, "entity_id": "pump\u20281"}, ensure_ascii=False).encode()) == (1, {})
    assert outcome(b"\xef\xbb\xbf" + json.dumps(row).encode()) == (1, {})
    not_utf8 = json.dumps({**row, "entity_id": "X"}).encode().replace(b"X", b"\xff")
    assert outcome(not_utf8) == (0, {"malformed_record": 1})


def test_an_unreadable_feed_file_is_one_dead_letter_and_the_stream_goes_on(make_federation):
    """A truncated file used to fail every micro-batch, at every restart, for every institution."""
    fed = stream_federation(make_federation, subdir="unreadable")
    for hour in range(3):
        land(fed, hour)
    inst = fed.config.institutions[0]
    ext = EXT[inst.feeds[0].format.value]
    good = fed.directory / "feeds" / inst.id / f"hour-00.{ext}"
    (fed.directory / "feeds" / inst.id / f"hour-99.{ext}").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    driver = StreamDriver(fed.config, until=at(3))
    driver.run(drain=True)
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(
        t.filter(pc.less(t.column("event_time"), START + 3 * HOUR)).num_rows for t in fed.raw.values()
    )
    assert driver.state.unwindowed == {inst.id: {"malformed_record": 1}}
    dead = list((fed.directory / "deadletter" / inst.id / "stream").glob("*unreadable*.parquet"))
    assert len(dead) == 1 and "hour-99" in pq.read_table(dead[0]).to_pylist()[0]["_source"]


def test_a_feed_file_the_os_cannot_read_now_fails_the_step_and_the_next_poll_reads_it(make_federation, monkeypatch):
    """An error the operating system raised while a feed file was read (EIO from a failing disk, EMFILE, ESTALE on
    NFS) dead-lettered the intact file as unreadable, its readings lost for good. The step fails instead, saying
    so, no window closes, and the next poll reads the file; draining gives up on a file that stays unreadable."""
    import errno

    from pipelines import stream as stream_module

    fed = stream_federation(make_federation, subdir="eio")
    land(fed, 0)
    alpha = fed.directory / "feeds" / "alpha" / "hour-00.parquet"
    read = stream_module.read_feed_file
    failures: list[str] = []

    def flaky(path: str, feed: Any, **kwargs: Any) -> Any:
        if path == str(alpha) and len(failures) < limit:
            failures.append(path)
            raise OSError(errno.EIO, "Input/output error", path)
        yield from read(path, feed, **kwargs)

    monkeypatch.setattr(stream_module, "read_feed_file", flaky)
    limit = 1_000  # unreadable for good: a drain waits drain_wait_s, then ends saying why; nothing is released
    driver = StreamDriver(fed.config, until=at(1), drain_wait_s=0)
    with pytest.raises(FusionError, match=rf"--drain: stream input {alpha} cannot be read now \(OSError: \[Errno 5\]"):
        driver.run(drain=True, sleep=lambda seconds: None)
    assert len(failures) == 2 and driver.state.windows == {} and driver.state.readings == 0
    limit = len(failures) + 1  # the disk recovers after one more failure
    notices: list[str] = []
    driver = StreamDriver(fed.config, until=at(1), on_notice=notices.append)
    driver.run(drain=True, sleep=lambda seconds: None)
    landed = sum(hour_of(fed, i, 0).num_rows for i in fed.raw)
    assert (driver.state.readings, driver.state.rejected, driver.state.unwindowed) == (landed, 0, {})
    assert sum(Store(fed.config.store_path).read("releases").column("count").to_pylist()) == landed
    assert [n for n in notices if "cannot be read now" in n] == [
        f"warning: stream input {alpha} cannot be read now (OSError: [Errno 5] Input/output error: '{alpha}'); "
        "nothing of it is kept, and the stream reads it again at its next step"
    ]
    assert driver.status().unavailable is None


def test_a_file_two_feeds_of_an_institution_match_is_read_once_by_the_stream_and_by_a_batch(make_federation):
    """Two feeds of alpha whose globs overlap: the stream read the file once per feed and counted its rows twice as
    accepted readings, though they were spooled once (under one name) and released once; a batch read it twice and
    counted the second copy as duplicates. Both list the file once, with the first feed that matches it."""
    from fusion.feeds.scan import list_sources
    from fusion.release.plan import plan_release

    fed = stream_federation(make_federation, subdir="overlapping-feeds")
    feed = 'path = "feeds/alpha/*.parquet"\nformat = "parquet"\n'
    text = fed.config_path.read_text()
    assert feed in text
    gateway = '[[institutions.feeds]]\nname = "gateway"\npath = "feeds/alpha/hour-*.parquet"\nformat = "parquet"\n'
    fed.config_path.write_text(text.replace(feed, feed + gateway))
    for hour in range(2):
        land(fed, hour)
    driver = StreamDriver(fed.config, clock=lambda: at(2))
    try:
        driver.ingest()  # no window closes
    finally:
        driver.close()
    landed = sum(hour_of(fed, i, h).num_rows for i in fed.raw for h in range(2))
    assert (driver.state.readings, driver.state.rejected) == (landed, 0)
    config = fed.config
    alpha = config.institution("alpha")
    files = sorted(str(fed.directory / "feeds" / "alpha" / f"hour-{h:02d}.parquet") for h in range(2))
    assert list_sources(plan_release(config, START, at(2)), alpha).sources == [(0, path) for path in files]


@pytest.mark.parametrize("failing", ["store", "state"])
def test_a_disk_the_stream_cannot_write_stops_it_with_one_line_naming_what_failed(make_federation, monkeypatch,
                                                                                   failing):
    """A read-only or full store ended `fusion stream` with Delta's traceback (and its writer's panic message); a
    full disk under the stream's own files with an OSError's. One line says which store, or that the stream's
    files, could not be used and why; the stream stops where a kill would (the windows being released stay
    closing, released once when it runs again)."""
    import errno

    from deltalake.exceptions import DeltaError
    from deltalake.table import TableMerger

    from fusion.store.failures import StoreUnavailable

    fed = stream_federation(make_federation, subdir=f"disk-{failing}")
    land(fed, 0)
    store = fed.config.store_path
    driver = StreamDriver(fed.config, until=at(1))
    if failing == "store":  # the first write of the release: Delta's own error for a read-only disk

        def read_only(self: TableMerger) -> dict[str, Any]:
            raise DeltaError(
                f"Failed to parse parquet: External: Generic LocalFileSystem error: Unable to open file {store}/"
                "budget/part-00000-c000.snappy.parquet#1: Read-only file system (os error 30)"
            )

        monkeypatch.setattr(TableMerger, "execute", read_only)
        expected, said = StoreUnavailable, f"the store {store} cannot be used now: Read-only file system (os error 30)."
    else:

        def full(*args: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(stream_driver, "save_state", full)
        expected, said = FusionError, "fusion stream could not use its files: No space left on device (os error 28)."
    with pytest.raises(expected) as raised:
        driver.run(drain=True)
    assert str(raised.value).startswith(said) and "\n" not in str(raised.value)
    closing = {start: window.status for start, window in driver.state.windows.items()}
    assert closing == ({START.isoformat(): WindowStatus.CLOSING} if failing == "store" else {})


def test_a_stdin_journal_never_overwrites_a_file_whose_number_was_not_saved(tmp_path: Path) -> None:
    import io

    from pipelines.stream_driver import StdinJournal

    journal = StdinJournal(io.StringIO('{"a": 1}\n'), str(tmp_path))
    time.sleep(0.1)
    assert journal.flush(0) == 0
    journal = StdinJournal(io.StringIO('{"a": 2}\n'), str(tmp_path))  # a restart from state saying 0 again
    time.sleep(0.1)
    assert journal.flush(0) == 1
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ['{"a": 1}\n', '{"a": 2}\n']


def test_lines_read_from_stdin_are_journalled_when_the_stream_stops(make_federation):
    """Ctrl-C and SIGTERM end the run once its step is done. The lines the reader had taken from the pipe since
    the last step were lost then, never journalled; they are journalled as the stream stops, and the restarted
    stream reads them."""
    import json

    fed = stream_federation(make_federation, subdir="stdin-stop")
    alpha = fed.config.institutions[0].id
    rows = hour_of(fed, alpha, 0).to_pylist()
    lines = [json.dumps({**row, "event_time": row["event_time"].isoformat()}) + "\n" for row in rows]
    read_end, write_end = os.pipe()
    with os.fdopen(read_end) as stdin, os.fdopen(write_end, "w") as pipe:
        driver = StreamDriver(fed.config, stdin=(alpha, stdin), clock=lambda: START)
        journal = driver._stdin
        assert journal is not None

        def read_by_the_stream(lines: list[str]) -> None:
            pipe.write("".join(lines))
            pipe.flush()
            deadline = time.monotonic() + 30
            while journal._lines.qsize() < len(lines) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert journal._lines.qsize() == len(lines)

        read_by_the_stream(lines[:5])
        driver.ingest()  # a step: journalled, spooled and counted
        read_by_the_stream(lines[5:])  # read from the pipe, which stays open
        driver.stop_requested = True  # what the SIGTERM and SIGINT handlers do
        driver.run()
    assert driver.state.readings == 5
    restarted = StreamDriver(fed.config, clock=lambda: START)
    try:
        restarted.ingest()
    finally:
        restarted.close()
    assert restarted.state.readings == len(rows) and restarted.state.rejected == 0


def hour_of(fed: Federation, institution: str, hour: int) -> pa.Table:
    table = fed.raw[institution]
    times = table.column("event_time")
    lo, hi = START + hour * HOUR, START + (hour + 1) * HOUR
    return table.filter(pc.and_(pc.greater_equal(times, lo), pc.less(times, hi)))


def test_a_reading_spooled_twice_is_counted_as_a_duplicate_in_its_window(make_federation):
    """A gateway's retry lands readings of hours 0 and 1 again in a file of their own: each copy is spooled, and
    the release (one for both windows) takes it once, as an exact duplicate. The state counted the copies as
    accepted readings; it counts them as duplicates of their windows now: rows read = accepted + rejected."""
    fed = stream_federation(make_federation, subdir="duplicates")
    alpha = fed.config.institutions[0]
    land(fed, 0)
    land(fed, 1)
    again = pa.concat_tables([hour_of(fed, alpha.id, 0).slice(0, 2), hour_of(fed, alpha.id, 1).slice(0, 3)])
    write_feed(again, fed.directory / "feeds" / alpha.id / f"again.{EXT[alpha.feeds[0].format.value]}",
               alpha.feeds[0].format.value)
    driver = StreamDriver(fed.config, until=at(2))
    driver.run(drain=True)
    read = sum(hour_of(fed, i, h).num_rows for i in fed.raw for h in range(2)) + 5
    assert (driver.state.readings, driver.state.rejected) == (read - 5, 5)
    assert [driver.state.windows[at(h).isoformat()].rejects for h in range(2)] == [
        {alpha.id: {"duplicate": 2}}, {alpha.id: {"duplicate": 3}}
    ]
    assert sum(Store(fed.config.store_path).read("releases").column("count").to_pylist()) == read - 5
    assert load_state(Path(fed.config.stream_state_path) / "state.json").rejected == 5


def test_a_reading_stamped_far_ahead_of_the_clock_is_rejected_and_moves_no_window(make_federation):
    fed = stream_federation(make_federation, subdir="future")
    land(fed, 0)
    write_feed(
        with_times(hour_of(fed, "alpha", 0), datetime(2030, 1, 1, tzinfo=UTC)),
        fed.directory / "feeds" / "alpha" / "clock-jump.parquet",
        "parquet",
    )
    now = START + timedelta(minutes=90)  # the processing clock; the default max_clock_skew is 1h
    driver = StreamDriver(fed.config, clock=lambda: now)
    driver.step()
    assert datetime.fromisoformat(driver.state.max_event["alpha"]) < START + HOUR
    assert driver.state.unwindowed == {"alpha": {"out_of_interval": 1}}
    assert {w: s.status for w, s in driver.state.windows.items()} == {START.isoformat(): WindowStatus.RELEASED}


def test_a_reading_stamped_exactly_at_the_clock_plus_the_skew_is_accepted_and_one_later_rejected(make_federation):
    """The docs reject readings stamped *later than* the processing clock plus `max_clock_skew`; the check rejected
    one stamped at that very moment too."""
    fed = stream_federation(make_federation, subdir="skew-edge")
    now = START + timedelta(minutes=30)
    limit = now + timedelta(hours=1)  # the default max_clock_skew
    edge = with_times(hour_of(fed, "alpha", 0), limit, limit + timedelta(microseconds=1))
    write_feed(edge, fed.directory / "feeds" / "alpha" / "edge.parquet", "parquet")
    driver = StreamDriver(fed.config, clock=lambda: now)
    try:
        driver.ingest()
    finally:
        driver.close()
    assert driver.state.readings == 1 and driver.state.unwindowed == {"alpha": {"out_of_interval": 1}}
    assert driver.state.max_event["alpha"] == limit.isoformat()


def test_reject_windows_counts_rows_with_a_valid_time_by_their_window() -> None:
    """Against the obvious count: rows rejected after their time was parsed, grouped by hour."""
    from pipelines.stream import RejectWindows
    from schemas.validation import ReadingRules
    from tests.conftest import METRICS, REGIONS

    rules = ReadingRules(plausible={m: v[4] for m, v in METRICS.items()}, regions=REGIONS, start=START, end=END)
    times = [START + timedelta(minutes=m) for m in (5, 50, 65, 130, 140, 150)]
    raw = pa.table(
        {
            "entity_id": ["e"] * 6,
            "region": ["north", "mars", "north", "north", "north", None],
            "metric": ["load", "load", "rain", "temp", "load", "load"],
            "event_time": pa.array([*times[:5], None], pa.timestamp("us", tz="UTC")),
            "value": [1.0, 1.0, 1.0, 99.0, float("nan"), 1.0],
        }
    )
    columns = {f: f for f in ("entity_id", "region", "metric", "event_time", "value")}
    counts = RejectWindows(rules, HOUR).count(raw, rules=rules, columns=columns, time_format="iso")
    assert counts == {
        START.isoformat(): {"unknown_region": 1},  # row 0 is accepted
        at(1).isoformat(): {"unknown_metric": 1},
        at(2).isoformat(): {"out_of_range": 1, "non_finite_value": 1},  # row 5: no time, no window
    }


@pytest.mark.e2e
def test_rejects_stay_local_and_those_with_a_valid_time_ride_with_their_window(make_federation):
    """A malformed line belongs to no window: it is counted in the stream's state only. A row with a valid time
    but a value outside the plausible range belongs to its hour, whose release carries its count (noisy); no
    exact count reaches the store. Rejects used to be upserted, exact, into `rejects`."""
    fed = stream_federation(make_federation, subdir="rejects")
    (fed.directory / "feeds" / "gamma").mkdir(parents=True, exist_ok=True)
    (fed.directory / "feeds" / "gamma" / "bad.jsonl").write_text("{not json\n")
    land(fed, 0)
    implausible = with_times(hour_of(fed, "gamma", 1), at(1) + timedelta(minutes=5))
    write_feed(
        implausible.set_column(implausible.schema.get_field_index("value"), "value", pa.array([1e6])),
        fed.directory / "feeds" / "gamma" / "implausible.jsonl",
        "jsonl",
    )
    driver = StreamDriver(fed.config, clock=lambda: at(2))
    driver.step()
    assert driver.state.unwindowed == {"gamma": {"malformed_record": 1}}
    windows = driver.state.windows
    assert windows[at(1).isoformat()].rejects == windows[at(1).isoformat()].carried == {"gamma": {"out_of_range": 1}}
    assert windows[START.isoformat()].carried == {}
    assert [w.status for w in windows.values()] == [WindowStatus.RELEASED] * 2
    assert driver.status().rejected == 2
    assert exact_rejects_in_store(fed.config.store_path) == []
    assert driver.window_plan(at(1)).carried_rejects == {"gamma": {"out_of_range": 1}}
    assert driver.window_plan(START).carried_rejects == {}
    # Both windows were due together: one release carries both windows' rejects, as tallies of its interval.
    assert driver.release_plan([START, at(1)]).carried_rejects == {"gamma": {"out_of_range": 1}}
    tallies = {
        (r["interval_start"], r["interval_end"], r["institution"]): r["count"]
        for r in Store(fed.config.store_path).read("rejects").to_pylist()
        if r["reason"] == "out_of_range"
    }
    assert tallies[START, at(2), "gamma"] == 1 and tallies[START, at(2), "alpha"] == 0  # noise off: exactly


def test_readings_of_a_window_released_before_they_arrived_are_late(make_federation):
    """Hour 1 has no readings when the clock passes its end: it is released all the same (zeros), and its
    readings landing afterwards are late: counted, dead-lettered, never released."""
    fed = stream_federation(make_federation, subdir="gap")
    land(fed, 0)
    driver = StreamDriver(fed.config, clock=lambda: at(2))
    driver.step()
    land(fed, 1)
    driver.step()
    gap = driver.state.windows[at(1).isoformat()]
    assert gap.status is WindowStatus.RELEASED
    assert gap.rejects == {i: {"late": hour_of(fed, i, 1).num_rows} for i in fed.raw}
    released = Store(fed.config.store_path).read("releases").to_pylist()
    assert {r["count"] for r in released if r["window_start"] == at(1)} == {0}  # noise off: exactly nothing
    assert exact_rejects_in_store(fed.config.store_path) == []


def test_another_window_or_grid_start_is_refused_while_the_state_holds_windows_of_its_grid(make_federation):
    """A stream of 1h windows released 00:00 and spooled readings to 01:00 and 02:00. With stream.window = "2h",
    or stream.start an hour later, the stream refuses to start, naming the setting, and leaves its state as it
    was: on the new grid the open 1h windows would never be released (the 2h window at 02:00 not taking the
    readings of 01:00, the grid from 01:00 not holding the window at 00:00...). Back on its own grid the stream
    goes on and releases every reading it accepted."""
    fed = stream_federation(make_federation, subdir="regrid")
    for hour in range(3):
        land(fed, hour)
    StreamDriver(fed.config, clock=lambda: at(1) + timedelta(minutes=1)).step()
    state_file = Path(fed.config.stream_state_path) / "state.json"
    held = state_file.read_text()
    original = fed.config_path.read_text()
    for setting, changed in (
        ("stream.window", original.replace("[stream]\n", '[stream]\nwindow = "2h"\n')),
        ("stream.start", original.replace(f'start = "{START.isoformat()}"', f'start = "{at(1).isoformat()}"')),
    ):
        fed.config_path.write_text(changed)
        with pytest.raises(FusionError, match=rf"^{re.escape(setting)} .*holds windows .*new state directory"):
            StreamDriver(load_config(fed.config_path), clock=lambda: at(4))
        assert state_file.read_text() == held
    fed.config_path.write_text(original)
    driver = StreamDriver(load_config(fed.config_path), until=at(3), clock=lambda: at(3))
    driver.run(drain=True)
    assert [w.status for w in driver.state.windows.values()] == [WindowStatus.RELEASED] * 3
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == driver.state.readings > 0
    landed = sum(hour_of(fed, i, h).num_rows for i in fed.raw for h in range(3))
    assert driver.state.readings + driver.state.rejected == landed  # the rest: stamped too far ahead of 01:01


def test_draining_up_to_a_time_the_clock_has_not_reached_is_refused_and_releases_nothing(make_federation):
    """`--drain --until` releases every window up to --until at once: one the clock has not seen end would be
    released without the readings still to come (they would then be late). The stream used to release them."""
    fed = stream_federation(make_federation, subdir="drain-ahead")
    land(fed, 0)
    clock = at(1.5)  # hour 0 has ended, hour 1 has not
    driver = StreamDriver(fed.config, until=at(3), clock=lambda: clock)
    with pytest.raises(FusionError, match=r"--drain --until .* \(--until 2026-01-01T01:00:00\+00:00,"):
        driver.run(drain=True)
    assert driver.state.windows == {} and not Store(fed.config.store_path).read("releases").num_rows
    driver = StreamDriver(fed.config, until=at(1), clock=lambda: clock)
    driver.run(drain=True)
    assert window_starts(fed.config.store_path) == [at(0)]


@pytest.mark.parametrize("meanwhile", ["archived", "appended to"])
def test_an_input_moved_or_grown_while_it_is_read_is_recorded_at_the_size_listed(make_federation, monkeypatch,
                                                                                  meanwhile):
    """The size recorded for an input was taken after the micro-batch had read it: a file archived in between
    failed the step (an IndexError, its readings spooled but never counted), and rows appended in between were
    taken for read (never read, never reported). The size listed before the read is recorded: the archived file's
    readings count, and the file appended to is reported as changed."""
    import json

    from pipelines import stream as stream_module

    fed = stream_federation(make_federation, subdir=f"meanwhile-{meanwhile.split()[0]}")
    land(fed, 0)
    gamma = fed.directory / "feeds" / "gamma" / "hour-00.jsonl"
    listed = gamma.stat().st_size
    read = stream_module.read_feed_file

    def read_then_touched(path: str, feed: Any, **kwargs: Any) -> Any:
        yield from read(path, feed, **kwargs)
        if path == str(gamma) and meanwhile == "archived":
            os.replace(gamma, fed.directory / "archived.jsonl")
        elif path == str(gamma):
            row = {**hour_of(fed, "gamma", 0).to_pylist()[0], "event_time": START.isoformat()}
            with open(gamma, "a") as feed_file:
                feed_file.write(json.dumps(row) + "\n")

    monkeypatch.setattr(stream_module, "read_feed_file", read_then_touched)
    notices: list[str] = []
    driver = StreamDriver(fed.config, clock=lambda: START, on_notice=notices.append)
    try:
        driver.ingest()
        monkeypatch.setattr(stream_module, "read_feed_file", read)
        driver.ingest()
    finally:
        driver.close()
    assert driver.state.readings == sum(hour_of(fed, i, 0).num_rows for i in fed.raw)
    assert driver.state.processed[str(gamma)].size == listed
    changed = (str(gamma),) if meanwhile == "appended to" else ()
    assert driver.status().changed_inputs == changed
    assert len([n for n in notices if "changed after it was read" in n]) == len(changed)


def test_an_input_rewritten_after_it_was_read_is_reported_not_read_twice(make_federation, caplog):
    fed = stream_federation(make_federation, subdir="rewritten")
    land(fed, 0)
    driver = StreamDriver(fed.config, clock=lambda: START)  # no window due yet
    driver.step()
    readings = driver.state.readings
    alpha = next((fed.directory / "feeds" / "alpha").iterdir())
    write_feed(pa.concat_tables([hour_of(fed, "alpha", 0)] * 2), alpha, "parquet")  # rewritten, grown
    with caplog.at_level("WARNING"):
        driver.step()
        driver.step()  # reported once per size, not at every poll
    assert driver.state.readings == readings
    assert driver.status().changed_inputs == (str(alpha),)
    assert [r.getMessage() for r in caplog.records if "changed after it was read" in r.getMessage()] == [
        f"stream input {alpha} changed after it was read ({driver.state.processed[str(alpha)].size} -> "
        f"{alpha.stat().st_size} bytes); it is not read again: land new readings as new files, under names not used "
        "before"
    ]


def test_an_input_replaced_by_another_file_of_the_same_size_is_reported_as_changed(make_federation):
    """A gateway archived a file it had landed and landed another under the same name, of the same size: the
    stream compared sizes only and said nothing, the new readings silently never read. It compares the file's
    modification time and inode too, and reports it as it reports a file that grew."""
    fed = stream_federation(make_federation, subdir="same-size")
    land(fed, 0)
    gamma = fed.directory / "feeds" / "gamma" / "hour-00.jsonl"
    notices: list[str] = []
    driver = StreamDriver(fed.config, clock=lambda: START, on_notice=notices.append)
    try:
        driver.ingest()
        lines = gamma.read_bytes().splitlines(keepends=True)
        other = gamma.with_name(".landing")
        other.write_bytes(b"".join(lines[1:] + lines[:1]))  # other content, the same size
        other.rename(gamma)
        readings = driver.state.readings
        driver.ingest()
        driver.ingest()  # said once, not at every poll
    finally:
        driver.close()
    assert driver.state.readings == readings and driver.status().changed_inputs == (str(gamma),)
    assert [n for n in notices if "changed after it was read" in n] == [
        f"warning: stream input {gamma} changed after it was read (replaced or rewritten at the same size, "
        f"{gamma.stat().st_size} bytes); it is not read again: land new readings as new files, under names not "
        "used before"
    ]
    state = load_state(Path(fed.config.stream_state_path) / "state.json")
    assert state.processed[str(gamma)] == driver.state.processed[str(gamma)] and state.changed == driver.state.changed


@pytest.mark.e2e
def test_off_a_terminal_the_status_line_is_logged_and_a_restart_shows_the_last_release(make_federation):
    """Under systemd or in a container (no terminal) the status line is logged with a timestamp every
    --status-every seconds; a restarted stream shows the last release on record, not 'none yet'; a rewritten
    input's warning reaches the output, not only a logger nobody configured."""
    fed = stream_federation(make_federation, subdir="logged")
    land(fed, 0)
    first = fusion_stream(fed.config_path, "--until", at(1).isoformat(), "--status-every", "0")
    assert first.returncode == 0, first.stdout + first.stderr
    stamped = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ windows open")
    logged = [line for line in first.stdout.splitlines() if stamped.match(line)]
    assert logged, first.stdout
    alpha = next((fed.directory / "feeds" / "alpha").iterdir())
    write_feed(pa.concat_tables([hour_of(fed, "alpha", 0)] * 2), alpha, "parquet")  # rewritten after it was read
    again = fusion_stream(fed.config_path, "--until", at(1).isoformat())
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"last release: {at(0).isoformat()}" in again.stdout, again.stdout
    assert "none yet" not in again.stdout
    assert f"warning: stream input {alpha} changed after it was read" in " ".join(again.stdout.split()), again.stdout


def test_windows_overlapping_a_batch_release_are_refused_and_the_stream_goes_on(make_federation):
    from fusion.release.plan import plan_release

    fed = stream_federation(make_federation, subdir="overlap")
    for hour in range(4):
        land(fed, hour)
    run_batch(plan_release(fed.config, START, START + 2 * HOUR))  # hours 0-1 are sealed by a batch release
    driver = StreamDriver(fed.config, until=at(4))
    driver.run(drain=True)
    windows = {datetime.fromisoformat(w): s for w, s in driver.state.windows.items()}
    assert [windows[START + h * HOUR].status for h in range(4)] == [WindowStatus.REFUSED] * 2 + [
        WindowStatus.RELEASED
    ] * 2
    assert "overlaps" in (windows[START].reason or "")
    audit = Store(fed.config.store_path).read("audit").to_pylist()
    refused = [a for a in audit if a["action"] == "contribution_refused"]
    assert len(refused) == 2 and all("overlaps" in a["reason"] for a in refused)  # one per refused window


@pytest.mark.e2e
def test_windows_closable_together_are_released_as_one_release_charged_once(make_federation):
    """Three windows become closable at one moment: at event level they are one release of their interval (one
    release id, one envelope per institution, one ledger charge, which parallel composition makes what one
    window costs), holding every window's cells, and one commit of `releases` makes all of them queryable."""
    fed = stream_federation(make_federation, noise=True)
    for hour in range(3):
        land(fed, hour)
    driver = StreamDriver(fed.config, clock=lambda: at(3))
    driver.ingest()
    store = Store(fed.config.store_path)
    before = store.delta_table("releases").version()
    assert driver.close_windows() == [at(0), at(1), at(2)]
    windows = [driver.state.windows[at(h).isoformat()] for h in range(3)]
    assert [w.status for w in windows] == [WindowStatus.RELEASED] * 3
    assert len({w.released_at for w in windows}) == 1
    from fusion.release.plan import plan_release

    release_id = plan_release(fed.config, at(0), at(3)).key.release_id
    assert [w.release_id for w in windows] == [release_id] * 3
    writes = [
        entry
        for entry in store.delta_table("releases").history()
        if entry["version"] > before and entry["operation"] == "WRITE"
    ]
    assert len(writes) == 1  # (compaction may follow it: it rewrites files, adds no rows)
    assert released_once(fed.config.store_path, 3) == {release_id}
    for institution in fed.config.institutions:  # one envelope per institution for the three windows
        sealed = Path(fed.config.institution_keys_path(institution)) / "sealed"
        assert [ReleaseKey.parse_interval_name(p.stem) for p in sealed.glob("*.json")] == [(at(0), at(3))]
    one = Store(fed.config.store_path).read("budget").to_pylist()[0]["epsilon_spent"]
    alone = stream_federation(make_federation, subdir="alone", noise=True)  # the same windows, one at a time
    now = [at(0)]
    driver = StreamDriver(alone.config, clock=lambda: now[0])
    for hour in range(3):
        land(alone, hour)
        now[0] = at(hour + 1)
        driver.ingest()
        assert driver.close_windows() == [at(hour)]
    assert len(released_once(alone.config.store_path, 3)) == 3
    assert Store(alone.config.store_path).read("budget").to_pylist()[0]["epsilon_spent"] == pytest.approx(one)


def test_a_streaming_job_counts_readings_beyond_the_allowed_lateness_as_late(make_federation):
    """On a distributed runner Beam drops too-late readings only at a grouping, after the spool: the job routes
    them to dead letters and its reject counts instead (`late` in their window), so they are neither spooled nor
    released, and the release side counts them like any other reject, locally."""
    import json

    from apache_beam.testing.test_stream import TestStream

    from pipelines.stream_sources import SpoolUnbounded

    fed = stream_federation(make_federation, subdir="too-late")
    first = fed.config.institutions[0].id

    def payload(hour: int, rows: int | None = None) -> bytes:
        lo, hi = START + hour * HOUR, START + (hour + 1) * HOUR
        table = fed.raw[first]
        part = table.filter(
            pc.and_(pc.greater_equal(table.column("event_time"), lo), pc.less(table.column("event_time"), hi))
        )
        part = part if rows is None else part.slice(0, rows)
        return "\n".join(
            json.dumps({**r, "event_time": r["event_time"].isoformat()}) for r in part.to_pylist()
        ).encode()

    on_time = [payload(0), payload(1)]
    stream = (
        TestStream()
        .advance_watermark_to(START.timestamp())
        .add_elements([TimestampedValue((first, on_time[0]), at(0).timestamp())])
        .advance_watermark_to(at(1).timestamp())  # hour 0 ends (allowed lateness 0): later readings of it are late
        .add_elements([TimestampedValue((first, on_time[1]), at(1).timestamp())])
        .advance_watermark_to(at(2).timestamp() + 1)
        .add_elements([TimestampedValue((first, payload(0, rows=4)), at(0).timestamp())])
        .advance_watermark_to_infinity()
    )
    # The late message differs from the first one (4 of its rows): it is a new message, not a redelivery.
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=options) as pipeline:
        _ = pipeline | stream | SpoolUnbounded(fed.config)
    spool = Path(fed.config.stream_spool_path) / first
    hour0 = sum(pq.read_table(p).num_rows for p in (spool / at(0).strftime("%Y%m%dT%H%M%SZ")).glob("*.parquet"))
    assert hour0 == len(on_time[0].splitlines())  # the too-late rows were not spooled
    counts = [json.loads(p.read_text()) for p in (spool / "_rejects").glob("*.json")]
    assert counts == [{"rejects": {"late": 4}, "windows": {at(0).isoformat(): {"late": 4}}}]
    dead = list((fed.directory / "deadletter" / first / "stream").glob("*late*.parquet"))
    assert sum(pq.read_table(p).num_rows for p in dead) == 4

    driver = StreamDriver(fed.config, releases_only=True, clock=lambda: at(3))
    driver.run(sleep=lambda s: setattr(driver, "stop_requested", True))
    driver.step()  # a later scan of the spool (no reading spooled after the release) keeps the count
    assert driver.state.windows[at(0).isoformat()].rejects == {first: {"late": 4}}
    assert driver.state.rejected == 4
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(len(p.splitlines()) for p in on_time)
    assert exact_rejects_in_store(fed.config.store_path) == []


def test_a_file_spooled_while_its_window_is_released_is_late_and_not_released(make_federation, monkeypatch):
    """`--releases-only`: the streaming job spools a late pane of hour 0 after the driver put the window's spool
    files on record and before its release read them. The release reads exactly the files on record, so the
    pane's readings are counted once, as late, and never released: released + late = spooled."""
    fed = stream_federation(make_federation, subdir="pane-race")
    land(fed, 0)
    StreamDriver(fed.config, clock=lambda: START).step()  # spools hour 0 (the job's part here); nothing is due
    first = fed.config.institutions[0].id
    directory = Path(spool_dir(fed.config, first, START))

    def with_a_late_pane(plans: Any) -> Any:  # the job's late pane lands as the release starts
        pane = pq.read_table(next(directory.glob("*.parquet"))).slice(0, 3)  # a second later: no exact duplicates
        times = pc.add(pane.column("event_time"), pa.scalar(timedelta(seconds=1), pa.duration("us")))
        pq.write_table(
            pane.set_column(pane.schema.get_field_index("event_time"), "event_time", times),
            directory / "late-pane.parquet",
        )
        return release_windows(plans)

    monkeypatch.setattr(stream_driver, "release_windows", with_a_late_pane)
    driver = StreamDriver(fed.config, releases_only=True, clock=lambda: at(1))
    driver.step()
    monkeypatch.undo()
    driver.step()  # the next scan of the spool finds the pane
    window = driver.state.windows[START.isoformat()]
    assert window.status is WindowStatus.RELEASED and "late-pane.parquet" not in str(window.files)
    assert window.rejects == {first: {"late": 3}} and driver.state.rejected == 3
    spooled = sum(
        pq.read_table(path).num_rows
        for inst in fed.config.institutions
        for path in Path(spool_dir(fed.config, inst.id, START)).glob("*.parquet")
    )
    released = sum(Store(fed.config.store_path).read("releases").column("count").to_pylist())
    assert released == driver.state.readings == spooled - 3 == sum(hour_of(fed, i, 0).num_rows for i in fed.raw)


def test_a_micro_batch_in_process_does_what_the_beam_pipeline_does(make_federation, tmp_path):
    """The local stream runs a micro-batch's DoFns in process (no pipeline per step); on a named runner it runs
    the Beam pipeline: both spool the same files and report the same readings, late ones and rejects."""
    from pipelines.run import beam_options
    from pipelines.stream import run_micro_batch, run_micro_batch_in_process

    fed = stream_federation(make_federation, subdir="in-process")
    for hour in range(2):
        land(fed, hour)
    inst = fed.config.institutions[0]
    bad = with_times(hour_of(fed, inst.id, 0), at(0), at(1) + timedelta(minutes=5))
    bad = bad.set_column(bad.schema.get_field_index("metric"), "metric", pa.array(["?", "?"]))
    write_feed(bad, fed.directory / "feeds" / inst.id / "bad.parquet", "parquet")
    driver = StreamDriver(fed.config, clock=lambda: at(2))
    inputs = [(institution, feed, path) for institution, feed, path, _ in driver._discover()]
    letters = tmp_path / "letters"
    dead = {i.id: str(letters / i.id) for i in fed.config.institutions}
    closed = frozenset({at(0).isoformat()})  # hour 0 has closed: its readings are late
    spool = Path(fed.config.stream_spool_path)
    results, files = [], []
    for way in ("beam", "in process"):
        shutil.rmtree(spool, ignore_errors=True)
        shutil.rmtree(letters, ignore_errors=True)
        common = {"closed": closed, "dead_letter_dirs": dead, "now": at(2), "start": START}
        if way == "beam":
            batch = run_micro_batch(
                fed.config, inputs, summary_path=str(letters / "summary.json"), options=beam_options(), **common
            )
        else:
            batch = run_micro_batch_in_process(fed.config, inputs, **common)
        results.append((sorted(batch.spooled), sorted(batch.late), sorted(map(repr, batch.rejects))))
        files.append(
            sorted(str(p.relative_to(spool)) for p in spool.rglob("*.parquet"))
            + sorted(p.name for p in letters.rglob("*.parquet"))
        )
    assert results[0] == results[1] and files[0] == files[1]
    spooled, late, rejects = results[1]
    assert {w for _, w, _, _ in spooled} == {at(1).isoformat()} and late
    assert any("unknown_metric" in r for r in rejects)
