"""Benchmark data: N sensor readings across several institutions as Parquet feeds, plus a federation config.

Deterministic (seeded NumPy; the data are synthetic), written chunk by chunk in row groups so memory stays flat
at any N. Every institution holds its own entities (meters), each in one of the public regions; readings are
spread uniformly over the metrics and over one UTC day of 15-minute windows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

START = datetime(2026, 1, 1, tzinfo=UTC)
END = START + timedelta(days=1)
WINDOW = "15m"
REGIONS = tuple(f"region-{r:02d}" for r in range(50))
METRICS = {  # name: (unit, lower, upper, resolution, plausible)
    "load": ("kW", 0.0, 250.0, 0.1, (0.0, 5000.0)),
    "voltage": ("V", 200.0, 260.0, 0.1, (0.0, 1000.0)),
    "air_temp": ("degC", -40.0, 50.0, 0.1, (-80.0, 70.0)),
    "humidity": ("percent", 0.0, 100.0, 0.5, (0.0, 100.0)),
    "flow": ("m3/h", 0.0, 500.0, 1.0, (0.0, 10000.0)),
}
CHUNK_ROWS = 262_144
FILE_ROWS = 1_048_576
READINGS_PER_ENTITY = 200
#: Entity-level bounds of the bench (L0: cells an entity may touch; Linf: its readings a cell).
ENTITY_MAX_PARTITIONS = 24
ENTITY_MAX_PER_PARTITION = 4


@dataclass(frozen=True)
class BenchData:
    """Where the generated feeds are and what they hold."""

    directory: Path
    rows: int
    institutions: tuple[str, ...]

    @property
    def feeds(self) -> Path:
        return self.directory / "feeds"

    def glob(self) -> str:
        """Every feed file, as a DuckDB / glob pattern."""
        return str(self.feeds / "*" / "*.parquet")


def institution_ids(count: int) -> tuple[str, ...]:
    return tuple(f"inst-{i}" for i in range(count))


def _chunk(institution: str, entities: int, rows: int, rng: np.random.Generator) -> pa.Table:
    """`rows` readings of one institution: entity, region (fixed per entity), metric, event time, value."""
    entity = rng.integers(0, entities, size=rows)
    names = list(METRICS)
    metric = rng.integers(0, len(names), size=rows)
    lower = np.array([METRICS[m][1] for m in names])[metric]
    upper = np.array([METRICS[m][2] for m in names])[metric]
    resolution = np.array([METRICS[m][3] for m in names])[metric]
    span = upper - lower
    # 5% of the clamp range beyond each bound (clamping is exercised), always inside the plausible range.
    low = np.maximum(lower - 0.05 * span, np.array([METRICS[m][4][0] for m in names])[metric])
    high = np.minimum(upper + 0.05 * span, np.array([METRICS[m][4][1] for m in names])[metric])
    value = np.round(rng.uniform(low, high) / resolution) * resolution
    start_us = int(START.timestamp() * 1_000_000)
    micros = start_us + rng.integers(0, 86_400 * 1_000_000, size=rows)
    entity_names = pa.array([f"{institution}-m{e:06d}" for e in range(entities)], pa.string())
    region_names = pa.array(list(REGIONS), pa.string())
    return pa.table(
        {
            "entity_id": entity_names.take(pa.array(entity)),
            "region": region_names.take(pa.array(entity % len(REGIONS))),
            "metric": pa.array(names, pa.string()).take(pa.array(metric)),
            "event_time": pa.array(micros, pa.timestamp("us", tz="UTC")),
            "value": pa.array(value, pa.float64()),
        }
    )


def generate(directory: Path, rows: int, *, institutions: int = 5, seed: int = 2026) -> BenchData:
    """Write `rows` readings split evenly over `institutions` (feeds/<id>/part-NNNN.parquet). Reuses data already
    generated with the same parameters (a marker file records them)."""
    directory = Path(directory).resolve()
    ids = institution_ids(institutions)
    data = BenchData(directory=directory, rows=rows, institutions=ids)
    marker = directory / "generated.json"
    spec = {"rows": rows, "institutions": institutions, "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return data
    rng = np.random.default_rng(seed)
    for index, institution in enumerate(ids):
        share = rows // institutions + (1 if index < rows % institutions else 0)
        entities = max(10, share // READINGS_PER_ENTITY)
        folder = directory / "feeds" / institution
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.parquet"):
            old.unlink()
        written, part = 0, 0
        while written < share or part == 0:
            file_rows = min(FILE_ROWS, share - written)
            with pq.ParquetWriter(folder / f"part-{part:04d}.parquet", _chunk(institution, 1, 0, rng).schema) as out:
                done = 0
                while done < file_rows:
                    n = min(CHUNK_ROWS, file_rows - done)
                    out.write_table(_chunk(institution, entities, n, rng), row_group_size=CHUNK_ROWS)
                    done += n
            written += file_rows
            part += 1
    marker.write_text(json.dumps(spec))
    return data


def config_text(
    data: BenchData,
    *,
    entity_level: bool = False,
    noise: bool = True,
    quorum: int = 3,
    batch_rows: int = 262_144,
    shard_rows: int | None = None,
) -> str:
    """A federation config over the generated feeds. Production mode (secure noise) unless `noise` is off,
    which only test mode allows."""
    mode = "production" if noise else "test"
    lines = [
        f"regions = {json.dumps(list(REGIONS))}",
        "[federation]",
        'id = "bench-federation"',
        f'window = "{WINDOW}"',
        "[privacy]",
        "epsilon = 1.0",
        "delta = 1e-6",
        f"quorum = {quorum}",
        f'mode = "{mode}"',
    ]
    if not noise:
        lines.append("noise = false")
    if entity_level:
        lines += [
            'unit = "entity"',
            f"max_partitions = {ENTITY_MAX_PARTITIONS}",
            f"max_readings_per_partition = {ENTITY_MAX_PER_PARTITION}",
        ]
    lines += ["[pipeline]", f"batch_rows = {batch_rows}"]
    if shard_rows is not None:  # unset: the privacy unit's default, as a federation's own config has it
        lines.append(f"shard_rows = {shard_rows}")
    for name, (unit, lower, upper, resolution, plausible) in METRICS.items():
        lines += [
            "[[metrics]]",
            f'name = "{name}"',
            f'unit = "{unit}"',
            f"lower = {lower}",
            f"upper = {upper}",
            f"resolution = {resolution}",
            f"plausible = [{plausible[0]}, {plausible[1]}]",
        ]
    for institution in data.institutions:
        lines += [
            "[[institutions]]",
            f'id = "{institution}"',
            "[[institutions.feeds]]",
            'name = "meters"',
            f'path = "{data.feeds / institution}/*.parquet"',
            'format = "parquet"',
        ]
    return "\n".join(lines) + "\n"
