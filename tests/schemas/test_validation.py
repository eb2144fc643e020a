"""ReadingValidator.validate on hand-built raw Arrow tables, checked against a slow plain-Python reference."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.readings import (
    ALL_FIELDS,
    DEAD_LETTER_REASON,
    DEAD_LETTER_ROW,
    DEAD_LETTER_SOURCE,
    ENTITY_ID,
    EVENT_TIME,
    METRIC,
    READING_SCHEMA,
    REGION,
    REQUIRED_FIELDS,
    SENSOR_ID,
    VALUE,
)
from schemas.reasons import REASON_PRECEDENCE, RejectReason
from schemas.validation import ReadingRules, ReadingValidator, _trimmed, connect

START = datetime(2026, 1, 1, tzinfo=UTC)
END = START + timedelta(hours=6)
PLAUSIBLE = {"temp": (-60.0, 60.0), "load": (0.0, 2000.0)}
REGIONS = ("north", "south", "east")
RULES = ReadingRules(plausible=PLAUSIBLE, regions=REGIONS, start=START, end=END)
IDENTITY = {f: f for f in ALL_FIELDS}
R = RejectReason

#: The reasons validation itself assigns (malformed records and duplicates are decided elsewhere).
VALIDATION_REASONS = tuple(r for r in REASON_PRECEDENCE if r not in (R.MALFORMED_RECORD, R.DUPLICATE))


@pytest.fixture(scope="module")
def validator() -> Iterator[ReadingValidator]:
    yield ReadingValidator(RULES)


def good(**overrides: Any) -> dict[str, Any]:
    """One valid CSV-like (all text) raw row, with some fields replaced."""
    row: dict[str, Any] = {
        ENTITY_ID: "e1",
        REGION: "north",
        METRIC: "temp",
        EVENT_TIME: "2026-01-01T01:00:00Z",
        VALUE: "21.5",
        SENSOR_ID: "s1",
    }
    row.update(overrides)
    return row


def text_table(rows: list[dict[str, Any]], names: tuple[str, ...] = ALL_FIELDS) -> pa.Table:
    return pa.table({n: pa.array([r.get(n) for r in rows], pa.string()) for n in names})


# --- the slow, obvious reference -------------------------------------------------------------------------


def _blank_to_none(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | Decimal):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _as_time(value: Any, time_format: str) -> datetime | None:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if time_format == "iso":
        if not isinstance(value, str):
            return None
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    # An epoch count is the decimal it is written as (a float: its shortest text), floored to the microsecond.
    if isinstance(value, bool) or value is None:
        return None
    try:
        count = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
    except ArithmeticError:  # decimal.InvalidOperation: not a number
        return None
    if not count.is_finite():
        return None
    micros = math.floor(count * (1000 if time_format == "epoch_ms" else 1_000_000))
    try:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    except OverflowError:
        return None


def reference(row: dict[str, Any], rules: ReadingRules = RULES, time_format: str = "iso") -> str | dict[str, Any]:
    """The reason code of one raw row (fields by logical name), or its typed reading if it is valid."""
    if any(row.get(f) is None or (isinstance(row.get(f), str) and not row[f].strip()) for f in REQUIRED_FIELDS):
        return R.MISSING_FIELD  # absent, null or blank text
    entity, region, metric = (_blank_to_none(row[f]) for f in (ENTITY_ID, REGION, METRIC))
    if entity is None or region is None or metric is None:
        return R.MISSING_FIELD
    value = _as_float(row[VALUE])
    if value is None:
        return R.MISTYPED_FIELD
    moment = _as_time(row[EVENT_TIME], time_format)
    if moment is None:
        return R.UNPARSEABLE_TIME
    if not rules.start <= moment < rules.end:
        return R.OUT_OF_INTERVAL
    if metric not in rules.plausible:
        return R.UNKNOWN_METRIC
    if region not in rules.regions:
        return R.UNKNOWN_REGION
    if not math.isfinite(value):
        return R.NON_FINITE_VALUE
    low, high = rules.plausible[metric]
    if not low <= value <= high:
        return R.OUT_OF_RANGE
    return {
        ENTITY_ID: entity,
        REGION: region,
        METRIC: metric,
        EVENT_TIME: moment,
        VALUE: value,
        SENSOR_ID: _blank_to_none(row.get(SENSOR_ID)),
    }


def _key(reading: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(reading[f] for f in ALL_FIELDS)


def check_against_reference(
    validator: ReadingValidator, rows: list[dict[str, Any]], raw: pa.Table, *, time_format: str = "iso"
) -> None:
    """Every row's fate (reason or typed reading) equals the reference's; dead letters point at their rows."""
    result = validator.validate(raw, columns=IDENTITY, time_format=time_format, source="feed.csv")
    expected = [reference(r, time_format=time_format) for r in rows]
    assert result.rows == raw.num_rows == len(rows)
    assert result.accepted.num_rows + result.rejected.num_rows == len(rows)
    assert result.accepted.schema.equals(READING_SCHEMA)
    assert Counter(_key(r) for r in result.accepted.to_pylist()) == Counter(
        _key(e) for e in expected if isinstance(e, dict)
    )
    expected_reasons = {i: str(e) for i, e in enumerate(expected) if not isinstance(e, dict)}
    got_reasons = dict(
        zip(
            result.rejected.column(DEAD_LETTER_ROW).to_pylist(),
            result.rejected.column(DEAD_LETTER_REASON).to_pylist(),
            strict=True,
        )
    )
    assert got_reasons == expected_reasons
    assert result.reasons == dict(Counter(expected_reasons.values()))


# --- every reason code ------------------------------------------------------------------------------------

#: A row built to trigger exactly each reason validation assigns.
ONE_FAULT: dict[RejectReason, dict[str, Any]] = {
    R.MISSING_FIELD: good(entity_id=None),
    R.MISTYPED_FIELD: good(value="twenty"),
    R.UNPARSEABLE_TIME: good(event_time="yesterday noon"),
    R.OUT_OF_INTERVAL: good(event_time="2026-01-01T06:00:00Z"),  # the end is exclusive
    R.UNKNOWN_METRIC: good(metric="humidity"),
    R.UNKNOWN_REGION: good(region="west"),
    R.NON_FINITE_VALUE: good(value="NaN"),
    R.OUT_OF_RANGE: good(value="60.5"),
}


def test_one_fault_rows_cover_every_validation_reason() -> None:
    assert set(ONE_FAULT) == set(VALIDATION_REASONS)
    assert all(reference(row) == reason for reason, row in ONE_FAULT.items())


@pytest.mark.parametrize("reason", VALIDATION_REASONS, ids=str)
def test_each_reason_is_produced(validator: ReadingValidator, reason: RejectReason) -> None:
    rows = [good(entity_id="before"), ONE_FAULT[reason], good(entity_id="after")]
    result = validator.validate(text_table(rows), columns=IDENTITY, source="feed.csv")
    assert result.reasons == {str(reason): 1}
    assert result.rejected.column(DEAD_LETTER_REASON).to_pylist() == [str(reason)]
    assert result.rejected.column(DEAD_LETTER_ROW).to_pylist() == [1]
    assert sorted(result.accepted.column(ENTITY_ID).to_pylist()) == ["after", "before"]


def test_all_reasons_in_one_batch(validator: ReadingValidator) -> None:
    rows = [good(entity_id=f"ok-{i}") for i in range(3)] + list(ONE_FAULT.values())
    result = validator.validate(text_table(rows), columns=IDENTITY, source="feed.csv")
    assert result.reasons == {str(r): 1 for r in VALIDATION_REASONS}
    assert result.accepted.num_rows == 3
    check_against_reference(validator, rows, text_table(rows))


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({ENTITY_ID: ""}, R.MISSING_FIELD),  # blank text is missing
        ({REGION: "   "}, R.MISSING_FIELD),
        ({METRIC: None}, R.MISSING_FIELD),
        ({EVENT_TIME: None}, R.MISSING_FIELD),
        ({VALUE: None}, R.MISSING_FIELD),
        ({VALUE: ""}, R.MISSING_FIELD),  # blank text is missing, as for every field
        ({VALUE: "1,5"}, R.MISTYPED_FIELD),
        ({VALUE: "true"}, R.MISTYPED_FIELD),
        ({EVENT_TIME: "2026-13-01T00:00:00"}, R.UNPARSEABLE_TIME),
        ({EVENT_TIME: ""}, R.MISSING_FIELD),
        ({EVENT_TIME: "2025-12-31T23:59:59.999999Z"}, R.OUT_OF_INTERVAL),
        ({EVENT_TIME: "2026-01-01T01:00:00-06:00"}, R.OUT_OF_INTERVAL),  # 07:00 UTC
        ({METRIC: "Temp"}, R.UNKNOWN_METRIC),  # names are case-sensitive
        ({REGION: "North"}, R.UNKNOWN_REGION),
        ({VALUE: "inf"}, R.NON_FINITE_VALUE),
        ({VALUE: "-Infinity"}, R.NON_FINITE_VALUE),
        ({VALUE: "1e400"}, R.NON_FINITE_VALUE),  # overflows to infinity
        ({VALUE: "-60.01"}, R.OUT_OF_RANGE),
        ({METRIC: "load", VALUE: "-0.5"}, R.OUT_OF_RANGE),
        ({METRIC: "load", VALUE: "2000.5"}, R.OUT_OF_RANGE),
    ],
)
def test_reason_variants(validator: ReadingValidator, overrides: dict[str, Any], reason: RejectReason) -> None:
    row = good(**overrides)
    assert reference(row) == reason  # the reference agrees with the expectation written here
    result = validator.validate(text_table([row]), columns=IDENTITY)
    assert result.reasons == {str(reason): 1}
    assert result.accepted.num_rows == 0


def test_accepted_rows_are_typed_readings(validator: ReadingValidator) -> None:
    rows = [
        good(entity_id=" e1 ", region=" south ", metric=" temp ", value=" -60 ", sensor_id=" s7 "),
        good(entity_id="e2", metric="load", value="2000", event_time="2026-01-01T00:00:00Z", sensor_id=None),
        good(entity_id="e3", metric="load", value="0", event_time="2026-01-01T05:59:59.999999+00:00", sensor_id=""),
        good(entity_id="e4", value="1e1", event_time="2026-01-01 03:30:00+02:00"),  # 01:30 UTC
        good(entity_id="e5", value="60", event_time="2026-01-01T02:00:00"),  # naive times are UTC
    ]
    result = validator.validate(text_table(rows), columns=IDENTITY)
    assert result.reasons == {}
    assert result.rejected.num_rows == 0
    assert result.accepted.schema.equals(READING_SCHEMA)
    got = sorted(result.accepted.to_pylist(), key=lambda r: r[ENTITY_ID])
    assert got == [
        {
            ENTITY_ID: "e1",
            REGION: "south",
            METRIC: "temp",
            EVENT_TIME: datetime(2026, 1, 1, 1, tzinfo=UTC),
            VALUE: -60.0,
            SENSOR_ID: "s7",
        },
        {ENTITY_ID: "e2", REGION: "north", METRIC: "load", EVENT_TIME: START, VALUE: 2000.0, SENSOR_ID: None},
        {
            ENTITY_ID: "e3",
            REGION: "north",
            METRIC: "load",
            EVENT_TIME: END - timedelta(microseconds=1),
            VALUE: 0.0,
            SENSOR_ID: None,
        },
        {
            ENTITY_ID: "e4",
            REGION: "north",
            METRIC: "temp",
            EVENT_TIME: datetime(2026, 1, 1, 1, 30, tzinfo=UTC),
            VALUE: 10.0,
            SENSOR_ID: "s1",
        },
        {
            ENTITY_ID: "e5",
            REGION: "north",
            METRIC: "temp",
            EVENT_TIME: datetime(2026, 1, 1, 2, tzinfo=UTC),
            VALUE: 60.0,
            SENSOR_ID: "s1",
        },
    ]
    assert all(t.utcoffset() == timedelta(0) for t in result.accepted.column(EVENT_TIME).to_pylist())


@pytest.mark.parametrize("pad", [" ", "\u00a0", "\u2003", "\u3000", "\t", "\u200b", "\ufeff"])
def test_a_row_s_verdict_does_not_depend_on_the_rest_of_its_batch(validator: ReadingValidator, pad: str) -> None:
    # Batches without padding skip trim(); a row padded with any character trim() strips (Unicode spaces too)
    # must get the verdict it gets in a batch that is trimmed anyway (the batch scan always trims).
    row = good(entity_id=f"e1{pad}", region=f"{pad}north", metric=f"temp{pad}")
    alone = validator.validate(text_table([row, good(entity_id="e2")]), columns=IDENTITY)
    padded = good(entity_id=" e2 ", region=" north ", metric=" temp ")
    trimmed = validator.validate(text_table([row, padded]), columns=IDENTITY)
    assert alone.reasons == trimmed.reasons
    assert alone.accepted.to_pylist() == trimmed.accepted.to_pylist()


#: Every Unicode space separator (category Zs: what DuckDB's trim() strips), and characters it keeps.
SPACES = " \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"
EDGES = SPACES + "\t\n\r\u200b\ufeffaZ0-_é漢"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(alphabet=EDGES, max_size=6), st.text(max_size=8)), min_size=1,
                max_size=40))
def test_the_guarded_trim_gives_what_trim_gives(values: list[str | None]) -> None:
    # The feed scan trims an entity's or a sensor's id only where trim() may change it (fusion/feeds/scan.py,
    # `_trimmed`): the same text, NULL included, for every value.
    con = connect()
    con.register("t", pa.table({"x": pa.array(values, pa.string())}))
    got = con.sql(f"SELECT {_trimmed('x')} AS g, trim(x) AS t FROM t").fetchall()
    assert [g for g, _ in got] == [t for _, t in got]
    con.close()


def test_empty_batch(validator: ReadingValidator) -> None:
    result = validator.validate(text_table([]), columns=IDENTITY)
    assert result.rows == 0
    assert result.reasons == {}
    assert result.accepted.schema.equals(READING_SCHEMA)
    assert result.rejected.column_names == [*ALL_FIELDS, DEAD_LETTER_REASON, DEAD_LETTER_SOURCE, DEAD_LETTER_ROW]


# --- precedence -------------------------------------------------------------------------------------------

#: One fault per reason, as (field it breaks, bad value); a row may carry several faults on different fields.
FAULTS: dict[RejectReason, tuple[str, str | None]] = {
    R.MISSING_FIELD: (ENTITY_ID, None),
    R.MISTYPED_FIELD: (VALUE, "abc"),
    R.UNPARSEABLE_TIME: (EVENT_TIME, "not a time"),
    R.OUT_OF_INTERVAL: (EVENT_TIME, "2025-06-01T00:00:00Z"),
    R.UNKNOWN_METRIC: (METRIC, "humidity"),
    R.UNKNOWN_REGION: (REGION, "west"),
    R.NON_FINITE_VALUE: (VALUE, "inf"),
    R.OUT_OF_RANGE: (VALUE, "99"),
}


def _fault_pairs() -> list[tuple[RejectReason, RejectReason]]:
    order = list(VALIDATION_REASONS)
    return [(a, b) for i, a in enumerate(order) for b in order[i + 1 :] if FAULTS[a][0] != FAULTS[b][0]]


def test_precedence_follows_reject_reason_order() -> None:
    assert tuple(r for r in RejectReason if r is not R.LATE) == REASON_PRECEDENCE
    assert REASON_PRECEDENCE[0] is R.MALFORMED_RECORD
    assert REASON_PRECEDENCE[-1] is R.DUPLICATE


def test_two_faults_give_the_first_reason(validator: ReadingValidator) -> None:
    pairs = _fault_pairs()
    assert len(pairs) > 15
    rows = [good(**{FAULTS[a][0]: FAULTS[a][1], FAULTS[b][0]: FAULTS[b][1]}) for a, b in pairs]
    result = validator.validate(text_table(rows), columns=IDENTITY)
    got = dict(
        zip(
            result.rejected.column(DEAD_LETTER_ROW).to_pylist(),
            result.rejected.column(DEAD_LETTER_REASON).to_pylist(),
            strict=True,
        )
    )
    assert got == {i: str(a) for i, (a, _) in enumerate(pairs)}


def test_peeling_faults_one_at_a_time(validator: ReadingValidator) -> None:
    """A row with a fault on every field; removing the reported fault reveals the next one in order."""
    chain = [R.MISSING_FIELD, R.MISTYPED_FIELD, R.UNPARSEABLE_TIME, R.UNKNOWN_METRIC, R.UNKNOWN_REGION]
    for first in range(len(chain)):
        row = good(**{FAULTS[r][0]: FAULTS[r][1] for r in chain[first:]})
        result = validator.validate(text_table([row]), columns=IDENTITY)
        assert result.reasons == {str(chain[first]): 1}


# --- native (Parquet-like) types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "time_type",
    [
        pa.timestamp("us", tz="UTC"),
        pa.timestamp("ns", tz="Europe/Paris"),
        pa.timestamp("s", tz="+02:00"),
        pa.timestamp("ms"),  # naive: UTC
        pa.timestamp("ns"),
    ],
    ids=str,
)
@pytest.mark.parametrize(
    ("value_type", "values"),
    [
        (pa.float64(), [1.5, -60.0, 60.0, None, math.nan, math.inf, -math.inf, 60.5]),
        (pa.float32(), [1.5, -60.0, 60.0, None, math.nan, math.inf, -math.inf, 60.5]),
        (pa.int64(), [1, -60, 60, None, 0, 0, 0, 61]),
        (pa.int16(), [1, -60, 60, None, 0, 0, 0, 61]),
        (
            pa.decimal128(6, 2),
            [Decimal("1.5"), Decimal("-60"), Decimal("60"), None, Decimal(0), Decimal(0), Decimal(0), Decimal("60.01")],
        ),
    ],
    ids=str,
)
def test_native_types(
    validator: ReadingValidator, time_type: pa.DataType, value_type: pa.DataType, values: list[Any]
) -> None:
    times = [
        START + timedelta(hours=h, seconds=s)
        for h, s in ((0, 0), (1, 1), (5, 3599), (2, 0), (2, 0), (2, 0), (2, 0), (2, 0))
    ]
    times += [START - timedelta(seconds=1), END]  # out of interval on both sides
    one = Decimal(1) if pa.types.is_decimal(value_type) else (1.0 if pa.types.is_floating(value_type) else 1)
    values = [*values, one, one]
    n = len(values)
    naive = time_type.tz is None
    raw = pa.table(
        {
            ENTITY_ID: pa.array(range(n), pa.int64()),  # a number: validation reads it as text
            REGION: ["north"] * n,
            METRIC: ["temp"] * n,
            EVENT_TIME: pa.array([t.replace(tzinfo=None) if naive else t for t in times], time_type),
            VALUE: pa.array(values, value_type),
        }
    )
    result = validator.validate(raw, columns=IDENTITY, source="feed.parquet")
    is_float = pa.types.is_floating(value_type)
    expected = {3: R.MISSING_FIELD, 7: R.OUT_OF_RANGE, 8: R.OUT_OF_INTERVAL, 9: R.OUT_OF_INTERVAL}
    if is_float:
        expected |= {4: R.NON_FINITE_VALUE, 5: R.NON_FINITE_VALUE, 6: R.NON_FINITE_VALUE}
    got = dict(
        zip(
            result.rejected.column(DEAD_LETTER_ROW).to_pylist(),
            result.rejected.column(DEAD_LETTER_REASON).to_pylist(),
            strict=True,
        )
    )
    assert got == {i: str(r) for i, r in expected.items()}
    assert result.accepted.schema.equals(READING_SCHEMA)
    accepted = {int(r[ENTITY_ID]): r for r in result.accepted.to_pylist()}
    assert set(accepted) == set(range(n)) - set(expected)
    for i, reading in accepted.items():
        assert reading[EVENT_TIME] == times[i]
        assert reading[VALUE] == float(values[i])
        assert reading[REGION] == "north" and reading[METRIC] == "temp" and reading[SENSOR_ID] is None


def test_native_date_and_boolean_columns(validator: ReadingValidator) -> None:
    raw = pa.table(
        {
            ENTITY_ID: ["a", "b", "c"],
            REGION: ["north"] * 3,
            METRIC: ["temp"] * 3,
            EVENT_TIME: pa.array([date(2026, 1, 1)] * 3, pa.date32()),  # midnight UTC: the interval's start
            VALUE: pa.array([True, False, None], pa.bool_()),  # present but not a number
        }
    )
    result = validator.validate(raw, columns=IDENTITY)
    assert result.reasons == {str(R.MISTYPED_FIELD): 2, str(R.MISSING_FIELD): 1}
    assert result.rejected.column(VALUE).to_pylist() == ["true", "false", None]
    assert result.rejected.column(EVENT_TIME).to_pylist() == ["2026-01-01"] * 3

    raw = raw.set_column(4, VALUE, pa.array([1.0, 2.0, 3.0]))
    result = validator.validate(raw, columns=IDENTITY)
    assert result.reasons == {}
    assert result.accepted.column(EVENT_TIME).to_pylist() == [START] * 3


def test_iso_format_refuses_numeric_time_column(validator: ReadingValidator) -> None:
    raw = text_table([good()]).set_column(3, EVENT_TIME, pa.array([1767229200], pa.int64()))
    result = validator.validate(raw, columns=IDENTITY, time_format="iso")
    assert result.reasons == {str(R.UNPARSEABLE_TIME): 1}


# --- time formats -----------------------------------------------------------------------------------------

T1 = 1767229200  # 2026-01-01T01:00:00Z
EPOCH_CASES = [
    # (time_format, raw event times, reason per row (None: accepted at the given time))
    (
        "epoch_s",
        pa.array([T1, T1 + 1, 1767225600, 1767247200, 1767225599], pa.int64()),
        [
            START + timedelta(hours=1),
            START + timedelta(hours=1, seconds=1),
            START,
            R.OUT_OF_INTERVAL,
            R.OUT_OF_INTERVAL,
        ],
    ),
    (
        "epoch_s",
        pa.array([T1 + 0.25, 1767247199.999999, 0.0], pa.float64()),
        [START + timedelta(hours=1, milliseconds=250), END - timedelta(microseconds=1), R.OUT_OF_INTERVAL],
    ),
    (
        "epoch_s",
        pa.array([str(T1), f" {T1 + 2} ", "1767229200.5", "abc", "", "nan", "inf", None], pa.string()),
        [
            START + timedelta(hours=1),
            START + timedelta(hours=1, seconds=2),
            START + timedelta(hours=1, milliseconds=500),
            R.UNPARSEABLE_TIME,
            R.MISSING_FIELD,
            R.UNPARSEABLE_TIME,
            R.UNPARSEABLE_TIME,
            R.MISSING_FIELD,
        ],
    ),
    (
        "epoch_ms",
        pa.array([T1 * 1000, T1 * 1000 + 123, 1767225600000, 1767247200000, 1767225599999], pa.int64()),
        [
            START + timedelta(hours=1),
            START + timedelta(hours=1, milliseconds=123),
            START,
            R.OUT_OF_INTERVAL,
            R.OUT_OF_INTERVAL,
        ],
    ),
    (
        "epoch_ms",
        pa.array([str(T1 * 1000 + 7), "1767229200000.5", "12:00", str(T1)], pa.string()),
        [
            START + timedelta(hours=1, milliseconds=7),
            START + timedelta(hours=1, microseconds=500),
            R.UNPARSEABLE_TIME,
            R.OUT_OF_INTERVAL,
        ],
    ),  # seconds read as milliseconds: January 1970
    (
        "epoch_s",
        pa.array(["1767229200.9999999", "1767229200.0000005", "1767229199.9999999", "1767229200.000003"]),
        [
            START + timedelta(hours=1, microseconds=999999),
            START + timedelta(hours=1),
            START + timedelta(minutes=59, seconds=59, microseconds=999999),
            START + timedelta(hours=1, microseconds=3),
        ],
    ),  # truncated to the microsecond, as ISO text is (rounded, the first went to the next second)
    (
        "epoch_s",
        pa.array([1767229200.9999996, 1767229200.000003], pa.float64()),
        [START + timedelta(hours=1, microseconds=999999), START + timedelta(hours=1, microseconds=3)],
    ),  # a float as the decimal it prints as: its binary value, 1767229200.0000030994, would not do
    (
        "epoch_ms",
        pa.array(["1767229200000.0009", "1767229200000.9999", "1767229200001"], pa.string()),
        [
            START + timedelta(hours=1),
            START + timedelta(hours=1, microseconds=999),
            START + timedelta(hours=1, milliseconds=1),
        ],
    ),
    (
        "epoch_s",
        pa.array([True], pa.bool_()),
        [R.UNPARSEABLE_TIME],
    ),  # not a number (it was read as 1 s, 1970)
    (
        "epoch_ms",
        pa.array([datetime(2026, 1, 1, 2, tzinfo=UTC)], pa.timestamp("us", tz="UTC")),
        [START + timedelta(hours=2)],
    ),  # a native timestamp column is a time whatever the format
    (
        "iso",
        pa.array(["2026-01-01T01:00:00Z", "2026-01-01T01:00:00.123456+00:00", str(T1)], pa.string()),
        [START + timedelta(hours=1), START + timedelta(hours=1, microseconds=123456), R.UNPARSEABLE_TIME],
    ),
]


@pytest.mark.parametrize(("time_format", "times", "expected"), EPOCH_CASES)
def test_time_formats(validator: ReadingValidator, time_format: str, times: pa.Array, expected: list[Any]) -> None:
    n = len(times)
    raw = pa.table(
        {
            ENTITY_ID: [f"e{i}" for i in range(n)],
            REGION: ["east"] * n,
            METRIC: ["load"] * n,
            EVENT_TIME: times,
            VALUE: pa.array([5] * n, pa.int32()),
        }
    )
    result = validator.validate(raw, columns=IDENTITY, time_format=time_format)
    accepted = {r[ENTITY_ID]: r[EVENT_TIME] for r in result.accepted.to_pylist()}
    rejected = dict(
        zip(
            result.rejected.column(ENTITY_ID).to_pylist(),
            result.rejected.column(DEAD_LETTER_REASON).to_pylist(),
            strict=True,
        )
    )
    for i, outcome in enumerate(expected):
        if isinstance(outcome, datetime):
            assert accepted.get(f"e{i}") == outcome, f"row {i}"
        else:
            assert rejected.get(f"e{i}") == str(outcome), f"row {i}"
    # the reference classifier agrees
    rows = [
        {**r, EVENT_TIME: t} for r, t in zip(raw.drop_columns([EVENT_TIME]).to_pylist(), times.to_pylist(), strict=True)
    ]
    for row, outcome in zip(rows, expected, strict=True):
        got = reference(row, time_format=time_format)
        assert (got[EVENT_TIME] if isinstance(got, dict) else got) == outcome


def _outcomes(result: Any, rows: int) -> list[Any]:
    """Per row e0, e1, ...: its accepted time, or the reason it was rejected."""
    accepted, rejected = result.accepted, result.rejected
    outcome = dict(zip(accepted.column(ENTITY_ID).to_pylist(), accepted.column(EVENT_TIME).to_pylist(), strict=True))
    outcome.update(
        zip(rejected.column(ENTITY_ID).to_pylist(), rejected.column(DEAD_LETTER_REASON).to_pylist(), strict=True)
    )
    return [outcome.get(f"e{i}") for i in range(rows)]


@pytest.mark.parametrize("kind", ["ns-utc", "ns-naive", "iso-text"])
def test_nanosecond_times_are_truncated_to_the_microsecond_as_iso_text_is(
    validator: ReadingValidator, kind: str
) -> None:
    """A Parquet time 1 ns before a window's or the interval's end was rounded up into the next window, or out of
    the interval (one 1 ns before its start into it), where the same time as ISO text was truncated."""
    s0, hour = int(START.timestamp()) * 10**9, 3600 * 10**9
    nanos = [s0 - 1, s0 + hour - 1, s0 + 6 * hour - 1, s0 + 1999]
    times = {
        "ns-utc": pa.array(nanos, pa.timestamp("ns", tz="UTC")),
        "ns-naive": pa.array(nanos, pa.timestamp("ns")),
        "iso-text": pa.array([
            "2025-12-31T23:59:59.999999999Z", "2026-01-01T00:59:59.999999999Z", "2026-01-01T05:59:59.999999999Z",
            "2026-01-01T00:00:00.000001999Z",
        ]),
    }[kind]
    raw = text_table([good(entity_id=f"e{i}") for i in range(4)]).set_column(3, EVENT_TIME, times)
    assert _outcomes(validator.validate(raw, columns=IDENTITY), 4) == [
        str(R.OUT_OF_INTERVAL),
        START + timedelta(hours=1) - timedelta(microseconds=1),
        END - timedelta(microseconds=1),
        START + timedelta(microseconds=1),
    ]


def test_a_nanosecond_time_before_1970_is_floored_too() -> None:
    """DuckDB's integer division truncates towards zero: -1 ns is -1 us, not 0."""
    raw = text_table([good(entity_id=f"e{i}") for i in range(3)]).set_column(
        3, EVENT_TIME, pa.array([-1, -1000, -1001], pa.timestamp("ns", tz="UTC"))
    )
    rules = ReadingRules(plausible=PLAUSIBLE, regions=REGIONS, start=datetime(1969, 1, 1, tzinfo=UTC), end=START)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert _outcomes(ReadingValidator(rules).validate(raw, columns=IDENTITY), 3) == [
        epoch - timedelta(microseconds=1),
        epoch - timedelta(microseconds=1),
        epoch - timedelta(microseconds=2),
    ]


