"""Fixed-point encoding against a per-element reference, balanced scales, sensitivities, and the partition layout."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.encoding import MetricEncoding, balanced_encodings, event_level_sensitivity
from privacy.layout import Component, PartitionLayout

# --- encoding -----------------------------------------------------------------------------------------------------


def centre_reference(encoding: MetricEncoding) -> int:
    """The clamp range's midpoint in resolution steps, rounded half up."""
    return math.floor((encoding.lower + encoding.upper) / 2 / encoding.resolution + 0.5)


def encode_reference(value: float, encoding: MetricEncoding) -> int:
    """Clamp, round half to even at the resolution, subtract the centre, then scale: one reading at a time."""
    clamped = min(max(value, encoding.lower), encoding.upper)
    return (round(clamped / encoding.resolution) - centre_reference(encoding)) * encoding.scale


ENCODINGS = st.sampled_from(
    [
        MetricEncoding(lower=-20.0, upper=40.0, resolution=0.1, scale=1),
        MetricEncoding(lower=0.0, upper=500.0, resolution=1.0, scale=1),
        MetricEncoding(lower=-1.5, upper=2.5, resolution=0.5, scale=3),  # exact halves at 0.25, 0.75, ...
        MetricEncoding(lower=0.0, upper=100.0, resolution=0.01, scale=2),
        MetricEncoding(lower=-0.35, upper=0.25, resolution=0.1, scale=7),  # bounds off the resolution grid
    ]
)
VALUES = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.floats(min_value=-3.0, max_value=3.0, allow_nan=False),
    st.integers(min_value=-40, max_value=40).map(lambda n: n / 4),  # on and halfway between grid points
    st.sampled_from([math.inf, -math.inf, -0.0]),
)


@settings(max_examples=200, deadline=None)
@given(encoding=ENCODINGS, values=st.lists(VALUES, min_size=0, max_size=40))
def test_encode_clamps_then_rounds_like_the_reference(encoding: MetricEncoding, values: list[float]) -> None:
    got = encoding.encode(np.array(values, dtype=float))
    assert got.dtype == np.int64
    assert got.tolist() == [encode_reference(v, encoding) for v in values]
    assert all(abs(x) <= encoding.sum_bound for x in got.tolist())


def test_encode_keeps_shape_and_rounds_half_to_even() -> None:
    encoding = MetricEncoding(lower=-10.0, upper=10.0, resolution=0.5, scale=1)  # centre 0
    values = np.array([[0.25, 0.75], [-0.25, 11.0]])  # 0.5, 1.5, -0.5 units; 11 clamps to 10 = 20 units
    np.testing.assert_array_equal(encoding.encode(values), [[0, 2], [0, 20]])


def test_encoding_properties() -> None:
    encoding = MetricEncoding(lower=-20.0, upper=40.0, resolution=0.1, scale=3)
    assert encoding.centre_units == 100 and encoding.centre == pytest.approx(10.0)
    assert encoding.units_bound == 300  # |-200 - 100| = |400 - 100| = 300 steps from the centre
    assert encoding.count_weight == encoding.sum_bound == 900
    assert encoding.sum_unit() == 0.1 / 3
    off_grid = MetricEncoding(lower=-0.35, upper=0.25, resolution=0.1, scale=1)  # centre -0.05 -> 0 steps
    assert off_grid.centre_units == 0 and off_grid.units_bound == 4  # ceil(3.5)
    # An offset range shrinks by centring: [200, 260] V at 0.1 V is 300 steps either side of 230 V, not 2600.
    assert MetricEncoding(lower=200.0, upper=260.0, resolution=0.1, scale=1).units_bound == 300


