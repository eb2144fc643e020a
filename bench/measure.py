"""One measurement per process: `python -m bench.measure KIND JSON-ARGS` prints one JSON line.

Each measurement runs in its own process so its peak memory (ru_maxrss of the process and of any children it
waited for, e.g. Beam workers) is its own. Timings are wall-clock seconds of the measured work only (set-up
such as key generation is excluded and reported separately where it matters).
"""

from __future__ import annotations

import gc
import json
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.generate import (
    END,
    ENTITY_MAX_PARTITIONS,
    ENTITY_MAX_PER_PARTITION,
    METRICS,
    REGIONS,
    START,
    BenchData,
    config_text,
)


def peak_rss_mb() -> float:
    """Peak resident memory of this process or any child it waited for, in MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


def _time_duckdb(sql: str, *, threads: int, repeats: int) -> dict[str, Any]:
    """Median wall time of `sql` in a fresh DuckDB connection (connecting included), and its result's rows."""
    import duckdb

    times = []
    result = None
    for _ in range(repeats):
        began = time.perf_counter()
        con = duckdb.connect(":memory:")
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"SET threads = {threads}")
        result = con.sql(sql).to_arrow_table()
        con.close()
        times.append(time.perf_counter() - began)
    assert result is not None
    return {"seconds": sorted(times)[len(times) // 2], "all_seconds": times, "cells": result.num_rows}


def duckdb_reference(data: BenchData, *, threads: int = 2, repeats: int = 3) -> dict[str, Any]:
    """The non-private floor: plain DuckDB GROUP BY metric, region, 15-minute bucket over the same Parquet."""
    sql = f"""
        SELECT metric, region, time_bucket(INTERVAL '15 minutes', event_time) AS window_start,
               count(*) AS count, sum(value) AS sum
        FROM read_parquet('{data.glob()}')
        GROUP BY ALL
    """
    return _time_duckdb(sql, threads=threads, repeats=repeats)


def _checked_readings(data: BenchData) -> tuple[str, str]:
    """(WITH-list entries, source) of the readings that pass every check validation makes (present fields, known
    metric and region, time in the interval, finite and plausible value), exactly de-duplicated, in plain SQL."""
    plausible = ", ".join(f"('{name}', {spec[4][0]}, {spec[4][1]})" for name, spec in METRICS.items())
    regions = ", ".join(f"'{r}'" for r in REGIONS)
    ctes = f"""limits(metric, low, high) AS (VALUES {plausible}),
        checked AS (
            SELECT DISTINCT trim(r.entity_id) AS entity_id, trim(r.region) AS region, trim(r.metric) AS metric,
                   r.event_time, r.value
            FROM read_parquet('{data.glob()}') r JOIN limits l ON trim(r.metric) = l.metric
            WHERE nullif(trim(r.entity_id), '') IS NOT NULL AND trim(r.region) IN ({regions})
              AND r.event_time >= TIMESTAMPTZ '{START.isoformat()}' AND r.event_time < TIMESTAMPTZ '{END.isoformat()}'
              AND isfinite(r.value) AND r.value BETWEEN l.low AND l.high
        )"""
    return ctes, "checked"


def duckdb_checked_reference(data: BenchData, *, threads: int = 2, repeats: int = 3) -> dict[str, Any]:
    """Plain DuckDB doing the non-private part of Fusion's event-level work: every check validation makes and
    exact de-duplication, then the same GROUP BY. Fusion's event-level throughput is held against it."""
    ctes, source = _checked_readings(data)
    sql = f"""
        WITH {ctes}
        SELECT metric, region, time_bucket(INTERVAL '15 minutes', event_time) AS window_start,
               count(*) AS count, sum(value) AS sum
        FROM {source}
        GROUP BY ALL
    """
    return _time_duckdb(sql, threads=threads, repeats=repeats)


def bounded_sql(data: BenchData, *, max_partitions: int, max_per_partition: int) -> str:
    """The entity-level reference query (see `duckdb_bounded_reference`)."""
    ctes, source = _checked_readings(data)
    return f"""
        WITH {ctes},
        windowed AS (
            SELECT entity_id, metric, region, time_bucket(INTERVAL '15 minutes', event_time) AS window_start, value
            FROM {source}
        ),
        cells AS (
            SELECT *, hash(entity_id, metric, region, window_start, 2026) AS cell_priority, random() AS row_priority
            FROM windowed
        ),
        bounded AS (
            SELECT metric, region, window_start, value FROM cells
            WINDOW by_cell AS (PARTITION BY entity_id ORDER BY cell_priority, metric, region, window_start),
                   by_row AS (PARTITION BY entity_id ORDER BY cell_priority, metric, region, window_start, row_priority)
            QUALIFY dense_rank() OVER by_cell <= {int(max_partitions)}
                AND row_number() OVER by_row - rank() OVER by_cell < {int(max_per_partition)}
        )
        SELECT metric, region, window_start, count(*) AS count, sum(value) AS sum
        FROM bounded
        GROUP BY ALL
    """


def duckdb_bounded_reference(
    data: BenchData,
    *,
    max_partitions: int = ENTITY_MAX_PARTITIONS,
    max_per_partition: int = ENTITY_MAX_PER_PARTITION,
    threads: int = 2,
    repeats: int = 3,
) -> dict[str, Any]:
    """Plain DuckDB doing the non-private part of Fusion's entity-level work: the same checks and de-duplication,
    then the same L0/Linf bounding with window functions (each entity keeps a random set of at most
    `max_partitions` cells, and at most `max_per_partition` random readings in each), then the same GROUP BY.
    Fusion's entity-level throughput is held against it. The windows share one sort per entity (cells by a
    hashed priority, rows by a random one within their cell): about 1.4x faster here than a second window
    partitioned by cell, so the reference is the faster of the two plain ways to write it."""
    sql = bounded_sql(data, max_partitions=max_partitions, max_per_partition=max_per_partition)
    return _time_duckdb(sql, threads=threads, repeats=repeats)


#: Where a release's time goes, by the code that spends it (self time of the functions whose module or name
#: contains one of the patterns; the first category that matches takes it).
COST_ITEMS = (
    ("Skellam noise (ChaCha20 Poisson draws)", ("privacy/skellam.py",)),
    ("HE: contexts, encryption, sum, decryption", ("tenseal", "privacy/he.py")),
    ("envelopes: deflate, digests, signatures", ("zlib", "_hashlib", "ed25519", "privacy/envelope", "signing")),
    ("masks and Shamir shares", ("privacy/sharing.py", "privacy/masking", "privacy/noise_shares.py", "x25519")),
    ("fsync of kept records", ("posix.fsync",)),
    ("Delta store: commits and reads", ("deltalake", "fusion/store/delta.py")),
    ("Beam: building, translating, scheduling", ("apache_beam",)),
    ("DuckDB: scan and validation", ("duckdb", "validation.py:connect")),
    ("files: listing, reading, writing, removing", ("posix.", "os>:walk", "shutil", "io.", "pathlib", "exchange.py")),
)


def cost_items(stats: Any) -> dict[str, float]:
    """Self time per COST_ITEMS category (plus `other`) from a pstats.Stats. A function that no pattern names (a
    NumPy method or helper, OpenSSL's cipher, a hash's update) counts for the category of the code that called
    it: NumPy's work for the noise draws is the noise's cost, not `other`."""

    def category(key: tuple[str, int, str]) -> str | None:
        where = f"{key[0]}:{key[2]}"
        return next((n for n, patterns in COST_ITEMS if any(p in where for p in patterns)), None)

    items = {name: 0.0 for name, _ in COST_ITEMS} | {"other": 0.0}
    for key, (_calls, _primitive, self_time, _cumulative, callers) in stats.stats.items():
        name = category(key)
        if name is None and callers:
            for caller, (_n, _p, caller_time, _c) in callers.items():
                items[category(caller) or "other"] += caller_time
            continue
        items[name or "other"] += self_time
    return items


def fusion_batch(
    data: BenchData,
    workdir: Path,
    *,
    entity_level: bool,
    noise: bool = True,
    beam_args: list[str] | None = None,
    profile: bool = False,
    in_process: bool | None = None,
    history_days: int = 0,
) -> dict[str, Any]:
    """Fusion end to end (`run_batch`: contribute, aggregate, unmask, aggregate, release) in a fresh federation
    over the generated feeds. Keys and the store's tables are created first and not timed (once per federation);
    with `history_days`, so is a store history of that many daily releases before the interval (24,000 cells each,
    bench.releases.add_history): the release then runs on a store in use, as a federation's does.
    `profile`: run under cProfile and report its self time by COST_ITEMS, on a CPU-time clock (cProfile slows
    Python code more than native code: shares, not seconds)."""
    from fusion.config.federation import load_config
    from fusion.keys.holder import create_federation_keys
    from fusion.release.plan import plan_release
    from fusion.store.delta import Store
    from pipelines.batch import run_batch

    gc.freeze()  # as `fusion batch` does once its imports are in (fusion/cli/release.py)

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    config_path = workdir / "federation.toml"
    config_path.write_text(config_text(data, entity_level=entity_level, noise=noise))
    config = load_config(config_path)
    create_federation_keys(config)
    Store(config.store_path).ensure_tables()  # once per federation, as the keys are: not a release's cost
    if history_days:
        from bench.releases import linked_history

        cache = workdir.parent / f"history-{history_days}-{config.privacy.mode.value}"
        linked_history(Path(config.store_path), days=history_days, cache=cache, mode=config.privacy.mode)
    plan = plan_release(config, START, END)
    stages: dict[str, float] = {}
    marks: list[tuple[str, float]] = []

    def on_stage(stage: str) -> None:
        marks.append((stage, time.perf_counter()))

    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile(time.process_time)  # CPU time: waits (fsync, I/O) are not the release's cost
        profiler.enable()
    began = time.perf_counter()
    cpu_began = time.process_time()
    # Profiled, the steps run one at a time: cProfile sees this thread only, and would file the work of the
    # contribution threads (`[pipeline] workers`) under "other".
    workers = 1 if profile else None
    summary = run_batch(plan, beam_args=beam_args or [], on_stage=on_stage, in_process=in_process, workers=workers)
    seconds = time.perf_counter() - began
    cpu_seconds = time.process_time() - cpu_began
    items = None
    if profiler is not None:
        import pstats

        profiler.disable()
        items = cost_items(pstats.Stats(profiler))
    ends = [t for _, t in marks[1:]] + [began + seconds]
    for (stage, start), end in zip(marks, ends, strict=True):
        stages[stage] = stages.get(stage, 0.0) + (end - start)
    contributions = sorted((workdir / "exchange").rglob("contributions/*.fenv"))
    envelope_bytes = [p.stat().st_size for p in contributions]
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # this process's CPU time (every thread), not its children's
        "stages": stages,
        **({"profile_self_seconds": items} if items is not None else {}),
        "status": summary.status,
        "cells": summary.cells,
        "slots": plan.layout.slots,
        "components": len(plan.layout.components),
        "envelopes": len(envelope_bytes),
        "envelope_bytes": envelope_bytes,
        "row_counts": summary.row_counts,
        "store": str(workdir / "store"),
    }


def fusion_readings(data: BenchData, workdir: Path, *, entity_level: bool, repeats: int = 3) -> dict[str, Any]:
    """Fusion's per-reading work alone, as its contribution step does it (staging when an institution has several
    scan shards, then `ContributeShard` over every shard: scan with validation, encoding and hashing, exact
    de-duplication, entity-level bounding, packing), in process, without Beam, sealing, aggregation or release;
    and the scan alone (staging and each shard's scan). Its ratio to the DuckDB floor is the most Fusion's
    end-to-end ratio could reach if every per-release cost were zero."""
    from fusion.config.federation import load_config
    from fusion.feeds.scan import FeedScanner, ShardScan, scan_connection
    from fusion.release.plan import plan_release
    from pipelines.contribute import PARTIAL, ContributeShard, StageFeed, remove_staging, scan_work, staging_prefix
    from pipelines.local import run_dofn

    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "federation.toml"
    config_path.write_text(config_text(data, entity_level=entity_level))
    plan = plan_release(load_config(config_path), START, END)
    institutions = plan.config.institutions
    work = scan_work(plan, institutions)
    contribute, scan = [], []
    accepted = 0
    for _ in range(repeats):
        remove_staging(plan, institutions)
        began = time.perf_counter()
        staged, staging = run_dofn(StageFeed(plan, work.sources), work.staging)
        partials, _dead = run_dofn(ContributeShard(plan, work.sources), work.shards, dict(staged))
        contribute.append(time.perf_counter() - began)
        accepted = sum(p.rows_accepted for _, p in partials + staging[PARTIAL])
        remove_staging(plan, institutions)
        con = scan_connection(plan)
        began = time.perf_counter()
        prefixes: dict[str, dict[int, str]] = {}
        for institution, src, shards in work.staging:
            scanner = FeedScanner(plan, plan.config.institution(institution), connection=con)
            prefix = staging_prefix(plan, scanner.institution, src)
            prefixes.setdefault(institution, {})[src] = prefix
            for _letters in scanner.stage(src, prefix, shards, ShardScan()):
                pass
        for institution, shard, shards in work.shards:
            scanner = FeedScanner(
                plan, plan.config.institution(institution), connection=con, staged=prefixes.get(institution)
            )
            scanner.scan(shard, shards)
        scan.append(time.perf_counter() - began)
        con.close()
    remove_staging(plan, institutions)
    return {
        "seconds": sorted(contribute)[repeats // 2],
        "scan_seconds": sorted(scan)[repeats // 2],
        "all_seconds": contribute,
        "accepted": accepted,
        "shards": len(work.shards),
        "staged_files": len(work.staging),
    }


def he_operations(data: BenchData, workdir: Path, *, repeats: int = 3) -> dict[str, Any]:
    """The HE work of one release on the same layout, timed alone: every institution encrypts its masked vector,
    the aggregator checks and sums the ciphertexts and adds the plaintext mask correction, the key holder
    decrypts. (Fusion's pipeline does exactly these calls; timing them here keeps timers out of its code.)"""
    import numpy as np

    from fusion.config.federation import load_config
    from fusion.release.plan import plan_release
    from privacy import he

    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "federation.toml"
    config_path.write_text(config_text(data))
    plan = plan_release(load_config(config_path), START, END)
    slots = plan.layout.slots
    secret, public = he.generate_keys()
    rng = np.random.default_rng(1)
    vectors = [rng.integers(-(he.MAX_ABS_TOTAL), he.MAX_ABS_TOTAL, size=slots) for _ in data.institutions]
    timings: dict[str, list[float]] = {"encrypt": [], "sum": [], "decrypt": []}
    for _ in range(repeats):
        began = time.perf_counter()
        public_context = he.load_public_context(public)
        encrypted = [he.encrypt_vector(public_context, v, residues=True) for v in vectors]
        timings["encrypt"].append(time.perf_counter() - began)
        began = time.perf_counter()
        aggregator = he.load_public_context(public)
        for ciphertexts in encrypted:
            for ct in ciphertexts:
                he.check_ciphertext(aggregator, ct)
        total = he.add_encrypted(aggregator, encrypted)
        total = he.add_plain(aggregator, total, np.zeros(slots, dtype=np.int64))
        timings["sum"].append(time.perf_counter() - began)
        began = time.perf_counter()
        he.decrypt_vector(he.load_secret_context(secret), total, slots)
        timings["decrypt"].append(time.perf_counter() - began)
    best = {k: min(v) for k, v in timings.items()}
    return {"seconds": sum(best.values()), "parts": best, "slots": slots, "ciphertexts": he.ciphertexts_for(slots)}


def sql_query(workdir: Path, *, days: int, repeats: int = 7) -> dict[str, Any]:
    """A year (or `days`) of 15-minute releases for 50 regions x 5 metrics written through the store's insert
    path; a filtered time-series query through the sandbox vs DuckDB over the same rows as plain Parquet."""
    from bench.releases import QUERY, build_store, export_plain

    store_dir = workdir / "sql-store"
    plain = workdir / "sql-plain"
    began = time.perf_counter()
    rows = build_store(store_dir, days=days)
    build_seconds = time.perf_counter() - began
    export_plain(store_dir, plain)
    return {"rows": rows, "build_seconds": build_seconds, **_time_queries(store_dir, plain, QUERY, repeats)}


def _time_queries(store_dir: Path, plain: Path, query: str, repeats: int) -> dict[str, Any]:
    """Median times of `query` through the sandbox, through DuckDB over the plain Parquet export (one file, DuckDB's
    default row groups), and through DuckDB over the very files of the store's snapshot."""
    import duckdb
    from deltalake import DeltaTable

    from fusion.store.sql import SqlSandbox

    files = [uri.removeprefix("file://") for uri in DeltaTable(str(store_dir / "releases")).file_uris()]
    sandbox = SqlSandbox(store_dir)

    def plain_duckdb(source: str) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(":memory:")
        con.execute("SET threads = 2")
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"CREATE VIEW releases AS SELECT * FROM read_parquet({source})")
        return con

    exported = plain_duckdb(repr(f"{plain}/*.parquet"))
    same_files = plain_duckdb(repr(files))

    def median(run: Callable[[], Any]) -> tuple[float, int]:
        times, n = [], 0
        for _ in range(repeats):
            began = time.perf_counter()
            n = run().num_rows
            times.append(time.perf_counter() - began)
        return sorted(times)[len(times) // 2], n

    fusion_s, fusion_rows = median(lambda: sandbox.query(query))
    duck_s, duck_rows = median(lambda: exported.sql(query).to_arrow_table())
    same_s, _ = median(lambda: same_files.sql(query).to_arrow_table())
    sandbox.close()
    exported.close()
    same_files.close()
    return {
        "fusion_seconds": fusion_s,
        "duckdb_seconds": duck_s,
        "duckdb_store_files_seconds": same_s,
        "store_files": len(files),
        "result_rows": fusion_rows,
        "duckdb_result_rows": duck_rows,
        "query": query,
    }


def main(argv: list[str]) -> None:
    kind, args = argv[0], json.loads(argv[1])
    data = BenchData(directory=Path(args["data"]), rows=args["rows"], institutions=tuple(args["institutions"]))
    workdir = Path(args["workdir"])
    if kind == "duckdb":
        result = duckdb_reference(data)
    elif kind == "duckdb_checked":
        result = duckdb_checked_reference(data)
    elif kind == "duckdb_bounded":
        result = duckdb_bounded_reference(data)
    elif kind == "fusion":
        result = fusion_batch(
            data,
            workdir,
            entity_level=args.get("entity_level", False),
            noise=args.get("noise", True),
            beam_args=args.get("beam_args"),
            profile=args.get("profile", False),
            history_days=args.get("history_days", 0),
            in_process=args.get("in_process"),
        )
    elif kind == "readings":
        result = fusion_readings(data, workdir, entity_level=args.get("entity_level", False))
    elif kind == "he":
        result = he_operations(data, workdir)
    elif kind == "sql":
        result = sql_query(workdir, days=args["days"])
    else:
        raise SystemExit(f"unknown measurement {kind}")
    result["peak_rss_mb"] = peak_rss_mb()
    print("BENCH-RESULT " + json.dumps(result, default=str))


if __name__ == "__main__":
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    main(sys.argv[1:])
