"""Several windows' files scanned in one DuckDB pass (fusion.feeds.scan.scan_windows, a stream's burst): per window
what scanning its files on their own finds, row for row: the encoded rows in their order, the rows read, the
rejects (out_of_interval decided against each window's own interval), their dead letters and the file tallies."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fusion.feeds.scan import FeedScanner, ShardScan, scan_connection, scan_windows
from fusion.release.plan import ReleasePlan, plan_release
from tests.conftest import START, Federation
from tests.fusion.feeds.test_scan import STATISTICS, edge_readings
from tests.pipelines.test_entity_level import ENTITY_LEVEL

HOUR = timedelta(hours=1)
WINDOWS = 5


def window_files(directory: Path, rng: np.random.Generator) -> list[list[tuple[int, str]]]:
    """Per hourly window, Parquet files of readings mostly in it, some of the hours around it (out of its interval,
    though inside the others'), some invalid in other ways too (unknown region or metric, not finite, implausible),
    some exact duplicates; the even windows in two files."""
    table = edge_readings(rng, 4000)
    n = table.num_rows
    region = pc.if_else(pa.array(rng.random(n) < 0.03), pa.scalar("nowhere"), table.column("region"))
    metric = pc.if_else(pa.array(rng.random(n) < 0.03), pa.scalar("bogus"), table.column("metric"))
    odd = rng.random(n)
    value = np.where(odd < 0.02, np.nan, np.where(odd > 0.98, 1e9, table.column("value").to_numpy()))
    table = table.set_column(1, "region", region).set_column(2, "metric", metric)
    table = table.set_column(4, "value", pa.array(value))
    times = table.column("event_time")
    sources = []
    for h in range(WINDOWS):
        lo, hi = START + (h - 0.25) * HOUR, START + (h + 1.25) * HOUR  # a quarter hour either side
        part = table.filter(pc.and_(pc.greater_equal(times, lo), pc.less(times, hi)))
        halves = [part] if h % 2 else [part.slice(0, part.num_rows // 2), part.slice(part.num_rows // 2)]
        files = []
        for number, half in enumerate(halves):
            path = directory / f"w{h}" / f"part-{number}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(half, path)
            files.append((0, str(path)))
        sources.append(files)
    return sources


def summary(scan: ShardScan) -> tuple[object, ...]:
    letters = [(name, table.to_pylist()) for name, table in scan.dead_letters]
    tallies = {path: (t.read, dict(t.rejected), t.reason) for path, t in scan.files.items()}
    return scan.rows_read, dict(scan.rejected), letters, tallies, scan.unreadable


@pytest.mark.parametrize("unit", ["event", "entity"])
def test_windows_scanned_together_find_what_each_window_scanned_alone_finds(
    make_federation: Callable[..., Federation], tmp_path: Path, unit: str
) -> None:
    federation = make_federation(
        institutions=[("alpha", "parquet"), ("beta", "parquet")],
        statistics=STATISTICS,  # variance and histogram bins: every encoded column
        extra_privacy=ENTITY_LEVEL if unit == "entity" else "",
    )
    config = federation.config
    plans: list[ReleasePlan] = [plan_release(config, START + h * HOUR, START + (h + 1) * HOUR) for h in range(WINDOWS)]
    sources = window_files(tmp_path / "spool", np.random.default_rng(23))
    connection = scan_connection(plans[0])
    together = scan_windows(plans, "alpha", sources, connection)
    assert together is not None
    rejected = set()
    for plan, files, made in zip(plans, sources, together, strict=True):
        scanner = FeedScanner(plan, config.institution("alpha"), connection=connection, sources=files)
        alone = scanner.scan(0, 1)
        assert made.table(scanner.schema).equals(alone.table(scanner.schema))  # the same rows, in the same order
        assert made.table(scanner.schema).num_rows > 0
        assert summary(made) == summary(alone)
        rejected |= set(alone.rejected)
    assert {"out_of_interval", "unknown_region", "unknown_metric", "non_finite_value", "out_of_range"} <= rejected


def test_windows_that_cannot_be_scanned_together_are_left_to_their_own_scans(
    make_federation: Callable[..., Federation], tmp_path: Path
) -> None:
    federation = make_federation(institutions=[("alpha", "parquet"), ("beta", "csv")])
    config = federation.config
    plans = [plan_release(config, START + h * HOUR, START + (h + 1) * HOUR) for h in range(2)]
    sources = window_files(tmp_path / "spool", np.random.default_rng(5))[:2]
    connection = scan_connection(plans[0])
    assert scan_windows(plans, "beta", sources, connection) is None  # a CSV feed: read as batches, not by DuckDB
    other = tmp_path / "other.parquet"  # a file of another schema (an extra column)
    table = pq.read_table(sources[1][0][1])
    pq.write_table(table.append_column("note", pa.array(["x"] * table.num_rows)), other)
    assert scan_windows(plans, "alpha", [sources[0], [(0, str(other))]], connection) is None
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(Path(sources[1][0][1]).read_bytes()[:100])
    assert scan_windows(plans, "alpha", [sources[0], [(0, str(damaged))]], connection) is None
    assert scan_windows(plans, "alpha", sources, connection) is not None


@pytest.mark.parametrize("unit", ["event", "entity"])
def test_a_release_of_several_windows_scans_their_files_in_one_pass_as_its_own_scan_does(
    make_federation: Callable[..., Federation], tmp_path: Path, unit: str
) -> None:
    """One release over every window (a stream's burst at event level): the windows' files, scanned in one pass,
    give what the release's own scan, file by file, gives."""
    federation = make_federation(
        institutions=[("alpha", "parquet"), ("beta", "parquet")],
        statistics=STATISTICS,
        extra_privacy=ENTITY_LEVEL if unit == "entity" else "",
    )
    config = federation.config
    plan = plan_release(config, START, START + WINDOWS * HOUR)
    files = [f for window in window_files(tmp_path / "spool", np.random.default_rng(29)) for f in window]
    connection = scan_connection(plan)
    (made,) = scan_windows([plan], "alpha", [files], connection) or [None]
    assert made is not None
    scanner = FeedScanner(plan, config.institution("alpha"), connection=connection, sources=files)
    alone = scanner.scan(0, 1)
    assert made.table(scanner.schema).equals(alone.table(scanner.schema))
    assert made.table(scanner.schema).num_rows > 0 and summary(made) == summary(alone)
