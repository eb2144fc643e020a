"""The role steps run in process (pipelines/local.py) release exactly what the Beam pipelines release."""

from __future__ import annotations

import pytest

from fusion.plan import plan_release
from fusion.store import Store
from pipelines.batch import run_batch
from tests.conftest import END, START

pytestmark = pytest.mark.e2e


def released(store_path: str) -> list[dict[str, object]]:
    table = Store(store_path).read("releases").drop_columns(["released_at"])
    return table.sort_by([("metric", "ascending"), ("region", "ascending"), ("window_start", "ascending")]).to_pylist()


def test_in_process_and_beam_releases_are_identical(make_federation):
    # Same feeds, same test seed: identical noise shares, so identical releases whichever way the steps run.
    statistics = "variance = true\nquantiles = true\nhistogram_bins = 8"
    by_beam = make_federation(noise=True, seed=11, subdir="beam", statistics=statistics)
    local = make_federation(noise=True, seed=11, subdir="local", statistics=statistics)
    # Naming the runner makes `run_batch` build the aggregator's pipelines too (and spread the scan shards).
    run_batch(plan_release(by_beam.config, START, END), beam_args=["--runner=DirectRunner"])
    summary = run_batch(plan_release(local.config, START, END), in_process=True)
    assert summary.status == "released" and summary.cells == 36
    assert released(by_beam.config.store_path) == released(local.config.store_path)
    beam_rejects = Store(by_beam.config.store_path).read("rejects").drop_columns(["recorded_at"]).to_pylist()
    local_rejects = Store(local.config.store_path).read("rejects").drop_columns(["recorded_at"]).to_pylist()
    assert sorted(map(str, beam_rejects)) == sorted(map(str, local_rejects))
