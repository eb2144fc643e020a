"""The public partition layout: which packed slot holds which (component, metric, region, window)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum

import numpy as np


class Component(IntEnum):
    """The per-cell sums every contribution carries, in this order; means are post-processing of these."""

    COUNT = 0
    SUM = 1


#: Optional per-cell sums, after COUNT and SUM: the centred sum of squares (variance), then histogram bins.
SUMSQ = "sumsq"
BASE_COMPONENTS = ("count", "sum")


def bin_components(bins: int) -> tuple[str, ...]:
    return tuple(f"bin{j:03d}" for j in range(bins))


@dataclass(frozen=True)
class PartitionLayout:
    """metrics x regions x windows cells for one release interval, each with one slot per component, then one slot
    per tally (interval-wide counts outside the cells, such as an institution's rejected rows of one reason).

    Slot order is component-major: slot = component * cells + (metric * R + region) * W + window; the tallies
    follow the last component, in order. The layout is public (from the config), so every institution packs the
    same vector.
    """

    metrics: tuple[str, ...]
    regions: tuple[str, ...]
    start: datetime
    window: timedelta
    windows: int
    components: tuple[str, ...] = BASE_COMPONENTS
    tallies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ValueError("layout start must be timezone-aware (UTC)")
        object.__setattr__(self, "start", self.start.astimezone(UTC))  # one layout, one digest
        if self.window <= timedelta(0):
            raise ValueError(f"the window must be positive, got {self.window}")
        if self.windows < 1:
            raise ValueError("a layout needs at least one window")
        if self.components[:2] != BASE_COMPONENTS or len(set(self.components)) != len(self.components):
            raise ValueError(f"components must start with {BASE_COMPONENTS} and not repeat, got {self.components}")
        if len(set(self.tallies)) != len(self.tallies):
            raise ValueError(f"tallies must not repeat, got {self.tallies}")

    @classmethod
    def for_interval(
        cls,
        metrics: tuple[str, ...],
        regions: tuple[str, ...],
        start: datetime,
        end: datetime,
        window: timedelta,
        components: tuple[str, ...] = BASE_COMPONENTS,
        tallies: tuple[str, ...] = (),
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
        return cls(metrics, regions, start, window, (end - start) // window, components, tallies)

    @property
    def end(self) -> datetime:
        return self.start + self.window * self.windows

    @property
    def cells(self) -> int:
        return len(self.metrics) * len(self.regions) * self.windows

    @property
    def slots(self) -> int:
        return self.cells * len(self.components) + len(self.tallies)

    def tally_slots(self, vector: np.ndarray) -> np.ndarray:
        """The tallies' slots (a view into `vector`), in `tallies` order."""
        first = self.cells * len(self.components)
        return vector[first : first + len(self.tallies)]

    def has(self, component: str) -> bool:
        return component in self.components

    @property
    def bins(self) -> int:
        """Histogram bins per cell (0 without quantiles)."""
        return sum(name.startswith("bin") for name in self.components)

    def block(self, vector: np.ndarray, component: str) -> np.ndarray:
        """The `cells` slots of one component (a view into `vector`)."""
        k = self.components.index(component)
        return vector[k * self.cells : (k + 1) * self.cells]

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
            "components": list(self.components),
        }
        if self.tallies:  # layouts without tallies keep the digest they always had
            doc["tallies"] = list(self.tallies)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
