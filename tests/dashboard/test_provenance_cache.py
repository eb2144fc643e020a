"""The provenance page's verify result is cached per version of every table verify reads."""

from __future__ import annotations

import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import write_deltalake

from dashboard.provenance import verify_job
from dashboard.snapshot import Snapshot, VersionCache
from fusion.release.plan import plan_release
from fusion.store.delta import Store
from pipelines.batch import run_batch
from tests.conftest import END, START, Federation


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
