"""Entity-level contribution bounding against a plain-Python reference of its constraints, the uniformity of its
random choice (seeded, chi-square), and the entity-level sensitivity against a brute-force search."""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fusion.release.contribution import aggregate_readings, bound_by_entity
from privacy.bounding import DUCKDB_FROM_ROWS, bound_contributions
from privacy.encoding import MetricEncoding, balanced_encodings, entity_level_sensitivity, event_level_sensitivity
from privacy.layout import BASE_COMPONENTS, SUMSQ, PartitionLayout, bin_components
from privacy.skellam import seeded_generator
from schemas.readings import READING_SCHEMA

#: Goodness-of-fit tests reject only below this p-value: a correct implementation fails one in 10,000 seeds.
P_MIN = 1e-4
DRAWS = 20_000
#: Both ways of bounding: NumPy (small batches) and one DuckDB window query (large ones).
ENGINES = ("numpy", "duckdb")
START = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)

# --- the constraints, against a plain-Python reference ------------------------------------------------------------


def check_against_reference(
    entity: list[int], cell: list[int], keep: list[bool], *, max_partitions: int, max_per_partition: int
) -> None:
    """Kept rows obey both caps and use them fully: min(k, L0) cells per entity, min(n, Linf) rows per kept cell."""
    rows_in: Counter[tuple[int, int]] = Counter(zip(entity, cell, strict=True))
    rows_kept: Counter[tuple[int, int]] = Counter(
        pair for pair, kept in zip(zip(entity, cell, strict=True), keep, strict=True) if kept
    )
    cells_in: dict[int, set[int]] = defaultdict(set)
    cells_kept: dict[int, set[int]] = defaultdict(set)
    for e, c in rows_in:
        cells_in[e].add(c)
    for e, c in rows_kept:
        cells_kept[e].add(c)
    for e, cells in cells_in.items():
        assert cells_kept[e] <= cells
        assert len(cells_kept[e]) == min(len(cells), max_partitions), (e, cells, cells_kept[e])
        for c in cells_kept[e]:
            assert rows_kept[e, c] == min(rows_in[e, c], max_per_partition), (e, c, rows_in[e, c], rows_kept[e, c])