def test_a_date_beyond_the_timestamps_range_is_unparseable_and_the_batch_goes_on(validator: ReadingValidator) -> None:
    """A DATE column with a date in year 1,001,306 failed the whole batch (DuckDB's cast to a timestamp)."""
    raw = text_table([good(entity_id="ok"), good(entity_id="far")]).set_column(
        3, EVENT_TIME, pa.array([20454, 365_000_000], pa.int32()).cast(pa.date32())
    )
    result = validator.validate(raw, columns=IDENTITY)
    assert result.accepted.column(EVENT_TIME).to_pylist() == [START]
    assert result.reasons == {str(R.UNPARSEABLE_TIME): 1}
    assert result.rejected.column(ENTITY_ID).to_pylist() == ["far"]


@pytest.mark.parametrize(("time_format", "text"), [("epoch_s", "1e18"), ("epoch_ms", "99999999999999999999")])
def test_epoch_time_out_of_timestamp_range_is_unparseable(
    validator: ReadingValidator, time_format: str, text: str
) -> None:
    """One absurd epoch value must be routed as unparseable_time, not fail the whole batch."""
    ok = str(T1 if time_format == "epoch_s" else T1 * 1000)
    raw = text_table([good(entity_id="ok", event_time=ok), good(entity_id="bad", event_time=text)])
    result = validator.validate(raw, columns=IDENTITY, time_format=time_format)
    assert result.reasons == {str(R.UNPARSEABLE_TIME): 1}
    assert result.accepted.column(ENTITY_ID).to_pylist() == ["ok"]


