"""Fixed-point encoding of clamped values, component weights, and the sensitivities they imply."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def centre_units(lower: float, upper: float, resolution: float) -> int:
    """The clamp range's midpoint on the resolution grid (an integer number of resolution steps)."""
    return math.floor((lower + upper) / (2.0 * resolution) + 0.5)


def units_bound(lower: float, upper: float, resolution: float) -> int:
    """B: the largest |round(clamp(x) / resolution) - centre| of any reading."""
    centre = centre_units(lower, upper, resolution)
    return max(1, math.ceil(max(abs(lower / resolution - centre), abs(upper / resolution - centre)) - 1e-9))


@dataclass(frozen=True)
class MetricEncoding:
    """How one metric's readings become integers.

    A reading x contributes `count_weight` to its cell's COUNT slot and
    (round(clamp(x) / resolution) - centre_units) * scale to its SUM slot. Centring on the clamp range's midpoint
    halves the sensitivity of a one-sided range ([0, 1200] W/m2) and shrinks that of an offset one
    ([200, 260] V) by an order of magnitude; the decoder adds centre * count back. `scale` (an integer >= 1)
    refines the resolution of metrics with a small range so every metric's per-reading contribution is close to
    the common bound; `count_weight` equals the metric's largest |SUM| contribution, so counts and sums are
    equally well served by one noise level.
    """

    lower: float
    upper: float
    resolution: float
    scale: int

    @property
    def centre_units(self) -> int:
        return centre_units(self.lower, self.upper, self.resolution)

    @property
    def centre(self) -> float:
        """The centre in value units: decoded sum = centred sum + centre * count."""
        return self.centre_units * self.resolution

    @property
    def units_bound(self) -> int:
        return units_bound(self.lower, self.upper, self.resolution)

    @property
    def count_weight(self) -> int:
        return self.units_bound * self.scale

    @property
    def sum_bound(self) -> int:
        """Largest |SUM slot contribution| of one reading, in integer units."""
        return self.units_bound * self.scale

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Clamp, centre and encode float values (any shape) to int64 SUM contributions."""
        clamped = np.clip(values, self.lower, self.upper)
        return (np.rint(clamped / self.resolution).astype(np.int64) - self.centre_units) * self.scale

    def sum_unit(self) -> float:
        """Value units per integer unit of the SUM slot (to decode totals)."""
        return self.resolution / self.scale


def encode_squares(centred: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """SUMSQ contributions: round(q^2 / w) for centred SUM contributions q with |q| <= w, so in [0, w].

    Dividing by w keeps a reading's SUMSQ move no larger than its COUNT move (one noise level for all); the
    rounding error (at most 1/2 unit a reading, mean about 0) is tiny beside the noise.
    """
    q = centred.astype(np.float64)
    return np.rint(q * q / weight).astype(np.int64)


def bin_index(
    values: np.ndarray, lower: np.ndarray, upper: np.ndarray, resolution: np.ndarray, bins: int
) -> np.ndarray:
    """Equal-width histogram bin (0..bins-1) of each clamped value over its metric's [lower, upper].

    Computed in integer resolution steps, so a value exactly on a bin edge always opens the upper bin."""
    steps = np.rint(np.clip(values, lower, upper) / resolution).astype(np.int64)
    low = np.rint(lower / resolution).astype(np.int64)
    span = np.maximum(np.rint(upper / resolution).astype(np.int64) - low, 1)
    return np.clip((steps - low) * bins // span, 0, bins - 1)


def encode_readings(
    values: np.ndarray, metric_idx: np.ndarray, encodings: tuple[MetricEncoding, ...] | list[MetricEncoding]
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised over readings of mixed metrics: (COUNT contributions, SUM contributions), both int64."""

    def per_reading(values_of: list[float] | list[int], dtype: type = float) -> np.ndarray:
        return np.asarray(values_of, dtype=dtype)[metric_idx]

    lower = per_reading([e.lower for e in encodings])
    upper = per_reading([e.upper for e in encodings])
    resolution = per_reading([e.resolution for e in encodings])
    centre = per_reading([e.centre_units for e in encodings], np.int64)
    scale = per_reading([e.scale for e in encodings], np.int64)
    weight = per_reading([e.count_weight for e in encodings], np.int64)
    steps = np.rint(np.clip(values, lower, upper) / resolution).astype(np.int64)
    return weight, (steps - centre) * scale


def balanced_encodings(bounds: list[tuple[float, float, float]]) -> list[MetricEncoding]:
    """Encodings for metrics given as (lower, upper, resolution), with scales that balance their bounds."""
    units = [units_bound(lo, hi, res) for lo, hi, res in bounds]
    common = max(units)
    return [
        MetricEncoding(lower=lo, upper=hi, resolution=res, scale=max(1, common // u))
        for (lo, hi, res), u in zip(bounds, units, strict=True)
    ]


@dataclass(frozen=True)
class Sensitivity:
    """What one privacy unit can move in the packed vector: at most `coordinates` slots, each by at most `shift`
    integer units. The accountant needs this per-slot shape (privacy/pld.py); L1 and L2 follow from it.

    At entity level the histogram bins of a cell move by Linf * w in total, possibly split across bins; this
    sensitivity charges the split as if it were concentrated in one bin. That is not covered by the per-slot
    monotonicity argument of privacy/pld.py, so it was checked numerically: at the variances configs calibrate
    to, shifts (a w, b w) on two slots are dominated by (a + b) w on one (every hockey-stick divergence at most),
    and by induction (a merge at a time) so is every split of Linf readings (tests/privacy/test_accountant.py).
    """

    coordinates: int
    shift: int

    @property
    def l1(self) -> float:
        return float(self.coordinates * self.shift)

    @property
    def l2(self) -> float:
        return math.sqrt(self.coordinates) * self.shift


def event_level_sensitivity(encodings: list[MetricEncoding], *, components: int = 2) -> Sensitivity:
    """Adding or removing one reading changes one cell's COUNT by w_m and its SUM by at most w_m; with the
    optional statistics, its SUMSQ by at most w_m and one histogram bin by w_m.

    So the vector moves in `components` slots by at most w = max_m w_m each: L1 <= k w and L2 <= sqrt(k) w
    (k = 2 for count and sum).
    """
    worst = max(max(e.count_weight, e.sum_bound) for e in encodings)
    return Sensitivity(coordinates=components, shift=worst)


def entity_level_sensitivity(
    encodings: list[MetricEncoding], *, max_partitions: int, max_per_partition: int, components: int = 2
) -> Sensitivity:
    """Adding or removing one entity changes at most L0 cells, each by at most Linf readings.

    In one cell its readings move COUNT, SUM and SUMSQ by at most Linf * w each, and the histogram bins by
    Linf * w in total (charged as one bin: see Sensitivity). So L0 * k slots move by at most Linf * w each:
    L1 <= L0 k Linf w (L0 cells add up) and L2 <= sqrt(L0 k) Linf w (in quadrature).
    """
    event = event_level_sensitivity(encodings, components=components)
    return Sensitivity(coordinates=event.coordinates * max_partitions, shift=event.shift * max_per_partition)
