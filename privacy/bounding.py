"""Entity-level contribution bounding: at most L0 cells per entity and at most Linf readings per cell.

Which cells and which readings are kept is chosen uniformly at random (random priorities, keep the smallest),
never "the first rows", so the choice cannot depend on the order of the input. Vectorised over a batch: in NumPy
for small batches, and as one DuckDB window query (two parallel partitioned sorts, several times faster than
NumPy's sorts) from `DUCKDB_FROM_ROWS` rows up. Both draw from the same distribution; tests check each.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

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


class _Connections:
    """Idle DuckDB connections of this process, reused by the next bounding call: opening one (about 30 ms)
    costs as much as bounding 200k readings. A call holds its connection alone (one thread at a time); at most
    `keep` idle ones are kept, all closed before the process forks (a child cannot use, or even close, a DuckDB
    connection it inherits: its scheduler's threads stayed in the parent)."""

    def __init__(self, keep: int = 2) -> None:
        self._idle: list[duckdb.DuckDBPyConnection] = []
        self._keep = keep
        self._lock = threading.Lock()

    def close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for con in idle:
            con.close()

    @contextmanager
    def held(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            con = self._idle.pop() if self._idle else None
        if con is None:
            con = duckdb.connect(":memory:")
            con.execute("SET enable_progress_bar = false")  # it would draw on the user's terminal past 2 s
            con.execute("SET threads = 2")
        try:
            yield con
        except BaseException:
            con.close()  # its state is unknown: not reused
            raise
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(con)
                return
        con.close()


_connections = _Connections()
os.register_at_fork(before=_connections.close_idle)


#: An entity with more rows than PREFILTER x L0 has its pairs pre-filtered by priority before the sort (see
#: `_bound_in_duckdb`): about PREFILTER x L0 of its pairs survive when its rows lie in distinct cells.
PREFILTER = 2


def _bound_in_duckdb(
    entity: np.ndarray,
    cell: np.ndarray,
    max_partitions: int,
    max_per_partition: int,
    generator: np.random.Generator,
    *,
    prefilter: bool = True,
) -> np.ndarray:
    """The same choice as the NumPy path, as one window query: cells ranked per entity by their pair priority
    (ties broken by the cell, so distinct cells always get distinct ranks), rows ranked within their cell by a
    random number each.

    `prefilter` sorts only the pairs that can be kept, and keeps exactly the same rows: an entity with n rows
    (n > PREFILTER x L0) first drops the pairs whose priority lies above 2^64 x PREFILTER x L0 / n. What survives
    is a prefix of the entity's pairs in priority order, so if at least L0 distinct pairs survive, its L0 first
    pairs are among them, ranked as among all its pairs, each with all its rows. An entity left with fewer (rare
    unless its rows crowd into few cells) is ranked again over all of its rows."""
    salt = int(generator.integers(0, 2**63))  # keys the pair priorities: each call orders the cells afresh
    table = pa.table(
        {"e": entity, "c": cell, "r": generator.random(entity.size), "i": np.arange(entity.size, dtype=np.int64)}
    )
    l0, linf = int(max_partitions), int(max_per_partition)
    # p: a pseudo-random priority per (entity, cell) pair, the same for all of a pair's rows. One sort per entity
    # by (p, cell, row priority) serves all three windows: the dense rank of (p, c) is the cell's rank, and
    # row_number - rank (rank: the pair's first row) the row's rank within its cell.
    ranks = """dense_rank() OVER (PARTITION BY e ORDER BY p, c) AS pair_rank,
                row_number() OVER (PARTITION BY e ORDER BY p, c, r)
                    - rank() OVER (PARTITION BY e ORDER BY p, c) AS row_rank"""
    if prefilter:
        cutoff = PREFILTER * l0
        sql = f"""
            WITH b AS (SELECT i, e, c, r, hash(e, c, {salt}) AS p FROM fusion_bounding),
            n AS (SELECT e, count(*) AS n FROM fusion_bounding GROUP BY e),
            ranked AS MATERIALIZED (
                SELECT i, e, {ranks}
                FROM b JOIN n USING (e)
                WHERE n.n <= {cutoff} OR CAST(b.p AS DOUBLE) < 18446744073709551616.0 * {cutoff} / n.n
            ),
            short AS MATERIALIZED (
                SELECT e FROM n WHERE n.n > {cutoff}
                EXCEPT
                SELECT e FROM ranked GROUP BY e HAVING max(pair_rank) >= {l0}
            ),
            redone AS (
                SELECT i, {ranks} FROM b SEMI JOIN short USING (e)
            )
            SELECT i FROM ranked ANTI JOIN short USING (e) WHERE pair_rank <= {l0} AND row_rank < {linf}
            UNION ALL
            SELECT i FROM redone WHERE pair_rank <= {l0} AND row_rank < {linf}"""
    else:
        sql = f"""
            WITH b AS (SELECT i, e, c, r, hash(e, c, {salt}) AS p FROM fusion_bounding),
            ranked AS (SELECT i, {ranks} FROM b)
            SELECT i FROM ranked WHERE pair_rank <= {l0} AND row_rank < {linf}"""
    with _connections.held() as con:
        con.register("fusion_bounding", table)
        try:
            kept = con.sql(sql).fetchnumpy()["i"]
        finally:
            con.unregister("fusion_bounding")
    keep = np.zeros(entity.size, dtype=bool)
    keep[np.asarray(kept, dtype=np.int64)] = True
    return keep
