"""Limits of a SQL query (time, rows, size; config [sql] block and `fusion sql` options), results streamed out
batch by batch, every read-only query form accepted, and refusals that name the statement refused."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from fusion.api import open_store
from fusion.cli.core import main
from fusion.config.federation import load_config
from fusion.config.sql_limits import SqlLimits
from fusion.errors import ConfigError, SqlError, SqlLimitExceeded, SqlRefused
from fusion.store.delta import Store
from fusion.store.sql import BATCH_ROWS, SqlSandbox, _Deadline
from schemas.tables import TABLE_SCHEMAS
from tests.conftest import config_text
from tests.fusion.store.test_sql import sample_releases, snapshot

ROOT = Path(__file__).resolve().parents[3]
RECURSIVE = "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT max(i) FROM r"
CROSS_JOIN = "SELECT count(*) FROM range(100000000) a, range(100000000) b WHERE a.range + b.range < 0"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    store.ensure_tables()
    store.insert_new("releases", sample_releases())
    return store


@pytest.fixture
def sandbox(store: Store) -> Iterator[SqlSandbox]:
    sandbox = SqlSandbox(store, limits=SqlLimits(timeout="1s", max_rows=1000, max_size="1MB"))
    yield sandbox
    sandbox.close()


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2))
    Store(load_config(path).store_path).insert_new("releases", sample_releases())
    return path


# --- time -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("query", [RECURSIVE, CROSS_JOIN], ids=["recursive-cte", "cross-join"])
def test_a_runaway_query_is_stopped_at_its_time_limit(sandbox: SqlSandbox, query: str) -> None:
    started = time.monotonic()
    with pytest.raises(SqlLimitExceeded, match=r"ran past its time limit of 1s .* --timeout"):
        sandbox.query(query)
    assert time.monotonic() - started < 10
    assert sandbox.query("SELECT count(*) AS n FROM releases").to_pylist() == [{"n": 10}]  # still usable


def test_the_time_limit_covers_reading_a_streamed_result(sandbox: SqlSandbox) -> None:
    with pytest.raises(SqlLimitExceeded, match="time limit"), sandbox.stream("SELECT 1 AS one") as reader:
        time.sleep(1.5)  # a slow reader: the query holds the connection past its limit
        reader.read_all()


def test_a_query_within_its_time_limit_is_not_stopped(sandbox: SqlSandbox) -> None:
    for _ in range(3):  # a timer that fires after a query ended must not stop the next one
        assert sandbox.query("SELECT count(*) AS n FROM range(100000)").to_pylist() == [{"n": 100000}]


@pytest.mark.parametrize(
    ("query", "call"),
    [
        ("SELECT list_sort(range(10000000)) AS l", "range"),  # 8 s and 1.7 GB in one call, past 1 s and 64 MB
        ("SELECT len(generate_series(1, n)) FROM (SELECT 10 AS n)", "generate_series"),
        ("SELECT levenshtein(region, region) FROM releases", "levenshtein"),  # quadratic in the length
        ("SELECT damerau_levenshtein('a', 'b')", "damerau_levenshtein"),
        ("SELECT length(repeat('xyz', 100000000)) AS n", "repeat"),  # 300 MB in one call
        ("SELECT repeat(region, 3) FROM releases", "repeat"),  # the repeated value too
        ("SELECT lpad('a', 1e9, ' ')", "lpad"),
        ("SELECT rpad(region, count::INT, '-') FROM releases", "rpad"),
        ("SELECT list_resize([1], 2000000)", "list_resize"),
        ("SELECT list_resize([1], 3, region) FROM releases", "list_resize"),  # the value it repeats, too
        ("SELECT len(list_sort(range('10000000'))) AS n", "range"),  # a count written as a string is one too
        ("SELECT length(repeat('a', '1000000000')) AS n", "repeat"),
        ("SELECT repeat('a', 'many') AS s", "repeat"),
        ("SELECT bit_length(bitstring('1', 2000000000)) AS n", "bitstring"),  # 15 s past a 1 s limit
        ("SELECT len(equi_width_bins(0, 10, count::BIGINT, false)) FROM releases", "equi_width_bins"),
        ("SELECT length(format('{:>1000000000}', 'x')) AS n", "format"),  # 2.5 s and 600 MB past 1 s and 64 MB
        ("SELECT length(format('{:>{}}', 'x', 5)) AS n", "format"),  # a width from an argument
        ("SELECT format(region, 'x') FROM releases", "format"),  # a format string that is no literal
        ("SELECT length(printf('%*s', 1000000000, 'x')) AS n", "printf"),
        ("SELECT length(printf('%.1000001f', 1.5)) AS n", "printf"),
        ("PIVOT (SELECT repeat('k', 2) AS k, 1 AS v) ON k USING sum(v)", "repeat"),  # not serialisable: by its text
        # ... found by DuckDB's tokenizer: a quoted name, or a comment before the parenthesis, is still a call
        ("PIVOT (SELECT 'k' AS k, \"Levenshtein\"('a', 'b') AS v) ON k USING sum(v)", "levenshtein"),
        ("PIVOT (SELECT 'k' AS k, levenshtein/**/('a', 'b') AS v) ON k USING sum(v)", "levenshtein"),
        ("PIVOT (SELECT 'k' AS k, d AS v FROM query('SELECT 1 AS d')) ON k USING sum(v)", "query"),
        # ... on the left of JSON's arrow, which DuckDB parses as a lambda (x -> y): a value, not a lambda's parameters
        ("SELECT levenshtein(region, region)::VARCHAR::JSON -> '$' AS j FROM releases", "levenshtein"),
        ("SELECT length(repeat(region, 3)::JSON -> '$') AS n FROM releases", "repeat"),
    ],
)
def test_a_call_that_no_limit_could_stop_is_refused(sandbox: SqlSandbox, query: str, call: str) -> None:
    """DuckDB checks for an interrupt (and counts most memory) between chunks, never inside one call: a call that
    can run or allocate without bound on its own is refused before it runs, naming it."""
    with pytest.raises(SqlRefused, match=rf"^{call}\(\) is refused"):
        sandbox.query(query)


#: A store table's column in a subquery: a value whose size the sandbox cannot know.
BIG_TEXT = "(SELECT repeat('a', 100000) AS s)"
BIG_LIST = "(SELECT list(x) AS l FROM range(100000) t(x))"


@pytest.mark.parametrize(
    ("query", "refused"),
    [
        # one call repeating a value its arguments set: 1.95 GB and 12.8 s past a 1 s, 256 MB limit
        ("SELECT length(replace(repeat('a', 30000), 'a', repeat('b', 30000))) AS n",
         r"replace\(\) is refused unless its replacement is a literal at most 16 times as long as its pattern"),
        ("SELECT length(regexp_replace(repeat('a', 30000), 'a', repeat('b', 30000), 'g')) AS n",
         r"regexp_replace\(\) is refused unless its replacement is a literal"),
        (f"SELECT replace(s, 'a', '{'b' * 17}') FROM {BIG_TEXT}", r"replace\(\) is refused unless"),
        (f"SELECT regexp_replace(s, '', '{'b' * 16}', 'g') FROM {BIG_TEXT}", r"regexp_replace\(\) is refused unless"),
        (f"SELECT regexp_replace(s, '.*', '{chr(92) + '0'}' || '', 'g') FROM {BIG_TEXT}",  # no literal replacement
         r"regexp_replace\(\) is refused unless"),
        ("SELECT regexp_replace(s, '(.*)', '" + "\\1" * 16 + "') FROM " + BIG_TEXT,  # one match, 16 copies of it
         r"regexp_replace\(\) is refused unless"),
        ("SELECT length(concat_ws(repeat('x', 30000), range(30000))) AS n",  # between each item of the list
         r"concat_ws\(\) is refused unless its separator is a literal of at most 15 bytes"),
        ("SELECT length(printf('" + "%1$s" * 17 + "', s)) FROM " + BIG_TEXT, r"printf\(\) is refused unless"),
        # nested, each call within bounds: 'abc' made 950 MB in bin() nine deep
        ("SELECT length(bin(bin(bin(bin(bin(bin(bin(bin(bin('abc')))))))))) AS n",
         r"bin\(\) is refused here: with the calls around it, it may make a value 64 times longer, past 16"),
        (f"SELECT replace(replace(s, 'a', 'bbbb'), 'b', 'cccccc') FROM {BIG_TEXT}", r"replace\(\) is refused here"),
        ("SELECT length(json_pretty(repeat('[', 2000) || repeat(']', 2000))) AS n",  # 4 KB of brackets: 16 MB
         r"json_pretty\(\) is refused: one call of it can run and allocate without bound"),
        # a lambda's body copies a value from outside it into each item: 0.7 GB under a 256 MB limit
        (f"SELECT len(list_transform(range(7000), lambda i: s)) FROM {BIG_TEXT}",
         r"list_transform\(\) is refused where its lambda names s, a value from outside it, over a list of up to "
         r"7,001 items"),
        (f"SELECT len(flatten(list_transform(l, lambda i: l))) FROM {BIG_LIST}",
         r"list_transform\(\) is refused where its lambda names l, .* over a list of unknown length"),
        (f"SELECT [s || x FOR x IN range(100)] FROM {BIG_TEXT}", r"list_apply\(\) is refused where its lambda names s"),
        (f"SELECT len(list_transform(range(7000), lambda i: t.s)) FROM {BIG_TEXT} t", r"list_transform\(\) is "
         r"refused where its lambda names t.s"),
        (f"SELECT len(list_transform(range(7000), lambda i: COLUMNS('s'))) FROM {BIG_TEXT}",  # or #1: not by name
         r"list_transform\(\) is refused where its lambda names a column, a value from outside it"),
        # over a list of unknown length, a body may build nothing from counts, and few literals
        (f"SELECT len(list_transform(l, lambda x: repeat('a', 20000))) FROM {BIG_LIST}",
         r"repeat\(\) is refused inside list_transform\(\) over a list of unknown length"),
        (f"SELECT len(list_transform(l, lambda x: '{'a' * 45}')) FROM {BIG_LIST}",
         r"list_transform\(\) is refused where its lambda, over a list of unknown length, adds 45 bytes of literals "
         r"to each item, past 16"),
        # a reduce's accumulator repeated doubles with each item: 2^30 bytes from 30
        ("SELECT length(list_reduce(list_transform(range(30), lambda x: 'a'), lambda a, x: a || a)) AS n",
         r"list_reduce\(\) is refused where its lambda repeats its accumulator a"),
        ("SELECT len(list_reduce(range(22), lambda a, x: flatten(list_transform([1, 2], lambda i: a)), [1])) AS n",
         r"list_reduce\(\) is refused where its lambda repeats its accumulator a"),
        ("SELECT length(list_reduce(range(12), lambda a, x: bin(a), 'a')) AS n",
         r"list_reduce\(\) is refused where its lambda repeats its accumulator a"),
        ("SELECT length(reduce(range(12), lambda a, x: replace(a, 'a', 'aa'), 'a')) AS n",
         r"reduce\(\) is refused where its lambda repeats its accumulator a"),
        # in a PIVOT without IN list (its source, ON, USING, GROUP BY) these calls are refused by name
        ("PIVOT (SELECT replace('k', 'k', 'kk') AS k, 1 AS v) ON k USING sum(v)",
         r"replace\(\) is refused .* In a PIVOT without an IN list .* replace\(\) is refused whatever its arguments"),
        ("PIVOT (SELECT 'k' AS k, len(list_transform([1], lambda x: x)) AS v) ON k USING sum(v)",
         r"list_transform\(\) is refused unless its call is checked.* a PIVOT is checked in full with an IN list"),
    ],
)
def test_a_call_that_repeats_a_value_without_bound_is_refused(sandbox: SqlSandbox, query: str, refused: str) -> None:
    """One call can repeat a value as DuckDB cannot stop it either (its interrupt and memory limit act between
    chunks of rows): a replace whose replacement its arguments set, calls nested that each grow their text, a
    lambda's body over the items of its list, a reduce's accumulator. Each is refused before it runs, in one line."""
    started = time.monotonic()
    with pytest.raises(SqlRefused, match=rf"^{refused}") as refusal:
        sandbox.query(query)
    assert "\n" not in str(refusal.value)
    assert time.monotonic() - started < 5  # nothing of it ran


def test_a_lambda_s_body_counts_once_for_each_item_of_its_list(store: Store) -> None:
    """list_transform(range(12000), lambda x: range(12000)) made 1.15 GB (37 s past a 5 s limit) where the sandbox
    counted 96 KB: what a lambda's body builds from counts, and its literals, count once for each item of its list,
    nested lambdas multiplied."""
    sandbox = SqlSandbox(store, limits=SqlLimits(timeout="5s", memory_limit="2GB", threads=2))  # 488,281 a row
    try:
        with pytest.raises(SqlRefused, match=r"^the values this query builds from counts \(literals, range\(\)\) come "
                                             r"to about 1,152,348,021 bytes a row, past the 488,281 a row"):
            sandbox.query("SELECT len(flatten(list_transform(range(12000), lambda x: range(12000)))) AS n")
        with pytest.raises(SqlRefused, match=r"come to about 72,\d{3},\d{3} bytes a row"):
            sandbox.query("SELECT sum(len(flatten(list_transform(range(3000), lambda x: range(3000))))) AS n "
                          "FROM range(40)")
        with pytest.raises(SqlRefused, match=r"\(literals, range\(\)\) come to about 700,\d{3},\d{3} bytes"):
            sandbox.query(f"SELECT len(list_transform(range(7000), lambda i: '{'a' * 100000}')) AS n")  # 100 KB an item
        with pytest.raises(SqlRefused, match=r"\(literals, range\(\), repeat\(\)\) come to about 1,000,\d{3},\d{3}"):
            sandbox.query("SELECT [repeat('a', 100000) FOR x IN range(10000) IF x % 2 = 0] AS l")
    finally:
        sandbox.close()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT replace(region, 'o', '0') AS r FROM releases WHERE region = 'north' LIMIT 1", "n0rth"),
        ("SELECT replace(region, 'n', 'North ') AS r FROM releases WHERE region = 'north' LIMIT 1", "North orth"),
        ("SELECT regexp_replace(region, '[aeiou]', '<\\0>', 'g') AS r FROM releases WHERE region = 'north' LIMIT 1",
         "n<o>rth"),
        ("SELECT regexp_replace(region, '^(\\w)(.*)$', '\\2-\\1') AS r FROM releases WHERE region = 'north' LIMIT 1",
         "orth-n"),
        ("SELECT concat_ws(', ', metric, region) AS r FROM releases ORDER BY r LIMIT 1", None),
        ("SELECT format('{0} ({0})', metric) AS r FROM releases LIMIT 1", None),
        ("SELECT hex(region) || to_json(region) || url_encode(region) AS r FROM releases LIMIT 1", None),
        ("SELECT list_transform([1, 2, 3], lambda x: x * 2) AS l", [2, 4, 6]),
        ("SELECT list_transform(range(4), lambda x: lpad(x::VARCHAR, 3, '0')) AS l", ["000", "001", "002", "003"]),
        ("SELECT [x * 2 FOR x IN range(10) IF x % 3 = 0] AS l", [0, 6, 12, 18]),
        ("SELECT list_filter(regions, lambda r: r <> region) AS l FROM (SELECT ['x', region] AS regions, region "
         "FROM releases LIMIT 1)", ["x"]),
        ("SELECT [upper(r) || ' region' FOR r IN regions IF r LIKE '%th'] AS l FROM (SELECT list(DISTINCT region "
         "ORDER BY region) AS regions FROM releases)", ["NORTH region", "SOUTH region"]),
        ("SELECT list_reduce([1, 5, 3], lambda acc, x: CASE WHEN acc > x THEN acc ELSE x END) AS m", 5),
        ("SELECT list_reduce(['a', 'b', 'c'], lambda acc, x: acc || ', ' || x) AS m", "a, b, c"),
        ("SELECT list_transform(range(3), lambda x: list_transform(range(3), lambda y: x * y)) AS l",
         [[0, 0, 0], [0, 1, 2], [0, 2, 4]]),
        # lists summed as they are built: 0.2 s for 300 x 300 x 300 (and stopped at the time limit at 1000)
        ("SELECT list_sum(list_transform(range(100), lambda x: list_sum(list_transform(range(100), lambda y: "
         "list_sum(list_transform(range(100), lambda z: x + y + z)))))) AS s", 148_500_000),
    ],
)
def test_calls_that_repeat_a_value_a_bounded_number_of_times_run(sandbox: SqlSandbox, query: str,
                                                                 expected: object) -> None:
    """Ordinary uses: replace with a short literal, a regexp with backreferences, lambdas over short lists or over a
    column's list with a few literals, a list comprehension, a reduce naming its accumulator once in its result,
    lambdas nested over ranges whose lists are summed."""
    rows = sandbox.query(query).to_pylist()
    assert rows
    if expected is not None:
        assert next(iter(rows[0].values())) == expected


def test_the_left_side_of_json_s_arrow_is_checked_and_the_arrow_still_reads_json(sandbox: SqlSandbox) -> None:
    """DuckDB parses j -> '$.a' as a lambda, whose left side (its parameters) the checks skipped: a lambda building
    1.15 GB there ran 181 s past a 1 s limit. The left side of an arrow is now a value, where no call takes a lambda."""
    with pytest.raises(SqlRefused, match=r"^the values this query builds from counts \(literals, range\(\)\) come to "
                                         r"about 8,\d{3},\d{3} bytes a row, past the 488,281"):
        sandbox.query("SELECT length(list_transform(range(1000), lambda x: range(1000))::JSON -> '$') AS n")
    got = sandbox.query("SELECT DISTINCT region, (to_json(region) -> '$')::VARCHAR AS j, "
                        "list_transform([to_json({'r': region})], lambda o: o -> '$.r')::VARCHAR[] AS l "
                        "FROM releases ORDER BY region").to_pylist()
    assert got and all(row["j"] == row["l"][0] == f'"{row["region"]}"' for row in got)


@pytest.mark.parametrize(
    ("separator", "between"),
    [("chr(9)", "\t"), ("'|' || ','", "|,"), ("concat(' ', chr(124), ' ')", " | "), ("chr(9) || chr(9)", "\t\t")],
)
def test_concat_ws_takes_a_constant_separator(store: Store, sandbox: SqlSandbox, separator: str, between: str) -> None:
    """A separator built of literals and chr() was refused as no literal: its size is as bounded as a literal's."""
    got = sandbox.query(f"SELECT concat_ws({separator}, region, metric) AS r FROM releases").column("r").to_pylist()
    rows = store.read("releases").to_pylist()
    assert sorted(got) == sorted(f"{row['region']}{between}{row['metric']}" for row in rows)


