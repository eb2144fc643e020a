"""An institution's local aggregation: readings -> de-duplicated -> one packed integer vector plus row counts.

Pure and vectorised (pyarrow / NumPy); the Beam pipeline in pipelines/contribute.py only wires these together.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from privacy.bounding import bound_contributions
from privacy.encoding import MetricEncoding, bin_index, encode_readings, encode_squares
from privacy.layout import SUMSQ, PartitionLayout, bin_components
from schemas.readings import ALL_FIELDS, ENTITY_ID, EVENT_TIME, METRIC, REGION, VALUE

_UID = "__fusion_uid"


@dataclass
class PartialAggregate:
    """Packed COUNT/SUM slots (int64, layout.slots) and reconciliation counts; merged by addition."""

    vector: np.ndarray | None = None
    rows_read: int = 0
    rows_accepted: int = 0
    rows_bounded: int = 0  # accepted, but left out by entity-level contribution bounding
    rejected: Counter[str] = field(default_factory=Counter)

    def merge(self, other: PartialAggregate) -> PartialAggregate:
        if other.vector is not None:
            self.vector = other.vector.copy() if self.vector is None else self.vector + other.vector
        self.rows_read += other.rows_read
        self.rows_accepted += other.rows_accepted
        self.rows_bounded += other.rows_bounded
        self.rejected.update(other.rejected)
        return self

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def reconciles(self) -> bool:
        """read = accepted + rejected."""
        return self.rows_read == self.rows_accepted + self.rows_rejected

    def counts(self) -> dict[str, object]:
        counts: dict[str, object] = {
            "read": self.rows_read,
            "accepted": self.rows_accepted,
            "rejected": dict(self.rejected),
        }
        if self.rows_bounded:
            counts["bounded"] = self.rows_bounded
        return counts


def entity_shards(entities: pa.Array | pa.ChunkedArray, shards: int) -> np.ndarray:
    """A stable shard number in [0, shards) per row, from a hash of the entity id (same on every worker)."""
    encoded = pc.dictionary_encode(pa.chunked_array([entities]) if isinstance(entities, pa.Array) else entities)
    combined = encoded.combine_chunks()
    dictionary = combined.dictionary.to_pylist()
    per_entity = np.array(
        [int.from_bytes(hashlib.blake2b(str(e).encode(), digest_size=8).digest(), "big") % shards for e in dictionary],
        dtype=np.int64,
    )
    return per_entity[combined.indices.to_numpy(zero_copy_only=False)] if len(dictionary) else np.zeros(0, np.int64)


def split_by_entity_shard(readings: pa.Table, shards: int) -> list[tuple[int, pa.Table]]:
    """Sub-tables of `readings` keyed by entity shard, so one entity's rows always meet in one place."""
    if readings.num_rows == 0:
        return []
    shard = entity_shards(readings.column(ENTITY_ID), shards)
    # A stable sort of small integers is a radix sort in NumPy. One take per shard, not slices of one take:
    # a slice pickles (through the shuffle) with its parent's whole buffers.
    order = np.argsort(shard.astype(np.uint16) if shards <= 1 << 16 else shard, kind="stable")
    sorted_shards = shard[order]
    bounds = np.flatnonzero(np.diff(sorted_shards)) + 1
    return [(int(shard[indices[0]]), readings.take(pa.array(indices))) for indices in np.split(order, bounds)]


