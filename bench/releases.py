"""A year of released cells for the SQL benchmark, written through the store's own insert path (Delta merges)."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.generate import METRICS, REGIONS, START
from fusion.store.delta import Store
from schemas.tables import RELEASES_SCHEMA

WINDOWS_PER_DAY = 96
CHUNK_DAYS = 31

#: One metric in one region over one month, in time order: what a dashboard or a forecaster asks for.
QUERY = """
SELECT window_start, count, mean, mean_ci_low, mean_ci_high
FROM releases
WHERE metric = 'air_temp' AND region = 'region-17'
  AND window_start >= TIMESTAMP '2026-03-01 00:00:00' AND window_start < TIMESTAMP '2026-04-01 00:00:00'
ORDER BY window_start
""".strip()


def release_rows(first_day: int, days: int, rng: np.random.Generator) -> pa.Table:
    """Rows of `days` daily releases (one release id a day) starting `first_day` days after START."""
    metrics, regions = list(METRICS), list(REGIONS)
    windows = days * WINDOWS_PER_DAY
    cells = len(metrics) * len(regions) * windows
    metric_idx = np.repeat(np.arange(len(metrics)), len(regions) * windows)
    region_idx = np.tile(np.repeat(np.arange(len(regions)), windows), len(metrics))
    window_idx = np.tile(np.arange(windows), len(metrics) * len(regions)) + first_day * WINDOWS_PER_DAY
    start_us = int(START.timestamp() * 1_000_000) + window_idx.astype(np.int64) * 15 * 60 * 1_000_000
    day = window_idx // WINDOWS_PER_DAY
    count = rng.normal(400.0, 20.0, cells)
    mean = rng.normal(15.0, 5.0, cells)
    sd = np.full(cells, 12.0)
    ts = pa.timestamp("us", tz="UTC")
    day_ids = np.array([f"bench-{(START + timedelta(days=int(d))).date()}" for d in range(first_day, first_day + days)])
    nulls = pa.nulls(cells, pa.float64())
    columns = {
        "release_id": pa.array(day_ids[day - first_day], pa.string()),
        "metric": pa.array(np.array(metrics, dtype=object)[metric_idx], pa.string()),
        "unit": pa.array(np.array([METRICS[m][0] for m in metrics], dtype=object)[metric_idx], pa.string()),
        "region": pa.array(np.array(regions, dtype=object)[region_idx], pa.string()),
        "window_start": pa.array(start_us, ts),
        "window_end": pa.array(start_us + 15 * 60 * 1_000_000, ts),
        "contributors": pa.array(np.full(cells, 5, dtype=np.int32)),
        "count": pa.array(count),
        "count_sd": pa.array(sd),
        "count_ci_low": pa.array(count - 1.96 * sd),
        "count_ci_high": pa.array(count + 1.96 * sd),
        "sum": pa.array(count * mean),
        "sum_sd": pa.array(sd * 10),
        "sum_ci_low": pa.array(count * mean - 196.0),
        "sum_ci_high": pa.array(count * mean + 196.0),
        "mean": pa.array(mean),
        "mean_ci_low": pa.array(mean - 1.0),
        "mean_ci_high": pa.array(mean + 1.0),
        "epsilon": pa.array(np.ones(cells)),
        "delta": pa.array(np.full(cells, 1e-6)),
        "noise": pa.array(np.full(cells, "skellam", dtype=object), pa.string()),
        "released_at": pa.array(start_us + 86_400 * 1_000_000, ts),
    }
    return pa.table({f.name: columns.get(f.name, nulls) for f in RELEASES_SCHEMA}, schema=RELEASES_SCHEMA)


def build_store(directory: Path, *, days: int) -> int:
    """A fresh store holding `days` days of releases, inserted a month at a time; returns the row count."""
    if directory.exists():
        shutil.rmtree(directory)
    store = Store(directory)
    store.ensure_tables()
    rng = np.random.default_rng(7)
    rows = 0
    for first in range(0, days, CHUNK_DAYS):
        rows += store.insert_new("releases", release_rows(first, min(CHUNK_DAYS, days - first), rng))
    return rows


def export_plain(store_dir: Path, target: Path) -> None:
    """The same rows as plain Parquet files (what DuckDB reads without Fusion)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    table = Store(store_dir).read("releases")
    pq.write_table(table, target / "releases.parquet", row_group_size=122_880)
