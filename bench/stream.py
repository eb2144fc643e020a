"""Streaming benchmark: sustained ingest rate of `fusion stream`, and latency from a window's close to its release.

Generates hourly Parquet feed files for several institutions (deterministic seed), then lands them one hour at a
time while a StreamDriver steps, as feeds would arrive live: each step ingests one hour (validate, window,
spool) and releases the hour before it (contribute, aggregate, unmask, release, with noise, masks and HE).

    .venv/bin/python -m bench.stream --readings 2000000          # prints a table, writes bench/results/stream.json
    .venv/bin/python -m bench.stream --burst 24                   # 24 windows closable at once (demo layout)

Reported: ingest readings/s (validation + windowing + spool, the micro-batch pipeline), end-to-end readings/s
(everything, releases included), and per-window latency from the window's close (the processing clock passing
its end, checked after each micro-batch) to the release being queryable in the store. With --burst, the latency
of windows that become closable together (released in one run, one commit) against the 2 s target.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fusion.config.federation import load_config
from fusion.feeds.stream_state import WindowStatus
from fusion.keys.holder import create_federation_keys
from fusion.store.delta import Store
from pipelines.stream_driver import StreamDriver
from pipelines.stream_release import WINDOW_WORKERS

START = datetime(2026, 3, 1, tzinfo=UTC)
METRICS = {"air_temp": (-40.0, 50.0, 0.1), "load_mw": (0.0, 500.0, 0.5), "humidity": (0.0, 100.0, 0.5)}
REGIONS = [f"r{i:02d}" for i in range(10)]


def config_text(institutions: list[str]) -> str:
    lines = [
        f"regions = {json.dumps(REGIONS)}",
        "[federation]",
        'id = "bench-stream"',
        'window = "1h"',
        'deadline = "0s"',
        "[privacy]",
        "epsilon = 1.0",
        "delta = 1e-6",
        "quorum = 2",
        "epsilon_cap = 1000.0",
        "[stream]",
        'allowed_lateness = "0s"',
        f'start = "{START.isoformat()}"',  # the public grid starts at the first hour of the generated feeds
    ]
    for name, (lower, upper, resolution) in METRICS.items():
        lines += [
            "[[metrics]]",
            f'name = "{name}"',
            'unit = "u"',
            f"lower = {lower}",
            f"upper = {upper}",
            f"resolution = {resolution}",
            f"plausible = [{lower - 100}, {upper + 100}]",
        ]
    for institution in institutions:
        lines += [
            "[[institutions]]",
            f'id = "{institution}"',
            "[[institutions.feeds]]",
            'name = "main"',
            f'path = "incoming/{institution}/*.parquet"',
            'format = "parquet"',
        ]
    return "\n".join(lines) + "\n"


def hour_of_readings(institution: str, hour: int, rows: int, rng: np.random.Generator) -> pa.Table:
    metric_names = list(METRICS)
    metric = rng.integers(0, len(metric_names), rows)
    lower = np.array([METRICS[m][0] for m in metric_names])[metric]
    upper = np.array([METRICS[m][1] for m in metric_names])[metric]
    start_us = int((START + timedelta(hours=hour)).timestamp() * 1_000_000)
    return pa.table(
        {
            "entity_id": pa.array([f"{institution}-{e:05d}" for e in rng.integers(0, 5000, rows)]),
            "region": pa.array(np.array(REGIONS)[rng.integers(0, len(REGIONS), rows)]),
            "metric": pa.array(np.array(metric_names)[metric]),
            "event_time": pa.array(start_us + rng.integers(0, 3_600_000_000, rows), pa.timestamp("us", tz="UTC")),
            "value": pa.array(rng.uniform(lower, upper)),
        }
    )


def run(readings: int, institutions: int, hours: int, directory: Path) -> dict[str, object]:
    ids = [f"inst{i}" for i in range(institutions)]
    (directory / "federation.toml").write_text(config_text(ids))
    config = load_config(directory / "federation.toml")
    create_federation_keys(config, ids)
    rng = np.random.default_rng(2026)
    per_file = readings // (institutions * hours)
    staged = directory / "staged"
    for hour in range(hours):
        for institution in ids:
            path = staged / institution / f"hour-{hour:03d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(hour_of_readings(institution, hour, per_file, rng), path)
    # The processing clock: the start of the hour being landed, plus the real time elapsed since it was landed
    # (so the window before it is due when its files land, and latencies are real seconds).
    landed: list[tuple[datetime, float]] = [(START, time.monotonic())]
    driver = StreamDriver(config, clock=lambda: landed[0][0] + timedelta(seconds=time.monotonic() - landed[0][1]))
    ingest_s = 0.0
    started = time.monotonic()
    for hour in range(hours):
        for institution in ids:  # land the hour's files atomically
            target = directory / "incoming" / institution / f"hour-{hour:03d}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(staged / institution / f"hour-{hour:03d}.parquet", target.with_name(".tmp"))
            target.with_name(".tmp").rename(target)
        landed[0] = (START + timedelta(hours=hour), time.monotonic())
        t0 = time.monotonic()
        driver.ingest()
        ingest_s += time.monotonic() - t0
        driver.close_windows()
    landed[0] = (START + timedelta(hours=hours), time.monotonic())
    driver.close_windows()
    total_s = time.monotonic() - started
    latencies = [
        (datetime.fromisoformat(w.released_at) - datetime.fromisoformat(w.closable_at)).total_seconds()
        for w in driver.state.windows.values()
        if w.status is WindowStatus.RELEASED and w.closable_at and w.released_at
    ]
    spooled = driver.state.readings
    return {
        "readings": spooled,
        "institutions": institutions,
        "windows": len(driver.state.windows),
        "ingest_readings_per_s": spooled / ingest_s,
        "end_to_end_readings_per_s": spooled / total_s,
        "latency_s_median": statistics.median(latencies),
        "latency_s_max": max(latencies),
        "allowed_lateness_s": 0,
    }


class _PhaseCapture(logging.Handler):
    """Keeps the phases a release run logs (`extra={"phases": ...}`)."""

    def __init__(self, into: list[dict[str, Any]]) -> None:
        super().__init__(logging.DEBUG)
        self._into = into

    def emit(self, record: logging.LogRecord) -> None:
        phases = getattr(record, "phases", None)
        if isinstance(phases, dict):
            self._into.append(phases)


#: A burst's target: every window closable at one moment queryable within this many seconds beyond the allowed
#: lateness (measured from the moment they became closable), on the demo's layout.
BURST_TARGET_S = 2.0


def burst(windows: int, directory: Path) -> dict[str, object]:
    """The demo federation's first day spooled, then `windows` hourly windows closable at one moment (a stream
    catching up, or `--drain`): seconds from that moment to each window being queryable in the store."""
    from fusion.demo.federation import DEMO_START, build_demo

    config_path = build_demo(directory / "demo", days=1)
    text = config_path.read_text().replace("refresh = true ", "refresh = false")  # forecasts are not the release
    config_path.write_text(text + f'\n[stream]\nstart = "{DEMO_START.isoformat()}"\nallowed_lateness = "0s"\n')
    config = load_config(config_path)
    end = DEMO_START + timedelta(hours=windows)
    clock: list[tuple[datetime, float]] = [(end, time.monotonic())]  # `end` once spooled, then real seconds
    driver = StreamDriver(config, clock=lambda: clock[0][0] + timedelta(seconds=time.monotonic() - clock[0][1]))
    driver.ingest()
    store = Store(config.store_path)
    before = store.delta_table("releases").version()
    phases: list[dict[str, Any]] = []  # what the release run logs of its phases (pipelines/stream_release.py)
    capture = _PhaseCapture(phases)
    run_log = logging.getLogger("pipelines.stream_release")
    level, propagate = run_log.level, run_log.propagate
    run_log.addHandler(capture)
    run_log.setLevel(logging.DEBUG)
    run_log.propagate = False  # kept here, not printed
    clock[0] = (end, time.monotonic())
    cpu = time.process_time()
    try:
        closed = driver.close_windows()
    finally:
        run_log.removeHandler(capture)
        run_log.setLevel(level)
        run_log.propagate = propagate
    cpu_s = time.process_time() - cpu
    states = [driver.state.windows[start.isoformat()] for start in closed]
    latencies = [
        (datetime.fromisoformat(w.released_at) - datetime.fromisoformat(w.closable_at)).total_seconds()
        for w in states
        if w.status is WindowStatus.RELEASED and w.closable_at and w.released_at
    ]
    history = store.delta_table("releases").history()
    return {
        "layout": "demo",
        "institutions": len(config.institutions),
        "windows_closable_together": len(closed),
        "windows_released": len(latencies),
        "release_commits": sum(1 for e in history if e["version"] > before and e["operation"] == "WRITE"),
        "latency_s_last_window": max(latencies),
        "release_run_cpu_s": cpu_s,  # the run's CPU time (every thread): its latency on a core of its own
        "window_workers": WINDOW_WORKERS,  # windows whose institution and aggregator steps run side by side
        # Wall seconds of the run's phases (checks, scan: each institution's files of every window in one pass,
        # window_steps: every window's institution and aggregator steps, key_holder: charge, decrypt, decode,
        # sign; publish: the store commits), the CPU seconds of the scan and of the window steps by step, summed
        # over the threads (without DuckDB's own threads), and the (window, institution) scans made together.
        "phases": phases[-1] if phases else {},
        "latency_target_s": BURST_TARGET_S,
        "allowed_lateness_s": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--burst",
        type=int,
        default=0,
        metavar="WINDOWS",
        help="instead: latency of WINDOWS windows closable at one moment, on the demo's layout",
    )
    parser.add_argument("--readings", type=int, default=2_000_000)
    parser.add_argument("--institutions", type=int, default=3)
    parser.add_argument("--hours", type=int, default=8)
    parser.add_argument("--out", default="bench/results/stream.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fusion-bench-stream-") as tmp:
        if args.burst:
            result = burst(args.burst, Path(tmp))
            args.out = args.out.replace("stream.json", "stream_burst.json")
        else:
            result = run(args.readings, args.institutions, args.hours, Path(tmp))
    result["measured_at"] = datetime.now(UTC).isoformat()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in result)
    for key, value in result.items():
        if isinstance(value, dict):  # the burst's phases: one line each
            for name, part in value.items():
                shown = {k: round(v, 2) for k, v in part.items()} if isinstance(part, dict) else part
                print(f"{key + '.' + name:<{width}}  {shown}")
            continue
        print(f"{key:<{width}}  {value:,.2f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
