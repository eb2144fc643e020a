"""Entity level end to end (real Beam, TenSEAL, Delta, DuckDB): bounded counts against a DuckDB reference of the
caps, the local report's reconciliation, the entity-level sensitivity and noise; and the coverage of the released
95% intervals on data with known truth (decode_release with real Skellam noise, no Beam)."""

from __future__ import annotations

import math
import tomllib
from datetime import UTC, datetime, timedelta

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from fusion.config.federation import load_config, parse_config
from fusion.config.parameters import ReleaseParameters, release_parameters
from fusion.release.contribution import aggregate_readings
from fusion.release.estimates import decode_release
from fusion.release.plan import plan_release
from fusion.store.delta import Store
from pipelines.batch import run_batch
from privacy.accountant import epsilon_for
from privacy.encoding import entity_level_sensitivity
from privacy.layout import PartitionLayout
from privacy.skellam import SkellamNoise, seeded_generator
from schemas.readings import READING_SCHEMA
from tests.conftest import END, METRICS, START, Federation, config_text

pytestmark = pytest.mark.e2e

L0 = 3  # max_partitions: cells per entity and release
LINF = 2  # max_readings_per_partition: readings per entity and cell
ENTITY_LEVEL = f'unit = "entity"\nmax_partitions = {L0}\nmax_readings_per_partition = {LINF}\n'


def switch_to_entity_level(fed: Federation) -> None:
    """Rewrite the fixture's TOML: the [privacy] table gains the entity unit and its caps."""
    text = fed.config_path.read_text()
    assert text.count('mode = "test"\n') == 1
    fed.config_path.write_text(text.replace('mode = "test"\n', 'mode = "test"\n' + ENTITY_LEVEL))


def with_noise(text: str) -> str:
    assert text.count("noise = false\n") == 1
    return text.replace("noise = false\n", "noise = true\n")


def bounded_reference(fed: Federation) -> duckdb.DuckDBPyConnection:
    """DuckDB views over the raw readings.

    pairs: rows n per (institution, entity, cell) and `capped` = min(n, Linf); per_cell: the entities' capped
    values in a cell and their sum, the most bounding can keep there; per_entity: the least and the most one
    entity can keep, the sum of its min(k, L0) smallest or largest capped cells.
    """
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    raw = pa.concat_tables(
        [
            t.select(["entity_id", "metric", "region", "event_time"]).append_column(
                "institution", pa.array([inst] * t.num_rows)
            )
            for inst, t in fed.raw.items()
        ]
    )
    con.register("raw", raw)
    con.execute(f"""
        CREATE VIEW pairs AS
        SELECT institution, entity_id, metric, region, time_bucket(INTERVAL 1 HOUR, event_time) AS window_start,
               count(*) AS n, least(count(*), {LINF}) AS capped
        FROM raw GROUP BY ALL
    """)
    con.execute("""
        CREATE VIEW per_cell AS
        SELECT metric, region, window_start, list(capped) AS capped, sum(capped)::BIGINT AS most
        FROM pairs GROUP BY ALL
    """)
    con.execute(f"""
        CREATE VIEW per_entity AS
        SELECT institution, entity_id, count(*) AS cells,
               sum(capped) FILTER (WHERE smallest_first <= {L0})::BIGINT AS least_kept,
               sum(capped) FILTER (WHERE largest_first <= {L0})::BIGINT AS most_kept
        FROM (
            SELECT *, row_number() OVER (PARTITION BY institution, entity_id ORDER BY capped) AS smallest_first,
                      row_number() OVER (PARTITION BY institution, entity_id ORDER BY capped DESC) AS largest_first
            FROM pairs
        ) GROUP BY ALL
    """)
    return con


