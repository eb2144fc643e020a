"""Parquet files that DuckDB's read_parquet misreads or fails on, scanned as they should be: columns whose names
differ only in case, a column named like DuckDB's own, text that is not UTF-8, a dotted time column, dates beyond
the timestamp's range. Most are scanned both where DuckDB reads the file itself and, under a name it would take
for a glob, where it is read as Arrow batches."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion.config.federation import load_config
from fusion.feeds.scan import ROW, FeedScanner, ShardScan, scan_connection, scan_windows
from fusion.release.plan import ReleasePlan, plan_release
from schemas.readings import DEAD_LETTER_REASON, VALUE
from tests.conftest import END, START, config_text

HOUR = timedelta(hours=1)
#: A file name DuckDB reads itself, and one it would take for a glob (read as Arrow batches).
NAMES = {"duckdb": "p.parquet", "batches": "p-[1].parquet"}


@pytest.fixture
def plan(tmp_path: Path) -> ReleasePlan:
    """alpha's Parquet feed, feeds/alpha/*.parquet, empty (keys are not needed to scan)."""
    text = config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2, noise=False, seed=7)
    (tmp_path / "federation.toml").write_text(text)
    (tmp_path / "feeds" / "alpha").mkdir(parents=True)
    return plan_release(load_config(tmp_path / "federation.toml"), START, END)


def _readings(rows: int, **columns: pa.Array | list[object]) -> pa.Table:
    """`rows` valid load readings in the first hour, with `columns` added or replacing theirs."""
    table = {
        "entity_id": [f"e{i}" for i in range(rows)],
        "region": ["north"] * rows,
        "metric": ["load"] * rows,
        "event_time": pa.array([START + timedelta(minutes=i) for i in range(rows)], pa.timestamp("us", tz="UTC")),
        "value": [float(i) for i in range(rows)],
    }
    return pa.table({**table, **columns})


def _scan(plan: ReleasePlan, table: pa.Table, name: str, **feed: object) -> tuple[FeedScanner, ShardScan]:
    pq.write_table(table, plan.config.base / "feeds" / "alpha" / name)
    if feed:
        institution = plan.config.institution("alpha")
        feeds = (institution.feeds[0].model_copy(update=feed),)
        institutions = tuple(
            i.model_copy(update={"feeds": feeds}) if i.id == "alpha" else i for i in plan.config.institutions
        )
        config = plan.config.model_copy(update={"institutions": institutions})
        plan = plan_release(config, plan.layout.start, plan.layout.end)
    scanner = FeedScanner(plan, plan.config.institution("alpha"))
    return scanner, scanner.scan(0, 1)


@pytest.mark.parametrize("read_by", NAMES)
def test_the_mapped_column_is_read_beside_one_whose_name_differs_only_in_case(plan: ReleasePlan, read_by: str) -> None:
    """DuckDB matches names ignoring case and renamed `value` to value_1 beside `Value`: the mapped "value" read
    `Value` (watts, where `value` holds kilowatts), accepted or refused on the wrong number."""
    table = _readings(3).drop_columns(["value"])  # `Value` first: DuckDB binds "value" to the first of the two
    table = table.append_column("Value", pa.array([120_000.0, 80_000.0, 7.0]))
    table = table.append_column("value", pa.array([120.0, 80.0, 5000.0]))  # 5000: beyond plausible
    scanner, scan = _scan(plan, table, NAMES[read_by])
    assert scan.rows_read == 3 and scan.rejected == Counter(out_of_range=1)
    encoded = scan.table(scanner.schema)
    assert scanner.readings_at(0, encoded.column(ROW).to_numpy()).column(VALUE).to_pylist() == [120.0, 80.0]
    [(_, letters)] = scan.dead_letters
    assert [float(v) for v in letters.column("value").to_pylist()] == [5000.0]
    assert "Value" not in letters.column_names


