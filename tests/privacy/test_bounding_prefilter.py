"""The DuckDB bounding engine's priority pre-filter keeps exactly the rows the plain window query keeps."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.bounding import PREFILTER, _bound_in_duckdb
from privacy.skellam import seeded_generator


def _codes(rng: np.random.Generator, entities: int, rows: int) -> np.ndarray:
    """Entity codes as hashed ids look: spread over the whole int64 range."""
    return (rng.integers(0, entities, rows).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)).view(np.int64)


@pytest.mark.parametrize(
    ("rows", "entities", "cells", "max_partitions", "max_per_partition"),
    [
        (200_000, 1_000, 24_000, 24, 4),  # rows in distinct cells: nearly every entity is pre-filtered
        (100_000, 1_000, 30, 24, 4),  # crowded: too few pairs survive, every entity is ranked again whole
        (100_000, 400, 120, 5, 2),  # some entities short of L0 survivors, some not
        (50_000, 20_000, 500, 3, 1),  # most entities at or below the cut-off: not filtered at all
        (100_000, 50, 2_000, 1, 1),
    ],
)
def test_prefilter_keeps_exactly_the_rows_of_the_full_query(
    rows: int, entities: int, cells: int, max_partitions: int, max_per_partition: int
) -> None:
    rng = np.random.default_rng(rows + cells)
    entity, cell = _codes(rng, entities, rows), rng.integers(0, cells, rows).astype(np.int64)
    caps = (max_partitions, max_per_partition)
    full = _bound_in_duckdb(entity, cell, *caps, seeded_generator(3), prefilter=False)
    filtered = _bound_in_duckdb(entity, cell, *caps, seeded_generator(3), prefilter=True)
    np.testing.assert_array_equal(filtered, full)
    # The caps bind (some rows dropped) and every entity keeps something: the comparison is not vacuous.
    assert 0 < filtered.sum() < rows
    assert np.unique(entity[filtered]).size == np.unique(entity).size


def test_an_entity_with_no_surviving_pair_is_ranked_again() -> None:
    """An entity whose every pair priority lies above its cut-off would vanish from the filtered ranks; it must
    still keep its L0 cells. Many small entities just above the cut-off make that happen in one call."""
    rows_each = PREFILTER * 2 + 1  # L0 = 2: cut-off 4 rows, so each entity is filtered, keeping ~4/5 of its pairs
    entities = 20_000
    entity = np.repeat(np.arange(entities, dtype=np.int64) * 7919, rows_each)
    cell = np.tile(np.arange(rows_each, dtype=np.int64), entities)
    full = _bound_in_duckdb(entity, cell, 2, 1, seeded_generator(9), prefilter=False)
    filtered = _bound_in_duckdb(entity, cell, 2, 1, seeded_generator(9), prefilter=True)
    np.testing.assert_array_equal(filtered, full)
    kept_per_entity = np.bincount(np.repeat(np.arange(entities), rows_each)[filtered], minlength=entities)
    assert (kept_per_entity == 2).all()