@pytest.mark.parametrize("separator", ["region", "chr(count::INT)", "chr(9) || region", "repeat('|', 3)",
                                       "'0123456789' || '012345'"])
def test_concat_ws_refuses_a_separator_built_from_columns_counts_or_past_15_bytes(sandbox: SqlSandbox,
                                                                                  separator: str) -> None:
    with pytest.raises(SqlRefused, match=r"^concat_ws\(\) is refused unless its separator is a literal of at most 15 "
                                         r"bytes, or a constant text of that size"):
        sandbox.query(f"SELECT concat_ws({separator}, region, metric) AS r FROM releases")


def test_a_lambda_over_a_list_of_columns_may_name_a_text_column_from_outside_it(store: Store,
                                                                               sandbox: SqlSandbox) -> None:
    """Each of the list's few items holds one copy of region: a result a constant factor of the row's values."""
    got = sandbox.query("SELECT DISTINCT region, metric, list_transform(list_value(region, metric), "
                        "lambda x: x || region) AS l FROM releases ORDER BY region, metric").to_pylist()
    pairs = sorted({(row["region"], row["metric"]) for row in store.read("releases").to_pylist()})
    assert got == [{"region": region, "metric": metric, "l": [region + region, metric + region]}
                   for region, metric in pairs]


@pytest.mark.parametrize(
    ("query", "refused"),
    [
        # over a list of unknown length: as many copies as items (string_split(s, '') of 100 KB: 10 GB)
        ("SELECT list_transform(string_split(region, ''), lambda x: x || region) AS l FROM releases",
         r"list_transform\(\) is refused where its lambda names region, .* over a list of unknown length"),
        # over more than 16 items, nested too
        ("SELECT list_transform(list_value(" + ", ".join(["metric"] * 17) + "), lambda x: x || region) AS l "
         "FROM releases", r"list_transform\(\) is refused where its lambda names region, .* up to 17 items"),
        ("SELECT list_transform(list_value(region, metric), lambda x: list_transform(list_value(" + ", ".join(
            ["x"] * 9) + "), lambda y: y || region)) AS l FROM releases",
         r"list_transform\(\) is refused where its lambda names region"),
    ],
)
def test_a_lambda_copying_a_text_column_without_a_constant_bound_is_refused(sandbox: SqlSandbox, query: str,
                                                                          refused: str) -> None:
    with pytest.raises(SqlRefused, match=rf"^{refused}"):
        sandbox.query(query)


