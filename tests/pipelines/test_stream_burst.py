"""A burst of stream windows released in one run: a kill in the middle of it, then a re-run, releases and charges
every window exactly once, from the one envelope each institution sealed for the burst; and the windows' scans made
in one pass per institution release what scanning each window on its own releases."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fusion.config.federation import Config, InstitutionConfig
from fusion.release.exchange import ReleaseKey
from fusion.runtime.faults import CRASH_EXIT_CODE
from fusion.store.delta import Store
from pipelines.run import report_path
from pipelines.stream_driver import StreamDriver
from tests.conftest import END, Federation
from tests.pipelines.test_entity_level import ENTITY_LEVEL
from tests.pipelines.test_stream import STREAM_CONFIG, at, fusion_stream, land, released_once, stream_federation

WINDOWS = 6


def sealed_records(config: Config, institution: InstitutionConfig) -> list[str]:
    """The intervals an institution recorded as sealed (one record per interval, ever)."""
    directory = Path(config.institution_keys_path(institution)) / "sealed"
    return sorted(p.stem for p in directory.glob("*.json") if ReleaseKey.parse_interval_name(p.stem))


@pytest.mark.e2e
@pytest.mark.parametrize("crash_at", ["after_encrypt", "after_sum"])
def test_a_burst_killed_midway_then_rerun_releases_each_window_exactly_once(
    make_federation: Any, crash_at: str
) -> None:
    fed = stream_federation(make_federation)
    for hour in range(WINDOWS):
        land(fed, hour)
    assert at(WINDOWS) == END
    # Every window closable at once: the run is killed while the windows' envelopes are sealed (after_encrypt) or
    # summed (after_sum), some windows further on than others.
    crashed = fusion_stream(fed.config_path, "--drain", "--until", END.isoformat(), crash_at=crash_at)
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stdout + crashed.stderr
    store = Store(fed.config.store_path)
    assert store.release_ids() == set()  # killed before any window was released
    rerun = fusion_stream(fed.config_path, "--drain", "--until", END.isoformat())
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    assert len(released_once(fed.config.store_path, WINDOWS)) == 1  # one release of the six windows, charged once
    for institution in fed.config.institutions:  # one envelope per institution for the burst, sealed once
        assert [ReleaseKey.parse_interval_name(name) for name in sealed_records(fed.config, institution)] == [
            (at(0), END)
        ]
    assert sum(store.read("releases").column("count").to_pylist()) == sum(t.num_rows for t in fed.raw.values())


def released(config: Config, table: str) -> list[dict[str, Any]]:
    """Every row of a published table but the moment it was written, in a fixed order."""
    rows = Store(config.store_path).read(table).to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in {"released_at", "recorded_at"}} for r in rows), key=repr)


def scanned_together(records: list[logging.LogRecord]) -> list[int]:
    """Per release run logged, the (window, institution) scans it made in one pass per institution."""
    return [r.phases["scanned_together"] for r in records if hasattr(r, "phases")]


def cells(config: Config) -> list[dict[str, Any]]:
    """Every released cell, without what names its release (its id, the moment it was written)."""
    rows = Store(config.store_path).read("releases").to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in {"release_id", "released_at"}} for r in rows), key=repr)


def tallies(config: Config) -> Counter[tuple[str, str]]:
    """Reject tallies by institution and reason, summed over the releases."""
    out: Counter[tuple[str, str]] = Counter()
    for r in Store(config.store_path).read("rejects").to_pylist():
        out[r["institution"], r["reason"]] += r["count"]
    return out


def burst_and_one_by_one(
    make_federation: Any, caplog: pytest.LogCaptureFixture, *, privacy: str, noise: bool
) -> tuple[Federation, Federation, list[int], list[int]]:
    """Two federations with the same readings: the first ingests six hours and closes their windows at one moment
    (a burst), the second closes each window as it lands. Returns both and, for each, the (window, institution)
    scans its release runs made in one pass per institution."""
    feds = [
        make_federation(noise=noise, quorum=2, subdir=name, extra_privacy=privacy, extra=STREAM_CONFIG)
        for name in ("burst", "one_by_one")
    ]
    for fed in feds:
        for inst in fed.config.institutions:  # the feeds arrive while the stream runs
            shutil.rmtree(fed.directory / "feeds" / inst.id)
    caplog.set_level(logging.DEBUG, logger="pipelines.stream_release")
    burst, alone = feds
    for hour in range(WINDOWS):
        land(burst, hour)
    driver = StreamDriver(burst.config, clock=lambda: END + timedelta(seconds=1))
    driver.ingest()
    assert len(driver.close_windows()) == WINDOWS
    scanned_burst = scanned_together(caplog.records)
    caplog.clear()
    now = [at(0)]
    driver = StreamDriver(alone.config, clock=lambda: now[0])
    for hour in range(WINDOWS):
        land(alone, hour)
        now[0] = at(hour + 1) + timedelta(seconds=1)
        driver.ingest()
        assert driver.close_windows() == [at(hour)]
    return burst, alone, scanned_burst, scanned_together(caplog.records)


@pytest.mark.e2e
def test_a_burst_released_as_one_release_holds_what_its_windows_released_one_by_one_hold(
    make_federation: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Event level, noise off (test mode): one federation releases six windows that are due together as one
    release (each institution's spooled files of all six scanned in one DuckDB pass, one envelope each); the other
    releases each window as it closes. Every cell, reject tallies and the institutions' counts (rows read,
    accepted) are the same."""
    burst, alone, scanned_burst, _ = burst_and_one_by_one(
        make_federation, caplog, privacy="epsilon_cap = 50.0", noise=False
    )
    assert scanned_burst == [len(burst.config.institutions)]  # one pass per institution
    assert len(released_once(burst.config.store_path, WINDOWS)) == 1
    assert len(released_once(alone.config.store_path, WINDOWS)) == WINDOWS
    assert cells(burst.config) == cells(alone.config)
    assert tallies(burst.config) == tallies(alone.config)
    group = StreamDriver(burst.config).release_plan([at(h) for h in range(WINDOWS)])
    for inst in burst.config.institutions:
        report = json.loads(Path(report_path(group, inst)).read_text())
        alone_reports = [
            json.loads(Path(report_path(StreamDriver(alone.config).window_plan(at(h)), inst)).read_text())
            for h in range(WINDOWS)
        ]
        assert report["read"] == sum(r["read"] for r in alone_reports) > 0
        assert report["accepted"] == sum(r["accepted"] for r in alone_reports)


