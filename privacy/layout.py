"""The public partition layout: which packed slot holds which (component, metric, region, window)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum

import numpy as np


class Component(IntEnum):
    """Per-cell sums that every contribution carries; means are post-processing of these."""

    COUNT = 0
    SUM = 1


@dataclass(frozen=True)
class PartitionLayout:
    """metrics x regions x windows cells for one release interval, each with len(Component) slots.

    Slot order is component-major: slot = component * cells + (metric * R + region) * W + window.
    The layout is public (from the config), so every institution packs the same vector.
    """

    metrics: tuple[str, ...]
    regions: tuple[str, ...]
    start: datetime
    window: timedelta
    windows: int

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ValueError("layout start must be timezone-aware (UTC)")
        object.__setattr__(self, "start", self.start.astimezone(UTC))  # one layout, one digest
        if self.window <= timedelta(0):
            raise ValueError(f"the window must be positive, got {self.window}")
        if self.windows < 1:
            raise ValueError("a layout needs at least one window")

    @classmethod
    def for_interval(
        cls,
        metrics: tuple[str, ...],
        regions: tuple[str, ...],
        start: datetime,
        end: datetime,
        window: timedelta,
    ) -> PartitionLayout:
        """The layout of [start, end); the interval must be a whole number of windows on the UTC grid."""
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("interval start and end must be timezone-aware (UTC)")
        if window <= timedelta(0):
            raise ValueError(f"the window must be positive, got {window}")
        start, end = start.astimezone(UTC), end.astimezone(UTC)
        if end <= start:
            raise ValueError(f"interval end {end.isoformat()} is not after start {start.isoformat()}")
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        if (start - epoch) % window or (end - start) % window:
            raise ValueError(
                f"interval [{start.isoformat()}, {end.isoformat()}) is not aligned to the {window} window grid"
            )
        return cls(metrics, regions, start, window, (end - start) // window)

    @property
    def end(self) -> datetime:
        return self.start + self.window * self.windows

    @property
    def cells(self) -> int:
        return len(self.metrics) * len(self.regions) * self.windows

    @property
    def slots(self) -> int:
        return self.cells * len(Component)

    def cell_index(self, metric_idx: np.ndarray, region_idx: np.ndarray, window_idx: np.ndarray) -> np.ndarray:
        """Vectorised cell index of each reading (int64 arrays of equal shape)."""
        return (metric_idx * len(self.regions) + region_idx) * self.windows + window_idx

    def cell_coordinates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(metric_idx, region_idx, window_idx) of every cell, in cell order."""
        cells = np.arange(self.cells, dtype=np.int64)
        window_idx = cells % self.windows
        region_idx = (cells // self.windows) % len(self.regions)
        metric_idx = cells // (self.windows * len(self.regions))
        return metric_idx, region_idx, window_idx

    def digest(self) -> str:
        """A hash that two parties compare to make sure they packed the same layout."""
        doc = {
            "metrics": list(self.metrics),
            "regions": list(self.regions),
            "start": self.start.isoformat(),
            "window_s": self.window.total_seconds(),
            "windows": self.windows,
            "components": [c.name for c in Component],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