def test_balanced_encodings_scale_small_ranges_up() -> None:
    # 1200, 500 and 400 units from each range's centre: scales 1, 1200 // 500 = 2, 1200 // 400 = 3.
    encodings = balanced_encodings([(-1200.0, 1200.0, 1.0), (0.0, 100.0, 0.1), (-5.0, 3.0, 0.01)])
    assert [e.units_bound for e in encodings] == [1200, 500, 400]
    assert [e.scale for e in encodings] == [1, 2, 3]
    assert [e.count_weight for e in encodings] == [1200, 1000, 1200]
    assert [(e.lower, e.upper, e.resolution) for e in encodings] == [
        (-1200.0, 1200.0, 1.0), (0.0, 100.0, 0.1), (-5.0, 3.0, 0.01),
    ]
    # A metric with the larger range is never scaled down.
    assert [e.scale for e in balanced_encodings([(0.0, 14.0, 1.0), (0.0, 10.0, 1.0)])] == [1, 1]


def test_event_level_sensitivity_is_set_by_the_worst_metric() -> None:
    encodings = balanced_encodings([(-1200.0, 1200.0, 1.0), (0.0, 100.0, 0.1), (-5.0, 3.0, 0.01)])
    sensitivity = event_level_sensitivity(encodings)
    assert sensitivity.l1 == 2.0 * 1200
    assert sensitivity.l2 == math.sqrt(2.0) * 1200

    lone = [MetricEncoding(lower=0.0, upper=500.0, resolution=1.0, scale=1),  # 250 steps from 250
            MetricEncoding(lower=-20.0, upper=40.0, resolution=0.1, scale=1)]  # 300 steps from 10
    assert event_level_sensitivity(lone).l1 == 600.0
    assert event_level_sensitivity(lone).l2 == math.sqrt(2.0) * 300


def test_one_reading_moves_the_vector_within_the_sensitivity() -> None:
    """Brute force over readings: (count_weight, encode(x)) has L1 <= l1 and L2 <= l2 for every metric."""
    encodings = balanced_encodings([(-20.0, 40.0, 0.1), (0.0, 500.0, 1.0), (-4.0, 2.0, 0.01)])
    sensitivity = event_level_sensitivity(encodings)
    values = np.linspace(-1000.0, 1000.0, 20001)
    for encoding in encodings:
        sums = np.abs(encoding.encode(values))
        assert encoding.count_weight + sums.max() <= sensitivity.l1
        assert math.hypot(encoding.count_weight, sums.max()) <= sensitivity.l2 * (1 + 1e-15)


# --- layout -------------------------------------------------------------------------------------------------------

START = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
METRICS = ("temp", "load")
REGIONS = ("north", "south", "east")


def test_for_interval_counts_windows_on_the_utc_grid() -> None:
    layout = PartitionLayout.for_interval(METRICS, REGIONS, START, START + 6 * HOUR, HOUR)
    assert layout.windows == 6
    assert layout.end == START + 6 * HOUR
    assert layout.cells == 2 * 3 * 6
    assert layout.slots == layout.cells * len(Component) == 72
    plus_one = timezone(timedelta(hours=1))  # the same instants, written in another zone
    same = PartitionLayout.for_interval(
        METRICS, REGIONS, START.astimezone(plus_one), (START + 6 * HOUR).astimezone(plus_one), HOUR
    )
    assert same == layout
    assert same.start.tzinfo == UTC
    assert same.digest() == layout.digest()


