"""Decoding a decrypted total into released cells: counts, sums, means, with noise SDs and 95% intervals.

Everything here is post-processing of the noisy sums, so it costs no privacy budget.
"""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import pyarrow as pa

from fusion.parameters import ReleaseParameters
from fusion.quantiles import QUANTILES, Z95, histogram_quantiles
from privacy.layout import SUMSQ, PartitionLayout
from schemas.tables import RELEASES_SCHEMA


def decode_release(
    totals: np.ndarray,
    *,
    layout: PartitionLayout,
    params: ReleaseParameters,
    units: tuple[str, ...],
    noise_variance: float,
    contributors: int,
    release_id: str,
    released_at: datetime,
) -> pa.Table:
    """One row per cell (RELEASES_SCHEMA). `noise_variance` is the total Skellam variance in each slot.

    The SUM slots carry sums of (value - centre); the sum adds centre * count back, so its SD combines both
    slots' noise. The mean (centre + centred sum / count) is released only where the noisy count is clearly
    positive (its 95% interval excludes 0); its interval is Fieller's and is clipped to the clamp bounds.
    With the optional statistics, stddev comes from the SUMSQ slots and p10/median/p90 (with intervals) from
    the histogram slots; like the mean they are NULL where the count is not clearly positive.
    """
    cells = layout.cells
    metric_idx, region_idx, window_idx = layout.cell_coordinates()
    weight = np.array([e.count_weight for e in params.encodings], dtype=float)[metric_idx]
    sum_unit = np.array([e.sum_unit() for e in params.encodings])[metric_idx]
    lower = np.array([e.lower for e in params.encodings])[metric_idx]
    upper = np.array([e.upper for e in params.encodings])[metric_idx]

    centre = np.array([e.centre for e in params.encodings])[metric_idx]
    count_slots = layout.block(totals, "count").astype(float)
    sum_slots = layout.block(totals, "sum").astype(float)
    sd = math.sqrt(noise_variance)
    count = count_slots / weight
    count_sd = sd / weight
    centred = sum_slots * sum_unit  # sum of (value - centre), the quantity the SUM slot carries
    centred_sd = sd * sum_unit
    total = centred + centre * count
    sum_sd = np.sqrt(centred_sd**2 + (centre * count_sd) ** 2)  # COUNT and SUM noises are independent

    confident = count - Z95 * count_sd > 0
    safe_count = np.where(confident, count, 1.0)
    mean = np.clip(centre + centred / safe_count, lower, upper)
    # Fieller's interval for the ratio centred / count, whose noises are independent and normal: the offsets x
    # from the centre with (centred - x * count)^2 <= z^2 (centred_sd^2 + x^2 count_sd^2). It is bounded exactly
    # where the count is clearly positive (count^2 > z^2 count_sd^2), i.e. where a mean is released, and keeps
    # 95% coverage for true counts at or above that threshold (the delta method's covered 92.8% at 2.2 SDs).
    spread = np.where(confident, safe_count**2 - (Z95 * count_sd) ** 2, 1.0)
    root = np.sqrt(
        np.maximum((centred * count_sd) ** 2 + (safe_count * centred_sd) ** 2 - (Z95 * centred_sd * count_sd) ** 2, 0.0)
    )
    # Its bounds, written around the ratio (a / b + skew -/+ half), so that without noise they are the mean.
    skew = centred * (Z95 * count_sd) ** 2 / (safe_count * spread)
    half = Z95 * root / spread
    # Exactly, the ratio lies inside; within a hair of the threshold both terms grow huge and rounding could
    # put it outside, so the bounds are taken no tighter than the mean.
    mean_low = np.minimum(np.clip(centre + centred / safe_count + skew - half, lower, upper), mean)
    mean_high = np.maximum(np.clip(centre + centred / safe_count + skew + half, lower, upper), mean)

    window_start = np.datetime64(layout.start.replace(tzinfo=None), "us") + window_idx * np.timedelta64(
        int(layout.window.total_seconds() * 1_000_000), "us"
    )
    window_end = window_start + np.timedelta64(int(layout.window.total_seconds() * 1_000_000), "us")
    metrics = np.array(layout.metrics, dtype=object)[metric_idx]

    def masked(values: np.ndarray) -> pa.Array:
        return pa.array(values, pa.float64(), mask=~confident | np.isnan(values))

    stddev = stddev_low = stddev_high = np.full(cells, np.nan)
    if layout.has(SUMSQ):
        # SUMSQ slots carry round(q^2 / w) for centred q: sum of (value - centre)^2 = slots * w * sum_unit^2.
        squares = layout.block(totals, SUMSQ).astype(float) * weight * sum_unit**2
        squares_sd = sd * weight * sum_unit**2
        n, s1, s2 = safe_count, centred, squares
        variance = s2 / n - (s1 / n) ** 2
        # Delta method on (S2, S1, N), whose noises are independent.
        variance_sd = np.sqrt(
            (squares_sd / n) ** 2
            + (2 * s1 * centred_sd / n**2) ** 2
            + ((-s2 / n**2 + 2 * s1**2 / n**3) * count_sd) ** 2
        )
        # Each reading's q^2 / w is rounded to a whole slot unit: up to half a unit each, a bias of up to
        # w * sum_unit^2 / 2 in the variance that more readings do not shrink (readings near the centre all round
        # the same way). The interval adds it on both sides; the noise term alone excluded the true value.
        rounding = 0.5 * weight * sum_unit**2
        widest = ((upper - lower) / 2) ** 2
        stddev = np.sqrt(np.clip(variance, 0.0, widest))
        stddev_low = np.sqrt(np.clip(variance - Z95 * variance_sd - rounding, 0.0, widest))
        stddev_high = np.sqrt(np.clip(variance + Z95 * variance_sd + rounding, 0.0, widest))
    quantiles = {
        f"{name}{suffix}": np.full(cells, np.nan) for name, _ in QUANTILES for suffix in ("", "_ci_low", "_ci_high")
    }
    if layout.bins:
        histogram = np.stack(
            [layout.block(totals, b).astype(float) / weight for b in layout.components if b.startswith("bin")]
        )
        quantiles = histogram_quantiles(histogram, bin_sd=count_sd, lower=lower, upper=upper)

    columns = {
        "release_id": pa.array([release_id] * cells, pa.string()),
        "metric": pa.array(metrics, pa.string()),
        "unit": pa.array(np.array(units, dtype=object)[metric_idx], pa.string()),
        "region": pa.array(np.array(layout.regions, dtype=object)[region_idx], pa.string()),
        "window_start": pa.array(window_start, pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC")),
        "window_end": pa.array(window_end, pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC")),
        "contributors": pa.array(np.full(cells, contributors, dtype=np.int32)),
        "count": pa.array(count),
        "count_sd": pa.array(count_sd),
        "count_ci_low": pa.array(count - Z95 * count_sd),
        "count_ci_high": pa.array(count + Z95 * count_sd),
        "sum": pa.array(total),
        "sum_sd": pa.array(sum_sd),
        "sum_ci_low": pa.array(total - Z95 * sum_sd),
        "sum_ci_high": pa.array(total + Z95 * sum_sd),
        "mean": masked(mean),
        "mean_ci_low": masked(mean_low),
        "mean_ci_high": masked(mean_high),
        "stddev": masked(stddev),
        "stddev_ci_low": masked(np.minimum(stddev_low, stddev)),
        "stddev_ci_high": masked(np.maximum(stddev_high, stddev)),
        **{name: masked(values) for name, values in quantiles.items()},
        "epsilon": pa.array(np.full(cells, params.epsilon if not params.seeded else math.inf)),
        "delta": pa.array(np.full(cells, params.delta)),
        "noise": pa.array([params.noise_label] * cells, pa.string()),
        "released_at": pa.array([released_at] * cells, pa.timestamp("us", tz="UTC")),
    }
    return pa.table(columns, schema=RELEASES_SCHEMA)
