"""An institution's local aggregation: encoded readings (from fusion/feeds/scan.py) -> exact duplicates found -> one
packed integer vector plus row counts; and the NumPy reference versions (over typed readings) that tests hold
the scan's SQL encoding and hashed de-duplication to.

Pure and vectorised (pyarrow / NumPy); the Beam pipeline in pipelines/contribute.py only wires these together.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from privacy.bounding import bound_contributions
from privacy.encoding import MetricEncoding, bin_index, encode_readings, encode_squares
from privacy.layout import SUMSQ, PartitionLayout, bin_components
from schemas.readings import ALL_FIELDS, ENTITY_ID, EVENT_TIME, METRIC, READING_SCHEMA, REGION, VALUE

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


def _as_numpy(values: np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
    return values if isinstance(values, np.ndarray) else values.to_numpy()


def shared_key_rows(keys: np.ndarray | pa.ChunkedArray) -> np.ndarray:
    """Indices (ascending) of the rows whose 64-bit key occurs more than once: a superset of the rows with an
    equal twin, as equal readings hash alike (a hash collision only adds a candidate).

    Sorts the keys' top 32 bits, not the keys (about half the cost); the few rows whose top bits repeat (about
    n^2 / 2^33 by chance) are then compared on their whole key."""
    if len(keys) < 2:
        return np.zeros(0, dtype=np.int64)
    values = np.ascontiguousarray(_as_numpy(keys))
    top = values.view(np.uint32)[1 if sys.byteorder == "little" else 0 :: 2]  # each key's top 32 bits, a view
    ordered = np.sort(top)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size == 0:
        return np.zeros(0, dtype=np.int64)
    # The rows whose top bits may repeat, by a table of the repeated values' leading bits (a superset). The table
    # has about 256 entries per repeated value (false candidates ~0.4%): sized by the rows instead, its 16 MB of
    # random lookups missed the cache (6M keys: 0.34 s against 0.26 s; 10% duplicated rows: 1.14 against 1.01 s).
    bits = min(24, max(8, repeated.size.bit_length() + 8))
    table = np.zeros(1 << bits, dtype=bool)
    table[repeated >> (32 - bits)] = True
    candidates = np.flatnonzero(table[top >> (32 - bits)])
    found = values[candidates]
    ordered_keys = np.sort(found)
    repeated_keys = ordered_keys[1:][ordered_keys[1:] == ordered_keys[:-1]]
    if repeated_keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return candidates[np.isin(found, np.unique(repeated_keys))]


def first_occurrences(readings: pa.Table) -> np.ndarray:
    """Boolean mask of the first row of each group of rows equal in every reading field."""
    numbered = readings.append_column(_UID, pa.array(np.arange(readings.num_rows, dtype=np.int64)))
    firsts = numbered.group_by(list(ALL_FIELDS), use_threads=False).aggregate([(_UID, "min")])
    keep = np.zeros(readings.num_rows, dtype=bool)
    keep[firsts.column(f"{_UID}_min").to_numpy()] = True
    return keep


def deduplicate_reference(readings: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(first occurrences, exact duplicates), every row compared on every field: the slow, obvious version of
    the scan's hashed de-duplication, for tests."""
    if readings.num_rows == 0:
        return readings, readings
    mask = pa.array(first_occurrences(readings))
    return readings.filter(mask), readings.filter(pc.invert(mask))


@dataclass(frozen=True)
class Duplicates:
    """Encoded rows that repeat an earlier reading exactly (earlier: in file order, then row order)."""

    indices: np.ndarray  # into the encoded rows
    readings: pa.Table  # their typed readings (READING_SCHEMA)
    sources: np.ndarray  # their file (`src`) ...
    rows: np.ndarray  # ... and row in it


