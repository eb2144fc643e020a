"""Parameters: bad values are refused naming the parameter; what reaches SQL is the value itself, as text."""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboard import params
from dashboard.formatting import interval, number, sd, when

CONNECTION = duckdb.connect()


@settings(deadline=None, max_examples=200)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=params.MAX_TEXT))
def test_a_text_literal_reads_back_as_the_text_itself(value: str) -> None:
    assert params.text("q", value) in (None, value)
    assert CONNECTION.execute(f"SELECT {params.sql_text(value)} AS v").fetchone() == (value,)


def test_times_are_utc() -> None:
    assert params.time("start", "2026-01-05") == datetime(2026, 1, 5, tzinfo=UTC)
    assert params.time("start", "2026-01-05T08:00+02:00") == datetime(2026, 1, 5, 6, tzinfo=UTC)
    assert params.time("start", " ") is None
    stamp = params.sql_time(datetime(2026, 1, 5, 6, tzinfo=UTC))
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    assert con.execute(f"SELECT {stamp} AS t").fetchone()[0] == datetime(2026, 1, 5, 6, tzinfo=UTC)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: params.choice("region", "x", ["a", "b"]), "region: 'x' is not one of the store's values ('a', 'b')"),
    (lambda: params.choice("region", "x", []), "region: 'x' is not one of the store's values (none yet)"),
    (lambda: params.text("text", "a" * 201), "text: at most 200 characters, got 201"),
    (lambda: params.text("text", "a\nb"), "text: control characters are not accepted"),
    (lambda: params.time("end", "soon"), "end: 'soon' is not a time"),
    (lambda: params.time("start", "0001-01-01T00:00+01:00"), "start: '0001-01-01T00:00+01:00' is out of the range"),
    (lambda: params.time("end", "9999-12-31T23:00-05:00"), "end: '9999-12-31T23:00-05:00' is out of the range"),
    (lambda: params.days("days", "\u00b2", default=7), "days: '\u00b2' is not a number of days"),
    (lambda: params.page("page", "\u00b9"), "page: '\u00b9' is not a page number"),
    (lambda: params.days("days", "0", default=7), "days: '0' is not a number of days from 1 to 3660, or 'all'"),
    (lambda: params.page("page", "-1"), "page: '-1' is not a page number"),
])
def test_a_bad_value_is_refused_naming_the_parameter(call: object, message: str) -> None:
    with pytest.raises(params.BadParameter) as caught:
        call()  # type: ignore[operator]
    assert str(caught.value).startswith(message)


def test_numbers_keep_about_four_significant_digits() -> None:
    assert [number(v) for v in (12.3456, 1234.5, 0.0012346, 12345678.0, -0.5, 3, None, float("inf"))] == [
        "12.35", "1,234", "0.001235", "1.235e+07", "-0.5", "3", "–", "inf"]
    assert (sd(0.25), sd(None), interval(9.5, 10.5), interval(None, 1.0)) == ("± 0.25", "± –", "[9.5, 10.5]", "–")
    assert when(datetime(2026, 1, 5, 6, tzinfo=UTC)) == "2026-01-05 06:00"
