"""Decoding a decrypted total into released cells: counts, sums, means, stddevs and quantiles, with noise SDs and
95% intervals.

Everything here is post-processing of the noisy sums, so it costs no privacy budget. Decoding is deterministic
(no random draws): re-decoding a release gives identical rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from scipy.special import ndtr, ndtri

from fusion.config.parameters import ReleaseParameters
from fusion.release.quantiles import QUANTILES, Z95, histogram_quantiles
from privacy.encoding import MetricEncoding
from privacy.layout import SUMSQ, PartitionLayout
from schemas.tables import RELEASES_SCHEMA

#: Readings' spreads (SDs of a normal, 0 then log-spaced up to 8 half clamp ranges) at which the rounded square
#: sums are predicted, and the normal quantiles that average over a cell's readings.
_SPREADS = 48
_NODES = ndtri((np.arange(128) + 0.5) / 128)
#: Stretches of the resolution grid over which the rounding of squares is summed (exact up to this many points).
_STRETCHES = 128
#: Cells per block when predicting rounded square sums (bounds memory at cells x spreads x nodes).
_BLOCK_CELLS = 128
#: A cell's stddev estimate is released only where the typical variance of its metric and region in the release
#: (pooled over the other cells, at its lower 95% bound) is at least this many times the variance noise SD of a
#: cell like it (see _noise_dwarfs_spread). Below it the noise dwarfs the spread, and no estimate that is never
#: negative can be unbiased (see _stddev); the interval is still released. With the estimate's correction for the
#: square root's curvature, a cell at a third of this (variance one noise SD) is within 0.02 of its error SD of
#: unbiased, so cells down to a third of their pool's spread are still estimated without bias.
STDDEV_SIGNAL = 3.0
#: Cells of a metric in a region that pool their variances by themselves; fewer pool with the metric's other regions.
STDDEV_POOL_CELLS = 8
#: The variance (and the stddev's estimate) is released only where its pool's cells hold at least this many count
#: noise SDs of readings: S2/n - (S1/n)^2 divides by the noisy count, and below it the second-order correction
#: leaves a bias (hourly weather at 24 readings a cell: the mean error over its SD +0.05 at 8.9 count SDs, +0.14 at
#: 4.4, +0.38 at 2.2, growing with the mean's distance from the clamp range's centre).
VARIANCE_COUNT_SDS = 6.0


def mean_sd(*, count: np.ndarray, centred: np.ndarray, count_sd: np.ndarray, centred_sd: np.ndarray) -> np.ndarray:
    """Delta-method SD of the ratio estimate centre + centred / count (value units): the COUNT and SUM slots'
    noises are independent, so var = (centred_sd^2 + (centred / count)^2 count_sd^2) / count^2."""
    offset = centred / count
    return np.sqrt(centred_sd**2 + offset**2 * count_sd**2) / np.abs(count)


def rounded_square_moments(
    *, offset: np.ndarray, spreads: np.ndarray, encoding: MetricEncoding
) -> tuple[np.ndarray, np.ndarray]:
    """What the sums of one metric's cells predict per reading, for readings normal with mean `offset` (value -
    centre, value units, shape (C,)) and SD `spreads` (shape (C, S)), clamped and on the resolution grid:

    - `raw`: w u^2 mean(round(q^2 / w)) - (u mean(q))^2, what S2/n - (S1/n)^2 estimates from the SUMSQ slots
      (q: a reading's centred SUM contribution, w its count weight, u the SUM unit);
    - `true`: u^2 mean(q^2) - (u mean(q))^2, the readings' own variance.

    Both (C, S). They differ by w u^2 mean(round(q^2 / w) - q^2 / w), the rounding of the squares, which does not
    average out: readings near the clamp range's centre all round down (q^2 / w < 1/2 becomes 0). `true` comes
    from normal quantiles (nodes); the rounding term, which flips sign from one grid point to the next, is summed
    over the grid itself (point by point, or in _STRETCHES stretches each weighted by its normal probability), so
    it does not pick up the nodes' aliasing.
    """
    unit, weight, step = encoding.sum_unit(), float(encoding.count_weight), encoding.resolution
    low, high = encoding.lower - encoding.centre, encoding.upper - encoding.centre
    values = offset[:, None, None] + spreads[:, :, None] * _NODES[None, None, :]  # (C, S, nodes)
    q = np.rint(np.clip(values, low, high) / step) * encoding.scale
    mean_q = q.mean(axis=2)
    true = unit**2 * (q * q).mean(axis=2) - (unit * mean_q) ** 2

    first_step = math.ceil(low / step - 1e-9)
    lattice_q = np.arange(first_step, math.floor(high / step + 1e-9) + 1) * float(encoding.scale)  # (K,)
    error = np.rint(lattice_q**2 / weight) - lattice_q**2 / weight
    running = np.concatenate([[0.0], np.cumsum(error)])
    points = lattice_q.size
    centre_x = offset[:, None, None]
    sd_x = np.maximum(spreads, 1e-12 * step)[:, :, None]
    # Stretches of the grid (point indices [start, stop)) covering the normal's +-6 SD.
    reach_low = np.clip(np.floor((centre_x - 6 * sd_x) / step) - first_step, 0, points - 1)
    reach_high = np.clip(np.ceil((centre_x + 6 * sd_x) / step) - first_step + 1, 1, points)
    bounds = np.rint(reach_low + (reach_high - reach_low) * np.linspace(0, 1, _STRETCHES + 1)[None, None, :])
    bounds = bounds.astype(np.int64)  # (C, S, stretches + 1)
    # A stretch's probability: the normal's mass between its outer half-steps; the tails beyond the range go to
    # the end points (clamped readings).
    edges = np.where(bounds == 0, -np.inf, np.where(bounds == points, np.inf, (bounds + first_step - 0.5) * step))
    mass = np.diff(ndtr((edges - centre_x) / sd_x), axis=2)
    summed = np.diff(running[bounds], axis=2)  # the rounding errors summed over each stretch
    stretch_mean = summed / np.maximum(np.diff(bounds, axis=2), 1)
    rounding = (mass * stretch_mean).sum(axis=2) / np.maximum(mass.sum(axis=2), 1e-300)
    raw = true + weight * unit**2 * rounding
    return raw, true


def _first_reaching(curve: np.ndarray, target: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Per row, the smallest grid value where the non-decreasing `curve` reaches `target` (linear in between)."""
    rows, points = curve.shape
    j = np.argmax(curve >= target[:, None], axis=1)
    reached = curve[:, -1] >= target
    j = np.where(reached, j, points - 1)
    r = np.arange(rows)
    before = curve[r, np.maximum(j - 1, 0)]
    rise = curve[r, j] - before
    frac = np.where((j > 0) & (rise > 0), (target - before) / np.where(rise > 0, rise, 1.0), 0.0)
    value = grid[r, np.maximum(j - 1, 0)] + np.clip(frac, 0.0, 1.0) * (grid[r, j] - grid[r, np.maximum(j - 1, 0)])
    return np.where(j == 0, grid[:, 0], np.where(reached, value, grid[:, -1]))


def _last_within(curve: np.ndarray, target: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Per row, the largest grid value where the non-decreasing `curve` is still at most `target`."""
    mirrored = _first_reaching(-curve[:, ::-1], -target, grid[:, ::-1])
    return mirrored


def _variance(
    *,
    count: np.ndarray,
    centred: np.ndarray,
    squares: np.ndarray,
    count_sd: np.ndarray,
    centred_sd: np.ndarray,
    squares_sd: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Population variance S2/n - (S1/n)^2 of the centred values from noisy (n, S1, S2), corrected to second order
    for the noise (E[S1^2] = S1^2 + sd1^2, and the curvature in n), with its delta-method SD."""
    n, s1, s2 = count, centred, squares
    raw = s2 / n - s1**2 / n**2
    # Second-order bias: 1/2 sum_i f_ii sd_i^2 for f = S2/n - S1^2/n^2 (independent noises).
    bias = (s2 / n**3 - 3 * s1**2 / n**4) * count_sd**2 - centred_sd**2 / n**2
    variance = raw - bias
    sd = np.sqrt(
        (squares_sd / n) ** 2
        + (2 * s1 * centred_sd / n**2) ** 2
        + 2 * centred_sd**4 / n**4
        + ((-s2 / n**2 + 2 * s1**2 / n**3) * count_sd) ** 2
    )
    return variance, sd


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
    quantiles: dict[str, np.ndarray] | None = None,
) -> pa.Table:
    """One row per cell (RELEASES_SCHEMA). `noise_variance` is the total Skellam variance in each slot;
    `quantiles`: this release's entry of `release_quantiles`, when several releases' were computed together.

    The SUM slots carry sums of (value - centre); the sum adds centre * count back, so its SD combines both
    slots' noise. The mean (centre + centred sum / count) is withheld (NULL) where the noisy count is not clearly
    positive (its 95% interval includes 0): there the ratio has no bounded interval. Where it is released its
    interval is Fieller's, clipped to the clamp bounds, and `ratio_mean` / `mean_sd` give the unclipped ratio and
    its delta-method SD for weighting cells by their noise. With the optional statistics, stddev comes from the
    SUMSQ slots and p10/median/p90 (with intervals) from the histogram slots; like the mean they are NULL where
    the count is not clearly positive, and quantiles also where the histogram is mostly noise.
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
    ratio = centre + centred / safe_count
    ratio_sd = mean_sd(count=safe_count, centred=centred, count_sd=count_sd, centred_sd=centred_sd)
    mean = np.clip(ratio, lower, upper)
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

    stddev = stddev_low = stddev_high = variance = variance_sd = np.full(cells, np.nan)
    if layout.has(SUMSQ):
        stddev, stddev_low, stddev_high, variance, variance_sd = _stddev(
            squares_slots=layout.block(totals, SUMSQ).astype(float),
            count=safe_count,
            centred=centred,
            count_sd=count_sd,
            centred_sd=centred_sd,
            noise_sd=sd,
            weight=weight,
            sum_unit=sum_unit,
            half_range=(upper - lower) / 2,
            metric_idx=metric_idx,
            encodings=params.encodings,
            count_confident=confident,
            region_idx=region_idx,
        )
    if quantiles is None:
        (quantiles,) = release_quantiles([(totals, layout, params, noise_variance)])

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
        "mean_sd": masked(ratio_sd),
        "ratio_mean": masked(ratio),
        "stddev": masked(stddev),
        "stddev_ci_low": masked(np.fmin(stddev_low, stddev)),
        "stddev_ci_high": masked(np.fmax(stddev_high, stddev)),
        "variance": masked(variance),
        "variance_sd": masked(variance_sd),
        **{name: masked(values) for name, values in quantiles.items()},
        "epsilon": pa.array(np.full(cells, params.epsilon if not params.seeded else math.inf)),
        "delta": pa.array(np.full(cells, params.delta)),
        "noise": pa.array([params.noise_label] * cells, pa.string()),
        "released_at": pa.array([released_at] * cells, pa.timestamp("us", tz="UTC")),
    }
    return pa.table(columns, schema=RELEASES_SCHEMA)


def _histogram_inputs(
    totals: np.ndarray, *, layout: PartitionLayout, params: ReleaseParameters, noise_variance: float
) -> dict[str, np.ndarray]:
    """histogram_quantiles' arguments for one release's cells (its layout has histogram bins), computed exactly
    as decode_release computes them."""
    metric_idx = layout.cell_coordinates()[0]
    weight = np.array([e.count_weight for e in params.encodings], dtype=float)[metric_idx]
    sum_unit = np.array([e.sum_unit() for e in params.encodings])[metric_idx]
    sd = math.sqrt(noise_variance)
    return {
        "histogram": np.stack(
            [layout.block(totals, b).astype(float) / weight for b in layout.components if b.startswith("bin")]
        ),
        "bin_sd": np.broadcast_to(sd / weight, (layout.cells,)),
        "lower": np.array([e.lower for e in params.encodings])[metric_idx],
        "upper": np.array([e.upper for e in params.encodings])[metric_idx],
        "count": layout.block(totals, "count").astype(float) / weight,
        "centred_sum": layout.block(totals, "sum").astype(float) * sum_unit,
        "centred_sd": np.broadcast_to(sd * sum_unit, (layout.cells,)),
        "centre": np.array([e.centre for e in params.encodings])[metric_idx],
    }


def release_quantiles(
    releases: Sequence[tuple[np.ndarray, PartitionLayout, ReleaseParameters, float]],
) -> list[dict[str, np.ndarray]]:
    """The quantile columns (p10, median, p90 and their intervals, per cell) of several releases, each given as
    (decrypted totals, layout, parameters, noise variance), in one histogram_quantiles call per bin count.

    Cells are estimated independently of one another, so each release's columns are identical, bit for bit, to
    those of decoding it alone (a re-run decoding one of them reproduces the rows it signed); what is shared is
    the call's fixed cost, which dominates for the few cells of a stream window."""
    out: list[dict[str, np.ndarray]] = [
        {
            f"{name}{suffix}": np.full(layout.cells, np.nan)
            for name, _ in QUANTILES
            for suffix in ("", "_ci_low", "_ci_high")
        }
        for _, layout, _, _ in releases
    ]
    groups: dict[int, list[int]] = {}
    for i, (_, layout, _, _) in enumerate(releases):
        if layout.bins and layout.cells:
            groups.setdefault(len([b for b in layout.components if b.startswith("bin")]), []).append(i)
    for members in groups.values():
        inputs = [
            _histogram_inputs(totals, layout=layout, params=params, noise_variance=variance)
            for totals, layout, params, variance in (releases[i] for i in members)
        ]
        joint = histogram_quantiles(**{key: np.concatenate([x[key] for x in inputs], axis=-1) for key in inputs[0]})
        start = 0
        for i, x in zip(members, inputs, strict=True):
            end = start + x["count"].size
            out[i] = {name: values[start:end] for name, values in joint.items()}
            start = end
    return out


def _stddev(
    *,
    squares_slots: np.ndarray,
    count: np.ndarray,
    centred: np.ndarray,
    count_sd: np.ndarray,
    centred_sd: np.ndarray,
    noise_sd: float,
    weight: np.ndarray,
    sum_unit: np.ndarray,
    half_range: np.ndarray,
    metric_idx: np.ndarray,
    encodings: tuple[MetricEncoding, ...],
    count_confident: np.ndarray,
    region_idx: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(stddev, 95% low, 95% high, variance, variance SD) per cell from the SUMSQ slots.

    S2/n - (S1/n)^2 from the slots (corrected to second order for the noise) estimates `raw`, not the readings'
    variance: SUMSQ carries round(q^2 / w) a reading. So the rounding is treated exactly under a normal model of
    the cell's readings (mean from the sums, SD s): rounded_square_moments predicts raw(s) and the readings'
    variance true(s) on a grid of s. The estimate solves raw(s) = the estimate, the interval holds every s whose
    raw(s) lies within 1.96 noise SDs of it (a test inversion: where rounding makes raw flat in s, for readings
    bunched near the centre, all those s stay in), and the stddev and its bounds are sqrt(true(s)).

    The point estimate is solved at v + tau^2 / (4 max(v, tau)) rather than at the variance estimate v (noise SD
    tau): the square root of an unbiased variance is biased low by about tau^2 / (8 sigma^3), which this cancels.
    Over normal noise its mean error is within 0.02 of its SD for every true variance from one tau up (the plain
    square root's: -0.19 at one tau, -0.09 at three). Where the true variance is far below tau nothing that is
    never negative can be unbiased (its mean error is +0.6 to +1.0 of its SD at zero): there the estimate (not the
    interval) is withheld, NaN, by a rule that reads the other cells of the release (_noise_dwarfs_spread). It
    reads only released slots (post-processing). What it cannot see: cells that differ wildly in spread within a
    metric and region (irradiance by night and by day in hourly windows) pool above the bar on the spread ones,
    and the flat ones are then released too, above their truth on average.

    The signed variance (the `variance` column, wherever the mean is released) is v less the rounding that raw(s)
    adds to true(s) at the s where raw(s) = v: never clipped, so averages over cells are unbiased where the
    stddev cannot be. Its SD for weighting (`variance_sd`) is that of a cell with this count and its pool's
    variance and mean offset, not the cell's own delta-method SD: that one grows with the cell's own noisy mean,
    and weights from it favoured the cells whose noise drew their variance up (on the test's day cells the error
    over it averaged +0.15; over the pooled SD +0.04, with an SD of 1.10 where cells differ from their pool).
    Both the variance and the stddev's estimate are withheld where the pool's count is under VARIANCE_COUNT_SDS
    count noise SDs (the interval stays).
    """
    scale = weight * sum_unit**2
    variance, variance_sd = _variance(
        count=count,
        centred=centred,
        squares=squares_slots * scale,
        count_sd=count_sd,
        centred_sd=centred_sd,
        squares_sd=noise_sd * scale,
    )
    # Where the noise dwarfs the rounding (at most w u^2 / 2 a reading, in the variance), it is left out.
    negligible = 0.5 * scale < 0.02 * variance_sd
    corrected = variance + variance_sd**2 / (4 * np.maximum(np.maximum(variance, variance_sd), 1e-300))
    offset = centred / count

    def noise_at(readings_variance: np.ndarray, mean_offset: np.ndarray) -> np.ndarray:
        """_variance's SD were the readings' variance and mean offset these (S1 = n offset, S2 = n (V + offset^2))."""
        return np.sqrt(
            (noise_sd * scale / count) ** 2
            + (2 * mean_offset * centred_sd / count) ** 2
            + 2 * centred_sd**4 / count**4
            + ((mean_offset**2 - readings_variance) * count_sd / count) ** 2
        )

    withheld, pooled_sd, count_clear = _noise_dwarfs_spread(
        variance,
        offset,
        noise_at=noise_at,
        metric_idx=metric_idx,
        region_idx=region_idx,
        pooled=count_confident,
        count=count,
        count_sd=count_sd,
    )
    withheld = withheld | ~count_clear
    stddev = np.sqrt(np.clip(corrected, 0.0, None))
    low = np.sqrt(np.clip(variance - Z95 * variance_sd, 0.0, None))
    high = np.sqrt(np.clip(variance + Z95 * variance_sd, 0.0, None))
    signed = variance.copy()
    for m, encoding in enumerate(encodings):
        of = np.flatnonzero((metric_idx == m) & ~negligible)
        lattice = encoding.resolution / 4
        # Up to 8 half-ranges: clamped at the bounds, a normal needs an SD beyond the half-range to reach the
        # variance of flat or two-humped readings (uniform readings over the range: about 0.58 half-ranges).
        grid = np.concatenate([[0.0], np.geomspace(lattice, 4 * (encoding.upper - encoding.lower), _SPREADS - 1)])
        for start in range(0, of.size, _BLOCK_CELLS):
            cells = of[start : start + _BLOCK_CELLS]
            spreads = np.broadcast_to(grid, (cells.size, grid.size))
            raw, true = rounded_square_moments(offset=centred[cells] / count[cells], spreads=spreads, encoding=encoding)
            raw = np.maximum.accumulate(raw, axis=1)  # clamping can bend it; the test needs it monotone
            true = np.maximum.accumulate(true, axis=1)
            v, v_sd, point = variance[cells], variance_sd[cells], corrected[cells]
            squared = spreads**2  # both curves are close to linear in s^2: interpolate there
            at = (_first_reaching(raw, point, squared) + _last_within(raw, point, squared)) / 2
            # The signed variance: v less the rounding that raw(s) adds to true(s), at the s where raw(s) = v (s = 0
            # below the curve: v - raw(0), negative where the noise drew it there).
            plain = (_first_reaching(raw, v, squared) + _last_within(raw, v, squared)) / 2
            rounding = _interpolate_rows(raw, squared, plain) - _interpolate_rows(true, squared, plain)
            signed[cells] = v - rounding
            lo = _first_reaching(raw, v - Z95 * v_sd, squared)
            hi = _last_within(raw, v + Z95 * v_sd, squared)
            for out, s2 in ((stddev, at), (low, lo), (high, hi)):
                out[cells] = np.sqrt(np.maximum(_interpolate_rows(true, squared, s2), 0.0))
    widest = half_range
    stddev = np.where(withheld, np.nan, np.minimum(stddev, widest))
    unclear = np.where(count_clear, 0.0, np.nan)  # NaN: withheld
    return stddev, np.minimum(low, widest), np.minimum(high, widest), signed + unclear, pooled_sd + unclear


def _noise_dwarfs_spread(
    variance: np.ndarray,
    offset: np.ndarray,
    *,
    noise_at: Callable[[np.ndarray, np.ndarray], np.ndarray],
    metric_idx: np.ndarray,
    region_idx: np.ndarray,
    pooled: np.ndarray,
    count: np.ndarray,
    count_sd: np.ndarray,
) -> _Pool:
    """Per cell, whether its stddev estimate is withheld (see _stddev), and the variance noise SD of a cell with
    its count and its pool's variance and mean offset (the `variance_sd` column: see _stddev).

    A cell's typical variance and mean offset (from the range's centre) are pooled over the other cells of its
    metric and region in the release (of its metric, where the region has fewer than STDDEV_POOL_CELLS), weighted
    by their precision at a variance of zero; the estimate is withheld where that variance, at its lower 95% bound,
    is below STDDEV_SIGNAL times the variance noise SD a cell with the pooled variance and offset and this cell's
    count would have. `noise_at(V, offset)` is that SD per cell. The cell's own sums are left out on purpose:
    its SUM and SUMSQ slots' noise moves its variance estimate, and a rule that read them (its own variance, or its
    own mean, on which its noise SD depends) would release the cells whose noise pushed their estimate up (a mean
    error of +0.5 of the SD where the pooled signal was near the threshold). Only its noisy count, which sets how
    many readings the noise is spread over, is its own. Without noise (test mode) nothing is withheld. A cell
    alone in its metric (a release of one window and region) has only its own estimate: released where its lower
    95% bound (at its noise SD at a variance of zero) is STDDEV_SIGNAL noise SDs; near that bar its noise decides,
    and a released estimate there is above the truth on average."""
    zero = np.zeros_like(variance)
    withheld = noise_at(zero, zero) > 0
    regional = metric_idx.astype(np.int64) * (int(region_idx.max(initial=0)) + 1) + region_idx
    size = np.bincount(regional[pooled & withheld], minlength=int(regional.max(initial=0)) + 1)
    _, group = np.unique(
        np.where(size[regional] >= STDDEV_POOL_CELLS, regional, -1 - metric_idx.astype(np.int64)), return_inverse=True
    )
    spread_sd = noise_at(zero, offset)
    counted = pooled & withheld & (spread_sd > 0)
    weight = np.where(counted, 1.0 / np.where(counted, spread_sd, 1.0) ** 2, 0.0)

    def others(values: np.ndarray, weights: np.ndarray = weight) -> np.ndarray:
        """The group's `weights`-weighted sum of `values`, leaving the cell out."""
        weighted = weights * np.where(weights > 0, values, 0.0)
        return np.bincount(group, weights=weighted)[group] - weighted

    total_weight = others(np.ones_like(variance))
    some = total_weight > 0
    safe_weight = np.where(some, total_weight, 1.0)
    # A cell alone in its metric has only itself: its own variance at its lower 95% bound.
    typical = np.where(some, others(variance) / safe_weight, variance)
    typical_offset = np.where(some, others(offset) / safe_weight, offset)
    typical_low = np.where(some, typical - Z95 / np.sqrt(safe_weight), variance - Z95 * spread_sd)
    typical_sd = noise_at(np.maximum(typical, 0.0), typical_offset)
    # The pool's count (the others' plain mean): where it is within VARIANCE_COUNT_SDS count SDs of zero, 1 / n
    # bends too much under the count's noise for the second-order correction.
    each = counted.astype(float)
    peers = others(np.ones_like(count), each)
    typical_count = np.where(peers > 0, others(count, each) / np.maximum(peers, 1.0), count)
    count_clear = ~withheld | (typical_count >= VARIANCE_COUNT_SDS * count_sd)
    return _Pool(withheld & (typical_low < STDDEV_SIGNAL * typical_sd), typical_sd, count_clear)


class _Pool(NamedTuple):
    """What the other cells of a cell's pool say of it (see _noise_dwarfs_spread)."""

    withheld: np.ndarray  # its stddev estimate is withheld: the pool's spread is within the noise
    noise_sd: np.ndarray  # the variance noise SD of a cell with its count and the pool's spread and mean offset
    count_clear: np.ndarray  # the pool's count is at least VARIANCE_COUNT_SDS count SDs (or noise is off)


def _interpolate_rows(curve: np.ndarray, grid: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Per row, `curve` (given on the row's increasing `grid`) at `at`, linearly (held at the ends)."""
    rows, points = grid.shape
    j = np.clip((grid <= at[:, None]).sum(axis=1), 1, points - 1)  # grid[j - 1] <= at < grid[j], within range
    r = np.arange(rows)
    left, right = grid[r, j - 1], grid[r, j]
    frac = np.clip((at - left) / np.where(right > left, right - left, 1.0), 0.0, 1.0)
    return curve[r, j - 1] + frac * (curve[r, j] - curve[r, j - 1])