def deduplicate(readings: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(first occurrences, exact duplicates): rows equal in every reading field count once.

    Fast path: rows can only be equal if their event time and value are, so a sort on those two numbers finds
    the few candidates (usually none) and only they are compared on every field."""
    if readings.num_rows == 0:
        return readings, readings
    if readings.column(EVENT_TIME).null_count or readings.column(VALUE).null_count:
        return deduplicate_reference(readings)
    candidates = _same_time_and_value(readings)
    if candidates.size == 0:
        return readings, readings.slice(0, 0)
    keep = np.ones(readings.num_rows, dtype=bool)
    keep[candidates] = _first_occurrences(readings.take(pa.array(candidates)))
    mask = pa.array(keep)
    return readings.filter(mask), readings.filter(pc.invert(mask))


def _same_time_and_value(readings: pa.Table) -> np.ndarray:
    """Sorted indices of the rows whose (event time, value) key is shared with another row (int64): a superset
    of the rows with an equal twin, as equal pairs give equal keys (hash collisions only add candidates)."""
    micros = pc.cast(readings.column(EVENT_TIME), pa.int64()).to_numpy(zero_copy_only=False)
    values = readings.column(VALUE).to_numpy(zero_copy_only=False).astype(np.float64) + 0.0  # -0.0 -> 0.0
    with np.errstate(over="ignore"):
        key = micros.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ values.view(np.uint64)
    counts = pc.value_counts(pa.array(key))
    shared = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    involved = pc.is_in(pa.array(key), value_set=shared).to_numpy(zero_copy_only=False)
    involved |= np.isnan(values)  # NaN keys differ bit by bit; validation rejects NaN, but compare them in full
    return np.flatnonzero(involved)


def _first_occurrences(readings: pa.Table) -> np.ndarray:
    """Boolean mask of the first row of each group of rows equal in every reading field."""
    numbered = readings.append_column(_UID, pa.array(np.arange(readings.num_rows, dtype=np.int64)))
    firsts = numbered.group_by(list(ALL_FIELDS), use_threads=False).aggregate([(_UID, "min")])
    keep = np.zeros(readings.num_rows, dtype=bool)
    keep[firsts.column(f"{_UID}_min").to_numpy()] = True
    return keep


def deduplicate_reference(readings: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The slow, obvious version of `deduplicate` (every row compared on every field), for tests."""
    if readings.num_rows == 0:
        return readings, readings
    mask = pa.array(_first_occurrences(readings))
    return readings.filter(mask), readings.filter(pc.invert(mask))


def reading_cells(readings: pa.Table, layout: PartitionLayout) -> tuple[np.ndarray, np.ndarray]:
    """(metric index, cell index) of each validated reading (int64 arrays)."""
    metric_idx = pc.index_in(readings.column(METRIC), value_set=pa.array(layout.metrics)).to_numpy(zero_copy_only=False)
    region_idx = pc.index_in(readings.column(REGION), value_set=pa.array(layout.regions)).to_numpy(zero_copy_only=False)
    if np.isnan(metric_idx.astype(float)).any() or np.isnan(region_idx.astype(float)).any():
        raise ValueError("readings contain metrics or regions outside the layout; validate them first")
    micros = pc.cast(readings.column(EVENT_TIME), pa.int64()).to_numpy()
    start_us = int(layout.start.timestamp() * 1_000_000)
    window_us = int(layout.window.total_seconds() * 1_000_000)
    window_idx = (micros - start_us) // window_us
    if (window_idx < 0).any() or (window_idx >= layout.windows).any():
        raise ValueError("readings fall outside the layout's interval; validate them first")
    metric_idx = metric_idx.astype(np.int64)
    return metric_idx, layout.cell_index(metric_idx, region_idx.astype(np.int64), window_idx)


def bound_by_entity(
    readings: pa.Table,
    *,
    layout: PartitionLayout,
    max_partitions: int,
    max_per_partition: int,
    generator: np.random.Generator,
) -> pa.Table:
    """The readings kept by entity-level bounding (all of an entity's readings must be in `readings`)."""
    if readings.num_rows == 0:
        return readings
    _, cell = reading_cells(readings, layout)
    entity = pc.dictionary_encode(readings.column(ENTITY_ID)).combine_chunks().indices.to_numpy(zero_copy_only=False)
    keep = bound_contributions(
        entity, cell, max_partitions=max_partitions, max_per_partition=max_per_partition, generator=generator
    )
    return readings.filter(pa.array(keep))


def aggregate_readings(
    readings: pa.Table, *, layout: PartitionLayout, encodings: tuple[MetricEncoding, ...]
) -> np.ndarray:
    """Pack validated readings (all inside the layout's interval) into the layout's slots (int64): COUNT and
    SUM, and when the layout has them SUMSQ and one histogram bin per reading, each weighted like COUNT."""
    vector = np.zeros(layout.slots, dtype=np.int64)
    if readings.num_rows == 0:
        return vector
    metric_idx, cell = reading_cells(readings, layout)
    values = readings.column(VALUE).to_numpy()
    weight, encoded = encode_readings(values, metric_idx, encodings)
    np.add.at(layout.block(vector, "count"), cell, weight)
    np.add.at(layout.block(vector, "sum"), cell, encoded)
    if layout.has(SUMSQ):
        np.add.at(layout.block(vector, SUMSQ), cell, encode_squares(encoded, weight))
    if layout.bins:
        lower = np.array([e.lower for e in encodings])[metric_idx]
        upper = np.array([e.upper for e in encodings])[metric_idx]
        resolution = np.array([e.resolution for e in encodings])[metric_idx]
        bins = bin_index(values, lower, upper, resolution, layout.bins)
        first_bin = layout.components.index(bin_components(layout.bins)[0])
        np.add.at(vector, (first_bin + bins) * layout.cells + cell, weight)
    return vector


def cell_reading_counts(
    vector: np.ndarray, *, layout: PartitionLayout, encodings: tuple[MetricEncoding, ...]
) -> np.ndarray:
    """Readings per cell recovered from an un-noised COUNT component (int64, layout.cells)."""
    metric_idx, _, _ = layout.cell_coordinates()
    weight = np.array([e.count_weight for e in encodings], dtype=np.int64)[metric_idx]
    return layout.block(vector, "count") // weight
