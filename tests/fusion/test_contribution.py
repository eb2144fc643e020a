"""Local aggregation helpers: the fast de-duplication against its slow, obvious reference."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.contribution import deduplicate, deduplicate_reference, split_by_entity_shard
from schemas.readings import READING_SCHEMA

START = datetime(2026, 1, 1, tzinfo=UTC)

# Few distinct values per field, so equal times and values with different entities (the fast path's candidates
# that are not duplicates) and exact duplicates are both common.
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


@settings(max_examples=200, deadline=None)
@given(st.lists(_row, max_size=40))
def test_deduplicate_matches_the_reference(rows: list[tuple[str, str, str, int, float, str | None]]) -> None:
    readings = table(rows)
    kept, duplicates = deduplicate(readings)
    ref_kept, ref_duplicates = deduplicate_reference(readings)
    assert kept.to_pylist() == ref_kept.to_pylist()
    assert duplicates.to_pylist() == ref_duplicates.to_pylist()
    assert kept.num_rows + duplicates.num_rows == readings.num_rows


def test_same_time_and_value_from_different_entities_are_not_duplicates() -> None:
    readings = table([("m1", "north", "temp", 0, 1.5, None), ("m2", "north", "temp", 0, 1.5, None)])
    kept, duplicates = deduplicate(readings)
    assert kept.num_rows == 2 and duplicates.num_rows == 0


def test_the_first_copy_is_kept_and_later_copies_are_duplicates() -> None:
    rows = [("m1", "north", "temp", 1, 2.0, "s1"), ("m2", "south", "load", 2, 1.5, None)]
    readings = table([rows[0], rows[1], rows[0], rows[0]])
    kept, duplicates = deduplicate(readings)
    assert kept.to_pylist() == table(rows).to_pylist()
    assert duplicates.to_pylist() == table([rows[0], rows[0]]).to_pylist()


def test_entity_shards_keep_every_row_and_each_entity_in_one_shard() -> None:
    rows = [(f"m{i % 7}", "north", "temp", i, float(i), None) for i in range(50)]
    readings = table(rows)
    parts = split_by_entity_shard(readings, 4)
    assert sum(t.num_rows for _, t in parts) == readings.num_rows
    owner: dict[str, int] = {}
    for shard, part in parts:
        for entity in part.column("entity_id").to_pylist():
            assert owner.setdefault(entity, shard) == shard
    assert sorted(r for _, t in parts for r in t.column("event_time").to_pylist()) == sorted(
        readings.column("event_time").to_pylist()
    )