@pytest.mark.parametrize(("unit", "beyond"), [("s", 10**13), ("ms", 10**16), ("ms", -(10**16))])
def test_a_timestamp_beyond_duckdbs_range_is_unparseable_and_the_batch_goes_on(unit: str, beyond: int) -> None:
    """Such a time (year 318,857 for 10^16 ms) used to fail the whole batch, and in seconds to invalidate the
    validator's DuckDB database for every later batch."""
    validator = ReadingValidator(RULES)  # its own: the fault used to leave it unusable
    per_second = {"s": 1, "ms": 1000}[unit]
    raw = pa.table(
        {
            ENTITY_ID: ["ok", "bad"],
            REGION: ["north", "north"],
            METRIC: ["temp", "temp"],
            EVENT_TIME: pa.array([T1 * per_second, beyond], pa.timestamp(unit, tz="UTC")),
            VALUE: [1.5, 2.5],
        }
    )
    columns = {f: f for f in REQUIRED_FIELDS}
    for _ in range(2):
        result = validator.validate(raw, columns=columns, source="f")
        assert result.reasons == {str(R.UNPARSEABLE_TIME): 1}
        assert result.accepted.column(EVENT_TIME).to_pylist() == [datetime(2026, 1, 1, 1, tzinfo=UTC)]
        assert result.rejected.column(EVENT_TIME).to_pylist() == [f"{beyond} {unit} since epoch"]