def test_a_lambda_written_with_an_arrow_is_answered_with_its_lambda_form(sandbox: SqlSandbox) -> None:
    """DuckDB refuses x -> ... lambdas and advises a setting no query may change: the error says how to write it."""
    with pytest.raises(SqlError, match=r"^SQL error: DuckDB no longer takes a lambda written x -> \.\.\.: write "
                                       r"lambda x: \.\.\. instead") as refused:
        sandbox.query("SELECT list_transform(list_value(region, metric), x -> x || region) AS l FROM releases")
    assert "lambda_syntax" not in str(refused.value) and "\n" not in str(refused.value)


def test_lpad_and_rpad_to_a_literal_width_map_a_column_s_list(store: Store, sandbox: SqlSandbox) -> None:
    """Over a list of unknown length (a column's, split) lpad was refused as a value built from a count: it adds at
    most its width in characters of its fill to each item, which counts as that many bytes of literals would."""
    regions = sorted({row["region"] for row in store.read("releases").to_pylist()})
    got = sandbox.query("SELECT DISTINCT region, list_transform(string_split(region, ''), lambda c: lpad(c, 12, ' ')) "
                        "AS l FROM releases ORDER BY region").to_pylist()
    assert got == [{"region": region, "l": [char.rjust(12) for char in region]} for region in regions]
    got = sandbox.query("SELECT DISTINCT region, [rpad(c, 16, '.') FOR c IN string_split(region, '')] AS l "
                        "FROM releases ORDER BY region").to_pylist()
    assert got == [{"region": region, "l": [char.ljust(16, ".") for char in region]} for region in regions]
    got = sandbox.query("SELECT DISTINCT region, metric, list_transform(list_value(region, metric), "
                        "lambda x: lpad(x, 12, ' ')) AS l FROM releases ORDER BY region, metric").to_pylist()
    assert got and all(row["l"] == [row["region"].rjust(12), row["metric"].rjust(12)] for row in got)


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        ("lpad(c, count::INT, ' ')", r"lpad\(\) is refused unless its count is a literal"),  # a width from the data
        ("lpad(c, 1000, ' ')", r"list_transform\(\) is refused where its lambda, over a list of unknown length, adds "
                               r"1,000 bytes of literals to each item, past 16 \(the padding of lpad\(\) and rpad\(\)"),
        ("rpad(c, 17, '.')", r"list_transform\(\) is refused .* adds 17 bytes of literals to each item, past 16"),
        ("lpad(c, 9, '·')", r"list_transform\(\) is refused .* adds 18 bytes"),  # 2 bytes a character
        ("lpad(c, 12, region)", r"list_transform\(\) is refused .* adds 48 bytes"),  # a fill of unknown characters
        ("hex(lpad(c, 10, ' '))", r"list_transform\(\) is refused .* adds 20 bytes"),  # grown twice
        ("lpad(c, 10, ' ') || '0123456'", r"list_transform\(\) is refused .* adds 17 bytes"),
    ],
)
def test_lpad_over_a_column_s_list_is_refused_past_16_bytes_an_item(sandbox: SqlSandbox, body: str,
                                                                    refused: str) -> None:
    with pytest.raises(SqlRefused, match=rf"^{refused}"):
        sandbox.query(f"SELECT list_transform(string_split(region, ''), lambda c: {body}) AS l FROM releases")


