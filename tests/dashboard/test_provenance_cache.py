"""The provenance page's verify result is cached per version of every table verify reads, and per state of their
data files; and computed again at least every REVERIFY_S."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake

from dashboard.provenance import REVERIFY_S, provenance_view, verify_job
from dashboard.snapshot import Snapshot, VersionCache
from fusion.config.federation import Config, load_config
from fusion.keys.registry import create_key_holder_key
from fusion.release.plan import plan_release
from fusion.store.delta import Store
from pipelines.batch import run_batch
from tests.conftest import END, START, Federation, config_text, publish_signed
from tests.fusion.store.test_store import release_rows


@pytest.mark.e2e
def test_an_edit_of_the_reject_tallies_is_not_served_as_verified_from_the_cache(
    make_federation: Callable[..., Federation],
) -> None:
    """Signatures cover a release's reject tallies: the cached verdict was keyed on releases, audit and budget
    only, so the page kept serving 'verified' (and 'current') after the tallies were rewritten."""
    fed = make_federation(noise=True, mode="production")
    assert run_batch(plan_release(fed.config, START, END)).status == "released"
    cache = VersionCache()
    with Snapshot(fed.config, cache) as shot:
        (_, before), _ = shot.recent(*verify_job(fed.config))
    assert [c.status for c in before] == ["verified"]
    store = Store(fed.config.store_path)
    rejects = store.read("rejects")
    index = rejects.schema.get_field_index("count")
    more = pc.add(rejects.column("count"), pa.scalar(1000, rejects.schema.field(index).type))
    write_deltalake(store.table_path("rejects"), rejects.set_column(index, "count", more), mode="overwrite")
    with Snapshot(fed.config, cache) as shot:
        (_, stale), current = shot.recent(*verify_job(fed.config))
    assert not current and [c.status for c in stale] == ["verified"]  # the earlier one, said to be earlier
    deadline = time.monotonic() + 60
    while not current and time.monotonic() < deadline:
        time.sleep(0.1)
        with Snapshot(fed.config, cache) as shot:
            (_, after), current = shot.recent(*verify_job(fed.config))
    assert current and [c.status for c in after] == ["tampered"]


def signed_store(root: Path) -> tuple[Config, Path]:
    """A federation whose store holds two releases signed by the key holder (both verified), and the data file
    holding the second's rows."""
    root.mkdir(parents=True)
    path = root / "federation.toml"
    path.write_text(config_text(institutions=[("alpha", "parquet")], quorum=1))
    config = load_config(path, check_release=False)
    create_key_holder_key(config)
    store = Store(config.store_path)
    publish_signed(config, store, release_rows("r-a", range(24)))
    publish_signed(config, store, release_rows("r-b", range(24, 48)))
    (data,) = [Path(uri) for uri in store.delta_table("releases").file_uris() if "r-b" in pq.read_table(uri)[
        "release_id"].to_pylist()]
    return config, data


def statuses(config: Config, cache: VersionCache, **options: Any) -> tuple[dict[str, str], bool]:
    with Snapshot(config, cache) as shot:
        (_, checks), current = shot.recent(*verify_job(config), **options)
    return {c.release_id: c.status for c in checks}, current


def current_statuses(config: Config, cache: VersionCache) -> dict[str, str]:
    """The report once the background check of the store as it is now has landed."""
    deadline = time.monotonic() + 60
    while True:
        found, current = statuses(config, cache)
        if current:
            return found
        assert time.monotonic() < deadline, "the verify report was not computed again"
        time.sleep(0.05)


def rewritten(data: Path, mean: float, **options: Any) -> None:
    """The data file written again in place (no Delta commit), r-b's mean set to `mean`."""
    rows = pq.read_table(data)
    changed = pc.if_else(pc.equal(rows["release_id"], "r-b"), mean, rows["mean"])
    pq.write_table(rows.set_column(rows.schema.get_field_index("mean"), "mean", changed), data, **options)


def test_a_data_file_rewritten_in_place_is_verified_again_and_read_afresh(tmp_path: Path) -> None:
    """A data file of `releases` rewritten without a Delta commit leaves every version as it was: the cached
    verdict was keyed on versions only, so a running dashboard kept calling the release verified; and the
    connection a serving thread keeps read the file through its old footer ("Couldn't deserialize thrift"),
    answered 400 as if the request's parameters were wrong."""
    config, data = signed_store(tmp_path / "fed")
    cache = VersionCache()
    assert statuses(config, cache) == ({"r-a": "verified", "r-b": "verified"}, True)
    means = "SELECT DISTINCT mean FROM releases WHERE release_id = 'r-b'"
    with Snapshot(config, cache) as shot:
        assert shot.rows(means) == [{"mean": 10.0}]
    rewritten(data, 45.0)
    with Snapshot(config, cache) as shot:  # this thread's store, opened afresh: the file as it is now
        assert shot.rows(means) == [{"mean": 45.0}]
    found, current = statuses(config, cache)
    assert not current and found["r-b"] == "verified"  # the earlier report, said to be earlier
    assert current_statuses(config, cache) == {"r-a": "verified", "r-b": "tampered"}


