"""Streaming: Beam's windowing under TestStream, the driver's watermarks, and `fusion stream` end to end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
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

from fusion.faults import CRASH_ENV, CRASH_EXIT_CODE
from fusion.store import Store
from fusion.stream_state import StreamState, WindowStatus, closable, load_state, window_start
from pipelines.batch import run_batch
from pipelines.stream import StampWindows, WindowReadings
from pipelines.stream_driver import StreamDriver
from tests.conftest import END, START, Federation, write_feed

HOUR = timedelta(hours=1)
EXT = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}


def table_at(*seconds: int) -> pa.Table:
    times = [datetime.fromtimestamp(s, UTC) for s in seconds]
    return pa.table({"event_time": pa.array(times, pa.timestamp("us", tz="UTC")), "value": [1.0] * len(times)})


class PaneCounts(beam.DoFn):
    def process(self, element: tuple[str, int], win: Any = beam.DoFn.WindowParam,
                pane: Any = beam.DoFn.PaneInfoParam) -> Any:
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


def test_a_window_closes_when_every_watermark_passes_or_a_quorum_has_waited_the_deadline() -> None:
    state = StreamState()
    state.window(START)
    now = START + 2 * HOUR
    kwargs: dict[str, Any] = {"institutions": ["a", "b", "c"], "size": HOUR, "lateness": timedelta(minutes=10)}
    state.advance("a", START + HOUR + timedelta(minutes=5))  # watermark 55 min: not past the end
    assert closable(state, **kwargs, quorum=2, deadline=timedelta(minutes=15), now=now) == []
    state.advance("a", START + HOUR + timedelta(minutes=10))
    state.advance("b", START + 2 * HOUR)
    assert closable(state, **kwargs, quorum=2, deadline=timedelta(minutes=15), now=now) == []  # quorum, waiting
    assert state.windows[START.isoformat()].quorum_at == now.isoformat()
    later = now + timedelta(minutes=15)
    assert closable(state, **kwargs, quorum=2, deadline=timedelta(minutes=15), now=later) == [START]
    state.advance("c", START + 3 * HOUR)  # everyone past: no need to wait
    assert closable(state, **kwargs, quorum=2, deadline=timedelta(hours=9), now=now) == [START]
    fresh = StreamState()
    fresh.window(START)
    assert closable(fresh, **kwargs, quorum=2, deadline=HOUR, now=now, drain=True) == [START]
    assert window_start(START + timedelta(minutes=59), HOUR) == START


# -- end to end --------------------------------------------------------------------------------------------

STREAM_CONFIG = '\n[stream]\nallowed_lateness = "0s"\npoll = "1s"\n'


def stream_federation(make_federation: Any, subdir: str = "stream", cap: float = 50.0,
                      noise: bool = False) -> Federation:
    fed = make_federation(noise=noise, quorum=2, subdir=subdir, extra_privacy=f"epsilon_cap = {cap}",
                          extra=STREAM_CONFIG)
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
    return subprocess.run([sys.executable, "-m", "fusion.cli", "stream", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.e2e
def test_fusion_stream_releases_each_window_like_the_batch_pipeline(make_federation):
    """Files land in the feed directories while `fusion stream` runs; each hour is released once the next
    hour's files pass its end; SIGTERM stops it cleanly; the releases equal the batch pipeline's (noise off)."""
    batch = make_federation(noise=False, quorum=2, subdir="batch")
    from fusion.plan import plan_release

    run_batch(plan_release(batch.config, START, END))
    fed = stream_federation(make_federation)
    process = subprocess.Popen([sys.executable, "-m", "fusion.cli", "stream", "--config", str(fed.config_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for hour in range(6):
            land(fed, hour)
            time.sleep(0.5)
        state_file = Path(fed.config.stream_state_path) / "state.json"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # hours 0-4 close when hour 5's readings pass their ends
            state = load_state(state_file)
            if sum(w.status is WindowStatus.RELEASED for w in state.windows.values()) == 5:
                break
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, out + err
    assert "windows open: 1" in out
    drained = fusion_stream(fed.config_path, "--drain")  # the last hour closes when the stream drains
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert cells(fed.config.store_path) == cells(batch.config.store_path)
    assert len(cells(fed.config.store_path)) == 36
    budget = Store(fed.config.store_path).read("budget").to_pylist()
    assert budget[0]["releases"] == 6


@pytest.mark.e2e
@pytest.mark.parametrize("crash_at", ["stream_after_spool", "stream_after_close", "after_ledger"])
def test_a_killed_stream_restarts_without_losing_or_repeating_anything(make_federation, crash_at):
    fed = stream_federation(make_federation)
    for hour in range(3):
        land(fed, hour)
    crashed = fusion_stream(fed.config_path, "--drain", crash_at=crash_at)
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stdout + crashed.stderr
    for hour in range(3, 6):
        land(fed, hour)
    rerun = fusion_stream(fed.config_path, "--drain")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(t.num_rows for t in fed.raw.values())
    assert sorted(set(released.column("window_start").to_pylist())) == [
        START + h * HOUR for h in range(6)
    ]
    budget = Store(fed.config.store_path).read("budget").to_pylist()
    assert budget[0]["releases"] == 6  # each window charged once
    state = load_state(Path(fed.config.stream_state_path) / "state.json")
    assert state.readings == sum(t.num_rows for t in fed.raw.values())


@pytest.mark.e2e
def test_late_readings_are_counted_and_a_spent_budget_refuses_windows_but_the_stream_goes_on(make_federation):
    # A cap of one release per day: hours 1.. are refused (recorded), and the stream keeps ingesting.
    fed = stream_federation(make_federation, cap=1.0, noise=True)
    for hour in range(4):
        land(fed, hour)
    driver = StreamDriver(fed.config)
    driver.run(drain=False, sleep=lambda s: setattr(driver, "stop_requested", True))
    windows = {datetime.fromisoformat(w): s for w, s in driver.state.windows.items()}
    assert [windows[START + h * HOUR].status for h in range(3)] == [WindowStatus.RELEASED] + [
        WindowStatus.REFUSED
    ] * 2
    assert "needs epsilon" in (windows[START + HOUR].reason or "")
    status = driver.status()  # what the status line and the final summary of `fusion stream` show
    assert status.released == 1 and len(status.refused) >= 2 and "needs epsilon" in status.refused[0]
    # Readings for hour 0 arrive after it was released: late, counted in `rejects`, kept as dead letters.
    inst = fed.config.institutions[0]
    late = fed.raw[inst.id].slice(0, 5).set_column(
        fed.raw[inst.id].schema.get_field_index("event_time"), "event_time",
        pa.array([START + timedelta(minutes=m) for m in range(5)], pa.timestamp("us", tz="UTC")),
    )
    write_feed(late, fed.directory / "feeds" / inst.id / f"late.{EXT[inst.feeds[0].format.value]}",
               inst.feeds[0].format.value)
    driver.step()
    rejects = Store(fed.config.store_path).read("rejects").to_pylist()
    assert [(r["institution"], r["rows"]) for r in rejects if r["reason"] == "late"] == [(inst.id, 5)]
    dead = list((fed.directory / "deadletter" / inst.id / "stream").glob("*late*.parquet"))
    assert dead and sum(pq.read_table(p).num_rows for p in dead) == 5
    refusals = [a for a in Store(fed.config.store_path).read("audit").to_pylist() if a["action"] == "budget_refused"]
    assert refusals


@pytest.mark.e2e
def test_json_lines_on_stdin_are_journalled_windowed_and_released(make_federation):
    """alpha's readings arrive as JSON lines on standard input (a closed pipe here); beta's and gamma's as
    files. Draining releases every hour with exactly the readings sent."""
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
    driver = StreamDriver(fed.config, stdin=(alpha.id, io.StringIO("\n".join(lines) + "\n")))
    time.sleep(0.2)  # let the reader thread take the whole pipe
    driver.run(drain=True)
    journal = list((Path(fed.config.stream_state_path) / "stdin" / alpha.id).glob("*.jsonl"))
    assert journal
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(t.num_rows for t in fed.raw.values())
    rejects = Store(fed.config.store_path).read("rejects").to_pylist()
    assert [(r["institution"], r["rows"]) for r in rejects if r["reason"] == "malformed_record"] == [(alpha.id, 1)]


@pytest.mark.e2e
def test_a_streaming_job_spools_windows_and_the_release_side_releases_them(make_federation):
    """The distributed path with TestStream in place of Kafka/Pub/Sub: messages of JSON lines are windowed by
    Beam and spooled with pane markers; `--releases-only` releases each window once every institution's
    ON_TIME marker is there, and counts readings spooled after a release as late."""
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
            part = table.filter(pc.and_(pc.greater_equal(table.column("event_time"), lo),
                                        pc.less(table.column("event_time"), hi)))
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

    driver = StreamDriver(fed.config, releases_only=True)
    driver.run(sleep=lambda s: setattr(driver, "stop_requested", True))
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == total
    assert all(w.status is WindowStatus.RELEASED for w in driver.state.windows.values())
    # The job's rejects are counted too (read = accepted + rejected on this path as on the local one).
    counted = [(r["institution"], r["reason"], r["rows"]) for r in Store(fed.config.store_path).read("rejects")
               .to_pylist() if r["rows"]]
    first = fed.config.institutions[0].id
    assert sorted(counted) == [(first, "malformed_record", 1), (first, "unknown_metric", 1)]
    driver.step()  # counted once
    assert driver.state.rejected == 2
    # A late pane spools more readings of hour 0 after its release: counted as late, not released.
    inst = fed.config.institutions[0].id
    late_dir = Path(fed.config.stream_spool_path) / inst / START.strftime("%Y%m%dT%H%M%SZ")
    pq.write_table(pq.read_table(next(late_dir.glob("*.parquet"))).slice(0, 3),
                           late_dir / "late-pane.parquet")
    driver.step()
    rejects = Store(fed.config.store_path).read("rejects").to_pylist()
    assert [(r["institution"], r["rows"]) for r in rejects if r["reason"] == "late"] == [(inst, 3)]
    assert sorted((r["reason"], r["rows"]) for r in rejects if r["rows"]) == [
        ("late", 3), ("malformed_record", 1), ("unknown_metric", 1)
    ]


def test_an_unreadable_feed_file_is_one_dead_letter_and_the_stream_goes_on(make_federation):
    """A truncated file used to fail every micro-batch, at every restart, for every institution."""
    fed = stream_federation(make_federation, subdir="unreadable")
    for hour in range(3):
        land(fed, hour)
    inst = fed.config.institutions[0]
    ext = EXT[inst.feeds[0].format.value]
    good = fed.directory / "feeds" / inst.id / f"hour-00.{ext}"
    (fed.directory / "feeds" / inst.id / f"hour-99.{ext}").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    driver = StreamDriver(fed.config)
    driver.run(drain=True)
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(
        t.filter(pc.less(t.column("event_time"), START + 3 * HOUR)).num_rows for t in fed.raw.values()
    )
    rejects = Store(fed.config.store_path).read("rejects").to_pylist()
    assert [(r["institution"], r["reason"], r["rows"]) for r in rejects if r["rows"]] == [
        (inst.id, "malformed_record", 1)
    ]
    dead = list((fed.directory / "deadletter" / inst.id / "stream").glob("*unreadable*.parquet"))
    assert len(dead) == 1 and "hour-99" in pq.read_table(dead[0]).to_pylist()[0]["_source"]


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


def hour_of(fed: Federation, institution: str, hour: int) -> pa.Table:
    table = fed.raw[institution]
    times = table.column("event_time")
    lo, hi = START + hour * HOUR, START + (hour + 1) * HOUR
    return table.filter(pc.and_(pc.greater_equal(times, lo), pc.less(times, hi)))


def test_a_reading_stamped_far_ahead_of_the_clock_is_rejected_and_moves_no_watermark(make_federation):
    fed = stream_federation(make_federation, subdir="future")
    land(fed, 0)
    ahead = hour_of(fed, "alpha", 0).slice(0, 1)
    ahead = ahead.set_column(ahead.schema.get_field_index("event_time"), "event_time",
                             pa.array([datetime(2030, 1, 1, tzinfo=UTC)], pa.timestamp("us", tz="UTC")))
    write_feed(ahead, fed.directory / "feeds" / "alpha" / "clock-jump.parquet", "parquet")
    now = START + 2 * HOUR  # the processing clock; the default max_clock_skew is 1h
    driver = StreamDriver(fed.config, clock=lambda: now)
    driver.step()
    assert datetime.fromisoformat(driver.state.max_event["alpha"]) < START + HOUR
    rejects = {w: s.rejects for w, s in driver.state.windows.items() if s.rejects}
    assert rejects == {START.isoformat(): {"alpha": {"out_of_interval": 1}}}
    assert all(datetime.fromisoformat(w) < START + HOUR for w in driver.state.windows)


def test_rejects_before_any_reading_join_the_first_window_and_release_nothing_alone(make_federation):
    """A window of rejects alone used to be created at processing time and released (charged) with no
    readings."""
    fed = stream_federation(make_federation, subdir="rejects-first")
    (fed.directory / "feeds" / "gamma").mkdir(parents=True, exist_ok=True)
    (fed.directory / "feeds" / "gamma" / "bad.jsonl").write_text("{not json\n")
    driver = StreamDriver(fed.config)
    driver.step()
    assert driver.state.windows == {} and driver.state.pending_rejects == {"gamma": {"malformed_record": 1}}
    for hour in range(2):
        land(fed, hour)
    driver.run(drain=True)
    store = Store(fed.config.store_path)
    assert store.read("budget").column("releases").to_pylist() == [2]
    assert sorted({w.isoformat() for w in store.read("releases").column("window_start").to_pylist()}) == [
        START.isoformat(), (START + HOUR).isoformat()
    ]
    rejects = [(r["institution"], r["reason"], r["rows"]) for r in store.read("rejects").to_pylist() if r["rows"]]
    assert rejects == [("gamma", "malformed_record", 1)] and driver.state.pending_rejects == {}


def test_readings_of_a_window_every_watermark_passed_before_it_opened_are_late(make_federation):
    fed = stream_federation(make_federation, subdir="gap")
    for hour in (0, 1, 3, 4):
        land(fed, hour)
    driver = StreamDriver(fed.config)
    driver.step()
    land(fed, 2)  # two hours behind every watermark (allowed_lateness 0s)
    driver.step()
    gap = driver.state.windows[(START + 2 * HOUR).isoformat()]
    assert gap.status is WindowStatus.REFUSED
    assert gap.rejects == {i: {"late": hour_of(fed, i, 2).num_rows} for i in fed.raw}
    released = Store(fed.config.store_path).read("releases").column("window_start").to_pylist()
    assert START + 2 * HOUR not in released
    late = [r for r in Store(fed.config.store_path).read("rejects").to_pylist() if r["reason"] == "late"]
    assert sum(r["rows"] for r in late) == sum(hour_of(fed, i, 2).num_rows for i in fed.raw)


def test_an_input_rewritten_after_it_was_read_is_reported_not_read_twice(make_federation, caplog):
    fed = stream_federation(make_federation, subdir="rewritten")
    land(fed, 0)
    driver = StreamDriver(fed.config)
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
        f"stream input {alpha} changed after it was read ({driver.state.processed[str(alpha)]} -> "
        f"{alpha.stat().st_size} bytes); it is not read again: land new readings as new files"
    ]


def test_windows_overlapping_a_batch_release_are_refused_and_the_stream_goes_on(make_federation):
    from fusion.plan import plan_release

    fed = stream_federation(make_federation, subdir="overlap")
    for hour in range(4):
        land(fed, hour)
    run_batch(plan_release(fed.config, START, START + 2 * HOUR))  # hours 0-1 are sealed by a batch release
    driver = StreamDriver(fed.config)
    driver.run(drain=True)
    windows = {datetime.fromisoformat(w): s for w, s in driver.state.windows.items()}
    assert [windows[START + h * HOUR].status for h in range(4)] == [WindowStatus.REFUSED] * 2 + [
        WindowStatus.RELEASED
    ] * 2
    assert "overlaps" in (windows[START].reason or "")
    audit = Store(fed.config.store_path).read("audit").to_pylist()
    refused = [a for a in audit if a["action"] == "contribution_refused"]
    assert len(refused) == 2 and all("overlaps" in a["reason"] for a in refused)  # one per refused window