def _nested(levels: int, body: str, around: str = "list_transform({}, lambda x: " + "{})") -> str:
    expression = "string_split(region, '')"
    for _ in range(levels):
        expression = around.format(expression, body)
    return expression


@pytest.mark.parametrize(
    ("expression", "grown"),
    [
        (_nested(25, "x || x"), 32),  # 2^25 times a column's list: 5.3 GB past a 256 MB limit
        (_nested(3, "[x, x, x]"), 27),
        (_nested(2, "concat(x, '-', x, '-', x, x, x)"), 25),
        (_nested(3, "hex(x) || x"), 27),  # twice, then once more
        ("invoke(lambda x: x || x, " * 25 + "region" + ")" * 25, 32),
        (_nested(5, "y || y", "list_transform({}, lambda x: list_transform([x, x], lambda y: {}))"), 64),
    ],
)
def test_a_lambda_naming_its_parameter_several_times_grows_its_list(sandbox: SqlSandbox, expression: str,
                                                                     grown: int) -> None:
    """lambda x: x || x makes each item twice as long; nested maps (or invokes) of it doubled a column's list at
    each level, unchecked. The times a body names its parameter now multiply along nested calls as growing calls'
    factors do, up to 16."""
    with pytest.raises(SqlRefused, match=rf"^\w+\(\) is refused here: its lambda names its parameter \d+ times .* "
                                         rf"a value {grown} times longer, past 16"):
        sandbox.query(f"SELECT {expression} AS v FROM releases")


def test_a_lambda_naming_its_parameter_a_bounded_number_of_times_runs(sandbox: SqlSandbox) -> None:
    got = sandbox.query(f"SELECT {_nested(4, 'x || x')} AS v FROM releases WHERE region = 'east' LIMIT 1")
    assert got.to_pylist() == [{"v": [c * 16 for c in "east"]}]
    for query in (  # named in scalars, or over a range's numbers
            f"SELECT {_nested(8, 'CASE WHEN x = x THEN x END')} AS v FROM releases",
            "SELECT list_transform(string_split(region, ''), lambda x: length(x) + length(x) * 2) AS v FROM releases",
            "SELECT list_transform(range(5), lambda i: [i, i, i, i, i, i]) AS v"):
        assert sandbox.query(query).num_rows >= 1, query


@pytest.mark.parametrize(
    "query",
    [
        "SELECT count(*) FROM histogram_values(releases, count, bin_count := 20000000, technique := 'equi-height')",
        "SELECT count(*) AS n FROM histogram_values(releases, count, bin_count := 1001, technique := 'equi-width')",
        "SELECT count(*) AS n FROM histogram_values(releases, count, 20000000, 'equi-width')",
        "SELECT count(*) AS n FROM histogram(releases, count, bin_count := 20000000, technique := 'equi-height')",
        "SELECT count(*) AS n FROM histogram(releases, count, bin_count := (SELECT 5), technique := 'equi-height')",
    ],
)
def test_histogram_table_macros_take_a_literal_bin_count_of_at_most_1000(sandbox: SqlSandbox, query: str) -> None:
    """DuckDB's histogram_values and histogram expand to generate_series(1, bin_count), list_apply over it and
    equi_width_bins(..., bin_count), which the parse tree does not show (bin_count 2 * 10^7: 11 s and 4.9 GB past a
    1 s and 256 MB limit)."""
    began = time.monotonic()
    with pytest.raises(SqlRefused, match=r"^histogram(_values)?\(\) is refused unless its bin_count is a literal of "
                                         r"at most 1,000"):
        sandbox.query(query)
    assert time.monotonic() - began < 1.0


def test_histogram_table_macros_with_few_bins_run(sandbox: SqlSandbox) -> None:
    for query in ("FROM histogram_values(releases, count)", "FROM histogram(releases, count, bin_count := 5)",
                  "FROM histogram_values(releases, count, bin_count := 1000, technique := 'equi-height')",
                  "SELECT histogram(metric) AS h FROM releases"):
        assert sandbox.query(query).num_rows >= 1, query


@pytest.mark.parametrize(
    ("query", "call"),
    [
        ("SELECT * FROM query('SELECT levenshtein(repeat(''a'', 100000), repeat(''b'', 100000)) AS d')", "query"),
        # runs on a connection of its own, which the time limit's interrupt never reaches
        ("SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1 AS n'))",
         "json_execute_serialized_sql"),
        ("SELECT json_serialize_plan('SELECT length(repeat(''a'', 100)) AS n') AS plan", "json_serialize_plan"),
    ],
)
def test_a_query_given_as_a_string_is_refused(sandbox: SqlSandbox, query: str, call: str) -> None:
    """A query inside a string (or JSON) is never checked, and some of these functions run it where the time limit
    cannot stop it: they are refused, whatever the query they are given."""
    with pytest.raises(SqlRefused, match=rf"^{call}\(\) is refused: the query it is given would run unchecked"):
        sandbox.query(query)


def test_a_result_finished_past_the_time_limit_is_refused(sandbox: SqlSandbox) -> None:
    """Work DuckDB's interrupt does not reach can finish without error long after the limit: past the limit, the
    result is refused however it ended."""
    batch = pa.record_batch({"n": [1]})
    with _Deadline(duckdb.connect(), 0.01) as deadline:
        time.sleep(0.2)  # the timer fired; the query it interrupted ended without error
        with pytest.raises(SqlLimitExceeded, match="ran past its time limit of 1s"):
            list(sandbox._limited(pa.RecordBatchReader.from_batches(batch.schema, [batch]), deadline))
        with pytest.raises(SqlLimitExceeded, match="ran past its time limit"):  # an empty result too
            list(sandbox._limited(pa.RecordBatchReader.from_batches(batch.schema, []), deadline))


@pytest.mark.parametrize(
    ("query", "rows"),
    [
        ("SELECT count(*) FROM range(100000)", 1),  # table functions produce rows chunk by chunk
        ("SELECT * FROM generate_series(1, 3)", 3),
        ("SELECT len(range(1000)) AS n", 1),  # literal counts up to COUNT_LIMIT
        ("SELECT lpad(region, 12, ' ') FROM releases", 10),  # as long as its count, whatever its text
        ("SELECT list_resize([1, 2], 5)", 1),
        ("SELECT repeat('ab', '3') AS s", 1),
        ("SELECT bitstring('101', 8) AS b", 1),
        ("SELECT format('{:>8} {:.3f} {{:>1000000000}}', region, count) FROM releases", 10),  # {{ is no field
        ("SELECT printf('%-8s|%5.1f|100%% 1000000000', region, count) FROM releases", 10),  # nor %% a conversion
        ("SELECT 'levenshtein(' AS text", 1),  # a name in a string is no call
    ],
)
def test_bounded_calls_and_table_functions_run(sandbox: SqlSandbox, query: str, rows: int) -> None:
    assert sandbox.query(query).num_rows == rows


