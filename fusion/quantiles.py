"""Quantiles from noisy histograms over public bins, with monotone post-processing and intervals.

Every cell's histogram (noisy counts per equal-width bin of the clamp range) is clipped at zero and
accumulated, which makes its CDF monotone. A quantile is read off the CDF by linear interpolation inside the
bin where the CDF crosses it. Its 95% interval comes from the cumulative counts shifted by +-1.96 of their
noise SD (cumulating j bins adds j independent noises) and is widened to whole bins, since the values inside
a bin are not known: the interval covers both the noise and the binning.
"""

from __future__ import annotations

import numpy as np

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054

#: The quantiles every histogram release reports, and their column names in `releases`.
QUANTILES: tuple[tuple[str, float], ...] = (("p10", 0.10), ("median", 0.50), ("p90", 0.90))


def _crossing(cdf: np.ndarray, q: float) -> np.ndarray:
    """Index of the first bin whose CDF reaches q, per cell (cdf: bins x cells, last row is 1)."""
    return np.argmax(cdf >= q - 1e-12, axis=0)


def _interpolate(cdf: np.ndarray, q: float, lower: np.ndarray, width: np.ndarray) -> np.ndarray:
    cells = cdf.shape[1]
    j = _crossing(cdf, q)
    columns = np.arange(cells)
    before = np.where(j > 0, cdf[np.maximum(j - 1, 0), columns], 0.0)
    mass = cdf[j, columns] - before
    fraction = np.where(mass > 0, (q - before) / np.where(mass > 0, mass, 1.0), 0.5)
    return lower + (j + np.clip(fraction, 0.0, 1.0)) * width


def histogram_quantiles(
    histogram: np.ndarray, *, bin_sd: np.ndarray, lower: np.ndarray, upper: np.ndarray
) -> dict[str, np.ndarray]:
    """Quantile estimates and intervals per cell.

    histogram: noisy counts, shape (bins, cells); bin_sd: the noise SD of one bin's count, per cell;
    lower/upper: the clamp range per cell. Returns {name, name_ci_low, name_ci_high} arrays; NaN where the
    histogram holds no mass.
    """
    bins, cells = histogram.shape
    clipped = np.clip(histogram, 0.0, None)
    cumulative = np.cumsum(clipped, axis=0)
    total = cumulative[-1]
    has_mass = total > 0
    safe_total = np.where(has_mass, total, 1.0)
    width = (upper - lower) / bins
    spread = Z95 * np.sqrt(np.arange(1, bins + 1))[:, None] * bin_sd[None, :]
    cdf = cumulative / safe_total
    cdf_high = np.clip((cumulative + spread) / safe_total, 0.0, 1.0)  # more mass early -> an earlier quantile
    cdf_low = np.maximum.accumulate(np.clip((cumulative - spread) / safe_total, 0.0, 1.0), axis=0)
    cdf_low[-1] = 1.0
    out: dict[str, np.ndarray] = {}
    for name, q in QUANTILES:
        estimate = _interpolate(cdf, q, lower, width)
        low = lower + _crossing(cdf_high, q) * width  # the left edge of the earliest plausible bin
        high = lower + (_crossing(cdf_low, q) + 1) * width  # the right edge of the latest plausible bin
        nan = np.full(cells, np.nan)
        out[name] = np.where(has_mass, estimate, nan)
        out[f"{name}_ci_low"] = np.where(has_mass, np.minimum(low, estimate), nan)
        out[f"{name}_ci_high"] = np.where(has_mass, np.maximum(high, estimate), nan)
    return out