def test_a_file_with_a_file_row_number_column_is_scanned(plan: ReleasePlan) -> None:
    """read_parquet(..., file_row_number = true) refused the file: "a column with this name is also in the file"."""
    _, scan = _scan(plan, _readings(2, file_row_number=[7, 7]), NAMES["duckdb"])
    assert scan.rows_read == 2 and not scan.rejected and not scan.unreadable


@pytest.mark.parametrize("extra", [{"Value": [9.0]}, {"FILE_INDEX": [5]}], ids=["Value", "FILE_INDEX"])
def test_windows_whose_files_duckdb_would_misbind_are_left_to_their_own_scans(
    plan: ReleasePlan, extra: dict[str, list[object]]
) -> None:
    """A file's own `file_index` stood in for the position read_parquet gives each of several files (its rows were
    joined to no window, and lost), as `Value` for "value"."""
    plans = [plan_release(plan.config, START + h * HOUR, START + (h + 1) * HOUR) for h in range(2)]
    folder = plan.config.base / "feeds" / "alpha"
    sources = []
    for h in range(2):
        table = _readings(1, **extra)
        table = table.set_column(3, "event_time", pa.array([START + h * HOUR], table.column(3).type))
        pq.write_table(table.select([*extra, *table.column_names[:-1]]), folder / f"w{h}.parquet")
        sources.append([(0, str(folder / f"w{h}.parquet"))])
    assert scan_windows(plans, "alpha", sources, scan_connection(plans[0])) is None


@pytest.mark.parametrize("read_by", NAMES)
def test_a_file_with_text_that_is_not_utf8_is_dead_lettered_whole_and_the_connection_lives_on(
    plan: ReleasePlan, read_by: str
) -> None:
    """DuckDB refused it (InvalidInputException) and the run failed; read as Arrow batches, DuckDB was given it and
    invalidated its database, for every later scan on the connection too."""
    folder = plan.config.base / "feeds" / "alpha"
    offsets = pa.py_buffer(np.array([0, 5, 10, 15], dtype=np.int32).tobytes())
    region = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"northnorthsou\xffh")])
    pq.write_table(_readings(3, region=region), folder / NAMES[read_by])
    pq.write_table(_readings(4), folder / "good.parquet")
    connection = scan_connection(plan)
    for _ in range(2):  # the second scan, on the same connection, reads the good file again
        scanner = FeedScanner(plan, plan.config.institution("alpha"), connection=connection)
        scan = scanner.scan(0, 1)
        assert scan.unreadable == {str(folder / NAMES[read_by])}
        assert scan.table(scanner.schema).num_rows == 4 and scan.rejected == Counter(malformed_record=1)
        [(_, letters)] = scan.dead_letters
        assert letters.column(DEAD_LETTER_REASON).to_pylist() == ["malformed_record"]
        assert "UTF" in letters.column("_text")[0].as_py()


def test_a_millisecond_time_beyond_duckdbs_range_in_a_dotted_column_is_unparseable(plan: ReleasePlan) -> None:
    """The footer check split the column's path at its dots (`event.time` as column `event`), so DuckDB read the
    file and failed the whole release ("Could not convert Timestamp(MS) to Timestamp(US)")."""
    start_ms = int(START.timestamp() * 1000)
    times = pa.array([start_ms, start_ms + 60_000, 10**16], pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    table = _readings(3).drop_columns(["event_time"]).append_column("event.time", times)
    _, scan = _scan(plan, table, NAMES["duckdb"], columns={"event_time": "event.time"})
    assert scan.rows_read == 3 and scan.rejected == Counter(unparseable_time=1) and not scan.unreadable


@pytest.mark.parametrize("read_by", NAMES)
def test_a_date_beyond_the_timestamps_range_is_unparseable(plan: ReleasePlan, read_by: str) -> None:
    """DuckDB's cast of a DATE in year 1,001,306 to a timestamp failed the whole release."""
    days = pa.array([20454, 20454, 365_000_000], pa.int32()).cast(pa.date32())  # 2026-01-01, twice
    _, scan = _scan(plan, _readings(3, event_time=days), NAMES[read_by])
    assert scan.rows_read == 3 and scan.rejected == Counter(unparseable_time=1)