def test_the_values_built_from_counts_in_a_chunk_of_rows_fit_the_memory_limit(store: Store) -> None:
    """DuckDB computes 2,048 rows at once on each thread, and counts no call's value against its memory limit
    (repeat('x', 10^6) FROM range(2048) made 2 GB under a 64 MB limit): the values a query's calls build from counts
    must fit the memory limit over such a chunk of rows on each thread."""
    sandbox = SqlSandbox(store, limits=SqlLimits(memory_limit="64MB", threads=2))  # 64 MB / 4,096 rows
    try:
        with pytest.raises(SqlRefused, match=r"\(repeat\(\)\) come to about 1,000,000 bytes a row, past the "
                                             r"15,625 a row its memory limit allows.* memory limit of 64MB"):
            sandbox.query("SELECT repeat('x', 1000000) AS s FROM range(2048)")
        with pytest.raises(SqlRefused, match=r"\(lpad\(\), repeat\(\)\) come to about 16,000 bytes a row"):
            sandbox.query("SELECT repeat('xy', 4000) AS a, lpad(region, 2000, ' ') AS b FROM releases")  # 4 B/char
        with pytest.raises(SqlRefused, match=r"\(range\(\)\) come to about 16,008 bytes a row"):  # 8 B a number
            sandbox.query("SELECT len(range(2000)) AS n")
        assert sandbox.query("SELECT repeat('x', 15000) AS s FROM range(3)").num_rows == 3
    finally:
        sandbox.close()
    sandbox = SqlSandbox(store, limits=SqlLimits(memory_limit="64MB", threads=1))  # one chunk at a time
    try:
        assert sandbox.query("SELECT repeat('x', 30000) AS s FROM range(3)").num_rows == 3
    finally:
        sandbox.close()


def test_a_query_nested_too_deeply_to_check_is_refused_not_a_python_error(sandbox: SqlSandbox) -> None:
    nested = "SELECT 1 AS x FROM " + "(SELECT 1 AS x FROM " * 400 + "(SELECT 1)" + " t)" * 400
    with pytest.raises(SqlRefused, match="nested too deeply"):
        sandbox.query(nested)
    assert sandbox.query("SELECT 1 AS x FROM " + "(SELECT 1 AS x FROM " * 50 + "(SELECT 1)" + " t)" * 50).num_rows


def test_settings_a_query_may_read_name_no_path_of_this_machine(sandbox: SqlSandbox) -> None:
    settings = sandbox.query("SELECT name, value FROM duckdb_settings()").to_pylist()
    home = str(Path.home())
    assert not [s for s in settings if home in str(s["value"]) or "/.duckdb" in str(s["value"])]


@pytest.mark.parametrize("query", ["SELECT * FROM duckdb_extensions()",
                                   "SELECT * FROM duckdb_extension_repositories()"])
def test_refusals_name_no_path_under_the_home_directory(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    home = tmp_path / "home-canary"
    monkeypatch.setenv("HOME", str(home))
    sandbox = SqlSandbox(store)
    try:
        with pytest.raises(SqlRefused, match=r"Cannot access directory \"~/\.duckdb/") as refused:
            sandbox.query(query)
    finally:
        sandbox.close()
    assert "home-canary" not in str(refused.value)


# --- size -----------------------------------------------------------------------------------------------------

def test_a_result_past_the_row_limit_is_refused_before_it_is_held(sandbox: SqlSandbox) -> None:
    assert sandbox.query("SELECT * FROM range(1000)").num_rows == 1000  # at the limit
    with pytest.raises(SqlLimitExceeded, match=r"more than 1,000 rows, its limit: .* --max-rows"):
        sandbox.query("SELECT * FROM range(1001)")
    with pytest.raises(SqlLimitExceeded, match="more than 1,000 rows"):  # never held whole: stopped at batch 1
        sandbox.query("SELECT * FROM range(10000000000)")


def test_a_result_past_the_size_limit_is_refused(sandbox: SqlSandbox) -> None:
    assert sandbox.query("SELECT repeat('x', 1000) AS s FROM range(900)").num_rows == 900  # 0.9 MB
    with pytest.raises(SqlLimitExceeded, match=r"larger than 1MB \(1,000,000 bytes in Arrow form\).*--max-size"):
        sandbox.query("SELECT repeat('x', 2000) AS s FROM range(900)")


def test_a_result_s_column_names_count_towards_its_size_limit(store: Store) -> None:
    """A PIVOT names its result's columns after the data: one row of 10 numbers, with 3.2 MB of column names, is
    past a 1 MB limit (the limit counted the batches' values only). Under a 10 s time limit, so that a loaded
    machine's slow cross join is not stopped by the time limit first."""
    sandbox = SqlSandbox(store, limits=SqlLimits(timeout="10s", max_rows=1000, max_size="1MB"))
    long = ("(SELECT string_agg(md5(a.count::VARCHAR || b.count || c.count || d.count), '') "
            "FROM releases a, releases b, releases c, releases d)")
    source = f"(SELECT {long} || row_number() OVER () AS k, 1 AS v FROM releases)"
    try:
        with pytest.raises(SqlLimitExceeded, match=r"larger than 1MB .* \(its column names alone are larger"):
            sandbox.query(f"PIVOT {source} ON k USING sum(v)")
        assert sandbox.query(f"PIVOT {source.replace(long, 'metric')} ON k USING sum(v)").num_columns == 10
    finally:
        sandbox.close()


def test_a_large_result_streams_in_batches(sandbox: SqlSandbox) -> None:
    limits = SqlLimits(max_rows=10 * BATCH_ROWS)
    streaming = SqlSandbox(sandbox.store, limits=limits)
    try:
        with streaming.stream(f"SELECT range AS i FROM range({3 * BATCH_ROWS + 5})") as reader:
            sizes = [batch.num_rows for batch in reader]
    finally:
        streaming.close()
    assert sum(sizes) == 3 * BATCH_ROWS + 5 and max(sizes) <= BATCH_ROWS


def test_a_stream_left_unread_frees_the_connection(sandbox: SqlSandbox) -> None:
    with sandbox.stream("SELECT * FROM range(1000)") as reader:
        reader.read_next_batch()
    assert sandbox.query("SELECT 42 AS x").to_pylist() == [{"x": 42}]


# --- configuration --------------------------------------------------------------------------------------------

def test_limits_come_from_the_config_sql_block(tmp_path: Path, config_path: Path) -> None:
    config_path.write_text(config_path.read_text() + '[sql]\nmax_rows = 5\ntimeout = "2s"\nmax_size = "1MiB"\n')
    config = load_config(config_path)
    assert config.sql == SqlLimits(max_rows=5, timeout="2s", max_size="1MiB")
    assert config.sql.max_bytes == 1024**2 and config.sql.timeout_s == 2.0
    with open_store(config_path) as fused:
        assert fused.sql("SELECT * FROM range(5)").num_rows == 5
        with pytest.raises(SqlLimitExceeded, match="more than 5 rows"):
            fused.sql("SELECT * FROM range(6)")
        with pytest.raises(SqlLimitExceeded):
            fused.sql_pandas("SELECT * FROM releases")
    with open_store(config_path, limits=SqlLimits(max_rows=50)) as fused:  # the API's own limits
        assert fused.sql("SELECT * FROM releases").num_rows == 10


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ("max_rows = 0", "sql.max_rows"),
        ('timeout = "0s"', "sql.timeout"),
        ('timeout = "soon"', "sql.timeout"),
        ('max_size = "lots"', "sql.max_size"),
        ('memory_limit = "-1GB"', "sql.memory_limit"),
        ("threads = 0", "sql.threads"),
        ("max_row = 5", "sql.max_row"),
    ],
)
def test_bad_sql_limits_are_refused_at_load_naming_the_field(config_path: Path, block: str, field: str) -> None:
    config_path.write_text(config_path.read_text() + f"[sql]\n{block}\n")
    with pytest.raises(ConfigError, match=rf"{field}: "):
        load_config(config_path)


