"""JSON lines parsed a block at a time (Arrow) read exactly as the per-line reader (`json.loads`) reads them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.feeds import files as feeds
from fusion.feeds.files import RawBatch, _jsonl_batches, _read_jsonl

WANTED = ["entity_id", "value", "event_time"]


def per_line(data: bytes) -> tuple[list[dict[str, object]], list[tuple[int, str]]]:
    """The slow, obvious reference: every line through json.loads."""
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="replace")
    batches = list(_jsonl_batches(text, WANTED, 1000))
    return rows_and_malformed(batches)


def number_or_text(cell: str | None) -> object:
    """A JSON number's text as its value: Arrow writes 3 as 3.0 in a column it read as floats, 1e-05 as 0.00001
    (the same reading; validation parses the text)."""
    try:
        value = json.loads(cell) if cell is not None else None
    except ValueError:
        return cell
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else cell


def rows_and_malformed(batches: list[RawBatch]) -> tuple[list[dict[str, object]], list[tuple[int, str]]]:
    tables = [b.table.select(WANTED) for b in batches if b.table.num_rows]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    rows = [{k: number_or_text(v) for k, v in row.items()} for row in rows]
    return rows, [m for b in batches for m in b.malformed]


def by_blocks(tmp_path: Path, data: bytes) -> tuple[list[dict[str, object]], list[tuple[int, str]]]:
    path = tmp_path / "feed.jsonl"
    path.write_bytes(data)
    return rows_and_malformed(list(_read_jsonl(str(path), WANTED, 1000)))


TRICKY = [
    b'{"entity_id": "a", "value": 1.5, "event_time": "2026-01-01T00:00:00Z"}\n',
    b'{"entity_id": "a", "value": 2.0, "event_time": "2026-01-01T00:00:00+00:00"}\n{"value": 3}\n',
    b'\xef\xbb\xbf{"entity_id": "bom", "value": 1}\n',
    b'{"entity_id": "x", "entity_id": "y"}\n{"entity_id": "z"}\n',  # a repeated key is malformed
    b'{"entity_id": "a"} {"entity_id": "b"}\n',  # two objects on a line: malformed
    b'[1, 2]\nnull\n"text"\n{"value": NaN}\n',
    b'{"value": {"nested": [1]}, "entity_id": 7}\n',
    b'{"value": true, "event_time": 1767225600}\n\n   \n{"value": "abc"}',  # blank lines, no final newline
    b'{"entity_id": "\\u00e9", "value": -3.0}\r\n{"entity_id": "crlf"}\r\n',
    b'{"entity_id": "\xff\xfe bad utf-8"}\n{"entity_id": "ok"}\n',
    b'{"value": 1}\n{"value": "1"}\n',  # types mixed in a column
    b'{"other": {"deep": [1, {"x": null}]}, "value": 5}\n',
    b'\n  \n{"entity_id": "after blank lines"}\n\t\n',
    b'{"entity_id": "a", "value": "1"}\n{"entity_id": 2, "value": "2"}\n',  # text first, a number later
    b'{"event_time": "2026-01-01T00:00:00Z"}\n{"event_time": 1767225600}\n',
]


def test_tricky_blocks_read_as_line_by_line(tmp_path: Path) -> None:
    for data in TRICKY:
        assert by_blocks(tmp_path, data) == per_line(data), data


def test_a_file_larger_than_a_block_keeps_its_line_numbers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(feeds, "JSONL_BLOCK_BYTES", 64)  # many blocks, some cut mid-line, one with a bad line
    lines = [
        json.dumps({"entity_id": f"e{i}", "value": i / 4, "event_time": "2026-01-01T00:00:00Z"}) for i in range(40)
    ]
    lines[23] = "{broken"
    data = ("\n".join(lines) + "\n").encode()
    rows, malformed = by_blocks(tmp_path, data)
    assert (rows, malformed) == per_line(data)
    assert malformed == [(24, "{broken")] and len(rows) == 39


NOT_OBJECTS = [b"null", b"true", b"42", b'"x"', b"[]"]
READING = b'{"entity_id": "a", "value": 1.5, "event_time": "2026-01-01T00:00:00Z"}'


def test_a_line_that_is_not_an_object_is_malformed_first_or_later(tmp_path: Path) -> None:
    """`null` first in a block crashed Arrow's JSON reader (the process died); `null` later was a record missing
    every field. Each is one malformed record, with its line number, and the readings around it are kept."""
    for line in NOT_OBJECTS:
        for data, number in ((line + b"\n" + READING + b"\n", 1), (READING + b"\n  " + line + b"\r\n" + READING, 2)):
            rows, malformed = by_blocks(tmp_path, data)
            assert (rows, malformed) == per_line(data), data
            assert [n for n, _ in malformed] == [number] and len(rows) == data.count(b"{"), data
            assert feeds._parsed_at_once(data, WANTED) is None, data


def test_a_line_of_white_space_json_does_not_know_is_malformed(tmp_path: Path) -> None:
    """Only JSON's white space (space, tab, line ends) makes a line blank: one of a form feed, a no-break space,
    U+2028 or an information separator alone was skipped, uncounted."""
    data = READING + "\n\x0c\n\u00a0\n\u2028\n\x1c\n \t\n".encode()
    rows, malformed = by_blocks(tmp_path, data)
    assert (rows, malformed) == per_line(data)
    assert [n for n, _ in malformed] == [2, 3, 4, 5] and len(rows) == 1


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.text(max_size=8),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).map(lambda f: round(f, 3)),
)
records = st.dictionaries(st.sampled_from([*WANTED, "extra"]), values, max_size=4)


@settings(max_examples=60, deadline=None)
@given(st.lists(records, max_size=12))
def test_any_block_of_objects_reads_as_line_by_line(tmp_path_factory, objects) -> None:
    data = "".join(json.dumps(o) + "\n" for o in objects).encode()
    assert by_blocks(tmp_path_factory.mktemp("b"), data) == per_line(data)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(records.map(json.dumps), st.sampled_from(NOT_OBJECTS).map(bytes.decode)), max_size=12))
def test_any_block_of_objects_and_other_values_reads_as_line_by_line(tmp_path_factory, lines) -> None:
    data = "".join(line + "\n" for line in lines).encode()
    rows, malformed = by_blocks(tmp_path_factory.mktemp("b"), data)
    assert (rows, malformed) == per_line(data)
    assert len(rows) + len(malformed) == len(lines)


def test_a_typical_block_is_parsed_at_once_not_line_by_line() -> None:
    """Readings as gateways send them (text, numbers, ISO times) take the fast path; a repeated key does not."""
    data = b"".join(
        json.dumps({"entity_id": f"e{i}", "value": i * 0.5, "event_time": f"2026-01-01T00:00:{i:02d}Z"}).encode()
        + b"\n"
        for i in range(50)
    )
    table = feeds._parsed_at_once(data, WANTED)
    assert table is not None and table.num_rows == 50
    assert table.column("event_time")[3].as_py() == "2026-01-01T00:00:03Z" and table.column("value")[2].as_py() == "1.0"
    assert feeds._parsed_at_once(b'{"value": 1, "value": 2}\n', WANTED) is None
