"""The peer: PipelineDP (Beam backend, DirectRunner) computing DP count and sum per partition.

Run as `python -m bench.pipelinedp_ref JSON-ARGS` with bench/.deps on PYTHONPATH (pipeline-dp and python-dp are
bench-only dependencies, see bench/requirements.lock). Reads the first `rows` readings of the generated feeds
(taken evenly from every institution), turns them into Python tuples (PipelineDP works element by element), then
times the pipeline: event level (each reading its own privacy unit, one contribution), public partitions
metric x region x 15-minute window (the same public layout Fusion uses), epsilon 1, delta 1e-6.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.generate import METRICS, REGIONS, START
from bench.measure import peak_rss_mb

WINDOW_US = 15 * 60 * 1_000_000


def load_rows(feeds: Path, rows: int) -> list[tuple[int, str, str, int, float]]:
    """(row id, metric, region, window index, value) for `rows` readings spread over the institutions."""
    institutions = sorted(p for p in feeds.iterdir() if p.is_dir())
    per = -(-rows // len(institutions))
    tables = []
    for folder in institutions:
        taken = 0
        for path in sorted(folder.glob("*.parquet")):
            if taken >= per:
                break
            table = pq.read_table(path).slice(0, per - taken)
            tables.append(table)
            taken += table.num_rows
    table = pa.concat_tables(tables).slice(0, rows)
    micros = pc.cast(table.column("event_time"), pa.int64()).to_numpy()
    window = ((micros - int(START.timestamp() * 1_000_000)) // WINDOW_US).tolist()
    return list(
        zip(
            range(table.num_rows),
            table.column("metric").to_pylist(),
            table.column("region").to_pylist(),
            window,
            table.column("value").to_pylist(),
            strict=True,
        )
    )


def run(rows: int, feeds: Path) -> dict[str, Any]:
    import apache_beam as beam
    import pipeline_dp
    from apache_beam.options.pipeline_options import PipelineOptions

    data = load_rows(feeds, rows)
    partitions = [(m, r, w) for m in METRICS for r in REGIONS for w in range(96)]
    lower = min(b[1] for b in METRICS.values())
    upper = max(b[2] for b in METRICS.values())
    released: list[int] = []

    began = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"])) as pipeline:
        readings = pipeline | "Readings" >> beam.Create(data)
        public = pipeline | "Partitions" >> beam.Create(partitions)
        accountant = pipeline_dp.NaiveBudgetAccountant(total_epsilon=1.0, total_delta=1e-6)
        engine = pipeline_dp.DPEngine(accountant, pipeline_dp.BeamBackend())
        params = pipeline_dp.AggregateParams(
            metrics=[pipeline_dp.Metrics.COUNT, pipeline_dp.Metrics.SUM],
            max_partitions_contributed=1,
            max_contributions_per_partition=1,
            min_value=lower,
            max_value=upper,
        )
        extractors = pipeline_dp.DataExtractors(
            privacy_id_extractor=lambda row: row[0],
            partition_extractor=lambda row: (row[1], row[2], row[3]),
            value_extractor=lambda row: row[4],
        )
        result = engine.aggregate(readings, params, extractors, public_partitions=public)
        accountant.compute_budgets()
        _ = result | "Count" >> beam.combiners.Count.Globally() | "Keep" >> beam.Map(released.append)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "rows": len(data), "cells": released[0] if released else None}


if __name__ == "__main__":
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    args = json.loads(sys.argv[1])
    result = run(args["rows"], Path(args["feeds"]))
    result["peak_rss_mb"] = peak_rss_mb()
    print("BENCH-RESULT " + json.dumps(result))