def test_the_verify_report_is_computed_again_after_its_age(tmp_path: Path) -> None:
    """A rewrite that keeps the file's size and modification time leaves every key as it was: past REVERIFY_S
    the report is computed again all the same (here at once: max_age 0)."""
    config, data = signed_store(tmp_path / "fed")
    plain = {"compression": None, "use_dictionary": False, "write_statistics": False}
    rewritten(data, 10.0, **plain)  # the same rows, written so that a changed mean keeps the file's size
    cache = VersionCache()
    assert current_statuses(config, cache) == {"r-a": "verified", "r-b": "verified"}
    before = data.stat()
    rewritten(data, 45.0, **plain)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert data.stat().st_size == before.st_size
    assert statuses(config, cache) == ({"r-a": "verified", "r-b": "verified"}, True)  # as far as the files tell
    found, current = statuses(config, cache, max_age=0.0)
    assert not current and found["r-b"] == "verified"  # past its age: shown as earlier, checked again
    deadline = time.monotonic() + 60
    while statuses(config, cache, max_age=REVERIFY_S)[0]["r-b"] != "tampered":
        assert time.monotonic() < deadline, "the verify report was not computed again"
        time.sleep(0.05)


def test_a_release_removed_whole_after_it_was_shown_is_reported_missing(tmp_path: Path) -> None:
    """The newest release removed whole (rows and audit record) leaves the chain's lower links intact: verified
    with seen = 0, the page showed one release fewer, all verified. It now verifies with the highest sequence number
    it has shown, as `fusion verify --seen` does; a dashboard started with `--seen` knows it from the start."""
    config, _ = signed_store(tmp_path / "fed")
    cache = VersionCache()

    def shown() -> tuple[list[tuple[str, int | None, str]], bool]:
        with Snapshot(config, cache) as shot:
            view = provenance_view(shot)
        return [(c.release_id, c.sequence, c.status) for c in view.checks], view.verify_current

    assert shown() == ([("r-a", 1, "verified"), ("r-b", 2, "verified")], True)
    assert cache.seen == 2
    store = Store(config.store_path)
    for table in ("releases", "audit"):
        store.delta_table(table).delete("release_id = 'r-b'")
    deadline = time.monotonic() + 60
    while not (after := shown())[1]:
        assert time.monotonic() < deadline, "the verify report was not computed again"
        time.sleep(0.05)
    assert after[0] == [("r-a", 1, "verified"), ("(sequence 2)", 2, "missing")]
    restarted = VersionCache(seen=2)
    with Snapshot(config, restarted) as shot:
        assert [c.status for c in provenance_view(shot).checks] == ["verified", "missing"]


@pytest.mark.parametrize("first", [False, True], ids=["copy-last", "copy-first"])
def test_a_copy_of_a_releases_audit_record_shows_it_tampered_and_no_time(tmp_path: Path, first: bool) -> None:
    """A second `<release>:released` record, a copy of the genuine one (signature and aggregate kept) with another
    time and actor: verify checked the first record read and called the release verified, and the page showed
    the earliest time of the two, the copy's."""
    from datetime import UTC, datetime

    config, _ = signed_store(tmp_path / "fed")
    store = Store(config.store_path)
    audit = store.read("audit")
    (record,) = [r for r in audit.to_pylist() if r["event_id"] == "r-b:released"]
    forged = {**record, "at": datetime(2020, 1, 1, tzinfo=UTC), "actor": "mallory"}
    copy = pa.Table.from_pylist([forged], schema=audit.schema)
    write_deltalake(store.table_path("audit"), pa.concat_tables([copy, audit] if first else [audit, copy]),
                    mode="overwrite")
    with Snapshot(config, VersionCache()) as shot:
        view = provenance_view(shot)
    shown = {c.release_id: (c.status, c.reason, c.released_at, c.aggregate_sha256) for c in view.checks}
    assert shown["r-b"] == ("tampered", "2 audit records of its release, where Fusion writes one", None, None)
    assert shown["r-a"][0] == "verified" and shown["r-a"][2] is not None and shown["r-a"][3] == "0" * 64
