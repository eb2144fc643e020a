"""The DuckDB bounding engine's priority pre-filter keeps exactly the rows the plain window query keeps."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.bounding import PREFILTER, _bound_in_duckdb, _ranked_survivors
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


@pytest.mark.parametrize("max_per_partition", [1, 2, 4])
@pytest.mark.parametrize("shared_top_bits", [True, False])
def test_survivors_are_ranked_as_a_sort_on_every_key_ranks_them(max_per_partition: int, shared_top_bits: bool) -> None:
    """The NumPy ranking of the pre-filter's survivors sorts on (entity, top 32 bits of the priority) only: ties
    on that key (a pair's rows, and pairs whose priorities share their top bits, forced here by drawing
    priorities from a few top-bit values) must keep the rows a full sort on (entity, priority, cell, row
    priority) keeps."""
    rng = np.random.default_rng(max_per_partition)
    rows = 20_000
    k = rng.integers(1, 300, rows)
    c = rng.integers(0, 40, rows)
    # Priorities a function of (entity, cell), as hash(e, c) is, with many sharing their top 32 bits.
    top = (k * 7 + c * 13) % 5 if shared_top_bits else k * 64 + c
    low = (k.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (c.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9))
    p = (top.astype(np.uint64) << np.uint64(32)) | (low & np.uint64(0xFFFFFFFF))
    r = rng.random(rows)
    order, pair_rank, row_rank = _ranked_survivors(k, p, c, r, max_per_partition)
    reference = np.lexsort((r, c, p, k))
    ks, ps, cs = k[reference], p[reference], c[reference]
    new_entity = np.concatenate(([True], ks[1:] != ks[:-1]))
    new_pair = new_entity | np.concatenate(([True], (ps[1:] != ps[:-1]) | (cs[1:] != cs[:-1])))
    expected_pair = np.empty(rows, dtype=np.int64)
    expected_row = np.empty(rows, dtype=np.int64)
    pair = row = 0
    for position in range(rows):
        pair = 1 if new_entity[position] else pair + int(new_pair[position])
        row = 0 if new_pair[position] else row + 1
        expected_pair[position], expected_row[position] = pair, row
    # Every row's pair rank must match, and whether its rank in its pair lets it be kept (the order of a pair's
    # rows among themselves is free while all of them are kept).
    ranks = {int(i): (int(a), int(b)) for i, a, b in zip(order, pair_rank, row_rank, strict=True)}
    assert sorted(ranks) == list(range(rows))
    for i, a, b in zip(reference, expected_pair, expected_row, strict=True):
        assert ranks[int(i)][0] == a
        assert (ranks[int(i)][1] < max_per_partition) == (b < max_per_partition)