@pytest.mark.parametrize("value_type", [pa.float16(), pa.decimal256(40, 2), pa.string_view()], ids=str)
def test_arrow_types_duckdb_cannot_import_are_read_as_their_nearest(value_type: pa.DataType) -> None:
    """float16, decimal256 and string views (which Parquet feeds may hold) used to fail the batch: DuckDB has no
    import for them ("Unsupported Internal Arrow Type"), and Arrow no take for views (the dead letters)."""
    validator = ReadingValidator(RULES)
    values: list[Any] = [1.5, 99.5]
    if pa.types.is_decimal(value_type):
        values = [Decimal("1.5"), Decimal("99.5")]
    elif pa.types.is_string_view(value_type):
        values = ["1.5", "99.5"]
    raw = pa.table(
        {
            ENTITY_ID: pa.array(["ok", "high"], pa.string_view()),
            REGION: ["north", "north"],
            METRIC: ["temp", "temp"],
            EVENT_TIME: pa.array(["2026-01-01T01:00:00Z"] * 2, pa.string_view()),
            VALUE: pa.array(values).cast(value_type),
        }
    )
    result = validator.validate(raw, columns={f: f for f in REQUIRED_FIELDS}, source="f")
    assert result.accepted.column(VALUE).to_pylist() == [1.5]
    assert result.reasons == {str(R.OUT_OF_RANGE): 1}
    assert result.rejected.column(ENTITY_ID).to_pylist() == ["high"]
    assert result.rejected.column(VALUE).to_pylist()[0] in ("99.5", "99.50")


