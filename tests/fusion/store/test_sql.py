"""The read-only SQL sandbox over a real Delta store: answers, refusals, errors, and the Python API."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pyarrow as pa
import pytest

from fusion.api import open_store
from fusion.config.federation import load_config
from fusion.errors import FusionError, SqlError, SqlRefused
from fusion.store.delta import Store
from fusion.store.sql import SqlSandbox
from schemas.tables import TABLE_SCHEMAS
from tests.conftest import config_text
from tests.fusion.store.test_store import START, release_rows

ROWS = ["release_id", "metric", "region", "window_start"]


def sample_releases() -> pa.Table:
    """One batch holding several values of every text column (the case that breaks naive string pushdown)."""
    return pa.concat_tables(
        [
            release_rows("r1", range(0, 4), metric="temp", region="north"),
            release_rows("r1", range(0, 4), metric="load", region="south"),
            release_rows("r2", range(4, 6), metric="temp", region="east"),
        ]
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    store.ensure_tables()
    assert store.insert_new("releases", sample_releases()) == 10
    return store


@pytest.fixture
def sandbox(store: Store) -> Iterator[SqlSandbox]:
    sandbox = SqlSandbox(store)
    yield sandbox
    sandbox.close()


def rows(table: pa.Table) -> list[tuple[Any, ...]]:
    return sorted(zip(*(table.column(c).to_pylist() for c in ROWS), strict=True))


def reference(store: Store, keep: Callable[[dict[str, Any]], bool]) -> list[tuple[Any, ...]]:
    """The obvious answer: every stored row, filtered in Python."""
    return sorted(tuple(r[c] for c in ROWS) for r in store.read("releases").to_pylist() if keep(r))


def snapshot(store: Store, root: Path) -> tuple[dict[str, int | None], dict[str, int], list[Path]]:
    """Delta versions, row counts, and every file under `root`: a refused query must change none of them."""
    versions = {name: store.version(name) for name in TABLE_SCHEMAS}
    counts = {name: store.read(name).num_rows for name in TABLE_SCHEMAS}
    return versions, counts, sorted(root.rglob("*"))


# --- answers --------------------------------------------------------------------------------------------------

def test_select_returns_an_arrow_table_of_the_rows(store: Store, sandbox: SqlSandbox) -> None:
    result = sandbox.query("SELECT release_id, metric, region, window_start, count FROM releases")
    assert isinstance(result, pa.Table)
    assert result.num_rows == 10
    assert rows(result) == reference(store, lambda r: True)
    assert result.schema.field("window_start").type == pa.timestamp("us", tz="UTC")
    stored = {(r["metric"], r["window_start"]): r["count"] for r in store.read("releases").to_pylist()}
    assert {(r["metric"], r["window_start"]): r["count"] for r in result.to_pylist()} == stored


def test_aggregates_match_a_python_reference(store: Store, sandbox: SqlSandbox) -> None:
    result = sandbox.query("SELECT metric, count(*) AS cells, sum(count) AS total FROM releases GROUP BY metric")
    expected: dict[str, tuple[int, float]] = {}
    for r in store.read("releases").to_pylist():
        cells, total = expected.get(r["metric"], (0, 0.0))
        expected[r["metric"]] = (cells + 1, total + r["count"])
    assert {r["metric"]: (r["cells"], r["total"]) for r in result.to_pylist()} == expected


HOUR = timedelta(hours=1)


@pytest.mark.parametrize(
    ("where", "keep"),
    [
        ("release_id = 'r2'", lambda r: r["release_id"] == "r2"),
        ("metric = 'load'", lambda r: r["metric"] == "load"),
        ("region IN ('north', 'east')", lambda r: r["region"] in ("north", "east")),
        ("region <> 'north'", lambda r: r["region"] != "north"),
        ("release_id LIKE 'r%' AND metric = 'temp'", lambda r: r["metric"] == "temp"),
        ("release_id = 'missing'", lambda r: False),
        ("window_start >= TIMESTAMPTZ '2026-01-01 02:00:00+00'", lambda r: r["window_start"] >= START + 2 * HOUR),
        ("window_start < '2026-01-01 02:00:00'", lambda r: r["window_start"] < START + 2 * HOUR),  # text is UTC
        ("window_start BETWEEN '2026-01-01 01:00:00+00' AND '2026-01-01 04:00:00+00'",
         lambda r: START + HOUR <= r["window_start"] <= START + 4 * HOUR),
        ("window_start >= '2026-01-01 03:00:00+01'", lambda r: r["window_start"] >= START + 2 * HOUR),  # an offset
        ("metric = 'temp' AND window_start > '2026-01-01 02:00:00' AND region = 'north'",
         lambda r: r["metric"] == "temp" and r["window_start"] > START + 2 * HOUR and r["region"] == "north"),
        ("contributors = 3 AND count > 102", lambda r: r["count"] > 102),
    ],
)
def test_filters_on_text_and_timestamp_columns(store: Store, sandbox: SqlSandbox, where: str,
                                               keep: Callable[[dict[str, Any]], bool]) -> None:
    result = sandbox.query(f"SELECT {', '.join(ROWS)} FROM releases WHERE {where}")
    assert rows(result) == reference(store, keep)


def explain(sandbox: SqlSandbox, sql: str) -> str:
    # EXPLAIN is refused through query(), so look at the plan on the sandbox's own connection (after a query
    # naming the tables has registered them: the sandbox registers a table when a query first names it).
    sandbox.query(f"SELECT * FROM ({sql}) LIMIT 0")
    return "".join(row[1] for row in sandbox._con.sql(f"EXPLAIN {sql}").fetchall())


def test_filters_are_pushed_into_the_arrow_scan(sandbox: SqlSandbox) -> None:
    plan = explain(
        sandbox, "SELECT release_id FROM releases WHERE contributors = 3 AND window_start >= '2026-01-01 02:00:00'"
    )
    assert "Filters:" in plan, plan
    text = explain(sandbox, "SELECT release_id FROM releases WHERE metric = 'temp' AND region = 'north'")
    assert "Filters:" in text, text
    assert rows(sandbox.query("SELECT * FROM releases WHERE metric = 'temp' AND region = 'north'")) == [
        ("r1", "temp", "north", START + h * HOUR) for h in range(4)
    ]


def merge_written(tmp_path: Path) -> Store:
    """A store whose releases were inserted by a Delta merge, as stores before insert-by-append were: its files
    hold string_view text."""
    store = Store(tmp_path / "merged")
    store.ensure_tables()
    rows = sample_releases().select(TABLE_SCHEMAS["releases"].names)
    predicate = " AND ".join(f"t.{k} = s.{k}" for k in ROWS)
    store.delta_table("releases").merge(
        rows, predicate=predicate, source_alias="s", target_alias="t"
    ).when_not_matched_insert_all().execute()
    return store


@pytest.mark.parametrize("extra", [False, True], ids=["merge-written", "merge-and-append-written"])
def test_a_store_with_merge_written_string_view_files_still_answers(tmp_path: Path, extra: bool) -> None:
    store = merge_written(tmp_path)
    if extra:  # a later insert (an append, plain string text): the files now mix both text types
        assert store.insert_new("releases", release_rows("r3", range(2))) == 2
    assert pa.types.is_string_view(store.dataset("releases", string_view=None).schema.field("metric").type)
    sandbox = SqlSandbox(store)
    try:
        for where, keep in (
            ("metric = 'temp' AND region = 'north'", lambda r: r["metric"] == "temp" and r["region"] == "north"),
            ("release_id = 'r2'", lambda r: r["release_id"] == "r2"),
            ("window_start >= '2026-01-01 02:00:00'", lambda r: r["window_start"] >= START + 2 * HOUR),
        ):
            assert rows(sandbox.query(f"SELECT * FROM releases WHERE {where}")) == reference(store, keep)
        assert store.insert_new("releases", sample_releases()) == 0  # keys read from string_view files too
        day = (START, START + 24 * HOUR)
        assert store.present_releases([("r1", *day), ("r2", *day), ("r3", *day), ("r9", *day)]) == (
            {"r1", "r2", "r3"} if extra else {"r1", "r2"}
        )
        assert store.has_release("r2", interval=(START + 4 * HOUR, START + 6 * HOUR))
        assert not store.has_release("r2", interval=(START, START + 4 * HOUR))  # its windows are not in there
        counts = store.releases_within(["r2"], day, ["count"])  # filtered on a column it does not return
        assert counts.column_names == ["count"] and counts.num_rows == 2
    finally:
        sandbox.close()


def test_the_sandbox_reads_the_snapshot_it_opened(store: Store, sandbox: SqlSandbox) -> None:
    store.insert_new("releases", release_rows("r3", range(2)))
    assert sandbox.query("SELECT count(*) AS n FROM releases").to_pylist() == [{"n": 10}]
    fresh = SqlSandbox(store)
    try:
        assert fresh.query("SELECT count(*) AS n FROM releases").to_pylist() == [{"n": 12}]
    finally:
        fresh.close()


def test_versions_time_travel(store: Store) -> None:
    store.insert_new("releases", release_rows("r3", range(2)))  # version 2
    for version, expected in ((0, 0), (1, 10), (2, 12)):
        sandbox = SqlSandbox(store, versions={"releases": version})
        try:
            assert sandbox.query("SELECT count(*) AS n FROM releases").to_pylist() == [{"n": expected}]
        finally:
            sandbox.close()


def test_versions_that_do_not_exist_are_refused_by_name(store: Store) -> None:
    """A misspelled table must not silently give the current data, nor a missing version a raw Delta error."""
    with pytest.raises(SqlError, match=r"tables the store does not have: \['release'\]"):
        SqlSandbox(store, versions={"release": 0})
    for version in (2, -1, True, "1"):
        with pytest.raises(FusionError, match=r"table releases has versions 0 to 1; version .* does not exist"):
            SqlSandbox(store, versions={"releases": version})  # type: ignore[dict-item]
    with pytest.raises(FusionError, match="table audit has no versions yet"):
        SqlSandbox(Store(store.path.parent / "empty"), versions={"audit": 0})
    sandbox = SqlSandbox(store, versions={"releases": np.int64(1)})  # e.g. a version read back from a table
    sandbox.close()


def test_a_version_whose_files_a_vacuum_removed_is_refused_by_name(store: Store) -> None:
    for version in range(3, 12):
        store.insert_new("releases", release_rows(f"r{version}", range(version * 4, version * 4 + 4)))
    assert store.compact("releases", min_files=2) > 0
    store.delta_table("releases").vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    with pytest.raises(FusionError, match="the data files of version 2 were removed"):
        SqlSandbox(store, versions={"releases": 2})


def test_a_store_without_tables_answers_empty_and_stays_untouched(tmp_path: Path) -> None:
    sandbox = SqlSandbox(tmp_path / "store")
    try:
        for name in TABLE_SCHEMAS:
            assert sandbox.query(f"SELECT count(*) AS n FROM {name}").to_pylist() == [{"n": 0}]
    finally:
        sandbox.close()
    assert not (tmp_path / "store").exists()


def test_every_store_table_is_queryable(store: Store, sandbox: SqlSandbox) -> None:
    for name, schema in TABLE_SCHEMAS.items():
        assert sandbox.query(f"SELECT * FROM {name}").column_names == schema.names


# --- refusals -------------------------------------------------------------------------------------------------

def _data_file(store: Store) -> str:
    files = sorted(Path(store.table_path("releases")).glob("*.parquet"))
    assert files, "the fixture should have written a data file"
    return str(files[-1])


FORBIDDEN = [
    pytest.param("SELECT * FROM read_csv('/etc/passwd')", id="read_csv-etc-passwd"),
    pytest.param("SELECT * FROM read_parquet('{data_file}')", id="read_parquet-store-file"),
    pytest.param("SELECT count(*) FROM read_parquet('{store}/releases/*.parquet')", id="read_parquet-store-glob"),
    pytest.param("SELECT * FROM glob('{store}/**')", id="glob-store"),
    pytest.param("SELECT * FROM read_json('{store}/releases/_delta_log/*.json')", id="read_json-delta-log"),
    pytest.param("SELECT * FROM read_text('{store}/releases/_delta_log/00000000000000000000.json')", id="read_text"),
    pytest.param("COPY (SELECT * FROM releases) TO '{out}/leak.csv'", id="copy-query-to-file"),
    pytest.param("COPY releases TO '{out}/leak.parquet' (FORMAT parquet)", id="copy-table-to-file"),
    pytest.param("EXPORT DATABASE '{out}/export'", id="export-database"),
    pytest.param("ATTACH '{out}/other.duckdb' AS other", id="attach"),
    pytest.param("INSTALL httpfs", id="install"),
    pytest.param("LOAD httpfs", id="load"),
    pytest.param("SET enable_external_access = true", id="set-external-access"),
    pytest.param("SET lock_configuration=false", id="set-lock-configuration"),
    pytest.param("RESET lock_configuration", id="reset-lock-configuration"),
    pytest.param("SET VARIABLE x = 1", id="set-variable"),
    pytest.param("PRAGMA database_list", id="pragma"),
    pytest.param("PRAGMA threads=64", id="pragma-assignment"),
    pytest.param("CREATE TABLE t AS SELECT * FROM releases", id="create-table"),
    pytest.param("CREATE VIEW v AS SELECT * FROM releases", id="create-view"),
    pytest.param("CREATE OR REPLACE VIEW releases AS SELECT 1 AS x", id="replace-store-view"),
    pytest.param("CREATE MACRO m(a) AS a", id="create-macro"),
    pytest.param("INSERT INTO releases SELECT * FROM releases", id="insert"),
    pytest.param("UPDATE releases SET count = 0", id="update"),
    pytest.param("DELETE FROM releases", id="delete"),
    pytest.param("TRUNCATE releases", id="truncate"),
    pytest.param("DROP VIEW releases", id="drop"),
    pytest.param("BEGIN TRANSACTION", id="transaction"),
    pytest.param("CALL checkpoint()", id="call-checkpoint"),
    pytest.param("CALL enable_profiling(format := 'json', save_location := '{out}/profile.json')",
                 id="call-writing-table-function"),
    pytest.param("CALL enable_logging(storage := 'file', storage_path := '{out}/logs')", id="call-enable-logging"),
    pytest.param("SELECT 1; DROP VIEW releases", id="multiple-statements"),
    pytest.param("UPDATE EXTENSIONS", id="update-extensions"),
    pytest.param(
        "SELECT * FROM enable_profiling(format := 'json', save_location := '{out}/profile.json')",
        id="select-writing-table-function",
    ),
]


@pytest.mark.parametrize("template", FORBIDDEN)
def test_forbidden_operations_are_refused(store: Store, sandbox: SqlSandbox, tmp_path: Path, template: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    query = template.format(store=store.path, out=out, data_file=_data_file(store))
    before = snapshot(store, tmp_path)
    with pytest.raises(SqlRefused) as refused:
        sandbox.query(query)
    assert "sandboxed" in str(refused.value)
    assert snapshot(store, tmp_path) == before  # same Delta versions, same rows, no new file anywhere
    assert sandbox.query("SELECT count(*) AS n FROM releases").to_pylist() == [{"n": 10}]  # still usable


def test_multiple_statements_are_refused_before_any_runs(store: Store, sandbox: SqlSandbox) -> None:
    with pytest.raises(SqlRefused, match="exactly one SQL statement, got 2"):
        sandbox.query("SELECT 1; DROP VIEW releases")
    assert sandbox.query("SELECT count(*) AS n FROM releases").to_pylist() == [{"n": 10}]
    with pytest.raises(SqlRefused, match="got 0"):
        sandbox.query("-- nothing")


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM enable_profiling(format := 'json', save_location := '{out}/profile.json')",
        "SELECT * FROM enable_logging(storage := 'file', storage_path := '{out}/logs')",
        "SELECT * FROM disable_profiling()",
    ],
)
def test_configuration_table_functions_in_a_select_do_not_run(store: Store, sandbox: SqlSandbox, tmp_path: Path,
                                                              query: str) -> None:
    before = snapshot(store, tmp_path)
    with pytest.raises(FusionError, match="configuration has been locked"):  # DuckDB's lock, not the sandbox's
        sandbox.query(query.format(out=tmp_path))
    assert snapshot(store, tmp_path) == before
    assert sandbox.query("SELECT current_setting('profiling_output') AS p").to_pylist() == [{"p": ""}]


def test_getenv_reveals_nothing(sandbox: SqlSandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    # DuckDB's getenv() exists only in its CLI; the Python build has no such function (checked with duckdb 2.0).
    monkeypatch.setenv("FUSION_SQL_CANARY", "canary-3f9b1c")
    monkeypatch.setenv("HOME", os.environ.get("HOME") or "/home/fusion-canary")
    for name in ("HOME", "FUSION_SQL_CANARY"):
        with pytest.raises(FusionError) as refused:
            sandbox.query(f"SELECT getenv('{name}') AS value")
        assert os.environ[name] not in str(refused.value)


# --- errors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("SELEC * FROM releases", "syntax error"),
        ("SELECT * FROM releases WHERE", "syntax error"),
        ("SELECT no_such_column FROM releases", "no_such_column"),
        ("SELECT * FROM no_such_table", "no_such_table"),
        ("SELECT CAST('x' AS INTEGER)", "Conversion"),
    ],
)
def test_query_errors_raise_sql_error(sandbox: SqlSandbox, query: str, match: str) -> None:
    with pytest.raises(SqlError, match=match) as error:
        sandbox.query(query)
    assert isinstance(error.value, FusionError)
    assert not isinstance(error.value, SqlRefused)
    assert sandbox.query("SELECT count(*) AS n FROM releases").to_pylist() == [{"n": 10}]


# --- the Python API -------------------------------------------------------------------------------------------

@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2))
    return path


def test_open_store_sql_returns_arrow_and_pandas(config_path: Path) -> None:
    store = Store(load_config(config_path).store_path)
    assert store.path == config_path.parent / "store"
    store.insert_new("releases", sample_releases())
    query = "SELECT release_id, metric, region, window_start, count FROM releases ORDER BY metric, window_start"
    with open_store(config_path) as fused:
        table = fused.sql(query)
        frame = fused.sql_pandas(query)
    assert isinstance(table, pa.Table)
    assert table.num_rows == 10
    assert isinstance(frame, pd.DataFrame)
    pdt.assert_frame_equal(frame, table.to_pandas())
    assert frame["metric"].tolist() == table.column("metric").to_pylist()
    assert frame["window_start"].tolist() == table.column("window_start").to_pylist()


def test_open_store_reads_a_new_federation_s_tables_as_empty_and_writes_nothing(config_path: Path) -> None:
    # A reader may hold read-only credentials: opening the store must not create its tables.
    with open_store(config_path) as fused:
        for name in TABLE_SCHEMAS:
            assert fused.sql(f"SELECT count(*) AS n FROM {name}").to_pylist() == [{"n": 0}]
    store = Store(config_path.parent / "store")
    assert {name: store.version(name) for name in TABLE_SCHEMAS} == dict.fromkeys(TABLE_SCHEMAS)


def test_open_store_time_travel(config_path: Path) -> None:
    store = Store(load_config(config_path).store_path)
    store.ensure_tables()  # version 0: empty
    store.insert_new("releases", release_rows("r1", range(3)))  # version 1
    store.insert_new("releases", release_rows("r2", range(2)))  # version 2
    query = "SELECT release_id, count(*) AS n FROM releases GROUP BY release_id ORDER BY release_id"
    with open_store(config_path) as fused:
        assert fused.sql(query).to_pylist() == [{"release_id": "r1", "n": 3}, {"release_id": "r2", "n": 2}]
    with open_store(config_path, versions={"releases": 1}) as fused:
        assert fused.sql(query).to_pylist() == [{"release_id": "r1", "n": 3}]
    with open_store(config_path, versions={"releases": 0}) as fused:
        assert fused.sql(query).num_rows == 0
        assert fused.sql_pandas(query).empty


def test_versions_passed_back_read_the_same_snapshot_a_table_not_created_yet_too(config_path: Path) -> None:
    """FusedStore.versions gives None for a table not created yet: passed back, that table reads as empty again,
    not as what was written to it since."""
    with open_store(config_path) as first:
        saved = first.versions
    assert saved["releases"] is None
    Store(load_config(config_path).store_path).insert_new("releases", sample_releases())  # after the snapshot
    with open_store(config_path, versions=saved) as again:
        assert again.versions == saved
        assert again.sql("SELECT count(*) AS n FROM releases").to_pylist() == [{"n": 0}]
    with open_store(config_path) as latest:
        assert latest.sql("SELECT count(*) AS n FROM releases").to_pylist() == [{"n": 10}]


def test_open_store_refuses_writes(config_path: Path) -> None:
    store = Store(load_config(config_path).store_path)
    store.insert_new("releases", release_rows("r1", range(3)))
    version = store.version("releases")
    with open_store(config_path) as fused:
        for query in ("DELETE FROM releases", "DROP VIEW releases", "COPY releases TO 'leak.csv'"):
            with pytest.raises(SqlRefused, match="sandboxed"):
                fused.sql(query)
        with pytest.raises(SqlRefused):
            fused.sql_pandas("DELETE FROM releases")
    assert store.version("releases") == version
    assert store.read("releases").num_rows == 3


def test_a_query_cannot_spill_to_disk(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    sandbox = SqlSandbox(store, memory_limit="64MB")
    before = snapshot(store, tmp_path)
    with pytest.raises(SqlError, match="Out of Memory"):
        sandbox.query("SELECT count(*) FROM (SELECT i, md5(i::VARCHAR) h FROM range(5000000) t(i) ORDER BY h)")
    assert snapshot(store, tmp_path) == before  # no temp files anywhere
    sandbox.close()


# --- output formats -------------------------------------------------------------------------------------------

AWKWARD_TEXT = ["plain", "[/x] [bold]not markup", 'comma, "quote"\nnewline', "ünïcødé ✓"]


def sample_value(field: pa.Field, i: int) -> Any:
    """A value of the field's type; floats cycle through NaN and the infinities, text through what a CSV writer
    quotes and what rich would read as markup."""
    kind = field.type
    if pa.types.is_string(kind):
        return f"{AWKWARD_TEXT[i % len(AWKWARD_TEXT)]} {i}"
    if pa.types.is_timestamp(kind):
        return START + i * HOUR
    if pa.types.is_integer(kind):
        return i
    if pa.types.is_boolean(kind):
        return i % 2 == 0
    if pa.types.is_floating(kind):
        return [1.5, math.nan, math.inf, -math.inf][i % 4]
    if pa.types.is_list(kind):
        return [sample_value(kind.value_field, i + j) for j in range(2)]
    if pa.types.is_struct(kind):
        return {child.name: sample_value(child, i) for child in kind}
    raise AssertionError(f"no sample value for {field}: add one for this new column type")


def sample_rows(name: str) -> pa.Table:
    """Four rows with every column set, and one with every nullable column NULL."""
    schema = TABLE_SCHEMAS[name]
    rows = [{field.name: sample_value(field, i) for field in schema} for i in range(4)]
    rows.append({field.name: None if field.nullable else sample_value(field, 4) for field in schema})
    return pa.Table.from_pylist(rows, schema=schema)


def as_json(value: Any) -> Any:
    """What JSON lines should hold for a stored value: times as Python prints them, NaN and infinities null."""
    if isinstance(value, datetime):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_json(item) for item in value]
    return value


def csv_matches(cell: str, value: Any) -> bool:
    """Whether a CSV cell reads back as the stored value (nested values as JSON text)."""
    if value is None or cell == "":
        return value is None and cell == ""
    try:
        if isinstance(value, list | dict):
            return bool(json.loads(cell) == as_json(value))
        if isinstance(value, datetime):
            return datetime.fromisoformat(cell) == value
        if isinstance(value, float):
            return math.isnan(float(cell)) if math.isnan(value) else float(cell) == value
        if isinstance(value, bool):
            return cell == str(value).lower()
    except ValueError:  # not this value's type
        return False
    return cell == str(value)


def strict_json(line: str) -> Any:
    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def key(row: dict[str, Any]) -> str:
    return json.dumps(as_json(row), sort_keys=True)


@pytest.fixture
def every_table(config_path: Path) -> dict[str, pa.Table]:
    """A store like the demo's, with rows in every table: each table's rows as stored."""
    store = Store(load_config(config_path).store_path)
    for name in TABLE_SCHEMAS:
        assert store.insert_new(name, sample_rows(name)) == 5
    return {name: store.read(name) for name in TABLE_SCHEMAS}


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_every_format_writes_every_column_type_of_every_table(config_path: Path, every_table: dict[str, pa.Table],
                                                              fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fusion.cli.core import main

    for name, stored in every_table.items():
        assert main(["sql", "--config", str(config_path), f"SELECT * FROM {name}", "--format", fmt]) == 0, name
        out = capsys.readouterr().out
        expected = sorted(stored.to_pylist(), key=key)
        if fmt == "json":
            assert sorted((strict_json(line) for line in out.splitlines()), key=key) == [as_json(r) for r in expected]
        elif fmt == "csv":
            reader = csv.DictReader(io.StringIO(out))
            assert reader.fieldnames == stored.column_names
            rows = list(reader)
            assert len(rows) == len(expected)
            for column in stored.column_names:  # each column holds the stored values (in any row order)
                stored_values = [r[column] for r in expected]
                for cell in (row[column] for row in rows):
                    assert any(csv_matches(cell, value) for value in stored_values), (name, column, cell)
        else:
            assert f"{stored.num_rows} row(s)" in out, name


def test_every_format_writes_the_types_a_query_can_make(config_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from fusion.cli.core import main

    query = (
        "SELECT 1.5::DECIMAL(10, 2) AS d, 170141183460469231731687303715884105727::HUGEINT AS h, INTERVAL 1 DAY AS i, "
        "'ab'::BLOB AS b, MAP {'k': 1} AS m, union_value(n := 1) AS u, 'a1b2c3d4-0000-0000-0000-000000000000'::UUID "
        "AS id, DATE '2026-01-01' AS day, TIME '01:02:03' AS t, CAST('a' AS ENUM('a', 'b')) AS e, 1 AS a, 2 AS a, "
        "[]::INTEGER[] AS empty, NULL AS nothing, 'nan'::FLOAT AS f, [{'x': [1.5, 'inf'::DOUBLE]}] AS nested, "
        "'[/x]' AS \"[bold]\""
    )
    outputs = {}
    for fmt in ("table", "csv", "json"):
        assert main(["sql", "--config", str(config_path), query, "--format", fmt]) == 0, fmt
        outputs[fmt] = capsys.readouterr().out
    assert strict_json(outputs["json"]) == {
        "d": 1.5, "h": 170141183460469231731687303715884105727, "i": [0, 1, 0], "b": "6162", "m": [["k", 1]],
        "u": 1, "id": "a1b2c3d4-0000-0000-0000-000000000000", "day": "2026-01-01", "t": "01:02:03", "e": "a",
        "a": 1, "a_1": 2, "empty": [], "nothing": None, "f": None, "nested": [{"x": [1.5, None]}], "[bold]": "[/x]",
    }
    header, row = list(csv.reader(io.StringIO(outputs["csv"])))
    assert header[-1] == "[bold]" and dict(zip(header[:6], row[:6], strict=True)) == {
        "d": "1.50", "h": "170141183460469231731687303715884105727", "i": "[0, 1, 0]", "b": "6162",
        "m": '[["k", 1]]', "u": "1"}
    assert json.loads(row[header.index("nested")]) == [{"x": [1.5, None]}]
    assert "[/x]" in outputs["table"] and "[bold" in outputs["table"] and "1 row(s)" in outputs["table"]


def test_a_table_shows_control_and_format_characters_as_escapes_and_csv_and_json_keep_them(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Text from the store reached the terminal raw in a table (rich drops a carriage return, not ESC): a release id
    holding "ESC[2A ESC[2K" moved the cursor up and erased lines `fusion verify` had printed, and U+202E reversed
    what followed. A table writes each such character as its escape (a line break stays, within its cell), and so
    does an error line; CSV and JSON lines are data and keep the text as it is."""
    from fusion.cli.core import main
    from fusion.cli.formats import visible

    evil = "r-zz\x1b[2A\x1b[2K\r\x1b[1B\x07\x9b31m\u202egpj.exe\u200b"
    query = ("SELECT chr(27) || '[2A' || chr(27) || '[2K' || chr(13) || chr(27) || '[1B' || chr(7) || chr(155) || "
             "'31m' || chr(8238) || 'gpj.exe' || chr(8203) AS id, 'two' || chr(10) || 'lines' AS note, "
             "'caf\u00e9 \u4e2d\u00a0x' AS plain, 1 AS \"c\x1b\"")
    outputs = {}
    for fmt in ("table", "csv", "json"):
        assert main(["sql", "--config", str(config_path), query, "--format", fmt]) == 0, fmt
        outputs[fmt] = capsys.readouterr().out
    table = outputs["table"]
    assert not any(ch in table for ch in "\x1b\r\x07\x9b\u202e\u200b"), repr(table)
    said = "".join(table.split())  # the table folds long cells across lines
    assert "\\x1b[2A\\x1b[2K\\x0d\\x1b[1B\\x07\\x9b31m\\u202egpj.exe\\u200b" in said, table
    assert "┃c\\x1b┃" in said and "caf\u00e9 \u4e2d\u00a0x" in table and "two" in table and "lines" in table
    assert strict_json(outputs["json"]) == {"id": evil[4:], "note": "two\nlines", "plain": "caf\u00e9 \u4e2d\u00a0x",
                                            "c\x1b": 1}
    header, row = list(csv.reader(io.StringIO(outputs["csv"])))
    assert header == ["id", "note", "plain", "c\x1b"] and row[0] == evil[4:] and row[1] == "two\nlines"
    # An error quoting the query (here an unknown table's name) shows it the same way.
    assert main(["sql", "--config", str(config_path), 'SELECT * FROM "t\x1b[2A\x1b[2K"', "--format", "csv"]) == 1
    captured = capsys.readouterr()
    assert "\x1b" not in captured.err and "t\\x1b[2A\\x1b[2K" in "".join(captured.err.split()), captured.err
    assert visible(evil) == "r-zz\\x1b[2A\\x1b[2K\\x0d\\x1b[1B\\x07\\x9b31m\\u202egpj.exe\\u200b"
    assert visible("tab\there") == "tab\\x09here" and visible("\U000e0001\ud800") == "\\U000e0001\\ud800"


def test_no_connection_draws_duckdbs_progress_bar_into_the_output(sandbox: SqlSandbox) -> None:
    """DuckDB draws a progress bar on stdout for a query that runs past 2 s: in `fusion sql --format csv` output
    it was a corrupt line (seen on a loaded machine). Every connection Fusion opens turns it off."""
    from schemas.validation import connect

    setting = "SELECT current_setting('enable_progress_bar') AS shown"
    assert sandbox.query(setting).column("shown").to_pylist() == [False]
    assert connect().sql(setting).fetchall() == [(False,)]