@pytest.mark.e2e
def test_a_burst_scanned_in_one_pass_per_institution_releases_what_windows_released_one_by_one_do(
    make_federation: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Entity level (each window its own release: contributions are bounded per release). The same readings,
    with noise, seeded (test mode): one federation releases its six windows as one burst, each institution's
    spooled windows scanned in one DuckDB pass; the other releases each window as it closes, scanned on its own.
    The releases, reject tallies included, are the same bit for bit, and so are the institutions' counts (rows
    read, accepted, bounded) of every window."""
    burst, alone, scanned_burst, scanned_alone = burst_and_one_by_one(
        make_federation, caplog, privacy=f"epsilon_cap = 50.0\n{ENTITY_LEVEL}", noise=True
    )
    institutions = len(burst.config.institutions)
    assert scanned_burst == [WINDOWS * institutions]  # every window's scans made together
    assert scanned_alone == [0] * WINDOWS  # each window alone: scanned on its own

    together, one_by_one = released(burst.config, "releases"), released(alone.config, "releases")
    assert len({r["release_id"] for r in together}) == WINDOWS and together == one_by_one
    assert released(burst.config, "rejects") == released(alone.config, "rejects")
    for start in (at(h) for h in range(WINDOWS)):  # each institution's own report of each window
        for inst in burst.config.institutions:
            reports = [
                json.loads(Path(report_path(StreamDriver(f.config).window_plan(start), inst)).read_text())
                for f in (burst, alone)
            ]
            assert reports[0] == reports[1]
            assert reports[0]["read"] > 0


@pytest.mark.parametrize("unit", ["event", "entity"])
def test_due_windows_are_grouped_by_contiguity_and_privacy_period_at_event_level_only(
    make_federation: Any, unit: str
) -> None:
    """Which windows share a release: at event level each run of contiguous due windows within one privacy period
    (here periods of 4 hours, and a gap after the third window); a window a crash interrupted keeps the release
    recorded for it; at entity level every window alone."""
    privacy = f'epsilon_cap = 50.0\nperiod = "4h"\n{ENTITY_LEVEL if unit == "entity" else ""}'
    fed = make_federation(quorum=2, subdir=unit, extra_privacy=privacy, extra=STREAM_CONFIG)
    driver = StreamDriver(fed.config, clock=lambda: END)
    hours = [0, 1, 2, 4, 5]  # 3 is not due (released before, say); 4 starts the next period
    interrupted = at(6)
    for h in hours:
        driver.state.window(at(h))  # closed, no release recorded yet
    driver.state.window(interrupted).release_id = "recorded"
    groups = driver._release_groups([at(h) for h in hours] + [interrupted])
    if unit == "event":
        assert groups == [[at(0), at(1), at(2)], [at(4), at(5)], [interrupted]]
    else:
        assert groups == [[at(h)] for h in hours] + [[interrupted]]
    plan = driver.release_plan([at(0), at(1), at(2)])
    assert (plan.key.start, plan.key.end) == (at(0), at(3)) and plan.layout.windows == 3