# --- column mapping ---------------------------------------------------------------------------------------


def test_mapped_column_absent_makes_every_row_missing(validator: ReadingValidator) -> None:
    rows = [good(entity_id=f"e{i}") for i in range(4)]
    raw = text_table(rows).drop_columns([VALUE])
    result = validator.validate(raw, columns=IDENTITY, source="f")
    assert result.reasons == {str(R.MISSING_FIELD): 4}
    assert result.accepted.num_rows == 0
    assert VALUE not in result.rejected.column_names  # dead letters hold the raw columns, as they came
    assert sorted(result.rejected.column(DEAD_LETTER_ROW).to_pylist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_any_required_column_absent(validator: ReadingValidator, field: str) -> None:
    raw = text_table([good(), good(entity_id="e2")]).drop_columns([field])
    assert validator.validate(raw, columns=IDENTITY).reasons == {str(R.MISSING_FIELD): 2}


def test_optional_sensor_column_absent_or_unmapped(validator: ReadingValidator) -> None:
    raw = text_table([good()]).drop_columns([SENSOR_ID])
    result = validator.validate(raw, columns=IDENTITY)
    assert result.reasons == {}
    assert result.accepted.column(SENSOR_ID).to_pylist() == [None]
    unmapped = {f: c for f, c in IDENTITY.items() if f != SENSOR_ID}
    result = validator.validate(text_table([good()]), columns=unmapped)
    assert result.accepted.column(SENSOR_ID).to_pylist() == [None]


def test_column_mapping_with_feed_names(validator: ReadingValidator) -> None:
    mapping = {
        ENTITY_ID: "device",
        REGION: "zone",
        METRIC: "kind",
        EVENT_TIME: "ts",
        VALUE: "reading",
        SENSOR_ID: "probe",
    }
    rows = [good(entity_id="d1"), good(entity_id="d2", value="oops"), good(entity_id="d3", region="west")]
    logical = text_table(rows)
    raw = logical.rename_columns([mapping[n] for n in logical.column_names]).append_column(
        "note", pa.array(["x", "y", "z"])
    )
    # a column named like a logical field but not mapped to it is ignored
    raw = raw.append_column(VALUE, pa.array(["not", "used", "here"]))
    result = validator.validate(raw, columns=mapping, source="mapped.csv")
    assert result.reasons == {str(R.MISTYPED_FIELD): 1, str(R.UNKNOWN_REGION): 1}
    assert result.accepted.to_pylist() == [
        {
            ENTITY_ID: "d1",
            REGION: "north",
            METRIC: "temp",
            EVENT_TIME: START + timedelta(hours=1),
            VALUE: 21.5,
            SENSOR_ID: "s1",
        }
    ]
    assert result.rejected.column_names == [*raw.column_names, DEAD_LETTER_REASON, DEAD_LETTER_SOURCE, DEAD_LETTER_ROW]
    assert sorted(result.rejected.column("device").to_pylist()) == ["d2", "d3"]


# --- dead letters -----------------------------------------------------------------------------------------


def test_dead_letters_hold_raw_text_and_point_to_rows(validator: ReadingValidator) -> None:
    n = 12
    raw = pa.table(
        {
            ENTITY_ID: pa.array(range(n), pa.int64()),
            REGION: ["north", "west", "south", None] * 3,
            METRIC: ["temp"] * n,
            EVENT_TIME: pa.array([START + timedelta(minutes=40 * i) for i in range(n)], pa.timestamp("us", tz="UTC")),
            VALUE: pa.array([1.5, 2.5, math.nan, 3.5] * 3, pa.float64()),
            "batch": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int32())),  # unmapped, nested
            "flag": pa.array([i % 2 == 0 for i in range(n)]),
        }
    )
    result = validator.validate(raw, columns=IDENTITY, source="s3://bucket/feed.parquet")
    expected = {}
    for i in range(n):
        if i >= 9:  # 06:00 and later
            expected[i] = R.OUT_OF_INTERVAL if i % 4 != 3 else R.MISSING_FIELD
        else:
            expected[i] = {0: None, 1: R.UNKNOWN_REGION, 2: R.NON_FINITE_VALUE, 3: R.MISSING_FIELD}[i % 4]
    expected = {i: r for i, r in expected.items() if r is not None}
    letters = result.rejected
    assert letters.column_names == [*raw.column_names, DEAD_LETTER_REASON, DEAD_LETTER_SOURCE, DEAD_LETTER_ROW]
    for name in [*raw.column_names, DEAD_LETTER_REASON, DEAD_LETTER_SOURCE]:
        assert letters.schema.field(name).type == pa.string(), name
    assert letters.schema.field(DEAD_LETTER_ROW).type == pa.int64()
    assert set(letters.column(DEAD_LETTER_SOURCE).to_pylist()) == {"s3://bucket/feed.parquet"}
    for letter in letters.to_pylist():
        i = letter[DEAD_LETTER_ROW]
        assert letter[DEAD_LETTER_REASON] == expected[i]
        assert letter[ENTITY_ID] == str(i)  # the row number points at the input row it came from
        assert letter[REGION] == raw.column(REGION)[i].as_py()
        assert letter["flag"] == ("true" if i % 2 == 0 else "false")
        assert letter["batch"] is not None and str(i) in letter["batch"]
        assert letter[VALUE] == ("nan" if i % 4 == 2 else str(raw.column(VALUE)[i].as_py()))
        moment = datetime.fromisoformat(letter[EVENT_TIME])
        assert moment == raw.column(EVENT_TIME)[i].as_py()
    assert sorted(letters.column(DEAD_LETTER_ROW).to_pylist()) == sorted(expected)
    assert result.accepted.column(ENTITY_ID).to_pylist() == [str(i) for i in range(n) if i not in expected]


