"""The seeded end-to-end batch on the runner modes CI proves: the DirectRunner in memory, the DirectRunner with
worker processes (`--direct_running_mode=multi_processing`), and the PortableRunner with an embedded job server
(`--job_endpoint=embed`: the job-submission path Flink and Spark use, with the SDK harness in process), beside
`fusion batch`'s default (without Beam options: every role step in process, no pipeline) and the DirectRunner
named without options. All must release exactly the same
cells: the noise is seeded (test mode), the masks cancel, and nothing in the pipelines may depend on how a runner
splits, orders or retries their work."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pytest

from fusion.release.plan import plan_release
from fusion.store.delta import Store
from pipelines.batch import run_batch
from tests.conftest import END, START, Federation

pytestmark = pytest.mark.e2e

#: Beam options of each mode, as `fusion batch` passes them through. A named runner also runs the aggregator's
#: steps as Beam pipelines (and spreads the scan shards), so the portable mode covers both pipelines.
MODES: dict[str, list[str] | None] = {
    "default": None,  # no Beam options: every role step in process (run_batch's default)
    "direct-named": ["--runner=DirectRunner"],
    "direct-in-memory": ["--direct_running_mode=in_memory"],
    "direct-multi-processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "portable-embed": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
}

#: What a run stamps (its time, the signature over it) rather than computes from the readings.
RUN_STAMPED = {"released_at"}


def released(make_federation: Callable[..., Federation], mode: str, *, entity_level: bool) -> pa.Table:
    extra = 'unit = "entity"\nmax_partitions = 3\nmax_readings_per_partition = 2' if entity_level else ""
    fed = make_federation(noise=True, seed=11, subdir=f"{mode}-{int(entity_level)}", extra_privacy=extra)
    plan = plan_release(fed.config, START, END)
    options = MODES[mode]
    summary = run_batch(plan, beam_args=options or [])
    assert summary.status == "released"
    assert summary.envelopes == len(fed.config.institutions)
    table = Store(fed.config.store_path).read("releases")
    assert table.num_rows == plan.layout.cells
    keep = [name for name in table.column_names if name not in RUN_STAMPED]
    return table.select(keep).sort_by([("metric", "ascending"), ("region", "ascending"), ("window_start", "ascending")])


@pytest.mark.parametrize("entity_level", [False, True], ids=["event", "entity"])
def test_runner_modes_release_identical_cells(make_federation: Callable[..., Federation], entity_level: bool) -> None:
    tables = {mode: released(make_federation, mode, entity_level=entity_level) for mode in MODES}
    reference = tables["direct-in-memory"]
    # Noise is on: equal releases across modes are not the trivial equality of exact counts.
    assert pa.compute.sum(reference.column("count_sd")).as_py() > 0
    for mode, table in tables.items():
        assert table.equals(reference), f"{mode} released other cells than the in-memory DirectRunner"