def test_cli_options_override_the_config_and_show_their_defaults(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path.write_text(config_path.read_text() + "[sql]\nmax_rows = 5\n")
    assert main(["sql", "--config", str(config_path), "SELECT * FROM releases", "--format", "csv"]) == 1
    assert "more than 5 rows" in " ".join(capsys.readouterr().err.split())
    assert main(["sql", "--config", str(config_path), "SELECT * FROM releases", "--max-rows", "10"]) == 0
    assert "10 row(s)" in capsys.readouterr().out
    assert main(["sql", "--config", str(config_path), RECURSIVE, "--timeout", "1s"]) == 1
    assert "time limit of 1s" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):
        main(["sql", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "else 60s" in shown and "else 1000000" in shown and "else 256MB" in shown
    for option, value, message in [("--max-rows", "0", "Input should be greater than or equal to 1"),
                                   ("--timeout", "soon", "'soon' is not a duration"),
                                   ("--max-size", "big", "'big' is not a size")]:
        with pytest.raises(SystemExit) as usage:
            main(["sql", "--config", str(config_path), "SELECT 1", option, value])
        assert usage.value.code == 2
        assert f"argument {option}: {message}" in capsys.readouterr().err


def test_a_table_shows_its_first_rows_only(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "--config", str(config_path), "SELECT * FROM range(20000)"]) == 0
    out = capsys.readouterr().out
    assert "10000 row(s)" in out and "more rows than the 10,000 shown" in out


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_dates_python_cannot_hold_are_printed_as_text(
    config_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    query = "SELECT DATE '10000-01-01' AS d, TIMESTAMP '10000-01-01 10:00' AS t, DATE '2026-01-02' AS ok"
    assert main(["sql", "--config", str(config_path), "--format", fmt, query]) == 0
    out = capsys.readouterr().out
    assert "10000-01-01" in out and "2026-01-02" in out


NESTED_DATES = {
    "SELECT [DATE '10000-01-01', DATE '2026-01-02'] AS v": ["10000-01-01", "2026-01-02"],
    "SELECT {'t': TIMESTAMP '10000-01-01 10:00'} AS v": {"t": "10000-01-01 10:00:00.000000"},
    "SELECT MAP {'k': [DATE '10000-01-01']} AS v": [["k", ["10000-01-01"]]],
    "SELECT union_value(d := DATE '10000-01-01') AS v": "10000-01-01",
    "SELECT ['infinity'::DATE] AS v": ["<value out of range: 2147483647>"],
}


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
@pytest.mark.parametrize("query", list(NESTED_DATES))
def test_dates_python_cannot_hold_are_text_inside_lists_structs_maps_and_unions_too(
    config_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, query: str
) -> None:
    assert main(["sql", "--config", str(config_path), "--format", fmt, query]) == 0
    out = capsys.readouterr().out
    if fmt == "json":
        assert json.loads(out) == {"v": NESTED_DATES[query]}
    else:  # the same dates, in the cell's JSON (csv) or the table's text
        expected = re.findall(r"\d{4,5}-\d\d-\d\d|out of range", json.dumps(NESTED_DATES[query]))
        assert expected and all(text in out for text in expected)


def test_csv_output_streams_without_holding_the_result(config_path: Path) -> None:
    """CSV through a pipe, 48 MB then 380 MB of it: the command's peak memory hardly grows with the result (held
    whole, 330 MB more would be the Arrow result alone)."""
    script = (
        "import resource, subprocess, sys\n"
        "child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)\n"
        "written = lines = 0\n"
        "while chunk := child.stdout.read(1 << 20):\n"
        "    written += len(chunk)\n    lines += chunk.count(b'\\n')\n"
        "code = child.wait()\n"
        "print(code, written, lines, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    fusion = [sys.executable, "-c", "from fusion.cli.core import run; run()"]

    def run_csv(rows: int) -> tuple[int, int]:
        """(bytes written, peak memory in bytes) of `fusion sql --format csv` on `rows` rows of 190 bytes."""
        query = f"SELECT range AS i, repeat('x', 180) AS text FROM range({rows})"
        done = subprocess.run(
            [sys.executable, "-c", script, *fusion, "sql", "--config", str(config_path), query, "--format", "csv",
             "--max-rows", str(rows), "--max-size", "2GB"],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )
        code, written, lines, peak_kib = (int(v) for v in done.stdout.split())
        assert code == 0, done.stderr
        assert lines == rows + 1
        return written, peak_kib * 1024

    small, small_peak = run_csv(250_000)
    large, large_peak = run_csv(2_000_000)
    assert large > 380e6
    grown = large_peak - small_peak
    assert grown < 0.25 * (large - small), f"peak memory grew {grown / 1e6:.0f} MB for {large - small:.0f} more bytes"


def test_a_reader_that_stops_reading_ends_the_command_quietly(config_path: Path) -> None:
    """`fusion sql ... | head`: no traceback, the exit status SIGPIPE would give."""
    child = subprocess.Popen(
        [sys.executable, "-c", "from fusion.cli.core import run; run()", "sql", "--config", str(config_path),
         "SELECT * FROM range(3000000)", "--format", "csv", "--max-rows", "3000000", "--max-size", "1GB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )
    assert child.stdout is not None and child.stderr is not None
    assert child.stdout.readline() == b'"range"\n'
    child.stdout.close()
    assert child.wait(timeout=120) == 141
    assert child.stderr.read() == b""


# --- query forms ----------------------------------------------------------------------------------------------

def test_pivot_without_an_in_list_is_accepted_and_matches_a_reference(store: Store, sandbox: SqlSandbox) -> None:
    expected: dict[tuple[str, str], float] = {}
    for row in store.read("releases").to_pylist():
        key = (row["region"], row["metric"])
        expected[key] = expected.get(key, 0.0) + row["count"]
    for query in ("PIVOT releases ON metric USING sum(count) GROUP BY region",
                  "PIVOT releases ON metric USING sum(count) GROUP BY region;",
                  "WITH p AS (PIVOT releases ON metric USING sum(count) GROUP BY region) SELECT * FROM p",
                  "SELECT * FROM (PIVOT releases ON metric USING sum(count) GROUP BY region) -- a comment"):
        got = {(row["region"], metric): row[metric] for row in sandbox.query(query).to_pylist()
               for metric in ("temp", "load") if row[metric] is not None}
        assert got == expected, query


#: A PIVOT without IN list, whose calls were looked for in the query's whole text.
PIVOTED = "(PIVOT releases ON metric USING sum(count) GROUP BY region)"


def test_the_query_around_a_pivot_without_an_in_list_is_checked_as_any_query(store: Store,
                                                                               sandbox: SqlSandbox) -> None:
    """replace, concat_ws, a lambda or a `* REPLACE (...)` anywhere in a query holding such a PIVOT were refused by
    name; only the PIVOT's own parts are now, and the rest is checked on its parse tree, as any query is."""
    totals: dict[str, dict[str, float]] = {}
    for row in store.read("releases").to_pylist():
        metrics = totals.setdefault(row["region"], {})
        metrics[row["metric"]] = metrics.get(row["metric"], 0.0) + row["count"]
    regions = sorted(totals)

    got = sandbox.query(f"SELECT replace(region, 'o', '0') AS r, temp FROM {PIVOTED} ORDER BY region").to_pylist()
    assert got == [{"r": region.replace("o", "0"), "temp": totals[region].get("temp")} for region in regions]

    got = sandbox.query("WITH keys AS (SELECT concat_ws('|', region, metric) AS k FROM releases) "
                        f"SELECT region, (SELECT max(k) FROM keys) AS top FROM {PIVOTED} ORDER BY region").to_pylist()
    top = max(f"{row['region']}|{row['metric']}" for row in store.read("releases").to_pylist())
    assert got == [{"region": region, "top": top} for region in regions]

    got = sandbox.query("SELECT region, list_transform([temp, load], lambda v: coalesce(v, 0)) AS l "
                        f"FROM {PIVOTED} ORDER BY region").to_pylist()
    assert got == [{"region": region, "l": [totals[region].get("temp", 0), totals[region].get("load", 0)]}
                   for region in regions]

    got = sandbox.query(f"SELECT * REPLACE (upper(region) AS region) FROM {PIVOTED} ORDER BY region").to_pylist()
    assert [row["region"] for row in got] == [region.upper() for region in regions]

    # An ON value bucketing with CASE ... IN (...) has no IN list of its own: the query is checked on its tree too
    # (it was taken for a listed PIVOT, checked by its text, and refused for the replace outside the PIVOT).
    got = sandbox.query("SELECT replace(region, 'o', '0') AS r, a FROM (PIVOT releases ON CASE WHEN metric IN "
                        "('temp') THEN 'a' ELSE 'b' END USING sum(count) GROUP BY region) ORDER BY region").to_pylist()
    assert got == [{"r": region.replace("o", "0"), "a": totals[region].get("temp")} for region in regions]


@pytest.mark.parametrize(
    ("query", "refused"),
    [
        # the PIVOT's own parts: its ON values name its columns, and derive from these calls whatever their arguments
        ("PIVOT releases ON replace(metric, 'e', 'ee') USING sum(count)", r"replace\(\) is refused .* In a PIVOT "
         r"without an IN list \(its source, ON, USING and GROUP BY, and the WITH queries its source reads\)"),
        ("PIVOT releases ON metric USING max(concat_ws('|', region, unit))", r"concat_ws\(\) is refused .* In a PIVOT"),
        ("PIVOT (SELECT metric, list_transform([count], lambda c: c) AS l FROM releases) ON metric USING max(l)",
         r"list_transform\(\) is refused .* In a PIVOT"),
        ("WITH c AS (SELECT replace(region, 'o', '0') AS k, count FROM releases), d AS (FROM c) "
         "PIVOT d ON k USING sum(count)", r"replace\(\) is refused .* In a PIVOT"),  # a WITH query its source reads
        ("WITH c AS (SELECT replace(region, 'o', '0') AS k, count FROM releases) "
         "PIVOT (FROM query_table('c')) ON k USING sum(count)", r"replace\(\) is refused .* In a PIVOT"),
        # the rest of the query: checked as any query's
        (f"SELECT replace(region, 'o', repeat('o', 1000)) AS r FROM {PIVOTED}",
         r"replace\(\) is refused unless its replacement is a literal"),
        (f"SELECT levenshtein(region, region) AS d FROM {PIVOTED}", r"levenshtein\(\) is refused"),
        (f"SELECT length(repeat('ab', 300000)) AS n FROM {PIVOTED}",
         r"the values this query builds from counts \(repeat\(\)\) come to about 600,\d{3} bytes a row"),
        # a PIVOT whose source joins tables (an ON of its own), or a query naming the IN list's type: by its text
        ("SELECT replace(region, 'o', '0') AS r FROM (PIVOT releases a JOIN releases b USING (release_id) ON metric "
         "USING count(*) GROUP BY region)", r"replace\(\) is refused .* This query is checked by its text only"),
        ("SELECT bin(bin(region)) AS b FROM (PIVOT releases a JOIN releases b USING (release_id) ON metric "
         "USING count(*) GROUP BY region)", r"bin\(\) is refused: it makes its text up to 8 times longer, .* This "
         r"query is checked by its text only"),
        # what repeats a value without naming a refused function: refused anywhere in a query checked by its text
        ("SELECT [region || region FOR x IN string_split(region, '')] AS l FROM (PIVOT releases a JOIN releases b "
         "USING (release_id) ON metric USING count(*) GROUP BY region)",
         r"a list comprehension \(\[\.\.\. FOR x IN l\]\) is refused in this query: it is checked by its text only"),
        ("SELECT len([[s || s FOR y IN l] FOR x IN l]) AS n FROM (SELECT 'ab' AS s, ['a'] AS l), (PIVOT releases ON "
         "metric IN (SELECT DISTINCT metric FROM releases) USING sum(count) GROUP BY region)",
         r"a list comprehension .* is refused in this query"),
        ("SELECT invoke(lambda x: x || x, region) AS d FROM (PIVOT releases a JOIN releases b USING (release_id) ON "
         "metric USING count(*) GROUP BY region)", r"a lambda \(lambda x: \.\.\.\) is refused in this query"),
    ],
)
def test_a_pivot_without_an_in_list_still_refuses_what_it_derives_from(sandbox: SqlSandbox, query: str,
                                                                        refused: str) -> None:
    with pytest.raises(SqlRefused, match=rf"^{refused}"):
        sandbox.query(query)


def test_a_pivot_without_an_in_list_leaves_no_type_in_the_session(store: Store) -> None:
    """DuckDB creates an ENUM type of a PIVOT's distinct ON values for each PIVOT without IN list, and kept every
    one for the session (20 queries with 10 values of 3.2 MB: 750 MB more, until its queries failed for lack of
    memory): each is dropped once its query is done, read whole, stopped at a limit or left unread."""
    sandbox = SqlSandbox(store, limits=SqlLimits(timeout="5s", max_rows=2, max_size="1MB"))
    types = "SELECT count(*) AS n FROM duckdb_types() WHERE type_name LIKE '__pivot_enum%'"
    for index in range(20):
        got = sandbox.query(f"SELECT region, temp + {index} AS t FROM {PIVOTED} ORDER BY region LIMIT 1")
        assert got.num_rows == 1
    with pytest.raises(SqlLimitExceeded, match="more than 2 rows"):
        sandbox.query(PIVOTED[1:-1])
    with sandbox.stream(f"SELECT * FROM {PIVOTED}"):
        pass
    assert sandbox.query(types).to_pylist() == [{"n": 0}]
    sandbox.close()


@pytest.mark.parametrize(
    ("alias", "comment"),
    [("n", "-- fusion_pivot_values"), ("fusion_pivot_values", ""), ("n", "/* fusion_pivot_values_0 */")],
)
def test_naming_the_twin_s_values_type_does_not_turn_a_pivot_s_check_to_its_text(sandbox: SqlSandbox, alias: str,
                                                                                  comment: str) -> None:
    """The name of the type a PIVOT's twin pivots on is made for each twin: a query naming what it starts with (in a
    comment, as an alias) is still checked on its parse tree, where a list comprehension copying a value from
    outside it into each item is refused (checked by its text, it made 1.9 GB under a 256 MB limit)."""
    bomb = "(SELECT len([s || s for x in string_split(s, '')]) FROM (SELECT max(region) AS s FROM releases))"
    with pytest.raises(SqlRefused, match=r"^list_apply\(\) is refused where its lambda names s, a value from outside"):
        sandbox.query(f"SELECT {bomb} AS {alias}, * FROM {PIVOTED} {comment}")
    assert sandbox.query(f"SELECT region AS {alias} FROM {PIVOTED} {comment}").num_rows == 3


@pytest.mark.parametrize(
    ("query", "rows"),
    [
        ("PIVOT releases ON metric IN ('temp', 'load') USING count(*) GROUP BY region", 3),
        ("UNPIVOT (SELECT region, count, sum FROM releases) ON count, sum INTO NAME stat VALUE v", 20),
        ("WITH t AS (SELECT * FROM releases WHERE metric = 'temp') SELECT count(*) FROM t", 1),
        ("FROM releases WHERE region = 'east'", 2),
        ("FROM releases SELECT metric, count(*) GROUP BY metric", 2),
        ("VALUES (1, 'a'), (2, 'b')", 2),
        ("TABLE releases", 10),
        ("SELECT region FROM releases UNION SELECT 'west'", 4),
        ("(SELECT 1 AS x) EXCEPT (SELECT 2)", 1),
        ("SUMMARIZE releases", len(TABLE_SCHEMAS["releases"])),
        ("SUMMARIZE SELECT count, sum FROM releases", 2),
        ("DESCRIBE releases", len(TABLE_SCHEMAS["releases"])),
        ("SHOW TABLES", len(TABLE_SCHEMAS)),
        ("SELECT count(*) FROM information_schema.tables", 1),
        ("SELECT * FROM query_table('releases')", 10),
        ("SELECT * FROM RELEASES WHERE \"region\" = 'east'", 2),
    ],
)
def test_read_only_query_forms_are_accepted(sandbox: SqlSandbox, query: str, rows: int) -> None:
    assert sandbox.query(query).num_rows == rows


def test_every_table_is_in_the_catalog(sandbox: SqlSandbox) -> None:
    names = sandbox.query("SELECT table_name FROM information_schema.tables").column("table_name").to_pylist()
    assert sorted(names) == sorted(TABLE_SCHEMAS)


def test_a_table_created_after_the_session_opened_stays_empty_in_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "late")
    sandbox = SqlSandbox(store)
    try:
        store.insert_new("releases", sample_releases())  # creates the table after the session opened
        assert sandbox.query("SELECT count(*) AS n FROM releases").to_pylist() == [{"n": 0}]
    finally:
        sandbox.close()


# --- refusals -------------------------------------------------------------------------------------------------

PIVOT = "PIVOT releases ON metric USING sum(count)"


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("INSTALL httpfs", "INSTALL statements are refused"),  # DuckDB files it under LOAD
        ("FORCE INSTALL httpfs", "FORCE INSTALL statements are refused"),
        ("RESET lock_configuration", "RESET statements are refused"),  # under SET
        ("USE memory", "USE statements are refused"),  # under SET
        ("CHECKPOINT", "CHECKPOINT statements are refused"),  # under CALL
        ("ANALYZE", "ANALYZE statements are refused"),  # under VACUUM
        ("DEALLOCATE p", "DEALLOCATE statements are refused"),  # under DROP
        ("COMMENT ON VIEW releases IS 'x'", "COMMENT statements are refused"),  # under ALTER
        ("UPDATE EXTENSIONS", "UPDATE EXTENSIONS statements are refused"),  # a type the client cannot name
        ("EXPLAIN SELECT 1", "EXPLAIN statements are refused"),
        ("EXPLAIN ANALYZE SELECT * FROM releases", "EXPLAIN ANALYZE statements are refused"),
        ("/* why */ -- not\n DETACH memory", "DETACH statements are refused"),
        (f"CREATE TABLE t AS {PIVOT}", "CREATE statements are refused"),  # a PIVOT makes DuckDB call it MULTI
        (f"COPY ({PIVOT}) TO '{{out}}/leak.csv'", "COPY statements are refused"),
        (f"INSERT INTO releases {PIVOT}", "INSERT statements are refused"),
        (f"WITH p AS ({PIVOT}) DELETE FROM releases", "this statement is refused: only a query"),
        ("WITH x AS (DELETE FROM releases RETURNING *) SELECT * FROM x", "DELETE statements are refused, in a WITH"),
        ("WITH x AS (UPDATE releases SET count = 0 RETURNING *) SELECT count(*) FROM x",
         "UPDATE statements are refused, in a WITH"),
        ("SELECT * FROM (WITH x AS (INSERT INTO releases SELECT * FROM releases RETURNING *) SELECT * FROM x)",
         "INSERT statements are refused, in a WITH"),
    ],
)
def test_refusals_name_the_statement_refused(store: Store, sandbox: SqlSandbox, tmp_path: Path, query: str,
                                             named: str) -> None:
    before = snapshot(store, tmp_path)
    with pytest.raises(SqlRefused) as refused:
        sandbox.query(query.format(out=tmp_path))
    assert str(refused.value).startswith(named) and "sandboxed" in str(refused.value)
    assert snapshot(store, tmp_path) == before
    assert sandbox.query("SELECT count(*) AS n FROM releases").to_pylist() == [{"n": 10}]


def test_limits_are_frozen_and_validated() -> None:
    limits = SqlLimits()
    assert (limits.timeout_s, limits.max_rows, limits.max_bytes, limits.memory_bytes) == (60.0, 1_000_000,
                                                                                          256_000_000, 2 * 10**9)
    with pytest.raises(ValueError):
        limits.replace(max_rows=-1)
    with pytest.raises(ValueError, match="frozen"):
        limits.max_rows = 3  # type: ignore[misc]
    assert isinstance(SqlError("x"), ValueError) and issubclass(SqlLimitExceeded, SqlError)
    assert pa.types.is_int64(pa.scalar(limits.max_bytes).type)


def test_closing_a_sandbox_busy_in_another_thread_interrupts_its_query(store: Store) -> None:
    # A dashboard stopping while its background thread still queries (DuckDB refuses to close a busy connection:
    # `fusion serve` ended with status 1 instead of 130 on Ctrl-C when that happened).
    import threading

    sandbox = SqlSandbox(store, limits=SqlLimits(timeout="60s", max_rows=1000, max_size="1MB"))
    failures: list[BaseException] = []

    def run() -> None:
        try:
            sandbox.query(CROSS_JOIN)
        except BaseException as exc:  # whatever the interrupted query raises, it is recorded
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.5)  # the query is running
    started = time.monotonic()
    sandbox.close()
    thread.join(10)
    assert time.monotonic() - started < 5 and not thread.is_alive()
    assert len(failures) == 1  # the query stopped, with an error in its own thread


def test_a_query_text_past_its_length_limit_is_refused_before_it_is_parsed(sandbox: SqlSandbox) -> None:
    """Checking a query serialises its parse tree (about 50 times its text) before the time limit starts: a
    1.2 MB `SELECT 1, 1, ...` took 7 s and 2.1 GB. Past MAX_QUERY_BYTES the text is refused at once."""
    from fusion.store.sql import MAX_QUERY_BYTES

    long = "SELECT " + ", ".join(["1"] * (MAX_QUERY_BYTES // 3))
    began = time.monotonic()
    with pytest.raises(SqlRefused, match=r"the query's text is [\d,]+ bytes, past the 262,144") as refused:
        sandbox.query(long)
    assert time.monotonic() - began < 1.0
    assert "\n" not in str(refused.value)
    near = "SELECT " + ", ".join(["1"] * 1000)
    assert sandbox.query(near).num_columns == 1000  # a long but ordinary query still runs


@pytest.mark.parametrize("word", ["PIVOT", "pivot_wider", "PIVOT_WIDER"])
def test_nested_pivots_past_their_limit_are_refused_before_they_are_parsed(sandbox: SqlSandbox, word: str) -> None:
    """DuckDB's parser slows down much faster than the text grows with nested PIVOTs (1,000 levels, 26 KB: 9.5 s;
    1,500 PIVOT_WIDERs, 62 KB: 42 s and 5 GB), before the time limit starts: past MAX_PIVOTS the query is refused at
    once, whichever spelling it uses; a few nested PIVOTs still run."""
    from fusion.store.sql import MAX_PIVOTS

    def nested(levels: int) -> str:
        source = "(SELECT metric, region, count FROM releases)"
        for _ in range(levels):
            source = f"({word} {source} ON region USING sum(count))"
        return f"SELECT * FROM {source}"

    began = time.monotonic()
    with pytest.raises(SqlRefused, match=rf"names PIVOT or UNPIVOT \(or PIVOT_WIDER, PIVOT_LONGER\) more than "
                                         rf"{MAX_PIVOTS} times") as refused:
        sandbox.query(nested(1000))
    assert time.monotonic() - began < 1.0
    assert "\n" not in str(refused.value)
    assert sandbox.query(f"{nested(1)} AS p").num_rows >= 0


def test_unpivot_longer_counts_towards_the_pivot_limit(sandbox: SqlSandbox) -> None:
    from fusion.store.sql import MAX_PIVOTS

    query = " UNION ALL ".join(["SELECT * FROM (PIVOT_LONGER (SELECT count, sum FROM releases) ON count, sum "
                                "INTO NAME stat VALUE v)"] * (MAX_PIVOTS + 1))
    with pytest.raises(SqlRefused, match=r"more than \d+ times"):
        sandbox.query(query)
    assert sandbox.query(query.split(" UNION ALL ")[0]).num_rows == 20


@pytest.mark.parametrize(
    "query",
    [
        # a column from outside a lambda under arithmetic: each item is a number, no copy of anything
        "SELECT list_transform(string_split(region, ''), lambda c: length(c) * count) AS l FROM releases",
        "SELECT list_transform(string_split(region, ''), lambda c: round(abs(length(c) - count) / 2, 1)) AS l "
        "FROM releases",
        # a numeric accumulator named twice: a number cannot double in size
        "SELECT list_reduce(list_transform(string_split(region, ''), lambda c: length(c) * 1.0), "
        "lambda a, b: a + (b - a) / 2) AS m FROM releases",
    ],
)
def test_arithmetic_on_values_from_outside_a_lambda_is_not_a_copy(sandbox: SqlSandbox, query: str) -> None:
    """Scaling a list by a column, or a running midpoint, were refused as unbounded copies (arithmetic builds a
    number whatever its operands)."""
    assert sandbox.query(query).num_rows > 0
