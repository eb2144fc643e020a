"""Idle scan connections are closed before the process forks, as bounding's are: a child cannot use, or even close,
a DuckDB connection it inherits (its scheduler's threads stayed in the parent); one whose database a fault
invalidated is closed, not kept."""

from __future__ import annotations

import multiprocessing

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from pipelines import contribute


def _idle_in_child(queue: multiprocessing.Queue) -> None:
    queue.put(len(contribute._scan_connections._idle))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_idle_scan_connections_are_closed_before_a_fork() -> None:
    connection = duckdb.connect(":memory:")
    contribute._scan_connections.give_back(connection)
    assert connection in contribute._scan_connections._idle
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_idle_in_child, args=(queue,))
    child.start()
    inherited = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert inherited == 0, "the child inherited idle scan connections"
    assert not contribute._scan_connections._idle  # closed in the parent too: the next scan opens one
    with pytest.raises(duckdb.ConnectionException):
        connection.execute("SELECT 1")


def test_a_connection_whose_database_was_invalidated_is_closed_not_kept() -> None:
    """Text that is not UTF-8, given to DuckDB, invalidates its database: kept, the connection would fail every
    later scan that took it ("database has been invalidated")."""
    pool = contribute._ScanConnections(keep=2)
    broken, healthy = duckdb.connect(":memory:"), duckdb.connect(":memory:")
    offsets = pa.py_buffer(np.array([0, 5], dtype=np.int32).tobytes())
    text = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"sou\xffh")])
    broken.register("fed", pa.table({"region": text}))
    with pytest.raises(duckdb.Error):
        broken.sql("SELECT trim(region) FROM fed").fetchall()
    with pytest.raises(duckdb.FatalException, match="invalidated"):
        broken.execute("SELECT 1")
    pool.give_back(broken)
    pool.give_back(healthy)
    assert pool._idle == [healthy]
    with pytest.raises(duckdb.ConnectionException):  # closed
        broken.execute("SELECT 1")