@st.composite
def bounding_inputs(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Rows of (entity code, cell index): 1..20 arbitrary int64 entity codes, 1..30 cells, up to 400 rows."""
    entities = draw(st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=20, unique=True))
    cells = draw(st.lists(st.integers(0, 10**9), min_size=1, max_size=30, unique=True))
    rows = draw(st.lists(st.tuples(st.sampled_from(entities), st.sampled_from(cells)), max_size=400))
    return [e for e, _ in rows], [c for _, c in rows]


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=150, deadline=None)
@given(
    rows=bounding_inputs(),
    max_partitions=st.integers(1, 5),
    max_per_partition=st.integers(1, 5),
    seed=st.integers(0, 2**63 - 1),
)
def test_kept_rows_obey_the_caps_and_use_them_fully(
    engine: str, rows: tuple[list[int], list[int]], max_partitions: int, max_per_partition: int, seed: int
) -> None:
    entity, cell = rows
    keep = bound_contributions(
        np.array(entity, dtype=np.int64),
        np.array(cell, dtype=np.int64),
        max_partitions=max_partitions,
        max_per_partition=max_per_partition,
        generator=seeded_generator(seed),
        engine=engine,
    )
    assert keep.dtype == np.bool_ and keep.shape == (len(entity),)
    check_against_reference(
        entity, cell, keep.tolist(), max_partitions=max_partitions, max_per_partition=max_per_partition
    )


def test_mismatched_shapes_are_refused_and_no_rows_keep_nothing() -> None:
    with pytest.raises(ValueError, match="same shape"):
        bound_contributions(
            np.zeros(3), np.zeros(2), max_partitions=1, max_per_partition=1, generator=seeded_generator(0)
        )
    empty = np.zeros(0, dtype=np.int64)
    keep = bound_contributions(empty, empty, max_partitions=1, max_per_partition=1, generator=seeded_generator(0))
    assert keep.shape == (0,) and keep.dtype == np.bool_


def test_bound_by_entity_bounds_string_ids_across_arrow_chunks() -> None:
    """The Arrow wrapper: entity ids are strings, tables arrive in several chunks (one per feed batch)."""
    layout = PartitionLayout.for_interval(("temp",), ("north", "south"), START, START + 4 * HOUR, HOUR)
    rng = np.random.default_rng(5)
    rows = 600
    entity = [f"meter-{i}" for i in rng.integers(0, 15, size=rows)]
    region = [("north", "south")[i] for i in rng.integers(0, 2, size=rows)]
    times = [START + timedelta(seconds=int(s)) for s in rng.integers(0, 4 * 3600, size=rows)]
    table = pa.table(
        {
            "entity_id": entity,
            "region": region,
            "metric": ["temp"] * rows,
            "event_time": pa.array(times, pa.timestamp("us", tz="UTC")),
            "value": rng.uniform(-20, 40, size=rows),
            "sensor_id": [str(i) for i in range(rows)],
        },
        schema=READING_SCHEMA,
    )
    chunked = pa.concat_tables([table.slice(0, 200), table.slice(200, 250), table.slice(450)])
    assert chunked.column("entity_id").num_chunks == 3
    kept = bound_by_entity(chunked, layout=layout, max_partitions=3, max_per_partition=2, generator=seeded_generator(3))

    def cells_of(t: pa.Table) -> list[int]:
        hours = [(ts - START) // HOUR for ts in t.column("event_time").to_pylist()]
        regions = [("north", "south").index(r) for r in t.column("region").to_pylist()]
        return [r * layout.windows + h for r, h in zip(regions, hours, strict=True)]

    entity_codes = {e: i for i, e in enumerate(sorted(set(entity)))}
    in_codes = [entity_codes[e] for e in chunked.column("entity_id").to_pylist()]
    survivors = set(kept.column("sensor_id").to_pylist())  # sensor_id carries each row's number here
    keep = [row in survivors for row in chunked.column("sensor_id").to_pylist()]
    assert sum(keep) == kept.num_rows
    check_against_reference(in_codes, cells_of(chunked), keep, max_partitions=3, max_per_partition=2)


# --- uniformity of the random choice ------------------------------------------------------------------------------


def kept_indices(keep: np.ndarray) -> tuple[int, ...]:
    return tuple(np.flatnonzero(keep).tolist())


def assert_uniform(counts: Counter[tuple[int, ...]], outcomes: list[tuple[int, ...]], what: str) -> None:
    assert set(counts) <= set(outcomes), f"{what}: impossible outcomes {set(counts) - set(outcomes)}"
    observed = np.array([counts[o] for o in outcomes])
    result = stats.chisquare(observed)  # expected: equal frequencies
    assert result.pvalue > P_MIN, f"{what} not uniform: chi2={result.statistic:.1f}, p={result.pvalue:.2e}, {observed}"


def test_kept_cells_are_a_uniform_pair_independently_per_entity() -> None:
    """Two entities, 5 cells each, L0 = 2: each entity's pair is uniform over the C(5, 2) = 10 pairs, and the two
    entities' pairs are independent (uniform over the 100 joint outcomes), so no cell is favoured for everyone."""
    entity = np.repeat([7, 3], 5)
    cell = np.tile([40, 10, 30, 0, 20], 2)  # cell ids deliberately not in input order
    generator = seeded_generator(2026)
    first: Counter[tuple[int, ...]] = Counter()
    joint: Counter[tuple[int, ...]] = Counter()
    for _ in range(DRAWS):
        keep = bound_contributions(entity, cell, max_partitions=2, max_per_partition=1, generator=generator)
        a, b = kept_indices(keep[:5]), kept_indices(keep[5:])
        first[a] += 1
        joint[a + b] += 1
    pairs = list(itertools.combinations(range(5), 2))
    assert_uniform(first, pairs, "cell pairs")
    assert_uniform(joint, [a + b for a in pairs for b in pairs], "joint cell pairs of two entities")


def test_kept_rows_are_a_uniform_pair_and_first_rows_are_not_favoured() -> None:
    """One cell with 6 rows, Linf = 2: the kept pair is uniform over the 15 pairs; every row is kept with
    probability 1/3 (within 5 standard errors, so a correct implementation essentially never fails)."""
    entity = np.zeros(6, dtype=np.int64)
    cell = np.full(6, 11, dtype=np.int64)
    generator = seeded_generator(7)
    counts: Counter[tuple[int, ...]] = Counter()
    per_row = np.zeros(6)
    for _ in range(DRAWS):
        keep = bound_contributions(entity, cell, max_partitions=1, max_per_partition=2, generator=generator)
        counts[kept_indices(keep)] += 1
        per_row += keep
    assert_uniform(counts, list(itertools.combinations(range(6), 2)), "row pairs")
    frequency = per_row / DRAWS
    standard_error = math.sqrt((1 / 3) * (2 / 3) / DRAWS)
    assert np.all(np.abs(frequency - 1 / 3) < 5 * standard_error), frequency
    assert abs(frequency[0] - frequency[5]) < 5 * math.sqrt(2) * standard_error


def test_duckdb_kept_cells_are_uniform_and_independent_across_entities() -> None:
    """The DuckDB engine, DRAWS entities in one call (5 cells each, L0 = 2): each entity's pair is uniform over
    the 10 pairs, and neighbouring entities' pairs are independent (uniform over the 100 joint outcomes): the
    salted pair priorities order every entity's cells afresh."""
    cells = np.array([40, 10, 30, 0, 20], dtype=np.int64)
    entity = np.repeat(np.arange(DRAWS, dtype=np.int64) * 7919 - 10**9, 5)
    cell = np.tile(cells, DRAWS)
    keep = bound_contributions(
        entity, cell, max_partitions=2, max_per_partition=1, generator=seeded_generator(11), engine="duckdb"
    ).reshape(DRAWS, 5)
    assert (keep.sum(axis=1) == 2).all()
    outcomes = [kept_indices(row) for row in keep]
    pairs = list(itertools.combinations(range(5), 2))
    assert_uniform(Counter(outcomes), pairs, "cell pairs (duckdb)")
    joint = Counter(a + b for a, b in zip(outcomes[0::2], outcomes[1::2], strict=True))
    assert_uniform(joint, [a + b for a in pairs for b in pairs], "joint cell pairs of two entities (duckdb)")


def test_duckdb_kept_rows_are_a_uniform_pair() -> None:
    """The DuckDB engine, DRAWS entities with 6 rows in one cell each (Linf = 2): uniform over the 15 pairs."""
    entity = np.repeat(np.arange(DRAWS, dtype=np.int64), 6)
    cell = np.full(DRAWS * 6, 11, dtype=np.int64)
    keep = bound_contributions(
        entity, cell, max_partitions=1, max_per_partition=2, generator=seeded_generator(12), engine="duckdb"
    ).reshape(DRAWS, 6)
    counts = Counter(kept_indices(row) for row in keep)
    assert_uniform(counts, list(itertools.combinations(range(6), 2)), "row pairs (duckdb)")


def test_the_engine_is_chosen_by_size_and_unknown_engines_are_refused() -> None:
    small = np.zeros(3, dtype=np.int64)
    with pytest.raises(ValueError, match="unknown bounding engine"):
        bound_contributions(
            small, small, max_partitions=1, max_per_partition=1, generator=seeded_generator(0), engine="x"
        )
    rows = DUCKDB_FROM_ROWS
    entity = np.arange(rows, dtype=np.int64) % 1000
    cell = np.arange(rows, dtype=np.int64) % 37
    keep = bound_contributions(entity, cell, max_partitions=3, max_per_partition=1, generator=seeded_generator(1))
    check_against_reference(entity.tolist(), cell.tolist(), keep.tolist(), max_partitions=3, max_per_partition=1)


def test_the_choice_does_not_depend_on_input_order() -> None:
    """The same six readings in their order and reversed, each sampled from the same generator state: the
    distribution of the kept pair (by reading identity) is the same (chi-square test of homogeneity)."""
    entity = np.zeros(6, dtype=np.int64)
    cell = np.zeros(6, dtype=np.int64)
    tables = []
    for order in (np.arange(6), np.arange(6)[::-1]):
        generator = seeded_generator(99)
        counts: Counter[tuple[int, ...]] = Counter()
        for _ in range(DRAWS // 2):
            keep = bound_contributions(entity, cell, max_partitions=1, max_per_partition=2, generator=generator)
            counts[tuple(sorted(order[keep].tolist()))] += 1
        tables.append(counts)
    pairs = list(itertools.combinations(range(6), 2))
    contingency = np.array([[counts[p] for p in pairs] for counts in tables])
    assert (contingency > 0).all(), f"some pairs are never kept: {contingency}"
    result = stats.chi2_contingency(contingency)
    assert result.pvalue > P_MIN, contingency


# --- entity-level sensitivity -------------------------------------------------------------------------------------

#: (lower, upper, resolution): symmetric, one-sided (scaled up x6), and one-sided with a smaller weight.
BOUNDS = {"temp": (-20.0, 40.0, 0.1), "humidity": (0.0, 100.0, 1.0), "load": (0.0, 500.0, 1.0)}
ENCODINGS = tuple(balanced_encodings(list(BOUNDS.values())))


@pytest.mark.parametrize("components", [2, 3, 4])
@pytest.mark.parametrize(("max_partitions", "max_per_partition"), [(1, 1), (1, 4), (3, 1), (2, 3), (5, 2)])
def test_entity_level_sensitivity_scales_the_event_level_one(
    max_partitions: int, max_per_partition: int, components: int
) -> None:
    event = event_level_sensitivity(list(ENCODINGS), components=components)
    entity = entity_level_sensitivity(
        list(ENCODINGS), max_partitions=max_partitions, max_per_partition=max_per_partition, components=components
    )
    assert entity.l1 == max_partitions * max_per_partition * event.l1  # integers: exact in floating point
    assert math.isclose(entity.l2, math.sqrt(max_partitions) * max_per_partition * event.l2, rel_tol=1e-14)


def readings_table(rows: list[tuple[str, str, str, int, float]]) -> pa.Table:
    """(entity, metric, region, window, value) rows -> a READING_SCHEMA table, one second apart in their window."""
    return pa.table(
        {
            "entity_id": [r[0] for r in rows],
            "region": [r[2] for r in rows],
            "metric": [r[1] for r in rows],
            "event_time": pa.array(
                [START + r[3] * HOUR + timedelta(seconds=i) for i, r in enumerate(rows)], pa.timestamp("us", tz="UTC")
            ),
            "value": pa.array([r[4] for r in rows], pa.float64()),
            "sensor_id": pa.nulls(len(rows), pa.string()),
        },
        schema=READING_SCHEMA,
    )


@pytest.mark.parametrize(
    "components",
    [BASE_COMPONENTS, (*BASE_COMPONENTS, SUMSQ), (*BASE_COMPONENTS, SUMSQ, *bin_components(4))],
    ids=["count-sum", "with-sumsq", "with-histogram"],
)
def test_one_entity_at_the_extremes_moves_the_vector_by_at_most_the_sensitivity(components: tuple[str, ...]) -> None:
    """Brute force on 3 metrics x 1 region x 2 windows: one entity adds Linf readings at one clamp bound (or far
    beyond it) to each of L0 cells, for every choice of cells and bounds; the packed vector moves by at most the
    entity-level L1 and L2, and by exactly them in the worst case (the caps are tight)."""
    layout = PartitionLayout.for_interval(tuple(BOUNDS), ("north",), START, START + 2 * HOUR, HOUR, components)
    per_reading = 2 + int(SUMSQ in components) + int(layout.bins > 0)  # slots one reading touches
    cells = [(m, w) for m in BOUNDS for w in range(layout.windows)]
    background = readings_table(
        [(f"other-{i}", m, "north", w, (lo + hi) / 3) for i, (m, w) in enumerate(cells) for lo, hi, _ in [BOUNDS[m]]]
    )
    base = aggregate_readings(background, layout=layout, encodings=ENCODINGS)
    for max_partitions, max_per_partition in [(1, 1), (1, 3), (2, 2), (3, 1), (3, 3)]:
        sensitivity = entity_level_sensitivity(
            list(ENCODINGS),
            max_partitions=max_partitions,
            max_per_partition=max_per_partition,
            components=per_reading,
        )
        worst_l1 = worst_l2 = 0.0
        for chosen in itertools.combinations(cells, max_partitions):
            for sides in itertools.product((0, 1, 2), repeat=max_partitions):
                rows = []
                for (metric, window), side in zip(chosen, sides, strict=True):
                    lo, hi, _ = BOUNDS[metric]
                    value = (lo, hi, hi + 10 * (hi - lo))[side]  # 2: far above the clamp, which clamps it
                    rows += [("entity", metric, "north", window, value)] * max_per_partition
                moved = (
                    aggregate_readings(
                        pa.concat_tables([background, readings_table(rows)]), layout=layout, encodings=ENCODINGS
                    )
                    - base
                )
                l1, l2 = float(np.abs(moved).sum()), math.sqrt(float((moved.astype(float) ** 2).sum()))
                assert l1 <= sensitivity.l1 and l2 <= sensitivity.l2 * (1 + 1e-12), (chosen, sides, l1, l2)
                worst_l1, worst_l2 = max(worst_l1, l1), max(worst_l2, l2)
        # temp and humidity both reach the common bound w = 300 at either clamp bound: 4 cells >= L0.
        assert worst_l1 == sensitivity.l1
        assert math.isclose(worst_l2, sensitivity.l2, rel_tol=1e-12)


def test_the_common_bound_is_what_the_brute_force_assumes() -> None:
    assert [(e.count_weight, e.sum_bound) for e in ENCODINGS] == [(300, 300), (300, 300), (250, 250)]
    assert ENCODINGS[1] == MetricEncoding(lower=0.0, upper=100.0, resolution=1.0, scale=6)
