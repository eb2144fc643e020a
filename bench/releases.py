"""A year of released cells for the SQL benchmark, written through the store's own insert path (Delta merges); and
a store's history (`add_history`): a year of earlier releases in its tables, for the per-release cost on a store in
use."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import WriterProperties, write_deltalake

from bench.generate import METRICS, REGIONS, START
from fusion.config.privacy import PrivacyMode
from fusion.store.delta import ROW_GROUP_ROWS, Store
from fusion.store.mode import MODE_PROPERTY
from schemas.tables import AUDIT_SCHEMA, RELEASES_SCHEMA

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


#: Audit rows a release leaves (its feeds, charge, signature, release; more with rejects or refusals).
AUDIT_ROWS_PER_RELEASE = 6


def add_history(
    directory: Path, *, days: int, mode: PrivacyMode = PrivacyMode.PRODUCTION, rng: np.random.Generator | None = None
) -> int:
    """Put `days` daily releases before START (24,000 cells each, content-hash ids as Fusion's, cells in cell
    order) and their audit rows into the store at `directory`, a month a commit, then compact both tables as the
    release step does: what a federation's store holds after `days` days. Returns the release rows added."""
    rng = rng if rng is not None else np.random.default_rng(11)
    store = Store(directory)
    store.ensure_tables()
    properties = WriterProperties(max_row_group_size=ROW_GROUP_ROWS)
    added = 0
    for first in range(-days, 0, CHUNK_DAYS):
        count = min(CHUNK_DAYS, -first)
        rows = release_rows(first, count, rng).sort_by(
            [("window_start", "ascending"), ("metric", "ascending"), ("region", "ascending")]
        )
        day = pc.days_between(pa.scalar(START), rows.column("window_start")).to_numpy()
        ids = np.array([_history_id(int(d)) for d in range(first, first + count)])[day - first]
        per_release = [_history_id(d) for d in range(first, first + count) for _ in range(AUDIT_ROWS_PER_RELEASE)]
        write_deltalake(
            store.table_path("releases"),
            rows.set_column(0, "release_id", pa.array(ids, pa.string())),
            mode="append",
            writer_properties=properties,
        )
        write_deltalake(
            store.table_path("audit"), _history_audit(per_release, rng), mode="append", writer_properties=properties
        )
        added += rows.num_rows
    store.compact("releases", min_files=2)
    store.compact("audit", min_files=2)
    store.record_table_property("releases", MODE_PROPERTY, mode.value)  # as a store's first release records it
    return added


def linked_history(directory: Path, *, days: int, cache: Path, mode: PrivacyMode = PrivacyMode.PRODUCTION) -> None:
    """`add_history` in the store at `directory` (its tables made, releases and audit empty), built once under
    `cache` and copied from there, its data files as hard links: Delta never rewrites a data file (a commit adds
    files, a compaction writes new ones and a vacuum unlinks old ones), so the copies share them safely."""
    marker = cache / "history.json"
    spec = json.dumps({"days": days, "mode": mode.value, "version": 1})
    if not marker.exists() or marker.read_text() != spec:
        if cache.exists():
            shutil.rmtree(cache)
        add_history(cache, days=days, mode=mode)
        marker.write_text(spec)
    for table in ("releases", "audit"):
        shutil.rmtree(directory / table)
        shutil.copytree(cache / table, directory / table, copy_function=_link_data)


def _link_data(source: str, target: str) -> None:
    if source.endswith(".parquet"):
        os.link(source, target)
    else:  # the log: Delta rewrites _last_checkpoint in place
        shutil.copy2(source, target)


def _history_id(day: int) -> str:
    return "r-" + hashlib.sha256(f"bench-history|{day}".encode()).hexdigest()[:24]


def _history_audit(release_ids: list[str], rng: np.random.Generator) -> pa.Table:
    n = len(release_ids)
    at = pa.array(np.full(n, int(START.timestamp() * 1_000_000)), pa.timestamp("us", tz="UTC"))
    events = [f"{r}:{rng.integers(1 << 62):016x}" for r in release_ids]
    columns = {
        "event_id": pa.array(events, pa.string()),
        "at": at,
        "actor_role": pa.array(["aggregator"] * n, pa.string()),
        "actor": pa.array(["bench"] * n, pa.string()),
        "action": pa.array(["history"] * n, pa.string()),
        "release_id": pa.array(release_ids, pa.string()),
    }
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in AUDIT_SCHEMA}, schema=AUDIT_SCHEMA)
