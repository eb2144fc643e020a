"""The benchmark harness at a tiny size: the generator, every measurement's plumbing and the report's fields,
and (noise off) Fusion's released counts equal to the plain DuckDB GROUP BY over the same feeds."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from bench.generate import METRICS, REGIONS, generate
from bench.run import DEPS, main, measure_all, summarise
from fusion.store.delta import Store


def test_generator_is_deterministic_and_splits_rows_over_institutions(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", 1003, institutions=3)
    second = generate(tmp_path / "b", 1003, institutions=3)
    files = sorted(first.feeds.rglob("*.parquet"))
    assert [f.relative_to(first.directory) for f in files] == [
        f.relative_to(second.directory) for f in sorted(second.feeds.rglob("*.parquet"))
    ]
    tables = [pq.read_table(f) for f in files]
    assert sum(t.num_rows for t in tables) == 1003
    assert [t.num_rows for t in tables] == [335, 334, 334]
    for table, path in zip(tables, files, strict=True):
        assert table.equals(pq.read_table(second.directory / path.relative_to(first.directory)))
    assert set(tables[0].column("metric").to_pylist()) <= set(METRICS)
    assert set(tables[0].column("region").to_pylist()) <= set(REGIONS)
    assert generate(tmp_path / "a", 1003, institutions=3) == first  # reused, not rewritten


@pytest.mark.e2e
def test_every_measurement_runs_and_noise_free_counts_match_duckdb(tmp_path: Path) -> None:
    data = generate(tmp_path / "data", 3000, institutions=3)
    pipelinedp_rows = 300 if (DEPS / "pipeline_dp").exists() else 0
    measured = measure_all(
        data,
        tmp_path / "runs",
        pipelinedp_rows=pipelinedp_rows,
        sql_days=2,
        history_days=2,
        noise=False,
        log=lambda _: None,
    )
    summary = measured["summary"]
    for field in (
        "duckdb_rows_per_s",
        "duckdb_checked_rows_per_s",
        "fusion_vs_duckdb_checked_event",
        "fusion_event_rows_per_s",
        "fusion_vs_duckdb_event",
        "fusion_entity_rows_per_s",
        "fusion_vs_duckdb_entity",
        "he_share",
        "envelope_bytes_per_component",
        "peak_memory_mb",
        "sql_ratio",
        "sql_rows",
        "scan_vs_duckdb",
        "readings_event_vs_duckdb",
        "readings_entity_vs_duckdb",
        "fixed_seconds",
    ):
        assert field in summary, field
    assert summary["sql_rows"] == 2 * 96 * len(REGIONS) * len(METRICS)
    assert measured["raw"]["duckdb_checked"]["cells"] == measured["raw"]["duckdb"]["cells"]  # clean data
    assert summary["envelope_bytes_per_component"] > 0
    assert measured["raw"]["readings_event"]["accepted"] == data.rows  # clean data: every reading counted
    assert summary["fixed_rows"] == 10_000 and measured["raw"]["fusion_fixed"]["status"] == "released"
    history = measured["raw"]["fusion_fixed_history"]  # the same release, on a store holding two days of releases
    assert history["status"] == "released" and summary["history_days"] == 2 and summary["fixed_history_ratio"] > 0
    held = Store(history["store"]).read("releases")
    assert held.num_rows == 2 * 24_000 + history["cells"]
    if pipelinedp_rows:
        assert summary["pipelinedp_rows"] == pipelinedp_rows
    event = measured["raw"]["fusion_event"]
    assert event["status"] == "released" and event["cells"] == 96 * len(REGIONS) * len(METRICS)

    released = Store(event["store"]).read("releases").to_pylist()
    fusion_counts = {(r["metric"], r["region"], r["window_start"]): r["count"] for r in released if r["count"]}
    reference = duckdb.sql(
        f"SET TimeZone = 'UTC'; SELECT metric, region, time_bucket(INTERVAL '15 minutes', event_time) AS w, "
        f"count(*) AS n FROM read_parquet('{data.glob()}') GROUP BY ALL"
    ).fetchall()
    assert fusion_counts == {(m, r, w): float(n) for m, r, w, n in reference}
    assert json.dumps(summarise(data, measured["raw"]), default=str)


def test_the_report_is_written_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.run

    fake = {"raw": {}, "summary": {"rows": 10, "institutions": 1}}
    monkeypatch.setattr(bench.run, "measure_all", lambda *args, **kwargs: fake)
    monkeypatch.setattr(bench.run, "table", lambda summary: "table")
    argv = ["--rows", "10", "--institutions", "1", "--work", str(tmp_path / "w"), "--results", str(tmp_path / "r")]
    report = main([*argv, "--no-streaming"])
    latest = json.loads((tmp_path / "r" / "latest.json").read_text())
    assert latest["summary"] == fake["summary"] == report["summary"]
    assert len(list((tmp_path / "r").glob("*.json"))) == 2


@pytest.mark.e2e
def test_the_staging_bench_releases_the_same_counts_in_one_shard_and_in_several(tmp_path: Path) -> None:
    from bench.staging import run

    result = run(6000, 1024, 0.05, 1, tmp_path)
    cases = result["cases"]
    assert all(case["status"] == "released" for case in cases.values())
    assert cases["clean_one_shard"]["shards"] == 1 and cases["clean_several_shards"]["shards"] > 1
    for label in ("clean", "resent"):
        assert cases[f"{label}_one_shard"]["row_counts"] == cases[f"{label}_several_shards"]["row_counts"]
    counts = cases["resent_several_shards"]["row_counts"]["inst-0"]
    assert counts["rejected"] == {"duplicate": counts["read"] - counts["accepted"]} and counts["accepted"] == 1200
