"""A burst of stream windows released in one run: a kill in the middle of it, then a re-run, releases and charges
every window exactly once, from the one envelope each institution sealed for it; and the windows' scans made in one
pass per institution release what scanning each window on its own releases."""

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
from tests.conftest import END
from tests.pipelines.test_entity_level import ENTITY_LEVEL
from tests.pipelines.test_stream import STREAM_CONFIG, at, fusion_stream, land, stream_federation, window_starts

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

    released = store.read("releases")
    assert window_starts(fed.config.store_path) == [at(h) for h in range(WINDOWS)]
    assert sum(released.column("count").to_pylist()) == sum(t.num_rows for t in fed.raw.values())
    per_release = Counter(released.column("release_id").to_pylist())
    assert len(per_release) == WINDOWS and len(set(per_release.values())) == 1  # each window's cells once
    budget = store.read("budget").to_pylist()
    assert budget[0]["releases"] == WINDOWS and sorted(budget[0]["release_ids"]) == sorted(per_release)
    spends = Counter(a["release_id"] for a in store.read("audit").to_pylist() if a["action"] == "budget_spend")
    assert spends == Counter(dict.fromkeys(per_release, 1))  # each window charged once
    for institution in fed.config.institutions:  # one envelope per institution and window, sealed once
        assert len(sealed_records(fed.config, institution)) == WINDOWS


def released(config: Config, table: str) -> list[dict[str, Any]]:
    """Every row of a published table but the moment it was written, in a fixed order."""
    rows = Store(config.store_path).read(table).to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in {"released_at", "recorded_at"}} for r in rows), key=repr)


def scanned_together(records: list[logging.LogRecord]) -> list[int]:
    """Per release run logged, the (window, institution) scans it made in one pass per institution."""
    return [r.phases["scanned_together"] for r in records if hasattr(r, "phases")]


@pytest.mark.e2e
@pytest.mark.parametrize("unit", ["event", "entity"])
def test_a_burst_scanned_in_one_pass_per_institution_releases_what_windows_released_one_by_one_do(
    make_federation: Any, caplog: pytest.LogCaptureFixture, unit: str
) -> None:
    """The same readings, with noise, seeded (test mode): one federation releases its six windows as one burst,
    each institution's spooled windows scanned in one DuckDB pass; the other releases each window as it closes,
    scanned on its own. The releases, reject tallies included, are the same bit for bit, and so are the
    institutions' counts (rows read, accepted, bounded) of every window."""
    privacy = f"epsilon_cap = 50.0\n{ENTITY_LEVEL if unit == 'entity' else ''}"
    feds = [
        make_federation(noise=True, quorum=2, subdir=name, extra_privacy=privacy, extra=STREAM_CONFIG)
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
    institutions = len(burst.config.institutions)
    assert scanned_together(caplog.records) == [WINDOWS * institutions]  # every window's scans made together

    caplog.clear()
    now = [at(0)]
    driver = StreamDriver(alone.config, clock=lambda: now[0])
    for hour in range(WINDOWS):
        land(alone, hour)
        now[0] = at(hour + 1) + timedelta(seconds=1)
        driver.ingest()
        assert driver.close_windows() == [at(hour)]
    assert scanned_together(caplog.records) == [0] * WINDOWS  # each window alone: scanned on its own

    together, one_by_one = released(burst.config, "releases"), released(alone.config, "releases")
    assert len({r["release_id"] for r in together}) == WINDOWS and together == one_by_one
    assert released(burst.config, "rejects") == released(alone.config, "rejects")
    for start in (at(h) for h in range(WINDOWS)):  # each institution's own report of each window
        for inst in burst.config.institutions:
            reports = [
                json.loads(Path(report_path(StreamDriver(f.config).window_plan(start), inst)).read_text())
                for f in feds
            ]
            assert reports[0] == reports[1]
            assert reports[0]["read"] > 0
