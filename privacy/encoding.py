"""Fixed-point encoding of clamped values, component weights, and the sensitivities they imply."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MetricEncoding:
    """How one metric's readings become integers.

    A reading x contributes `count_weight` to its cell's COUNT slot and round(clamp(x) / resolution) * scale
    to its SUM slot. `scale` (an integer >= 1) refines the resolution of metrics with a small range so that
    every metric's per-reading contribution is close to the common bound; `count_weight` equals that metric's
    largest |SUM| contribution so counts and sums are equally well served by one noise level.
    """

    lower: float
    upper: float
    resolution: float
    scale: int

    @property
    def units_bound(self) -> int:
        """B: the largest |round(clamp(x) / resolution)| of any reading."""
        return math.ceil(max(abs(self.lower), abs(self.upper)) / self.resolution - 1e-9)

    @property
    def count_weight(self) -> int:
        return self.units_bound * self.scale

    @property
    def sum_bound(self) -> int:
        """Largest |SUM slot contribution| of one reading, in integer units."""
        return self.units_bound * self.scale

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Clamp and encode float values (any shape) to int64 SUM contributions."""
        clamped = np.clip(values, self.lower, self.upper)
        return np.rint(clamped / self.resolution).astype(np.int64) * self.scale

    def sum_unit(self) -> float:
        """Value units per integer unit of the SUM slot (to decode totals)."""
        return self.resolution / self.scale


def balanced_encodings(bounds: list[tuple[float, float, float]]) -> list[MetricEncoding]:
    """Encodings for metrics given as (lower, upper, resolution), with scales that balance their bounds."""
    units = [math.ceil(max(abs(lo), abs(hi)) / res - 1e-9) for lo, hi, res in bounds]
    common = max(units)
    return [
        MetricEncoding(lower=lo, upper=hi, resolution=res, scale=max(1, common // u))
        for (lo, hi, res), u in zip(bounds, units, strict=True)
    ]


@dataclass(frozen=True)
class Sensitivity:
    """L1 and L2 sensitivities of the packed vector, in integer units."""

    l1: float
    l2: float


def event_level_sensitivity(encodings: list[MetricEncoding]) -> Sensitivity:
    """Adding or removing one reading changes one cell's COUNT by w_m and its SUM by at most w_m.

    So the vector moves by (w_m, s) with |s| <= w_m: L1 <= 2 w_m and L2 <= sqrt(2) w_m, maximised over metrics.
    """
    worst = max(max(e.count_weight, e.sum_bound) for e in encodings)
    return Sensitivity(l1=2.0 * worst, l2=math.sqrt(2.0) * worst)
