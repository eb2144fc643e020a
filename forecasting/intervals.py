"""Intervals of a forecast, for the true value and for the next noisy release, and their calibration.

A model's variance is of the true value (the signal). The next release adds the noise of a future cell, whose
variance is known in advance only as the typical noise of recent cells. Calibration scales the model's signal SD
by one factor learned on backtest errors against releases (the truth is never seen): the noise part is known, so
only the model's own uncertainty is rescaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Standard normal quantiles of the central 80% and 95% intervals.
Z80 = 1.2815515655446004
Z95 = 1.959963984540054
#: The range a calibration factor is kept in: outside it, the model's variance is not worth rescaling.
FACTOR_BOUNDS = (0.2, 10.0)


@dataclass(frozen=True)
class Intervals:
    """Per window ahead, shape (horizon,): the mean; the true value's SD and 80/95% bounds; the expected noise SD
    of the future cell; the next release's SD and 80/95% bounds."""

    mean: np.ndarray
    sd: np.ndarray
    ci80: tuple[np.ndarray, np.ndarray]
    ci95: tuple[np.ndarray, np.ndarray]
    noise_sd: np.ndarray
    release_sd: np.ndarray
    release_ci80: tuple[np.ndarray, np.ndarray]
    release_ci95: tuple[np.ndarray, np.ndarray]


def intervals(mean: np.ndarray, signal_var: np.ndarray, *, noise_var: float, factor: float = 1.0) -> Intervals:
    """The intervals of a forecast whose true-value variance is `signal_var` (scaled by `factor` squared) and whose
    future cells have noise variance `noise_var`.

    >>> out = intervals(np.array([10.0]), np.array([4.0]), noise_var=5.0)
    >>> float(out.sd[0]), float(out.release_sd[0]), round(float(out.ci95[1][0]), 3)
    (2.0, 3.0, 13.92)
    """
    sd = factor * np.sqrt(np.maximum(signal_var, 0.0))
    release_sd = np.sqrt(sd**2 + noise_var)
    return Intervals(
        mean=mean,
        sd=sd,
        ci80=(mean - Z80 * sd, mean + Z80 * sd),
        ci95=(mean - Z95 * sd, mean + Z95 * sd),
        noise_sd=np.full(mean.shape, np.sqrt(noise_var)),
        release_sd=release_sd,
        release_ci80=(mean - Z80 * release_sd, mean + Z80 * release_sd),
        release_ci95=(mean - Z95 * release_sd, mean + Z95 * release_sd),
    )


def calibration_factor(errors: np.ndarray, signal_var: np.ndarray, noise_var: np.ndarray) -> float:
    """The factor c on the model's signal SD under which the errors against releases have unit variance:
    mean(e^2 / (c^2 s + n)) = 1, for errors e, uncalibrated signal variances s and the released cells' noise
    variances n (NaN entries ignored). Kept in FACTOR_BOUNDS; 1 with no errors to learn from.

    >>> rng = np.random.default_rng(0)
    >>> s, n = np.full(20000, 4.0), np.full(20000, 1.0)
    >>> e = rng.normal(0, np.sqrt(1.5**2 * s + n))  # the model's SD is 1.5 times too small
    >>> round(calibration_factor(e, s, n), 1)
    1.5
    """
    keep = np.isfinite(errors) & np.isfinite(signal_var) & np.isfinite(noise_var)
    e2, s, n = errors[keep] ** 2, signal_var[keep], noise_var[keep]
    if e2.size == 0 or not (s > 0).any():
        return 1.0
    low, high = FACTOR_BOUNDS

    def excess(c: float) -> float:  # decreasing in c
        return float(np.mean(e2 / np.maximum(c * c * s + n, 1e-300))) - 1.0

    if excess(low) <= 0:
        return low
    if excess(high) >= 0:
        return high
    for _ in range(60):  # bisection on log c
        mid = float(np.sqrt(low * high))
        if excess(mid) > 0:
            low = mid
        else:
            high = mid
    return float(np.sqrt(low * high))


__all__ = ["FACTOR_BOUNDS", "Z80", "Z95", "Intervals", "calibration_factor", "intervals"]
