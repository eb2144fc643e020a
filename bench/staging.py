"""Staging benchmark: an institution split into several scan shards, with CSV feeds, against the same feeds in one
shard, with and without resent rows (exact duplicates), end to end (`run_batch`, production noise).

The bench's Parquet readings are written as CSV (one file per Parquet file, ISO times); "resent" appends a copy
of the first `--resent` fraction of each file's rows to the file itself. Each case runs in a fresh federation,
`--repeats` times; the median is reported.

    .venv/bin/python -m bench.staging --readings 2000000 --shard-rows 100000   # writes bench/results/staging.json

With several shards, each file is staged (fusion/feeds/scan.py: scanned once, each shard's encoded rows written apart,
the raw rows kept for comparing duplicates); before staging, every shard parsed and validated every file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from bench.generate import END, START, BenchData, config_text, generate
from fusion.config.federation import load_config
from fusion.feeds.scan import scan_shards
from fusion.keys.holder import create_keys
from fusion.keys.registry import create_aggregator_key, create_institution_keys
from fusion.release.plan import plan_release
from pipelines.batch import run_batch


def csv_feeds(data: BenchData, directory: Path, *, resent: float) -> Path:
    """The readings of `data` as CSV files under `directory`/feeds, each followed by a copy of its first `resent`
    fraction of rows. Reused when already written."""
    feeds = directory / "feeds"
    marker = directory / "written.json"
    spec = {"rows": data.rows, "institutions": list(data.institutions), "resent": resent}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return feeds
    shutil.rmtree(feeds, ignore_errors=True)
    for parquet in sorted(data.feeds.rglob("*.parquet")):
        table = pq.read_table(parquet)
        times = pc.strftime(table.column("event_time"), format="%Y-%m-%dT%H:%M:%S%z")
        table = table.set_column(table.schema.get_field_index("event_time"), "event_time", times)
        table = pa.concat_tables([table, table.slice(0, int(table.num_rows * resent))])
        target = feeds / parquet.parent.name / f"{parquet.stem}.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        pacsv.write_csv(table, target)
    marker.write_text(json.dumps(spec))
    return feeds


def release_seconds(data: BenchData, feeds: Path, workdir: Path, *, shard_rows: int) -> dict[str, Any]:
    """One end-to-end release over the CSV feeds in a fresh federation; keys are made first and not timed."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    text = config_text(data, shard_rows=shard_rows)
    text = text.replace(str(data.feeds), str(feeds.resolve())).replace("*.parquet", "*.csv")
    (workdir / "federation.toml").write_text(text.replace('format = "parquet"', 'format = "csv"'))
    config = load_config(workdir / "federation.toml")
    create_keys(config)
    create_aggregator_key(config)
    for institution in config.institutions:
        create_institution_keys(config, institution.id)
    plan = plan_release(config, START, END)
    began = time.perf_counter()
    summary = run_batch(plan)
    seconds = time.perf_counter() - began
    return {
        "seconds": seconds,
        "status": summary.status,
        "shards": scan_shards(plan, config.institutions[0]),
        "row_counts": summary.row_counts,
    }


def run(readings: int, shard_rows: int, resent: float, repeats: int, work: Path) -> dict[str, Any]:
    work = work.resolve()
    data = generate(work / f"data-{readings}", readings)
    cases: dict[str, Any] = {}
    for label, fraction in (("clean", 0.0), ("resent", resent)):
        feeds = csv_feeds(data, work / f"csv-{readings}-{label}", resent=fraction)
        for shards_label, rows in (("one_shard", 500_000_000), ("several_shards", shard_rows)):
            runs = [release_seconds(data, feeds, work / "run", shard_rows=rows) for _ in range(repeats)]
            cases[f"{label}_{shards_label}"] = {
                "seconds": statistics.median(r["seconds"] for r in runs),
                "all_seconds": [r["seconds"] for r in runs],
                "shards": runs[0]["shards"],
                "status": runs[0]["status"],
                "row_counts": runs[0]["row_counts"],
            }
    return {"readings": readings, "shard_rows": shard_rows, "resent": resent, "cases": cases}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readings", type=int, default=2_000_000)
    parser.add_argument("--shard-rows", type=int, default=100_000, help="pipeline.shard_rows of the several-shard runs")
    parser.add_argument("--resent", type=float, default=0.01, help="fraction of each file's rows resent")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("bench/out/staging"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/staging.json"))
    args = parser.parse_args(argv)
    result = run(args.readings, args.shard_rows, args.resent, args.repeats, args.work)
    for name, case in result["cases"].items():
        print(f"{name:24s} {case['shards']:3d} shards an institution  {case['seconds']:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written {args.out}")
    return result


if __name__ == "__main__":
    main()
