"""Snapshots: what is derived from whole tables is computed once per version; after a release, the previous
version's value is served at once while the current one is computed in the background, unless it lacks what a
request names."""

from __future__ import annotations

import time
from pathlib import Path

from dashboard.releases import SERIES, series_choices
from dashboard.snapshot import Snapshot, VersionCache
from fusion.config.federation import load_config
from fusion.store.delta import Store
from tests.dashboard.conftest import build_store
from tests.fusion.store.test_store import release_rows


def regions(config: object, cache: VersionCache, **named: str) -> set[str]:
    with Snapshot(config, cache) as snapshot:  # type: ignore[arg-type]
        return set(series_choices(snapshot, **named)["temp"])


def test_after_a_release_the_previous_series_are_served_while_the_current_are_computed(tmp_path: Path) -> None:
    config = load_config(build_store(tmp_path / "store"), check_release=False)
    store = Store(config.store_path)
    cache = VersionCache()
    before = regions(config, cache)
    assert {"north", "south"} <= before
    store.insert_new("releases", release_rows("r-east", range(2), region="east"))
    assert regions(config, cache) == before  # the previous version's list, at once
    with Snapshot(config, cache) as snapshot:
        key = snapshot._key(SERIES[0], SERIES[1])
    deadline = time.monotonic() + 30
    while not cache.get(key)[0]:  # the background refresh lands
        assert time.monotonic() < deadline, "the series were not refreshed"
        time.sleep(0.05)
    assert regions(config, cache) == before | {"east"}
    store.insert_new("releases", release_rows("r-west", range(2), region="west"))
    assert "west" in regions(config, cache, metric="temp", region="west")  # named: computed before answering


def test_a_snapshot_reads_one_version_of_each_table(tmp_path: Path) -> None:
    config = load_config(build_store(tmp_path / "store"), check_release=False)
    with Snapshot(config, VersionCache()) as snapshot:
        count = snapshot.rows("SELECT count(*) AS n FROM releases")[0]["n"]
        Store(config.store_path).insert_new("releases", release_rows("r-late", range(5), region="east"))
        assert snapshot.rows("SELECT count(*) AS n FROM releases")[0]["n"] == count
    with Snapshot(config, VersionCache()) as later:
        assert later.rows("SELECT count(*) AS n FROM releases")[0]["n"] == count + 5