def find_duplicates(
    keys: np.ndarray | pa.ChunkedArray,
    sources: np.ndarray | pa.ChunkedArray,
    rows: np.ndarray | pa.ChunkedArray,
    readings_at: Callable[[int, np.ndarray], pa.Table],
) -> Duplicates:
    """Exact duplicates among encoded rows: rows whose hashes collide are fetched in full (`readings_at(src,
    rows)` gives their typed readings) and compared on every field; all but the first of each group repeat it.
    Sources and rows are only read when some hashes collide."""
    candidates = shared_key_rows(keys)
    if candidates.size == 0:
        empty = np.zeros(0, np.int64)
        return Duplicates(empty, READING_SCHEMA.empty_table(), empty.astype(np.int32), empty)
    sources, rows = _as_numpy(sources), _as_numpy(rows)
    candidates = candidates[np.lexsort((rows[candidates], sources[candidates]))]  # file order
    src_of = sources[candidates]
    pieces = [readings_at(int(src), rows[candidates[src_of == src]]) for src in np.unique(src_of)]
    readings = pa.concat_tables(pieces)
    later = ~first_occurrences(readings)
    indices = candidates[later]
    return Duplicates(indices, readings.filter(pa.array(later)), sources[indices], rows[indices])


#: Integers up to this size are exact in float64.
EXACT_FLOAT = 1 << 53
#: Each of the two parts `exact_bincount` splits values into adds up exactly in float64 over this many rows.
EXACT_ROWS = 1 << 29


def exact_bincount(index: np.ndarray, values: np.ndarray, length: int) -> np.ndarray:
    """int64 sums of `values` (int64) per `index`, exact. NumPy's weighted bincount adds in float64, which is
    exact while every partial sum stays below 2^53: one pass when the largest |value| times the rows allows it,
    otherwise each value is split into a high part and a low 24-bit part whose sums stay below 2^53."""
    if index.size == 0:
        return np.zeros(length, dtype=np.int64)
    largest = max(int(values.max()), -int(values.min()))
    if largest * index.size < EXACT_FLOAT:
        return np.rint(np.bincount(index, weights=values, minlength=length)).astype(np.int64)
    if index.size > EXACT_ROWS:
        raise ValueError(f"at most {EXACT_ROWS} rows per call, got {index.size}")
    low = values & 0xFFFFFF
    high = values >> 24
    low_sum = np.rint(np.bincount(index, weights=low, minlength=length)).astype(np.int64)
    high_sum = np.rint(np.bincount(index, weights=high, minlength=length)).astype(np.int64)
    return (high_sum << 24) + low_sum


def pack_encoded(
    cell: np.ndarray,
    sums: Mapping[str, np.ndarray],
    *,
    layout: PartitionLayout,
    encodings: tuple[MetricEncoding, ...],
    bins: np.ndarray | None = None,
) -> np.ndarray:
    """The layout's slots (int64) from encoded readings: COUNT adds each reading's metric weight, SUM (and SUMSQ)
    its encoded values, and each histogram bin the weight of the readings in it. The same vector as
    `aggregate_readings` over the typed readings."""
    vector = np.zeros(layout.slots, dtype=np.int64)
    if cell.size == 0:
        return vector
    metric_idx, _, _ = layout.cell_coordinates()
    weight = np.array([e.count_weight for e in encodings], dtype=np.int64)[metric_idx]  # per cell
    vector[: layout.cells] = np.bincount(cell, minlength=layout.cells).astype(np.int64) * weight
    for component, values in sums.items():
        layout.block(vector, component)[:] = exact_bincount(cell, values, layout.cells)
    if layout.bins:
        if bins is None:
            raise ValueError("the layout has histogram bins: pass each reading's bin")
        first_bin = layout.components.index(bin_components(layout.bins)[0])
        counts = np.bincount(bins * layout.cells + cell, minlength=layout.bins * layout.cells).astype(np.int64)
        vector[first_bin * layout.cells : (first_bin + layout.bins) * layout.cells] = counts * np.tile(
            weight, layout.bins
        )
    return vector


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
