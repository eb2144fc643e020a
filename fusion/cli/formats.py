"""How a query result is written: CSV, JSON lines, or the cells of a terminal table, for every Arrow type a query
can return. Written batch by batch, so a large result streams out instead of being held whole.

CSV has no nested values: lists, structs and maps are written as JSON text in their cell, as are binary values
(hex) and intervals. JSON lines are strict JSON: NaN and infinities, which JSON cannot hold, are written as null;
decimals as numbers; times as text ("2026-01-01 00:00:00+00:00"); binary values as hex.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv


def _json_default(value: Any) -> Any:
    """What JSON cannot hold as such: decimals as numbers, bytes as hex, times and the rest as text."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def json_text(value: Any) -> str:
    """One value (or row) as strict JSON."""
    try:
        return json.dumps(value, default=_json_default, allow_nan=False)
    except ValueError:  # a NaN or an infinity somewhere in it
        return json.dumps(_finite(value), default=_json_default, allow_nan=False)


def _csv_native(kind: pa.DataType) -> bool:
    """Whether Arrow's CSV writer writes this type as text people read back."""
    if pa.types.is_dictionary(kind):
        return _csv_native(kind.value_type)
    return bool(
        pa.types.is_null(kind) or pa.types.is_boolean(kind) or pa.types.is_integer(kind)
        or pa.types.is_floating(kind) or pa.types.is_decimal(kind) or pa.types.is_date(kind)
        or pa.types.is_time(kind) or pa.types.is_timestamp(kind) or pa.types.is_duration(kind)
        or pa.types.is_string(kind) or pa.types.is_large_string(kind)
    )


def _csv_column(column: pa.Array) -> pa.Array:
    if _csv_native(column.type):
        return column
    if pa.types.is_string_view(column.type):
        return pc.cast(column, pa.string())
    return pa.array([None if value is None else _csv_text(value) for value in python_values(column)], pa.string())


def _csv_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict | list | tuple):
        return json_text(value)
    return str(value)


def csv_schema(schema: pa.Schema) -> pa.Schema:
    """The schema of `csv_batch`'s output: columns CSV cannot hold become text."""
    return pa.schema([field if _csv_native(field.type) else pa.field(field.name, pa.string()) for field in schema])


def csv_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` with the columns CSV cannot hold as JSON text (lists, structs, maps, binary, intervals)."""
    return pa.RecordBatch.from_arrays([_csv_column(column) for column in batch.columns],
                                      schema=csv_schema(batch.schema))


def write_csv(schema: pa.Schema, batches: Iterable[pa.RecordBatch], out: TextIO) -> int:
    """Write a header, then each batch as it comes; returns the rows written."""
    rows = 0
    header = True
    for batch in batches:
        _write_csv_part(pa.Table.from_batches([csv_batch(batch)]), out, header=header)
        header = False
        rows += batch.num_rows
    if header:  # no rows: the header alone
        _write_csv_part(csv_schema(schema).empty_table(), out, header=True)
    return rows


def _write_csv_part(table: pa.Table, out: TextIO, *, header: bool) -> None:
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink, write_options=pacsv.WriteOptions(include_header=header))
    out.write(sink.getvalue().to_pybytes().decode())


def write_json_lines(batches: Iterable[pa.RecordBatch], out: TextIO) -> int:
    """Write one JSON object per row, each batch as it comes; returns the rows written. A column name that
    repeats (`SELECT 1 AS a, 2 AS a`) is a key once: later ones get a suffix (a_1)."""
    rows = 0
    for batch in batches:
        names = unique_names(batch.schema.names)
        columns = [python_values(column) for column in batch.columns]
        out.writelines(json_text(dict(zip(names, values, strict=True))) + "\n" for values in zip(*columns, strict=True))
        rows += batch.num_rows
    return rows


def python_values(column: pa.Array) -> list[Any]:
    """A column's values as Python objects; a date or time Python cannot hold (SQL allows years past 9999 and
    before 1, and infinity) makes its column's dates and times text, as Arrow writes them, at any depth (in lists,
    structs, maps and unions)."""
    try:
        return column.to_pylist()
    except (OverflowError, ValueError):
        kind = column.type
        if pa.types.is_union(kind) and kind.mode == "sparse":  # DuckDB's unions: each member as long as the union
            members = [python_values(column.field(index)) for index in range(kind.num_fields)]
            codes = [kind.type_codes.index(code) for code in column.type_codes.to_pylist()]
            return [members[member][row] for row, member in enumerate(codes)]
        text = _temporal_as_text(kind)
        if text == kind:
            raise
        return pc.cast(column, text).to_pylist()


def _temporal_as_text(kind: pa.DataType) -> pa.DataType:
    """`kind` with each date or time type in it, at any depth, made text."""
    if pa.types.is_temporal(kind):
        return pa.string()
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(_temporal_as_text(field.type)) for field in kind])
    if pa.types.is_map(kind):
        return pa.map_(kind.key_field.with_type(_temporal_as_text(kind.key_type)),
                       kind.item_field.with_type(_temporal_as_text(kind.item_type)))
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(kind.value_field.with_type(_temporal_as_text(kind.value_type)), kind.list_size)
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_temporal_as_text(kind.value_type)))
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_temporal_as_text(kind.value_type)))
    return kind


def unique_names(names: list[str]) -> list[str]:
    """`names` with each repeat suffixed _1, _2, ... (skipping names already taken).

    >>> unique_names(["a", "a", "a_1", "b"])
    ['a', 'a_2', 'a_1', 'b']
    """
    taken = set(names)
    out: list[str] = []
    for name in names:
        unique, suffix = name, 0
        while unique in out or (unique != name and unique in taken):
            suffix += 1
            unique = f"{name}_{suffix}"
        out.append(unique)
    return out


def cell_text(value: Any) -> str:
    """A value as a terminal table shows it: floats to 6 significant digits, nested values as JSON, text `visible`."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=_json_default)
    if isinstance(value, bytes):
        return value.hex()
    return visible(str(value))


#: The Unicode categories `visible` writes as escapes: control characters (C0, DEL, C1), format characters (bidi
#: overrides and isolates, zero-width characters), surrogates, private-use and unassigned code points, and the line
#: and paragraph separators. Spaces stay.
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def visible(text: str) -> str:
    """`text` with every character a terminal would act on or hide rather than show written as its escape (ESC as
    \\x1b, U+202E as \\u202e), a line break excepted (a table keeps it within its cell): text from the store or a
    query (a release id, a reason, a column name) must not move the cursor, rewrite lines already printed, or
    reorder what is shown. CSV and JSON lines write values as they are: they are data, not a screen."""
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(
        _escaped(ch) if ch != "\n" and unicodedata.category(ch) in _HIDDEN else ch for ch in text
    )


def _escaped(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


__all__ = ["cell_text", "csv_batch", "csv_schema", "json_text", "visible", "write_csv", "write_json_lines"]
