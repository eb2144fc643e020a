"""Reading feed files (CSV, JSONL, Parquet) as raw Arrow batches, and finding a feed's files for an interval."""

from __future__ import annotations

import csv
import gzip
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion.config.federation import FeedConfig
from fusion.errors import FusionError
from fusion.feeds.files import (
    RawBatch,
    feed_files,
    list_feed_files,
    mapped_columns,
    read_feed_file,
    read_jsonl_lines,
)
from schemas.readings import ALL_FIELDS, ENTITY_ID, EVENT_TIME, METRIC, REGION, SENSOR_ID, VALUE

HEADER = ["entity_id", "region", "metric", "event_time", "value", "extra"]


def feed(fmt: str, **columns: str) -> FeedConfig:
    return FeedConfig(name="main", path="unused", format=fmt, columns=columns)


def read_all(path: Path, cfg: FeedConfig, batch_rows: int = 1 << 20) -> list[RawBatch]:
    return list(read_feed_file(str(path), cfg, batch_rows=batch_rows))


def concat(batches: list[RawBatch]) -> pa.Table:
    return pa.concat_tables([b.table for b in batches])


# --- CSV --------------------------------------------------------------------------------------------------


def test_csv_reads_mapped_columns_as_text_and_keeps_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "feed.csv"
    path.write_text(
        "entity_id,region,metric,event_time,value,extra\n"
        "007,north,temp,2026-01-01T00:00:00Z,1.50,x\n"
        "e2,south,load,2026-01-01T01:00:00Z,2,y,TOO,MANY\n"  # too many fields: malformed
        "e3,,temp,2026-01-01T02:00:00Z,NaN,z\n"  # empty field: null
        'e4,"",temp,n/a,"",w\n'  # quoted empty strings and "n/a" are text, not null
        "e5,east,load,2026-01-01T03:00:00Z,1e3,v\n"
    )
    batches = read_all(path, feed("csv"))
    table = concat(batches)
    assert table.column_names == list(ALL_FIELDS)  # unmapped "extra" dropped, absent sensor_id added as nulls
    assert all(t == pa.string() for t in table.schema.types)
    assert table.to_pylist() == [
        {
            ENTITY_ID: "007",
            REGION: "north",
            METRIC: "temp",
            EVENT_TIME: "2026-01-01T00:00:00Z",
            VALUE: "1.50",
            SENSOR_ID: None,
        },
        {
            ENTITY_ID: "e3",
            REGION: None,
            METRIC: "temp",
            EVENT_TIME: "2026-01-01T02:00:00Z",
            VALUE: "NaN",
            SENSOR_ID: None,
        },
        {ENTITY_ID: "e4", REGION: "", METRIC: "temp", EVENT_TIME: "n/a", VALUE: "", SENSOR_ID: None},
        {
            ENTITY_ID: "e5",
            REGION: "east",
            METRIC: "load",
            EVENT_TIME: "2026-01-01T03:00:00Z",
            VALUE: "1e3",
            SENSOR_ID: None,
        },
    ]
    malformed = [m for b in batches for m in b.malformed]
    assert [text for _, text in malformed] == ["e2,south,load,2026-01-01T01:00:00Z,2,y,TOO,MANY"]
    assert sum(b.rows for b in batches) == 5  # the malformed line counts as a row read


def test_csv_too_few_fields_is_malformed_too(tmp_path: Path) -> None:
    path = tmp_path / "feed.csv"
    path.write_text("entity_id,region,metric,event_time,value\na,north,temp,2026-01-01T00:00:00Z,1\nb,north\n")
    batches = read_all(path, feed("csv"))
    assert concat(batches).column(ENTITY_ID).to_pylist() == ["a"]
    assert [text for b in batches for _, text in b.malformed] == ["b,north"]
    assert sum(b.rows for b in batches) == 2