def test_text_dead_letters_are_the_raw_text(validator: ReadingValidator) -> None:
    rows = [good(entity_id=f"e{i}") for i in range(6)]
    rows[1] = good(entity_id="  e1 ", value=" x ")
    rows[4] = good(entity_id="e4", event_time="  soon  ", sensor_id=None)
    raw = text_table(rows)
    result = validator.validate(raw, columns=IDENTITY, source="feed.csv")
    letters = {r[DEAD_LETTER_ROW]: r for r in result.rejected.to_pylist()}
    assert set(letters) == {1, 4}
    for i, letter in letters.items():
        assert {f: letter[f] for f in ALL_FIELDS} == rows[i]  # untrimmed, exactly as read
        assert letter[DEAD_LETTER_SOURCE] == "feed.csv"
    assert letters[1][DEAD_LETTER_REASON] == R.MISTYPED_FIELD
    assert letters[4][DEAD_LETTER_REASON] == R.UNPARSEABLE_TIME


# --- property: random mixtures against the reference ------------------------------------------------------

TEXT_POOLS: dict[str, list[str | None]] = {
    ENTITY_ID: ["e1", "e2", " e3 ", "", "   ", None],
    REGION: ["north", "south", "east", " east ", "west", "North", "", None],
    METRIC: ["temp", "load", " load ", "humidity", "", None],
    EVENT_TIME: [
        "2026-01-01T00:00:00Z",
        "2026-01-01T05:59:59.999999+00:00",
        "2026-01-01T03:00:00",
        "2026-01-01 03:00:00+02:00",
        "2026-01-01T07:30:00+02:00",
        "2026-01-01T06:00:00Z",
        "2025-12-31T23:59:59Z",
        "2026-01-01T01:00:00-06:00",
        "not a time",
        "2026-13-01T00:00:00",
        "",
        None,
    ],
    VALUE: [
        "1.5",
        "-3",
        " 2.5 ",
        "59.9",
        "60",
        "60.1",
        "-60",
        "-60.5",
        "2000",
        "2000.5",
        "-0.5",
        "1e3",
        "abc",
        "1,5",
        "",
        "NaN",
        "inf",
        "-Infinity",
        None,
    ],
    SENSOR_ID: ["s1", " s2 ", "", None],
}

