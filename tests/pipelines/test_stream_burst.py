"""A burst of stream windows released in one run: a kill in the middle of it, then a re-run, releases and charges
every window exactly once, from the one envelope each institution sealed for it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fusion.config.federation import Config, InstitutionConfig
from fusion.release.exchange import ReleaseKey
from fusion.runtime.faults import CRASH_EXIT_CODE
from fusion.store.delta import Store
from tests.conftest import END
from tests.pipelines.test_stream import at, fusion_stream, land, stream_federation, window_starts

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
