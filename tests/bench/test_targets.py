"""The bench's references and its report against the targets, at a tiny size: the DuckDB bounding reference keeps
what L0/Linf allow, the scaling points are measured and judged, and the table carries every target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest
from rich.console import Console

from bench.generate import generate
from bench.measure import _checked_readings, bounded_sql, duckdb_bounded_reference, duckdb_checked_reference
from bench.run import TARGETS, measure_scaling, table


def test_bounding_reference_keeps_at_most_l0_cells_and_linf_readings_a_cell(tmp_path: Path) -> None:
    data = generate(tmp_path / "data", 6000, institutions=2)
    ctes, source = _checked_readings(data)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    [(readings, entities)] = con.sql(f"WITH {ctes} SELECT count(*), count(DISTINCT entity_id) FROM {source}").fetchall()

    def released(max_partitions: int, max_per_partition: int) -> tuple[int, int]:
        sql = bounded_sql(data, max_partitions=max_partitions, max_per_partition=max_per_partition)
        [(cells, total)] = con.sql(f"SELECT count(*), sum(count) FROM ({sql})").fetchall()
        return cells, total

    # Caps that never bind: every checked reading counted, in the same cells as without bounding.
    loose = released(10_000, 10_000)
    assert loose[1] == readings and loose[0] == duckdb_checked_reference(data, repeats=1)["cells"]
    # One cell an entity and one reading in it: the released counts add up to the entities.
    assert released(1, 1)[1] == entities < readings
    # Two cells, one reading each: every entity here has readings in at least two cells.
    assert released(2, 1)[1] == 2 * entities
    assert duckdb_bounded_reference(data, repeats=1)["cells"] > 0


@pytest.mark.e2e
def test_scaling_points_and_the_table_of_targets(tmp_path: Path) -> None:
    points = measure_scaling(
        [1000, 2000], [1], tmp_path, institutions=3, entity_level=False, noise=False, log=lambda _: None
    )
    assert [(p["rows"], p["workers"]) for p in points] == [(1000, 1), (2000, 1)]
    assert "vs_previous" not in points[0] and points[1]["vs_previous"] > 0
    assert all(p["fusion_event_peak_mib"] > 0 for p in points)
    for point in points:
        assert point["fusion_event_rows_per_s"] == pytest.approx(point["rows"] / point["fusion_event_seconds"])
    summary = _summary(points)
    console = Console(width=200, record=True)
    console.print(table(summary))
    text = console.export_text()
    for line, met in (
        ("Fusion / DuckDB with the same checks ", "yes"),  # 1.5x >= 1.3x
        ("Fusion / DuckDB with the same checks and bounding", "yes"),
        ("Per-release cost", "NO"),  # 0.9 s > 0.6 s
        ("Stream from a feed directory", "yes"),  # 280k >= 200k readings/s
        ("Stream from NATS JetStream", "NO"),
        ("24 windows closable at once", "yes"),  # 1.2 s <= 2 s
        ("the same on a store holding 365 days", "NO"),  # 1.33x a new store's > 1.25x
        ("Stream run 'brokers' failed", "ConnectionRefusedError"),
    ):
        row = next(r for r in text.splitlines() if line in r)
        assert row.rstrip(" │").endswith(met), row
    assert sum("Fusion / bare DuckDB" in r and r.rstrip(" │").endswith("NO") for r in text.splitlines()) == 2
    assert "Scaling: 2,000 readings, 1 worker" in text and f">= {TARGETS['scaling_min_ratio']:g}x" in text
    assert "0.90 s (median of 3: 0.80-1.10 s)" in text


def test_the_scaling_target_holds_only_when_both_levels_keep_their_throughput() -> None:
    def point(rows: int, event: float, entity: float, **ratios: float) -> dict[str, float]:
        return {"rows": rows, "workers": 1, "fusion_event_rows_per_s": event, "fusion_vs_duckdb_event": 0.3,
                "fusion_event_peak_mib": 700.0, "fusion_entity_rows_per_s": entity, "fusion_entity_peak_mib": 900.0,
                **ratios}

    points = [point(10_000_000, 6e6, 4e6), point(30_000_000, 6e6, 3e6, vs_previous=1.0, vs_previous_entity=0.75)]
    console = Console(width=240, record=True)
    console.print(table(_summary(points)))
    row = next(r for r in console.export_text().splitlines() if "Scaling: 30,000,000" in r)
    assert "0.75x" in row and "peak 900 MiB" in row
    assert row.rstrip(" │").endswith("NO"), row  # event level alone kept its throughput


def _summary(points: list[dict[str, Any]]) -> dict[str, Any]:
    """A bench summary with every figure the table judges, around these scaling points."""
    return {
        "rows": 2000,
        "institutions": 3,
        "duckdb_rows_per_s": 1e6,
        "duckdb_checked_rows_per_s": 2e5,
        "duckdb_bounded_rows_per_s": 1e5,
        "fusion_event_rows_per_s": 3e5,
        "fusion_vs_duckdb_checked_event": 1.5,
        "fusion_vs_duckdb_event": 0.3,
        "fusion_entity_rows_per_s": 2e5,
        "fusion_vs_duckdb_bounded_entity": 2.0,
        "fusion_vs_duckdb_entity": 0.2,
        "fixed_rows": 10_000,
        "fixed_seconds": 0.9,
        "fixed_runs_s": [0.8, 0.9, 1.1],
        "fixed_stages_s": {"contribute": 0.5},
        "fixed_cpu_seconds": 0.8,
        "history_days": 365,
        "fixed_history_seconds": 1.2,
        "fixed_history_runs_s": [1.1, 1.2, 1.3],
        "fixed_history_ratio": 1.2 / 0.9,
        "fixed_items_share": {"Skellam noise": 0.25, "other": 0.75},
        "scaling": points,
        "scan_rows_per_s": 1e6,
        "scan_vs_duckdb": 0.5,
        "readings_event_rows_per_s": 1e6,
        "readings_event_vs_duckdb": 0.4,
        "he_share": 0.05,
        "envelope_bytes_per_component": 31.7,
        "peak_memory_mb": {"fusion_event": 600.0},
        "fusion_event_stages_s": {"contribute": 1.0},
        "streaming": {
            "directory_readings_per_s": 280_000.0,
            "nats_readings_per_s": 150_000.0,
            "nats_readings_per_cpu_s": 240_000.0,
            "burst_windows": 24,
            "burst_latency_s": 1.2,
            "errors": {"brokers": ["ConnectionRefusedError"]},
        },
    }