NATIVE_POOLS: dict[str, list[Any]] = {
    **TEXT_POOLS,
    EVENT_TIME: [
        START,
        END - timedelta(microseconds=1),
        START + timedelta(hours=3, microseconds=7),
        END,
        START - timedelta(microseconds=1),
        None,
    ],
    VALUE: [1.5, -3.0, 60.0, 60.5, -60.0, 2000.0, 2000.25, -0.5, math.nan, math.inf, -math.inf, None],
}


def _rows(pools: dict[str, list[Any]]) -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(st.fixed_dictionaries({f: st.sampled_from(p) for f, p in pools.items()}), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_rows(TEXT_POOLS))
def test_property_text_rows_match_reference(validator: ReadingValidator, rows: list[dict[str, Any]]) -> None:
    check_against_reference(validator, rows, text_table(rows))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_rows(NATIVE_POOLS))
def test_property_native_rows_match_reference(validator: ReadingValidator, rows: list[dict[str, Any]]) -> None:
    raw = pa.table(
        {
            **{f: pa.array([r[f] for r in rows], pa.string()) for f in (ENTITY_ID, REGION, METRIC, SENSOR_ID)},
            EVENT_TIME: pa.array([r[EVENT_TIME] for r in rows], pa.timestamp("us", tz="UTC")),
            VALUE: pa.array([r[VALUE] for r in rows], pa.float64()),
        }
    )
    check_against_reference(validator, rows, raw)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                **{f: st.sampled_from(TEXT_POOLS[f]) for f in (ENTITY_ID, REGION, METRIC, VALUE, SENSOR_ID)},
                EVENT_TIME: st.one_of(
                    st.integers(1767225600000 - 5000, 1767247200000 + 5000).map(str),
                    st.sampled_from(["abc", "", "1767229200000.25", None]),
                ),
            }
        ),
        max_size=30,
    )
)
def test_property_epoch_ms_rows_match_reference(validator: ReadingValidator, rows: list[dict[str, Any]]) -> None:
    check_against_reference(validator, rows, text_table(rows), time_format="epoch_ms")