def test_csv_with_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "feed.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["device", "zone", "kind", "ts", "reading", "probe"])
        writer.writerows(
            [["d1", "north", "temp", "1767225600", "3.5", "p1"], ["d2", "east", "load", "1767225660", "4", ""]]
        )
    cfg = feed(
        "csv", entity_id="device", region="zone", metric="kind", event_time="ts", value="reading", sensor_id="probe"
    )
    assert mapped_columns(cfg) == {
        ENTITY_ID: "device",
        REGION: "zone",
        METRIC: "kind",
        EVENT_TIME: "ts",
        VALUE: "reading",
        SENSOR_ID: "probe",
    }
    table = concat(read_all(path, cfg))
    assert table.column_names == ["device", "zone", "kind", "ts", "reading", "probe"]
    assert table.column("ts").to_pylist() == ["1767225600", "1767225660"]
    assert table.column("probe").to_pylist() == ["p1", None]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_gzip_compressed_feed(tmp_path: Path, fmt: str) -> None:
    """Feeds are opened with CompressionTypes.AUTO, so a .gz file should read like the plain one."""
    path = tmp_path / f"feed.{fmt}.gz"
    with gzip.open(path, "wt") as handle:
        if fmt == "csv":
            handle.write("entity_id,value\na,1.5\nb,2,3\n")
        else:
            handle.write(json.dumps({ENTITY_ID: "a", VALUE: 1.5}) + "\n[2]\n")
    batches = read_all(path, feed(fmt))
    assert concat(batches).select([ENTITY_ID, VALUE]).to_pylist() == [{ENTITY_ID: "a", VALUE: "1.5"}]
    assert sum(len(b.malformed) for b in batches) == 1


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_truncated_gzip_feed_is_damage_not_a_shorter_file(tmp_path: Path, fmt: str) -> None:
    """A .gz cut off inside its stream used to read as a normal end of file: the rows after the cut vanished
    and the last line was read cut short (5.1 as 5)."""
    if fmt == "csv":
        text = "entity_id,value\n" + "".join(f"e{i},5.1\n" for i in range(2000))
    else:
        text = "".join(json.dumps({ENTITY_ID: f"e{i}", VALUE: "5.1"}) + "\n" for i in range(2000))
    data = text.encode()
    path = tmp_path / f"feed.{fmt}.gz"
    path.write_bytes(gzip.compress(data[:1001]) + gzip.compress(data[1001:]))  # two members (`cat a.gz b.gz`)
    assert concat(read_all(path, feed(fmt))).column(VALUE).to_pylist() == ["5.1"] * 2000
    whole = gzip.compress(data)
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(EOFError, match="truncated"):  # EOFError: the scan dead-letters the file whole
        read_all(path, feed(fmt))


@pytest.mark.parametrize(
    "text",
    [",".join(HEADER) + "\n", ",".join(HEADER), "\ufeff" + ",".join(HEADER), "\ufeff", "\n\n", ""],
    ids=["header", "header-without-line-end", "bom-and-header", "bom-only", "blank-lines", "empty"],
)
def test_a_csv_file_of_a_header_at_most_holds_no_rows(tmp_path: Path, text: str) -> None:
    """pyarrow refuses a header without its line end, or a byte-order mark alone ("Empty CSV file"): such a file
    was dead-lettered as unreadable, where a header with its line end, or an empty file, holds no rows."""
    path = tmp_path / "feed.csv"
    path.write_text(text, encoding="utf-8")
    assert read_all(path, feed("csv")) == []


@pytest.mark.parametrize("line_end", ["\n", ""])
def test_a_csv_header_lacking_a_column_says_so_with_or_without_its_line_end(tmp_path: Path, line_end: str) -> None:
    path = tmp_path / "feed.csv"
    path.write_text(",".join(h for h in HEADER if h != "value") + line_end)
    [batch] = read_all(path, feed("csv"))
    assert batch.rows == 0 and batch.missing_columns == ("value",)


# --- JSONL ------------------------------------------------------------------------------------------------


