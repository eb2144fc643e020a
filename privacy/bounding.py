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

    `prefilter` ranks only the pairs that can be kept, and keeps exactly the same rows: an entity with n rows
    (n > PREFILTER x L0) first drops the pairs whose priority lies above 2^64 x PREFILTER x L0 / n. What survives
    is a prefix of the entity's pairs in priority order, so if at least L0 distinct pairs survive, its L0 first
    pairs are among them, ranked as among all its pairs, each with all its rows. An entity left with fewer (rare
    unless its rows crowd into few cells) is ranked again over all of its rows, by the window query. The
    survivors are ranked in NumPy (`_ranked_survivors`: one sort on a compact key), about twice as fast as the
    window query's sorts on the same rows."""
    salt = int(generator.integers(0, 2**63))  # keys the pair priorities: each call orders the cells afresh
    table = pa.table(
        {"e": entity, "c": cell, "r": generator.random(entity.size), "i": np.arange(entity.size, dtype=np.int64)}
    )
    l0, linf = int(max_partitions), int(max_per_partition)
    with _connections.held() as con:
        con.register("fusion_bounding", table)
        try:
            if not prefilter:
                return _keep(entity.size, con.sql(_window_sql(salt, l0, linf, "fusion_bounding")).fetchnumpy()["i"])
            return _bound_prefiltered(con, entity.size, salt, l0, linf)
        finally:
            con.unregister("fusion_bounding")


def _keep(size: int, kept: np.ndarray) -> np.ndarray:
    keep = np.zeros(size, dtype=bool)
    keep[np.asarray(kept, dtype=np.int64)] = True
    return keep


def _window_sql(salt: int, l0: int, linf: int, rows: str) -> str:
    """The rows (`i`) of relation `rows` (e, c, r, i) that bounding keeps, ranked by window functions.

    p: a pseudo-random priority per (entity, cell) pair, the same for all of a pair's rows. One sort per entity
    by (p, cell, row priority) serves all three windows: the dense rank of (p, c) is the cell's rank, and
    row_number - rank (rank: the pair's first row) the row's rank within its cell."""
    return f"""
        WITH b AS (SELECT i, e, c, r, hash(e, c, {salt}) AS p FROM {rows}),
        ranked AS (
            SELECT i, dense_rank() OVER (PARTITION BY e ORDER BY p, c) AS pair_rank,
                   row_number() OVER (PARTITION BY e ORDER BY p, c, r)
                       - rank() OVER (PARTITION BY e ORDER BY p, c) AS row_rank
            FROM b
        )
        SELECT i FROM ranked WHERE pair_rank <= {l0} AND row_rank < {linf}"""


def _bound_prefiltered(con: duckdb.DuckDBPyConnection, size: int, salt: int, l0: int, linf: int) -> np.ndarray:
    """`_bound_in_duckdb` with the pre-filter, on `con` with the rows registered as fusion_bounding."""
    cutoff = PREFILTER * l0
    # Each entity numbered (k, from 1) with its rows counted; the pairs of the survivors ranked in NumPy.
    con.execute(
        "CREATE TEMP TABLE fusion_entities AS "
        "SELECT e, count(*) AS n, row_number() OVER () AS k FROM fusion_bounding GROUP BY e"
    )
    try:
        entities, expected = con.sql(f"SELECT count(*), sum(least(n, {cutoff})) FROM fusion_entities").fetchall()[0]
        if 2 * int(expected) > size:  # most rows would survive: the window query ranks them faster
            return _keep(size, con.sql(_window_sql(salt, l0, linf, "fusion_bounding")).fetchnumpy()["i"])
        survivors = con.sql(
            f"""
            WITH b AS (SELECT i, e, c, r, hash(e, c, {salt}) AS p FROM fusion_bounding)
            SELECT b.i, n.k, b.c, b.r, b.p
            FROM b JOIN fusion_entities n USING (e)
            WHERE n.n <= {cutoff} OR CAST(b.p AS DOUBLE) < 18446744073709551616.0 * {cutoff} / n.n"""
        ).to_arrow_table()
        filtered = con.sql(f"SELECT e, k FROM fusion_entities WHERE n > {cutoff}").fetchnumpy()
    finally:
        con.execute("DROP TABLE fusion_entities")
    entities = int(entities)
    i, k, c, r, p = (survivors.column(name).to_numpy() for name in ("i", "k", "c", "r", "p"))
    order, pair_rank, row_rank = _ranked_survivors(k.astype(np.int64), p.astype(np.uint64), c, r, linf)
    i, k = i[order], k[order].astype(np.int64)
    # The pairs an entity kept: its last row's pair rank (ranks only grow along an entity's rows).
    pairs_of = np.zeros(entities + 1, dtype=np.int64)
    if k.size:
        last = np.flatnonzero(np.append(k[1:] != k[:-1], True))
        pairs_of[k[last]] = pair_rank[last]
    filtered_k = np.asarray(filtered["k"], dtype=np.int64)
    short_k = filtered_k[pairs_of[filtered_k] < l0]
    short = np.zeros(entities + 1, dtype=bool)
    short[short_k] = True
    keep = _keep(size, i[~short[k] & (pair_rank <= l0) & (row_rank < linf)])
    if short_k.size:  # ranked again over all their rows
        redo = pa.table({"e": np.asarray(filtered["e"])[short[filtered_k]]})
        con.register("fusion_short", redo)
        try:
            rows = "(SELECT * FROM fusion_bounding SEMI JOIN fusion_short USING (e))"
            keep[np.asarray(con.sql(_window_sql(salt, l0, linf, rows)).fetchnumpy()["i"], dtype=np.int64)] = True
        finally:
            con.unregister("fusion_short")
    return keep