def test_entity_level_release_keeps_exactly_the_bounded_readings(make_federation):
    fed = make_federation(noise=False)
    switch_to_entity_level(fed)
    config = load_config(fed.config_path)
    plan = plan_release(config, START, END)
    summary = run_batch(plan)
    assert summary.status == "released"

    con = bounded_reference(fed)
    con.register("rel", Store(config.store_path).read("releases"))
    joined = con.sql("""
        SELECT rel.metric, rel.region, rel.window_start, rel.count, rel.sum,
               coalesce(capped, []) AS capped, coalesce(most, 0) AS most
        FROM rel LEFT JOIN per_cell USING (metric, region, window_start)
    """)
    cells = joined.to_arrow_table().to_pydict()
    assert len(cells["count"]) == plan.layout.cells
    count = np.array(cells["count"])
    np.testing.assert_array_equal(count, np.rint(count))  # noise off: exact integer counts
    assert (count >= 0).all()
    # Per cell: no entity contributes more than Linf readings.
    assert (count <= np.array(cells["most"])).all(), list(zip(count, cells["most"], strict=True))
    # Each entity keeps all of its min(n, Linf) readings in a cell or none: the count is a sum of a subset of them.
    for released, capped in zip(count.tolist(), cells["capped"], strict=True):
        reachable = {0}
        for c in capped:
            reachable |= {r + c for r in reachable}
        assert released in reachable, (released, capped)
    # Values stay clamped: each cell's sum lies between count * lower and count * upper.
    lower = np.array([METRICS[m][1] for m in cells["metric"]])
    upper = np.array([METRICS[m][2] for m in cells["metric"]])
    total = np.array(cells["sum"])
    assert (total >= count * lower - 1e-6).all() and (total <= count * upper + 1e-6).all()

    # Every entity keeps exactly min(k, L0) cells and min(n, Linf) readings in each. In this data all of an entity's
    # cells hold the same number of readings (3 an hour), so its kept total does not depend on the random choice.
    per_entity = con.sql("SELECT * FROM per_entity").to_arrow_table().to_pydict()
    assert per_entity["least_kept"] == per_entity["most_kept"]
    assert min(per_entity["cells"]) > L0 and min(con.sql("SELECT n FROM pairs").fetchnumpy()["n"]) > LINF  # caps bind
    expected_total = sum(per_entity["most_kept"])
    assert expected_total == len(fed.raw) * 12 * L0 * LINF  # 12 entities per institution in the fixture
    assert count.sum() == expected_total

    # The local reports: every accepted reading is either contributed or left out by bounding.
    kept_by_institution = dict(
        con.sql("SELECT institution, sum(most_kept)::BIGINT FROM per_entity GROUP BY ALL").fetchall()
    )
    for inst, raw in fed.raw.items():
        report = summary.row_counts[inst]
        assert report["read"] == report["accepted"] + sum(report["rejected"].values())
        assert report == {
            "read": raw.num_rows,
            "accepted": raw.num_rows,
            "rejected": {},
            "bounded": raw.num_rows - kept_by_institution[inst],
        }
    assert sum(r["accepted"] - r["bounded"] for r in summary.row_counts.values()) == count.sum()


def test_entity_level_sensitivity_and_noise(make_federation, tmp_path):
    fed = make_federation(noise=False)
    event_text = fed.config_path.read_text()
    switch_to_entity_level(fed)
    plan = plan_release(load_config(fed.config_path), START, END)
    encodings = list(plan.params.encodings)
    assert plan.params.sensitivity == entity_level_sensitivity(encodings, max_partitions=L0, max_per_partition=LINF)

    # The same config with noise on, at event level and at entity level: one epsilon, more noise for the entity.
    event = release_parameters(parse_config(tomllib.loads(with_noise(event_text)), base=tmp_path))
    entity = release_parameters(parse_config(tomllib.loads(with_noise(fed.config_path.read_text())), base=tmp_path))
    assert entity.sensitivity == plan.params.sensitivity
    assert event.total_variance > 0
    assert entity.total_variance > event.total_variance
    target = fed.config.privacy.epsilon
    assert event.epsilon <= target and entity.epsilon <= target
    # Event-level noise would not protect an entity at this epsilon.
    l1, l2, delta = entity.sensitivity.l1, entity.sensitivity.l2, entity.delta
    assert epsilon_for(variance=event.total_variance, l1=l1, l2=l2, delta=delta) > target


# --- coverage of the 95% intervals on known truth -----------------------------------------------------------------

COVERAGE = (0.93, 0.97)  # 1,920 cells: the binomial SD of a 95% coverage fraction is 0.5%, so +-2% is ~ +-4 SD
REGIONS_10 = tuple(f"region-{i}" for i in range(10))
HOUR = timedelta(hours=1)


@pytest.fixture(scope="module")
def noisy_params() -> ReleaseParameters:
    """Event-level parameters of a test config at epsilon 1, with noise on (the variance V to add)."""
    text = config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2, noise=True, seed=None)
    return release_parameters(parse_config(tomllib.loads(text)))