def test_jsonl_reads_text_and_keeps_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    lines = [
        json.dumps(
            {
                ENTITY_ID: "e1",
                REGION: "north",
                METRIC: "temp",
                EVENT_TIME: "2026-01-01T00:00:00Z",
                VALUE: 1.5,
                "extra": 1,
            }
        ),
        "this is not json {",
        "",  # blank lines are skipped, not counted
        json.dumps([1, 2, 3]),  # JSON, but not an object
        json.dumps({ENTITY_ID: 42, REGION: None, VALUE: True, SENSOR_ID: {"a": [1]}, EVENT_TIME: 1767225600}),
        '{"entity_id": "e3", "value": NaN, "metric": "temp"}',  # Python's json reads NaN
        "null",
        json.dumps({ENTITY_ID: "e4", VALUE: "abc"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    batches = read_all(path, feed("jsonl"))
    table = concat(batches)
    assert table.column_names == list(ALL_FIELDS)
    assert all(t == pa.string() for t in table.schema.types)
    assert table.to_pylist() == [
        {
            ENTITY_ID: "e1",
            REGION: "north",
            METRIC: "temp",
            EVENT_TIME: "2026-01-01T00:00:00Z",
            VALUE: "1.5",
            SENSOR_ID: None,
        },
        {ENTITY_ID: "42", REGION: None, METRIC: None, EVENT_TIME: "1767225600", VALUE: "true", SENSOR_ID: '{"a": [1]}'},
        {ENTITY_ID: "e3", REGION: None, METRIC: "temp", EVENT_TIME: None, VALUE: "NaN", SENSOR_ID: None},
        {ENTITY_ID: "e4", REGION: None, METRIC: None, EVENT_TIME: None, VALUE: "abc", SENSOR_ID: None},
    ]
    malformed = [m for b in batches for m in b.malformed]
    assert malformed == [(2, "this is not json {"), (4, "[1, 2, 3]"), (7, "null")]  # 1-based line numbers
    assert sum(b.rows for b in batches) == 7


@pytest.mark.parametrize("first", [True, False], ids=["first-line", "later-line"])
def test_a_json_line_nested_deeper_than_the_parser_goes_is_malformed_not_an_error(tmp_path: Path, first: bool) -> None:
    """Python's JSON parser raises RecursionError (not a ValueError) past about 1,000 levels: a 2 KB line of
    "[" escaped the reader, and a stream that had journalled it failed on it at every restart."""
    good = json.dumps({ENTITY_ID: "e1", REGION: "north", METRIC: "temp", EVENT_TIME: "2026-01-01T00:00:00Z",
                       VALUE: 1.5})
    deep = "[" * 5_000
    path = tmp_path / "feed.jsonl"
    path.write_text("\n".join([deep, good] if first else [good, deep, good]) + "\n")
    batches = read_all(path, feed("jsonl"))
    assert concat(batches).num_rows == (1 if first else 2)
    assert [text for b in batches for _, text in b.malformed] == [deep]


def test_jsonl_with_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text(json.dumps({"id": "x", "zone": "north", "kind": "load", "ts": 1, "reading": 2.0}) + "\n")
    cfg = feed("jsonl", entity_id="id", region="zone", metric="kind", event_time="ts", value="reading")
    table = concat(read_all(path, cfg))
    assert table.to_pylist() == [
        {"id": "x", "zone": "north", "kind": "load", "ts": "1", "reading": "2.0", SENSOR_ID: None}
    ]


def test_a_json_string_that_is_not_unicode_text_is_one_malformed_line(tmp_path: Path) -> None:
    """json.loads takes a lone surrogate escape ("\\ud800"), which no UTF-8 text holds: the whole file used to be
    unreadable (UnicodeEncodeError) for that one line, and a broker message the same."""
    record = {ENTITY_ID: "e1", REGION: "north", METRIC: "load", EVENT_TIME: "t", VALUE: 1.5}
    good = json.dumps(record)
    bad = json.dumps({**record, SENSOR_ID: "s"})[:-1] + ', "extra": "\\udfff"}'  # unmapped: not read, no matter
    lone = good[:-1] + ', "sensor_id": "s\\ud800"}'
    paired = good[:-1] + ', "sensor_id": "\\ud83d\\ude00"}'  # a pair is one character
    path = tmp_path / "feed.jsonl"
    path.write_text("\n".join([good, lone, bad, paired]) + "\n")
    lines = path.read_text().splitlines()
    for batches in (read_all(path, feed("jsonl")), list(read_jsonl_lines(lines, feed("jsonl"), batch_rows=100))):
        assert concat(batches).column(SENSOR_ID).to_pylist() == [None, "s", "\U0001f600"]
        assert [line for b in batches for line, _ in b.malformed] == [2]


def test_jsonl_only_malformed(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text("{oops\n[]\n")
    batches = read_all(path, feed("jsonl"))
    assert sum(b.table.num_rows for b in batches) == 0
    assert sum(b.rows for b in batches) == 2


def test_jsonl_with_a_byte_order_mark_keeps_its_first_record(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    record = {ENTITY_ID: "e1", REGION: "north", METRIC: "load", EVENT_TIME: "t", VALUE: 1.5}
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(record) + "\n").encode() * 2)
    batches = read_all(path, feed("jsonl"))
    assert concat(batches).column(ENTITY_ID).to_pylist() == ["e1", "e1"]
    assert all(b.malformed == () for b in batches)


def test_jsonl_duplicate_keys_and_long_lines_are_malformed_in_full(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    ambiguous = '{"entity_id": "e1", "region": "north", "metric": "load", "event_time": "t", "value": 1.5, "value": 9}'
    long_line = "{" + "x" * 20_000
    path.write_text(ambiguous + "\n" + long_line + "\n")
    batches = read_all(path, feed("jsonl"))
    assert concat(batches).num_rows == 0  # neither 1.5 nor 9: the record is ambiguous
    assert [m for b in batches for m in b.malformed] == [(1, ambiguous), (2, long_line)]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_file_with_a_mapped_column_twice_is_refused_naming_it(tmp_path: Path, fmt: str) -> None:
    names = [ENTITY_ID, REGION, METRIC, EVENT_TIME, VALUE, VALUE]
    row = ["e1", "north", "load", "2026-01-01T01:00:00Z", "1.5", "999"]
    path = tmp_path / f"feed.{fmt}"
    if fmt == "csv":
        path.write_text(",".join(names) + "\n" + ",".join(row) + "\n")
    else:
        pq.write_table(pa.Table.from_arrays([pa.array([v]) for v in row], names=names), path)
    with pytest.raises(FusionError, match=f"column '{VALUE}' appears 2 times"):
        read_all(path, feed(fmt))
    extra = tmp_path / f"unmapped.{fmt}"  # a duplicated column nobody maps is no ambiguity
    names[-1] = row[-1] = "note"
    if fmt == "csv":
        extra.write_text(",".join([*names, "note"]) + "\n" + ",".join([*row, "x"]) + "\n")
    else:
        pq.write_table(pa.Table.from_arrays([pa.array([v]) for v in [*row, "x"]], names=[*names, "note"]), extra)
    assert concat(read_all(extra, feed(fmt))).column(VALUE).to_pylist() == ["1.5"]


def test_a_csv_header_with_an_unclosed_quote_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "feed.csv"
    # Python's csv module reads on for the closing quote until its field limit (128 KiB) gives out.
    path.write_text('entity_id,"region,metric,event_time,value\n' + "e1,north,load,2026-01-01T01:00:00Z,1.5\n" * 4000)
    with pytest.raises(FusionError, match="unreadable CSV header"):
        read_all(path, feed("csv"))


# --- Parquet ----------------------------------------------------------------------------------------------


def test_parquet_keeps_native_types_and_only_mapped_columns(tmp_path: Path) -> None:
    path = tmp_path / "feed.parquet"
    when = [datetime(2026, 1, 1, h, tzinfo=UTC) for h in range(3)]
    table = pa.table(
        {
            ENTITY_ID: pa.array([1, 2, 3], pa.int64()),
            REGION: ["north", None, "east"],
            METRIC: ["temp", "load", "temp"],
            EVENT_TIME: pa.array(when, pa.timestamp("us", tz="UTC")),
            VALUE: pa.array([1.5, -2.0, None], pa.float64()),
            "extra": ["a", "b", "c"],
        }
    )
    pq.write_table(table, path)
    batches = read_all(path, feed("parquet"))
    got = concat(batches)
    assert got.equals(table.drop_columns(["extra"]))  # sensor_id is absent, not invented
    assert all(b.malformed == () for b in batches)
    assert sum(b.rows for b in batches) == 3


def test_parquet_with_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "feed.parquet"
    pq.write_table(
        pa.table(
            {
                "ts": pa.array([1767225600000], pa.int64()),
                "device": ["d"],
                "reading": [1.0],
                "zone": ["north"],
                "kind": ["temp"],
                "noise": [0],
            }
        ),
        path,
    )
    cfg = feed("parquet", entity_id="device", region="zone", metric="kind", event_time="ts", value="reading")
    got = concat(read_all(path, cfg))
    assert sorted(got.column_names) == ["device", "kind", "reading", "ts", "zone"]
    assert got.schema.field("ts").type == pa.int64()


# --- batching: several batches, no row lost ---------------------------------------------------------------


def _rows(n: int) -> list[list[str]]:
    return [[f"e{i:06d}", "north", "temp", f"2026-01-01T00:{i % 60:02d}:00Z", str(i % 50), "x"] for i in range(n)]


def test_parquet_batches(tmp_path: Path) -> None:
    n = 2500
    table = pa.table({n_: pa.array([r[i] for r in _rows(n)]) for i, n_ in enumerate(HEADER)})
    path = tmp_path / "feed.parquet"
    pq.write_table(table, path, row_group_size=700)
    batches = read_all(path, feed("parquet"), batch_rows=1000)
    assert len(batches) >= 3
    assert all(0 < b.table.num_rows <= 1000 for b in batches)
    assert concat(batches).equals(table.drop_columns(["extra"]))


def test_jsonl_batches(tmp_path: Path) -> None:
    n = 2500
    path = tmp_path / "feed.jsonl"
    bad_lines = {5, 999, 1000, 2400}
    with path.open("w") as handle:
        for i, row in enumerate(_rows(n)):
            if i in bad_lines:
                handle.write("not json\n")
            handle.write(json.dumps(dict(zip(HEADER, row, strict=True))) + "\n")
    batches = read_all(path, feed("jsonl"), batch_rows=1000)
    assert len(batches) >= 3
    assert all(b.table.num_rows <= 1000 for b in batches)
    table = concat(batches)
    assert table.column(ENTITY_ID).to_pylist() == [f"e{i:06d}" for i in range(n)]
    assert sorted(text for b in batches for _, text in b.malformed) == ["not json"] * len(bad_lines)
    assert sum(b.rows for b in batches) == n + len(bad_lines)
    numbers = sorted(number for b in batches for number, _ in b.malformed)
    assert numbers == [i + 1 + k for k, i in enumerate(sorted(bad_lines))]  # physical 1-based line numbers


def test_csv_batches(tmp_path: Path) -> None:
    """CSV is read in blocks of a few MiB: a file well over that comes back in several batches."""
    n = 200_000  # about 9 MB
    path = tmp_path / "feed.csv"
    bad = {10, 90_000, 199_000}
    rows = _rows(n)  # built once: the expected lines below are these rows too
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for i, row in enumerate(rows):
            writer.writerow(row)
            if i in bad:
                writer.writerow([*row, "one", "too", "many"])
    batches = read_all(path, feed("csv"), batch_rows=1024)
    assert len(batches) >= 2
    table = concat(batches)
    assert table.num_rows == n
    ids = table.column(ENTITY_ID).to_pylist()
    assert ids == [f"e{i:06d}" for i in range(n)]
    malformed = [text for b in batches for _, text in b.malformed]
    assert sorted(malformed) == sorted(",".join([*rows[i], "one", "too", "many"]) for i in bad)
    assert sum(b.rows for b in batches) == n + len(bad)


# --- finding files ----------------------------------------------------------------------------------------


@pytest.fixture
def daily(tmp_path: Path) -> Path:
    """feeds/<YYYY-MM-DD>/part-<k>.csv for 2025-12-30 .. 2026-01-03, two files a day; one day left empty."""
    for day in ("2025-12-30", "2025-12-31", "2026-01-01", "2026-01-02", "2026-01-03"):
        (tmp_path / "feeds" / day).mkdir(parents=True)
        if day != "2026-01-02":
            for k in (1, 0):
                (tmp_path / "feeds" / day / f"part-{k}.csv").write_text(",".join(HEADER) + "\n")
    return tmp_path / "feeds"


def _days(paths: list[str]) -> list[str]:
    return [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 6, tzinfo=UTC), ["2026-01-01"]),
        (datetime(2025, 12, 31, 18, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC), ["2025-12-31"]),  # end exclusive
        (datetime(2025, 12, 31, 23, tzinfo=UTC), datetime(2026, 1, 1, 1, tzinfo=UTC), ["2025-12-31", "2026-01-01"]),
        (
            datetime(2025, 12, 30, 12, tzinfo=UTC),
            datetime(2026, 1, 3, 0, 1, tzinfo=UTC),
            ["2025-12-30", "2025-12-31", "2026-01-01", "2026-01-03"],
        ),  # 2026-01-02 has no files: skipped
    ],
)
def test_feed_files_expands_date_to_every_day(daily: Path, start: datetime, end: datetime, expected: list[str]) -> None:
    paths = feed_files(str(daily / "{date}" / "*.csv"), start, end)
    assert _days(paths) == [f"{day}/part-{k}.csv" for day in expected for k in (0, 1)]
    assert all(Path(p).is_file() for p in paths)


def test_feed_files_date_in_a_file_name(tmp_path: Path) -> None:
    for day in ("2026-01-01", "2026-01-02"):
        (tmp_path / f"readings-{day}.jsonl").write_text("")
    got = feed_files(
        str(tmp_path / "readings-{date}.jsonl"),
        datetime(2026, 1, 1, 12, tzinfo=UTC),
        datetime(2026, 1, 2, 12, tzinfo=UTC),
    )
    assert [Path(p).name for p in got] == ["readings-2026-01-01.jsonl", "readings-2026-01-02.jsonl"]


def test_feed_files_without_placeholder_is_a_sorted_glob(daily: Path) -> None:
    start, end = datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 1, 2, tzinfo=UTC)
    paths = feed_files(str(daily / "*" / "*.csv"), start, end)  # no {date}: the interval does not filter
    assert paths == sorted(paths) and len(paths) == 8
    assert list_feed_files(str(daily / "2026-01-01" / "part-0.csv")) == [str(daily / "2026-01-01" / "part-0.csv")]


