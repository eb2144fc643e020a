"""Idle scan connections are closed before the process forks, as bounding's are: a child cannot use, or even close,
a DuckDB connection it inherits (its scheduler's threads stayed in the parent)."""

from __future__ import annotations

import multiprocessing

import duckdb
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
