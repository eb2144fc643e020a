"""Entity-level contribution bounding: at most L0 cells per entity and at most Linf readings per cell.

Which cells and which readings are kept is chosen uniformly at random (random priorities, keep the smallest),
never "the first rows", so the choice cannot depend on the order of the input. Vectorised over a batch: in NumPy
for small batches, and as one DuckDB window query (two parallel partitioned sorts, several times faster than
NumPy's sorts) from `DUCKDB_FROM_ROWS` rows up. Both draw from the same distribution; tests check each.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

#: Batches of at least this many rows are bounded by DuckDB (below it, a query costs more than NumPy).
DUCKDB_FROM_ROWS = 65_536


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
    engine: str | None = None,
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
    if engine is None:
        engine = "duckdb" if entity.size >= DUCKDB_FROM_ROWS else "numpy"
    if engine == "duckdb":
        return _bound_in_duckdb(entity, cell, max_partitions, max_per_partition, generator)
    if engine != "numpy":
        raise ValueError(f"unknown bounding engine {engine!r}")
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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 whose outputs look independent and uniform."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def pair_priorities(entity: np.ndarray, cell: np.ndarray, salt: int) -> np.ndarray:
    """A pseudo-random uint64 priority per (entity, cell) pair, the same for every row of a pair, keyed by a
    secret `salt` (drawn from the generator), so each entity's cells are ordered at random afresh per call."""
    with np.errstate(over="ignore"):
        inner = _mix64(cell.astype(np.uint64) * _GOLDEN + np.uint64(salt))
        return _mix64(entity.astype(np.int64).view(np.uint64) ^ inner)


def _bound_in_duckdb(
    entity: np.ndarray, cell: np.ndarray, max_partitions: int, max_per_partition: int, generator: np.random.Generator
) -> np.ndarray:
    """The same choice as the NumPy path, as one window query: cells ranked per entity by their pair priority
    (ties broken by the cell, so distinct cells always get distinct ranks), rows ranked per pair by a random
    number each."""
    salt = int(generator.integers(0, 2**63))
    table = pa.table(
        {
            "e": entity,
            "c": cell,
            "p": pair_priorities(entity, cell, salt),
            "r": generator.random(entity.size),
            "i": np.arange(entity.size, dtype=np.int64),
        }
    )
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET threads = 2")
        con.register("fusion_bounding", table)
        kept = con.sql(
            f"""SELECT i FROM fusion_bounding
            QUALIFY dense_rank() OVER (PARTITION BY e ORDER BY p, c) <= {int(max_partitions)}
                AND row_number() OVER (PARTITION BY e, c ORDER BY r) <= {int(max_per_partition)}"""
        ).fetchnumpy()["i"]
    finally:
        con.close()
    keep = np.zeros(entity.size, dtype=bool)
    keep[np.asarray(kept, dtype=np.int64)] = True
    return keep
