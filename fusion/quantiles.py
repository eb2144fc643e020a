"""Quantiles from noisy histograms over public bins, with monotone post-processing and intervals.

Every cell's histogram holds noisy counts per equal-width bin of the clamp range. The estimate reads the
quantile off the CDF of the raw noisy bins (unbiased cumulative sums; clipping bins at zero first would add a
positive bias to every empty bin and drag tail quantiles outwards), made monotone by a running maximum, with
linear interpolation inside the crossing bin. The 95% interval is a test at every bin edge e_k: with
D_k = C_k - q N (C_k the cumulative count of the first k bins, N the total), the true quantile is at most e_k
exactly when the true D_k >= 0, and D_k's noise SD is sd * sqrt(k (1-q)^2 + (B-k) q^2) for B bins of
independent noise. The interval runs from the last edge where D_k is clearly negative to the first edge where
it is clearly positive, so it covers both the noise and the binning (values inside a bin are not known).
"""

from __future__ import annotations

import numpy as np

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054

#: The quantiles every histogram release reports, and their column names in `releases`.
QUANTILES: tuple[tuple[str, float], ...] = (("p10", 0.10), ("median", 0.50), ("p90", 0.90))


def _interpolate(cdf: np.ndarray, q: float, lower: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Quantile per cell from a monotone CDF given at the right edge of each bin (bins x cells)."""
    cells = cdf.shape[1]
    j = np.argmax(cdf >= q - 1e-12, axis=0)  # the first bin whose CDF reaches q (the last one is 1)
    columns = np.arange(cells)
    before = np.where(j > 0, cdf[np.maximum(j - 1, 0), columns], 0.0)
    mass = cdf[j, columns] - before
    fraction = np.where(mass > 0, (q - before) / np.where(mass > 0, mass, 1.0), 0.5)
    return lower + (j + np.clip(fraction, 0.0, 1.0)) * width


def histogram_quantiles(
    histogram: np.ndarray, *, bin_sd: np.ndarray, lower: np.ndarray, upper: np.ndarray
) -> dict[str, np.ndarray]:
    """Quantile estimates and 95% intervals per cell.

    histogram: noisy counts, shape (bins, cells); bin_sd: the noise SD of one bin's count, per cell;
    lower/upper: the clamp range per cell. Returns {name, name_ci_low, name_ci_high} arrays; NaN where the
    histogram's total is not positive.
    """
    bins, cells = histogram.shape
    cumulative = np.vstack([np.zeros(cells), np.cumsum(histogram, axis=0)])  # C_0 .. C_B at the edges
    total = cumulative[-1]
    has_mass = total > 0
    safe_total = np.where(has_mass, total, 1.0)
    width = (upper - lower) / bins
    cdf = np.clip(np.maximum.accumulate(cumulative[1:] / safe_total, axis=0), 0.0, 1.0)
    cdf[-1] = 1.0
    k = np.arange(bins + 1)[:, None]
    out: dict[str, np.ndarray] = {}
    for name, q in QUANTILES:
        estimate = _interpolate(cdf, q, lower, width)
        d = cumulative - q * total
        spread = Z95 * bin_sd[None, :] * np.sqrt(k * (1 - q) ** 2 + (bins - k) * q**2)
        below = d + spread < 0  # the quantile is clearly above edge k
        above = d - spread >= 0  # the quantile is clearly at or below edge k
        last_below = np.where(below.any(axis=0), bins - np.argmax(below[::-1], axis=0), 0)  # an edge index
        first_above = np.where(above.any(axis=0), np.argmax(above, axis=0), bins)
        low = lower + last_below * width
        high = lower + first_above * width
        nan = np.full(cells, np.nan)
        out[name] = np.where(has_mass, estimate, nan)
        out[f"{name}_ci_low"] = np.where(has_mass, np.minimum(low, estimate), nan)
        out[f"{name}_ci_high"] = np.where(has_mass, np.maximum(high, estimate), nan)
    return out