@pytest.mark.parametrize(
    "pattern",
    ["{date}/*.csv", "2026-01-02/*.csv", "*/*.parquet", "no-such-file.csv"],
)
def test_feed_files_refuses_an_empty_match(daily: Path, pattern: str) -> None:
    start, end = datetime(2026, 1, 2, tzinfo=UTC), datetime(2026, 1, 2, 6, tzinfo=UTC)  # 2026-01-02 is empty
    with pytest.raises(FusionError, match="no feed files match"):
        feed_files(str(daily / pattern), start, end)


def test_feed_files_date_outside_available_days(daily: Path) -> None:
    with pytest.raises(FusionError, match="2027-01-01"):
        feed_files(
            str(daily / "{date}" / "*.csv"), datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, 6, tzinfo=UTC)
        )


def test_feed_files_days_are_utc_days_whatever_the_timezone(daily: Path) -> None:
    plus2 = timezone(timedelta(hours=2))
    start = datetime(2026, 1, 1, 0, 30, tzinfo=plus2)  # 2025-12-31T22:30Z
    end = datetime(2026, 1, 1, 3, 0, tzinfo=plus2)  # 2026-01-01T01:00Z
    paths = feed_files(str(daily / "{date}" / "*.csv"), start, end)
    assert sorted({Path(p).parent.name for p in paths}) == ["2025-12-31", "2026-01-01"]
