"""Arrow tables through a shuffle as compressed IPC bytes: the round trip is exact."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from fusion.transport import table_from_bytes, table_to_bytes
from schemas.readings import READING_SCHEMA


def test_round_trip_keeps_schema_values_and_nulls() -> None:
    table = pa.table(
        {
            "entity_id": ["m1", "m2", "m3"],
            "region": ["north", "south", "north"],
            "metric": ["temp", "load", "temp"],
            "event_time": [datetime(2026, 1, 1, h, tzinfo=UTC) for h in range(3)],
            "value": [1.5, -0.0, 1e300],
            "sensor_id": [None, "s1", None],
        },
        schema=READING_SCHEMA,
    )
    back = table_from_bytes(table_to_bytes(table))
    assert back.schema == table.schema
    assert back.equals(table)


def test_empty_and_sliced_tables() -> None:
    empty = READING_SCHEMA.empty_table()
    assert table_from_bytes(table_to_bytes(empty)).equals(empty)
    numbers = pa.table({"x": list(range(100))})
    assert table_from_bytes(table_to_bytes(numbers.slice(10, 5))).column("x").to_pylist() == list(range(10, 15))
