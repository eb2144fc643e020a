"""The scan's hashed de-duplication (equal 64-bit row hashes, then a full comparison of the few candidates)
against its slow, obvious reference, on real Parquet feeds."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion.feeds.scan import KEY, ROW, SOURCE, FeedScanner
from fusion.release.contribution import Duplicates, deduplicate_reference, find_duplicates
from fusion.release.plan import ReleasePlan, plan_release
from schemas.readings import READING_SCHEMA
from tests.conftest import Federation

START = datetime(2026, 1, 1, tzinfo=UTC)

# Few distinct values per field, so readings equal in some fields but not all, and exact duplicates, are both
# common; -0.0 and 0.0 are the same reading (validation types both as 0.0).
_row = st.tuples(
    st.sampled_from(["m1", "m2", "m3"]),
    st.sampled_from(["north", "south"]),
    st.sampled_from(["temp", "load"]),
    st.integers(0, 3),
    st.sampled_from([0.0, -0.0, 1.5, 2.0]),
    st.sampled_from([None, "s1", "s2"]),
)


def table(rows: list[tuple[str, str, str, int, float, str | None]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "entity_id": e,
                "region": r,
                "metric": m,
                "event_time": START + timedelta(seconds=t),
                "value": v,
                "sensor_id": s,
            }
            for e, r, m, t, v, s in rows
        ],
        schema=READING_SCHEMA,
    )


@pytest.fixture
def alpha(make_federation: Callable[..., Federation]) -> tuple[Federation, ReleasePlan]:
    federation = make_federation(institutions=[("alpha", "parquet"), ("beta", "parquet")])
    return federation, plan_release(federation.config, START, START + timedelta(hours=6))


def scanned_duplicates(federation: Federation, plan: ReleasePlan, readings: pa.Table, files: int = 2) -> Duplicates:
    """The scan's hashed de-duplication of `readings`, written as `files` Parquet files of alpha's feed."""
    folder = federation.directory / "feeds" / "alpha"
    for old in folder.glob("*.parquet"):
        old.unlink()
    cut = readings.num_rows // files
    for i in range(files):
        part = readings.slice(i * cut, None if i == files - 1 else cut)
        pq.write_table(part, folder / f"part-{i}.parquet")
    scanner = FeedScanner(plan, plan.config.institution("alpha"))
    encoded = scanner.scan(0, 1).table(scanner.schema)
    assert encoded.num_rows == readings.num_rows  # every row is valid here
    return find_duplicates(
        encoded.column(KEY).to_numpy(),
        encoded.column(SOURCE).to_numpy(),
        encoded.column(ROW).to_numpy(),
        scanner.readings_at,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row, min_size=1, max_size=40))
def test_hashed_deduplication_matches_the_reference(
    alpha: tuple[Federation, ReleasePlan], rows: list[tuple[str, str, str, int, float, str | None]]
) -> None:
    federation, plan = alpha
    readings = table(rows)
    found = scanned_duplicates(federation, plan, readings)
    _, expected = deduplicate_reference(table([(e, r, m, t, v + 0.0, s) for e, r, m, t, v, s in rows]))
    assert found.readings.to_pylist() == expected.to_pylist()
    assert sorted(found.indices.tolist()) == sorted(set(found.indices.tolist()))


def test_same_time_and_value_from_different_entities_are_not_duplicates(alpha: tuple[Federation, ReleasePlan]) -> None:
    readings = table([("m1", "north", "temp", 0, 1.5, None), ("m2", "north", "temp", 0, 1.5, None)])
    assert scanned_duplicates(*alpha, readings).indices.size == 0


def test_the_first_copy_is_kept_and_later_copies_are_duplicates(alpha: tuple[Federation, ReleasePlan]) -> None:
    rows = [("m1", "north", "temp", 1, 2.0, "s1"), ("m2", "south", "load", 2, 1.5, None)]
    readings = table([rows[0], rows[1], rows[0], rows[0]])
    found = scanned_duplicates(*alpha, readings)
    # two files: rows 0-1 in part-0, rows 2-3 in part-1; the first copy (part-0, row 0) is kept
    assert sorted(zip(found.sources.tolist(), found.rows.tolist(), strict=True)) == [(1, 0), (1, 1)]
    assert found.readings.to_pylist() == table([rows[0], rows[0]]).to_pylist()