@pytest.mark.parametrize(
    ("start", "end", "window", "match"),
    [
        (START + timedelta(minutes=30), START + 6 * HOUR, HOUR, "not aligned"),
        (START, START + timedelta(minutes=90), HOUR, "not aligned"),
        (START + timedelta(hours=1), START + timedelta(hours=25), timedelta(days=1), "not aligned"),
        (START, START, HOUR, "not after"),
        (START + HOUR, START, HOUR, "not after"),
    ],
)
def test_for_interval_refuses_unaligned_or_empty_intervals(
    start: datetime, end: datetime, window: timedelta, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        PartitionLayout.for_interval(METRICS, REGIONS, start, end, window)


@pytest.mark.parametrize("naive", ["start", "end", "both"])
def test_for_interval_refuses_naive_datetimes(naive: str) -> None:
    start = START.replace(tzinfo=None) if naive in ("start", "both") else START
    end = (START + 6 * HOUR).replace(tzinfo=None) if naive in ("end", "both") else START + 6 * HOUR
    with pytest.raises(ValueError, match="timezone"):
        PartitionLayout.for_interval(METRICS, REGIONS, start, end, HOUR)


def test_direct_construction_refuses_naive_start_and_no_windows() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        PartitionLayout(METRICS, REGIONS, START.replace(tzinfo=None), HOUR, 3)
    with pytest.raises(ValueError, match="at least one window"):
        PartitionLayout(METRICS, REGIONS, START, HOUR, 0)


def cell_reference(layout: PartitionLayout) -> list[tuple[int, int, int]]:
    """Cells in order, by nested loops: metric-major, then region, then window."""
    return [
        (m, r, w)
        for m in range(len(layout.metrics))
        for r in range(len(layout.regions))
        for w in range(layout.windows)
    ]


@settings(max_examples=40, deadline=None)
@given(metrics=st.integers(1, 5), regions=st.integers(1, 6), windows=st.integers(1, 30))
def test_cell_index_and_coordinates_are_inverse(metrics: int, regions: int, windows: int) -> None:
    layout = PartitionLayout(
        tuple(f"m{i}" for i in range(metrics)), tuple(f"r{i}" for i in range(regions)), START, HOUR, windows
    )
    m, r, w = layout.cell_coordinates()
    assert list(zip(m.tolist(), r.tolist(), w.tolist(), strict=True)) == cell_reference(layout)
    np.testing.assert_array_equal(layout.cell_index(m, r, w), np.arange(layout.cells))

    rng = np.random.default_rng(metrics * 1000 + regions * 100 + windows)
    mi = rng.integers(0, metrics, 500)
    ri = rng.integers(0, regions, 500)
    wi = rng.integers(0, windows, 500)
    index = layout.cell_index(mi, ri, wi)
    assert index.min() >= 0 and index.max() < layout.cells
    np.testing.assert_array_equal(m[index], mi)
    np.testing.assert_array_equal(r[index], ri)
    np.testing.assert_array_equal(w[index], wi)


def test_digest_changes_when_any_field_changes() -> None:
    layout = PartitionLayout(METRICS, REGIONS, START, HOUR, 6)
    assert layout.digest() == PartitionLayout(METRICS, REGIONS, START, HOUR, 6).digest()  # deterministic
    changed = [
        dataclasses.replace(layout, metrics=("temp",)),
        dataclasses.replace(layout, metrics=("load", "temp")),  # order fixes the slots, so it counts
        dataclasses.replace(layout, metrics=("temp", "load", "rain")),
        dataclasses.replace(layout, regions=("north", "south")),
        dataclasses.replace(layout, regions=("south", "north", "east")),
        dataclasses.replace(layout, start=START + HOUR),
        dataclasses.replace(layout, start=START + timedelta(microseconds=1)),
        dataclasses.replace(layout, window=timedelta(minutes=30)),
        dataclasses.replace(layout, windows=7),
    ]
    digests = {layout.digest(), *(c.digest() for c in changed)}
    assert len(digests) == len(changed) + 1


def test_values_on_a_bin_edge_open_the_upper_bin() -> None:
    from privacy.encoding import bin_index

    values = np.array([0.3, 0.6, 1.2, 2.4, 0.0, 3.0, 2.99, -5.0, 7.0])
    n = values.size
    bins = bin_index(values, np.full(n, 0.0), np.full(n, 3.0), np.full(n, 0.01), 10)
    assert bins.tolist() == [1, 2, 4, 8, 0, 9, 9, 0, 9]
    edges = np.array([-0.9, -0.8, 0.0, 0.95])
    assert bin_index(edges, np.full(4, -1.0), np.full(4, 1.0), np.full(4, 0.01), 20).tolist() == [1, 2, 10, 19]