def known_truth(
    layout: PartitionLayout, params: ReleaseParameters, seed: int
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """Readings (READING_SCHEMA) with 50..500 per cell, values on the resolution grid inside each cell's own random
    sub-range of the clamp bounds (so true means span the range); and the true count, sum and mean per cell."""
    rng = np.random.default_rng(seed)
    metric_idx, region_idx, window_idx = layout.cell_coordinates()
    counts = rng.integers(50, 501, size=layout.cells)
    steps_low = np.array([math.ceil(e.lower / e.resolution - 1e-9) for e in params.encodings])[metric_idx]
    steps_high = np.array([math.floor(e.upper / e.resolution + 1e-9) for e in params.encodings])[metric_idx]
    a, b = np.sort(rng.integers(steps_low, steps_high + 1, size=(2, layout.cells)), axis=0)
    cell_of_row = np.repeat(np.arange(layout.cells), counts)
    steps = rng.integers(a[cell_of_row], b[cell_of_row] + 1)  # integer resolution steps, inside the bounds
    resolution = np.array([e.resolution for e in params.encodings])[metric_idx]
    values = steps * resolution[cell_of_row]
    window_us = int(layout.window.total_seconds() * 1e6)
    start_us = int(layout.start.timestamp() * 1e6)
    micros = start_us + window_idx[cell_of_row] * window_us + rng.integers(0, window_us, size=cell_of_row.size)
    rows = cell_of_row.size
    table = pa.table(
        {
            "entity_id": pa.array(np.char.add("meter-", (np.arange(rows) % 997).astype(str)).astype(object)),
            "region": pa.array(np.array(layout.regions, dtype=object)[region_idx[cell_of_row]]),
            "metric": pa.array(np.array(layout.metrics, dtype=object)[metric_idx[cell_of_row]]),
            "event_time": pa.array(micros, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "value": pa.array(values, pa.float64()),
            "sensor_id": pa.nulls(rows, pa.string()),
        },
        schema=READING_SCHEMA,
    )
    true_sum = np.bincount(cell_of_row, weights=steps, minlength=layout.cells) * resolution
    return table, {"count": counts.astype(float), "sum": true_sum, "mean": true_sum / counts}


def decode(totals: np.ndarray, layout: PartitionLayout, params: ReleaseParameters, variance: float) -> dict:
    table = decode_release(
        totals,
        layout=layout,
        params=params,
        units=tuple(unit for unit, *_ in METRICS.values()),
        noise_variance=variance,
        contributors=2,
        release_id="coverage",
        released_at=datetime(2026, 1, 3, tzinfo=UTC),
    )
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reported_95_percent_intervals_cover_the_truth(noisy_params: ReleaseParameters, seed: int) -> None:
    layout = PartitionLayout.for_interval(tuple(METRICS), REGIONS_10, START, START + 96 * HOUR, HOUR)
    assert layout.cells == 1920
    readings, truth = known_truth(layout, noisy_params, seed)
    packed = aggregate_readings(readings, layout=layout, encodings=noisy_params.encodings)

    # Without noise the decoder recovers the truth exactly, so any miss below is the noise and its intervals.
    exact = decode(packed, layout, noisy_params, 0.0)
    np.testing.assert_array_equal(exact["count"], truth["count"])
    np.testing.assert_allclose(exact["sum"], truth["sum"], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(exact["mean"], truth["mean"], rtol=1e-12)

    variance = noisy_params.total_variance
    noise = SkellamNoise(variance, generator=seeded_generator(seed)).sample(layout.slots)
    cells = decode(packed + noise, layout, noisy_params, variance)
    # The noise matters: the count SD is several readings, and most counts come out visibly off.
    assert (cells["count_sd"] > 5).all()
    assert np.mean(np.abs(cells["count"] - truth["count"]) > 1) > 0.8

    released = ~np.isnan(cells["mean"])
    assert released.mean() > 0.99  # counts of 50+ against an SD under 8: the mean is released almost everywhere
    for statistic, mask in (("count", slice(None)), ("sum", slice(None)), ("mean", released)):
        covered = (cells[f"{statistic}_ci_low"][mask] <= truth[statistic][mask]) & (
            truth[statistic][mask] <= cells[f"{statistic}_ci_high"][mask]
        )
        assert COVERAGE[0] <= covered.mean() <= COVERAGE[1], f"{statistic}: coverage {covered.mean():.3f}"
