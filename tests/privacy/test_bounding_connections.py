"""The DuckDB bounding engine reuses its connections: a reused one keeps the same rows as a fresh one, holds no
table of an earlier call, and the idle ones are closed before a fork, so a forked process opens its own."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from privacy import bounding
from privacy.bounding import bound_contributions
from privacy.skellam import seeded_generator


def _rows(seed: int, rows: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    entity = (rng.integers(0, 500, rows).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)).view(np.int64)
    return entity, rng.integers(0, 5_000, rows)


def _bound(seed: int) -> np.ndarray:
    entity, cell = _rows(seed)
    return bound_contributions(
        entity, cell, max_partitions=6, max_per_partition=2, generator=seeded_generator(seed), engine="duckdb"
    )


def _reference(seed: int) -> np.ndarray:
    """The same call on a connection opened for it alone (a pool that keeps none)."""
    pool = bounding._connections
    bounding._connections = bounding._Connections(keep=0)
    try:
        return _bound(seed)
    finally:
        bounding._connections = pool


def test_a_reused_connection_keeps_the_rows_a_fresh_one_keeps() -> None:
    first, second = _bound(1), _bound(2)  # the second call runs on the first one's connection
    assert bounding._connections._idle, "the connection was not kept for the next call"
    assert np.array_equal(first, _reference(1))
    assert np.array_equal(second, _reference(2))
    assert 0 < second.sum() < second.size


def test_an_idle_connection_holds_no_table_of_the_last_call() -> None:
    _bound(3)
    with bounding._connections.held() as con:
        views = con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        tables = con.sql("SELECT table_name FROM duckdb_tables()").fetchall()
        assert ("fusion_bounding",) not in views + tables


def _bound_in_child(queue: multiprocessing.Queue) -> None:
    inherited = len(bounding._connections._idle)
    queue.put((_bound(4), inherited))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_process_opens_its_own_connection() -> None:
    parent = _bound(4)
    assert bounding._connections._idle
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_bound_in_child, args=(queue,))
    child.start()
    kept, inherited = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0, "the child did not exit"
    assert inherited == 0, "the child inherited idle connections"
    assert not bounding._connections._idle  # closed before the fork; the next call opens one
    assert np.array_equal(kept, parent)
    assert np.array_equal(_bound(4), parent)