def _epoch_text(micros: int, extra: str, time_format: str, exponent: bool) -> str:
    """`micros` since 1970 and `extra` digits beyond them, as a count of epoch seconds or milliseconds, written
    plainly or with an exponent."""
    per_unit = 1_000_000 if time_format == "epoch_s" else 1000
    whole, fraction = divmod(micros, per_unit)
    digits = f"{whole}.{fraction:0{len(str(per_unit)) - 1}d}{extra}"
    return f"{Decimal(digits):E}" if exponent else digits


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    times=st.lists(
        st.tuples(
            st.integers(int(START.timestamp()) * 10**6 - 2, int(END.timestamp()) * 10**6 + 2),
            st.sampled_from(["", "0", "5", "9", "999", "0001", "9999999"]),
            st.booleans(),
        ),
        max_size=30,
    ),
    time_format=st.sampled_from(["epoch_s", "epoch_ms"]),
)
def test_property_epoch_times_are_floored_to_the_microsecond_as_the_reference_does(
    validator: ReadingValidator, times: list[tuple[int, str, bool]], time_format: str
) -> None:
    """Every epoch count, whatever its digits beyond the microsecond and however written, as text or as a float
    (which is read as its shortest text): the reference floors the decimal exactly."""
    texts = [_epoch_text(micros, extra, time_format, exponent) for micros, extra, exponent in times]
    rows = [good(entity_id=f"e{i}", event_time=text) for i, text in enumerate(texts)]
    check_against_reference(validator, rows, text_table(rows), time_format=time_format)
    floats = [{**row, EVENT_TIME: float(row[EVENT_TIME])} for row in rows]
    raw = text_table(rows).set_column(3, EVENT_TIME, pa.array([r[EVENT_TIME] for r in floats], pa.float64()))
    check_against_reference(validator, floats, raw, time_format=time_format)