def _ranked_survivors(
    k: np.ndarray, p: np.ndarray, c: np.ndarray, r: np.ndarray, linf: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, pair rank from 1, row rank from 0) of rows in entities `k`, with pair priorities `p` (uint64),
    cells `c` and row priorities `r`: `order` sorts them by (k, p, c, r) as far as the ranks can tell, and the
    ranks are those of the sorted rows, as the window query gives them.

    One argsort on (k, top 32 bits of p) (k below 2^32); rows that tie on it are mostly a pair's rows, whose
    order matters only when the pair has more than `linf` rows. Any other tie (a pair with more than `linf` rows,
    or two pairs sharing their top 32 bits) is sorted exactly, on all four keys, within its tie."""
    if k.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    if int(k.max()) >= 1 << 32:
        order = np.lexsort((r, c, p, k))
    else:
        compact = (k.astype(np.uint64) << np.uint64(32)) | (p >> np.uint64(32))
        order = np.argsort(compact)
        compact = compact[order]
        starts = np.flatnonzero(np.concatenate(([True], compact[1:] != compact[:-1])))
        lengths = np.diff(np.append(starts, compact.size))
        tied = np.flatnonzero(lengths > 1)
        if tied.size:
            run = np.repeat(np.arange(starts.size), lengths)  # the tie (run of equal keys) of each sorted row
            ps, cs = p[order], c[order]
            first = starts[run]
            mixed = np.zeros(starts.size, dtype=bool)  # ties holding more than one pair
            np.logical_or.at(mixed, run, (ps != ps[first]) | (cs != cs[first]))
            # A pair's rows, more than linf of them: sorted by their priority. Several pairs: on all keys.
            for hard, keys in ((~mixed & (lengths > linf), (r,)), (mixed, (r, c, p))):
                if hard.any():
                    at = np.flatnonzero(hard[run])  # positions of the rows in these ties, in sorted order
                    rows = order[at]
                    order[at] = rows[np.lexsort((*(key[rows] for key in keys), run[at]))]
    ks, ps, cs = k[order], p[order], c[order]
    new_entity = np.concatenate(([True], ks[1:] != ks[:-1]))
    new_pair = new_entity.copy()
    new_pair[1:] |= (ps[1:] != ps[:-1]) | (cs[1:] != cs[:-1])
    pair_number = np.cumsum(new_pair)
    entity_start = np.flatnonzero(new_entity)
    entity_of = np.cumsum(new_entity) - 1
    pair_rank = pair_number - pair_number[entity_start][entity_of] + 1
    pair_start = np.flatnonzero(new_pair)
    row_rank = np.arange(k.size) - pair_start[pair_number - 1]
    return order, pair_rank, row_rank
