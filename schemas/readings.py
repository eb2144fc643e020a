"""The Arrow schema of one sensor reading, as every institution's pipeline sees it after column mapping."""

from __future__ import annotations

import string

import pyarrow as pa

#: Logical reading fields; feeds map their own column names onto these.
ENTITY_ID = "entity_id"
REGION = "region"
METRIC = "metric"
EVENT_TIME = "event_time"
VALUE = "value"
SENSOR_ID = "sensor_id"

REQUIRED_FIELDS: tuple[str, ...] = (ENTITY_ID, REGION, METRIC, EVENT_TIME, VALUE)
OPTIONAL_FIELDS: tuple[str, ...] = (SENSOR_ID,)
ALL_FIELDS: tuple[str, ...] = REQUIRED_FIELDS + OPTIONAL_FIELDS

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def folded_name(name: str) -> str:
    """A column name as DuckDB (which validates feeds) matches it: ASCII letters in lower case. DuckDB binds names
    ignoring ASCII case only (`Value` and `value` are one name to it, `Ä` and `ä` two), so of two columns whose
    folded names are equal it cannot read either by name for certain."""
    return name.translate(_ASCII_LOWER)

#: A validated reading. Event time is UTC with microsecond resolution.
READING_SCHEMA = pa.schema(
    [
        pa.field(ENTITY_ID, pa.string(), nullable=False),
        pa.field(REGION, pa.string(), nullable=False),
        pa.field(METRIC, pa.string(), nullable=False),
        pa.field(EVENT_TIME, pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field(VALUE, pa.float64(), nullable=False),
        pa.field(SENSOR_ID, pa.string(), nullable=True),
    ]
)

#: Columns added to every dead-letter row beside the raw fields.
DEAD_LETTER_REASON = "_reason"
DEAD_LETTER_SOURCE = "_source"
DEAD_LETTER_ROW = "_row"
