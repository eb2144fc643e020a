"""Predicted noise of every released statistic, before anything is released: what `fusion plan` prints.

Pure functions of the metrics' encodings, the layout's optional statistics and the total noise variance (integer
units) that every slot of a release carries. Counts and sums have exact noise SDs; the mean's, stddev's and
quantiles' depend on the data, so they are given for stated readings per cell and a stated spread of values:

- mean: n readings whose mean is the clamp range's centre, so its delta-method SD (decode_release's `mean_sd`) is
  centred_sd / n; a mean at an offset d from the centre adds d^2 count_sd^2 / n^2 to its variance;
- stddev: n readings centred in the range with SD a quarter of the clamp range (rounding of squares ignored): the
  variance's delta-method SD, the stddev's (its half over the stddev), and the half-width of the interval the
  decoder reports (the variance's 95% interval, square-rooted); and the smallest spread (SD of the readings) at
  which the estimate is released at all (`stddev_shown_from_n{n}`: below it only its interval is);
- quantiles: simulated, with the decoder's own estimator (fusion/release/quantiles.py), on 64 cells of n readings drawn
  from a normal centred in the range with SD a quarter of it (rounded to the resolution, clamped), every slot
  noised with the given variance; the root-mean-square error of each quantile and the median half-width of its
  interval, over the cells that release it (NaN where fewer than half do). The draws are seeded: the same inputs
  always predict the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from fusion.release.estimates import STDDEV_SIGNAL, VARIANCE_COUNT_SDS
from fusion.release.quantiles import QUANTILES, Z95, histogram_quantiles
from privacy.encoding import MetricEncoding, bin_index

#: Readings per cell at which the data-dependent statistics are predicted.
READINGS = (100, 1000, 10000)
#: Cells simulated per prediction of a quantile.
SIMULATED_CELLS = 64


def metric_noise(
    encoding: MetricEncoding,
    *,
    noise_variance: float,
    variance: bool,
    quantiles: bool,
    bins: int,
    readings: Sequence[int] = READINGS,
) -> dict[str, float]:
    """Predicted noise SDs and 95% half-widths (the metric's unit) of one metric's statistics in one cell.

    noise_variance: the total Skellam variance in each slot (integer units); variance / quantiles / bins: the
    layout's optional statistics. Keys: count_sd, count_ci_halfwidth, sum_sd, sum_ci_halfwidth, and per n in
    `readings` mean_sd_n{n}, mean_ci_halfwidth_n{n}, with `variance` stddev_sd_n{n}, stddev_ci_halfwidth_n{n},
    stddev_shown_from_n{n},
    with `quantiles` {p10,median,p90}_sd_n{n} and {..}_ci_halfwidth_n{n}. See the module docstring for the
    assumptions behind the data-dependent ones.
    """
    sd = math.sqrt(noise_variance)
    count_sd = sd / encoding.count_weight
    centred_sd = sd * encoding.sum_unit()
    sum_sd = math.hypot(centred_sd, encoding.centre * count_sd)
    row: dict[str, float] = {
        "count_sd": count_sd,
        "count_ci_halfwidth": Z95 * count_sd,
        "sum_sd": sum_sd,
        "sum_ci_halfwidth": Z95 * sum_sd,
    }
    for n in readings:
        row[f"mean_sd_n{n}"] = centred_sd / n
        row[f"mean_ci_halfwidth_n{n}"] = Z95 * centred_sd / n
    if variance:
        spread = (encoding.upper - encoding.lower) / 4
        squares_sd = sd * encoding.count_weight * encoding.sum_unit() ** 2
        for n in readings:
            # Delta method on S2/n - (S1/n)^2 at S1 = 0, S2 = n spread^2 (independent slot noises).
            variance_sd = math.sqrt((squares_sd / n) ** 2 + 2 * centred_sd**4 / n**4 + (spread**2 * count_sd / n) ** 2)
            row[f"stddev_sd_n{n}"] = variance_sd / (2 * spread)
            high = math.sqrt(spread**2 + Z95 * variance_sd)
            low = math.sqrt(max(spread**2 - Z95 * variance_sd, 0.0))
            row[f"stddev_ci_halfwidth_n{n}"] = (high - low) / 2
            row[f"stddev_shown_from_n{n}"] = shown_from_spread(encoding, noise_variance=noise_variance, readings=n)
    if quantiles:
        for n in readings:
            row.update(_simulated_quantiles(encoding, noise_sd=sd, bins=bins, readings=n))
    return row


def shown_from_spread(encoding: MetricEncoding, *, noise_variance: float, readings: int) -> float:
    """The smallest SD of readings (centred in the range, the metric's unit) at which a cell of `readings` readings
    has its stddev estimate released, among many cells like it: the pooled variance V at least STDDEV_SIGNAL times
    the variance's noise SD at V (decode_release's rule, its pool's own uncertainty ignored). inf where no spread
    inside the clamp range gets there, or where `readings` is under VARIANCE_COUNT_SDS count noise SDs."""
    sd = math.sqrt(noise_variance)
    count_sd, centred_sd = sd / encoding.count_weight, sd * encoding.sum_unit()
    squares_sd = sd * encoding.count_weight * encoding.sum_unit() ** 2
    n = readings
    if n < VARIANCE_COUNT_SDS * count_sd:  # too few readings for the count's noise: never shown
        return math.inf
    # V^2 >= K^2 (a^2 + b + (V c)^2), the variance's noise SD at a centred mean (see _variance).
    floor = (squares_sd / n) ** 2 + 2 * centred_sd**4 / n**4
    room = 1.0 - (STDDEV_SIGNAL * count_sd / n) ** 2
    if room <= 0:
        return math.inf
    spread = math.sqrt(STDDEV_SIGNAL * math.sqrt(floor / room))
    return spread if spread <= (encoding.upper - encoding.lower) / 2 else math.inf


def predicted_noise(
    encodings: Sequence[MetricEncoding],
    *,
    noise_variance: float,
    variance: bool,
    quantiles: bool,
    bins: int,
    readings: Sequence[int] = READINGS,
) -> list[dict[str, float]]:
    """metric_noise for each encoding, in order."""
    return [
        metric_noise(
            e, noise_variance=noise_variance, variance=variance, quantiles=quantiles, bins=bins, readings=readings
        )
        for e in encodings
    ]


def _simulated_quantiles(encoding: MetricEncoding, *, noise_sd: float, bins: int, readings: int) -> dict[str, float]:
    """RMS error and median 95% half-width of each quantile over simulated cells (see the module docstring)."""
    rng = np.random.default_rng(readings * 1_000_003 + bins)  # the data, not privacy noise: seeded, reproducible
    cells = SIMULATED_CELLS
    centre = (encoding.lower + encoding.upper) / 2
    values = rng.normal(centre, (encoding.upper - encoding.lower) / 4, size=(cells, readings))
    values = np.clip(np.round(values / encoding.resolution) * encoding.resolution, encoding.lower, encoding.upper)
    cell = np.repeat(np.arange(cells), readings)
    flat = values.reshape(-1)
    lower = np.full(flat.size, encoding.lower)
    upper = np.full(flat.size, encoding.upper)
    which = bin_index(flat, lower, upper, np.full(flat.size, encoding.resolution), bins)
    histogram = np.bincount(which * cells + cell, minlength=bins * cells).reshape(bins, cells).astype(float)
    centred = (values - encoding.centre).sum(axis=1)
    count_sd = noise_sd / encoding.count_weight
    centred_sd = noise_sd * encoding.sum_unit()
    histogram += rng.normal(0.0, count_sd, histogram.shape)
    out = histogram_quantiles(
        histogram,
        bin_sd=np.full(cells, count_sd),
        lower=np.full(cells, encoding.lower),
        upper=np.full(cells, encoding.upper),
        count=readings + rng.normal(0.0, count_sd, cells),
        centred_sum=centred + rng.normal(0.0, centred_sd, cells),
        centred_sd=np.full(cells, centred_sd),
        centre=np.full(cells, encoding.centre),
    )
    ordered = np.sort(values, axis=1)
    row: dict[str, float] = {}
    for name, q in QUANTILES:
        truth = ordered[:, max(0, math.ceil(q * readings - 1e-9) - 1)]
        released = ~np.isnan(out[name])
        if released.sum() * 2 < cells:
            row[f"{name}_sd_n{readings}"] = row[f"{name}_ci_halfwidth_n{readings}"] = math.nan
            continue
        error = out[name][released] - truth[released]
        row[f"{name}_sd_n{readings}"] = float(np.sqrt(np.mean(error**2)))
        halfwidth = (out[f"{name}_ci_high"] - out[f"{name}_ci_low"])[released] / 2
        row[f"{name}_ci_halfwidth_n{readings}"] = float(np.median(halfwidth))
    return row


def noise_table(rows: Sequence[dict[str, object]]) -> pa.Table:
    """privacy_plan's per-metric rows (metric, unit, then metric_noise's keys) turned for reading: one row per
    statistic, one column per metric, each cell "sd (+-half-width)" in the metric's unit; after the stddev's rows,
    the smallest spread at which its estimate is shown (">= s", or "never")."""
    metrics = [str(row["metric"]) for row in rows]
    keys: list[str] = []  # "<statistic>_sd[_n<n>]" or "<statistic>_shown_from_n<n>", in the rows' order
    for row in rows:
        for key in row:
            if (key.endswith("_sd") or "_sd_n" in key or "_shown_from_n" in key) and key not in keys:
                keys.append(key)
    shown = [key for key in keys if "_shown_from_n" in key]
    ordered = [key for key in keys if key not in shown]
    after = max((i for i, key in enumerate(ordered) if key.startswith("stddev_")), default=len(ordered) - 1)
    ordered[after + 1 : after + 1] = shown

    def label(key: str) -> str:
        if "_shown_from_n" in key:
            base, _, n = key.partition("_shown_from_n")
            return f"{base} shown from spread n={n}"
        return key.replace("_sd", "", 1).replace("_n", " n=")

    def cell(row: dict[str, object], key: str) -> str:
        value = row.get(key)
        if "_shown_from_n" in key:
            return "never" if not isinstance(value, float) or math.isinf(value) else f">= {value:.3g}"
        half = row.get(key.replace("_sd", "_ci_halfwidth", 1))
        if not isinstance(value, float) or math.isnan(value):
            return "-"
        return f"{value:.3g} (+-{half:.3g})" if isinstance(half, float) else f"{value:.3g}"

    columns: dict[str, list[str]] = {"statistic": [label(key) for key in ordered]}
    for metric, row in zip(metrics, rows, strict=True):
        columns[f"{metric} ({row['unit']})"] = [cell(row, key) for key in ordered]
    return pa.table(columns)
