"""Entity-level contribution bounding: at most L0 cells per entity and at most Linf readings per cell.

Which cells and which readings are kept is chosen uniformly at random (random priorities, keep the smallest),
never "the first rows", so the choice cannot depend on the order of the input. Vectorised over a batch.
"""

from __future__ import annotations

import numpy as np


def _rank_within_groups(groups: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """For each element, its 0-based rank by `priority` among the elements of its group."""
    order = np.lexsort((priority, groups))
    sorted_groups = groups[order]
    boundaries = np.flatnonzero(np.diff(sorted_groups)) + 1
    starts = np.concatenate([[0], boundaries])
    sizes = np.diff(np.concatenate([starts, [groups.size]]))
    ranks_sorted = np.arange(groups.size) - np.repeat(starts, sizes)
    ranks = np.empty(groups.size, dtype=np.int64)
    ranks[order] = ranks_sorted
    return ranks


def bound_contributions(
    entity: np.ndarray,
    cell: np.ndarray,
    *,
    max_partitions: int,
    max_per_partition: int,
    generator: np.random.Generator,
) -> np.ndarray:
    """A boolean mask of the readings to keep.

    entity: int64 codes (one per reading; equal codes = same privacy unit); cell: int64 cell index per reading.
    Each entity keeps a uniformly random set of at most `max_partitions` of its cells, and in each kept cell a
    uniformly random set of at most `max_per_partition` of its readings.
    """
    entity = np.asarray(entity, dtype=np.int64)
    cell = np.asarray(cell, dtype=np.int64)
    if entity.shape != cell.shape:
        raise ValueError("entity and cell must have the same shape")
    if entity.size == 0:
        return np.zeros(0, dtype=bool)
    # One int64 key per (entity, cell) pair, ordered like the pairs themselves (entity-major), so np.unique works
    # on a flat array (much faster than unique rows) and draws the same priorities in the same order.
    # Dense ranks keep the order of any int64 codes and make the key fit: at most rows^2 < 2^63.
    _, entity_rank = np.unique(entity, return_inverse=True)
    cells, cell_rank = np.unique(cell, return_inverse=True)
    width = cells.size
    keys, pair_of_row = np.unique(entity_rank.reshape(-1) * width + cell_rank.reshape(-1), return_inverse=True)
    pair_of_row = pair_of_row.reshape(-1)
    pair_rank = _rank_within_groups(keys // width, generator.random(len(keys)))
    row_rank = _rank_within_groups(pair_of_row, generator.random(entity.size))
    return (pair_rank[pair_of_row] < max_partitions) & (row_rank < max_per_partition)
