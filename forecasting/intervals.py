"""Intervals of a forecast, for the true value and for the next noisy release, and their calibration.

A model's variance is of the true value (the signal). The next release adds the noise of a future cell, whose
variance is known in advance only as expected from recent cells: those of the same window of the day, at the latest
releases' noise level (`History.noise_ahead`). Calibration rescales the model's own SD
(the noise part is known) from backtest errors against releases (the truth is never seen). Forecast errors are
heavier-tailed than Gaussian (calm days and fronts), so one factor matched on the errors' variance leaves the 80%
interval too wide when the 95% is right: a `Calibration` is a two-component scale mixture, the true value's error
being N(0, low^2 s) with probability `weight` and N(0, high^2 s) otherwise (s the model's variance), fitted by
maximum likelihood to the release errors with each cell's known noise added to both components. Its quantiles give
the intervals, so the 80% and 95% intervals are calibrated separately by one fitted shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Standard normal quantiles of the central 80% and 95% intervals.
Z80 = 1.2815515655446004
Z95 = 1.959963984540054
#: The range a calibration factor (and each scale of a mixture) is kept in: outside it, the model's variance is not
#: worth rescaling.
FACTOR_BOUNDS = (0.2, 10.0)
#: The fewest errors a mixture is fitted to; with fewer, one factor (a Gaussian) is learned.
MIXTURE_MIN_ERRORS = 96
#: The least weight of either component of a mixture.
MIXTURE_MIN_WEIGHT = 0.05
#: Where the released cells' noise variance is over this many times the model's variance, release errors cannot
#: tell a narrower model from noise: the calibration is one factor, and it widens the model's SD but never narrows it.
NOISE_DOMINATED = 3.0


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


def intervals(
    mean: np.ndarray, signal_var: np.ndarray, *, noise_var: float | np.ndarray, factor: float | Calibration = 1.0
) -> Intervals:
    """The intervals of a forecast whose true-value variance is `signal_var` and whose future cells have noise
    variance `noise_var` (one for all, or each window's: `History.noise_ahead`), calibrated by `factor`: a plain
    factor on the model's SD, or a `Calibration` (whose quantiles give the bounds; `sd` is scaled by its `factor`).

    >>> out = intervals(np.array([10.0]), np.array([4.0]), noise_var=5.0)
    >>> float(out.sd[0]), float(out.release_sd[0]), round(float(out.ci95[1][0]), 3)
    (2.0, 3.0, 13.92)
    >>> heavy = intervals(np.array([0.0]), np.array([1.0]), noise_var=0.0, factor=Calibration(0.8, 0.5, 2.0))
    >>> round(float(heavy.ci80[1][0]), 2), round(float(heavy.ci95[1][0]), 2)  # narrower at 80%, wider at 95%
    (0.86, 2.3)
    """
    calibration = factor if isinstance(factor, Calibration) else Calibration.scaled(factor)
    noise_var = np.broadcast_to(np.asarray(noise_var, float), np.shape(mean))
    sd = calibration.factor * np.sqrt(np.maximum(signal_var, 0.0))
    release_sd = np.sqrt(sd**2 + noise_var)
    q80, q95 = (calibration.half_width(p, signal_var) for p in (0.8, 0.95))
    r80, r95 = (calibration.half_width(p, signal_var, noise_var) for p in (0.8, 0.95))
    return Intervals(
        mean=mean,
        sd=sd,
        ci80=(mean - q80, mean + q80),
        ci95=(mean - q95, mean + q95),
        noise_sd=np.sqrt(noise_var),
        release_sd=release_sd,
        release_ci80=(mean - r80, mean + r80),
        release_ci95=(mean - r95, mean + r95),
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


def _half_width(probability: float, weight: float, sds: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The q with P(|X| <= q) = probability for X ~ weight N(0, sds[0]^2) + (1 - weight) N(0, sds[1]^2)."""
    from scipy.special import erf

    low_sd, high_sd = np.broadcast_arrays(*(np.maximum(np.asarray(s, float), 1e-300) for s in sds))
    lo, hi = np.zeros(low_sd.shape), 6.0 * np.maximum(low_sd, high_sd)
    for _ in range(50):  # bisection: the mixture's two-sided CDF is increasing in q
        mid = (lo + hi) / 2
        inside = weight * erf(mid / (low_sd * math.sqrt(2))) + (1 - weight) * erf(mid / (high_sd * math.sqrt(2)))
        below = inside < probability
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Calibration:
    """The true value's error over the model's SD: N(0, low^2) with probability `weight`, N(0, high^2) otherwise
    (a plain factor c is weight 1, low = high = c). `factor` is the mixture's SD: the model's SD is scaled by it.

    >>> Calibration.scaled(1.5).factor
    1.5
    >>> round(Calibration(0.5, 1.0, 7 ** 0.5).factor, 6)
    2.0
    """

    weight: float = 1.0
    low: float = 1.0
    high: float = 1.0

    @classmethod
    def scaled(cls, factor: float) -> Calibration:
        return cls(1.0, factor, factor)

    @property
    def factor(self) -> float:
        return math.sqrt(self.weight * self.low**2 + (1 - self.weight) * self.high**2)

    def half_width(self, probability: float, signal_var: np.ndarray, noise_var: np.ndarray | float = 0.0) -> np.ndarray:
        """The half-width of the central `probability` interval of the true value (noise_var 0) or of a release
        (the cell's noise variance added to each component)."""
        s = np.maximum(np.asarray(signal_var, float), 0.0)
        sds = (np.sqrt(self.low**2 * s + noise_var), np.sqrt(self.high**2 * s + noise_var))
        if self.weight >= 1.0 or self.low == self.high:
            from scipy.special import ndtri

            return float(ndtri((1 + probability) / 2)) * sds[0 if self.weight >= 1.0 else 1]
        return _half_width(probability, self.weight, sds)

    def as_dict(self) -> dict[str, float]:
        return {"weight": self.weight, "low": self.low, "high": self.high, "factor": self.factor}

    @classmethod
    def fit(cls, errors: np.ndarray, signal_var: np.ndarray, noise_var: np.ndarray) -> Calibration:
        """The mixture that best explains `errors` against releases (maximum likelihood, each component's variance
        scale^2 s + n), for the model's signal variances s and the released cells' noise variances n (NaN entries
        ignored). With fewer than MIXTURE_MIN_ERRORS errors, or where a mixture is no better than one factor, the
        variance-matched factor (`calibration_factor`). Where the noise dominates (its mean variance over
        NOISE_DOMINATED times the model's), that factor and at least 1: the errors are then mostly the releases' own
        noise, and a factor below 1 learned from them is mostly chance.

        >>> rng = np.random.default_rng(0)
        >>> s, n = np.full(4000, 4.0), np.full(4000, 1.0)
        >>> calm = rng.random(4000) < 0.7  # 70% of errors at 0.5 of the model's SD, the rest at 2.5 times it
        >>> e = rng.normal(0, np.sqrt(np.where(calm, 0.25, 6.25) * s + n))
        >>> fitted = Calibration.fit(e, s, n)
        >>> round(fitted.weight, 1), round(fitted.low, 1), round(fitted.high, 1)
        (0.7, 0.5, 2.4)
        """
        from scipy.optimize import minimize

        keep = np.isfinite(errors) & np.isfinite(signal_var) & np.isfinite(noise_var)
        e2, s, n = errors[keep] ** 2, np.maximum(signal_var[keep], 0.0), np.maximum(noise_var[keep], 0.0)
        single = cls.scaled(calibration_factor(errors, signal_var, noise_var))
        if e2.size < MIXTURE_MIN_ERRORS or not (s > 0).any():
            return single
        if float(np.mean(n)) > NOISE_DOMINATED * float(np.mean(s)):
            return cls.scaled(max(single.factor, 1.0))
        floor = 1e-12 * float(np.mean(e2) or 1.0)

        def nll(p: np.ndarray) -> float:
            w, c1, c2 = p[0], math.exp(p[1]), math.exp(p[2])
            v1, v2 = np.maximum(c1 * c1 * s + n, floor), np.maximum(c2 * c2 * s + n, floor)
            density = w * np.exp(-0.5 * e2 / v1) / np.sqrt(v1) + (1 - w) * np.exp(-0.5 * e2 / v2) / np.sqrt(v2)
            return -float(np.sum(np.log(density + 1e-300)))

        c = single.factor
        log_bounds = (math.log(FACTOR_BOUNDS[0]), math.log(FACTOR_BOUNDS[1]))
        bounds = [(MIXTURE_MIN_WEIGHT, 1 - MIXTURE_MIN_WEIGHT), log_bounds, log_bounds]
        best = None
        for w0, ratio in ((0.7, 2.0), (0.5, 3.0), (0.9, 4.0)):  # starts with the single factor's variance
            c1 = min(max(c / math.sqrt(w0 + (1 - w0) * ratio**2), FACTOR_BOUNDS[0]), FACTOR_BOUNDS[1])
            start = np.array([w0, math.log(c1), min(math.log(c1 * ratio), log_bounds[1])])
            found = minimize(nll, start, method="L-BFGS-B", bounds=bounds)
            if best is None or found.fun < best.fun:
                best = found
        one = nll(np.array([0.5, math.log(c), math.log(c)]))
        # Two more parameters must buy a likelihood ratio worth them (AIC), or the plain factor is kept.
        if best is None or not best.fun < one - 2.0:
            return single
        w, c1, c2 = float(best.x[0]), math.exp(best.x[1]), math.exp(best.x[2])
        if c1 > c2:
            w, c1, c2 = 1 - w, c2, c1
        return cls(w, c1, c2)


__all__ = [
    "FACTOR_BOUNDS",
    "NOISE_DOMINATED",
    "Z80",
    "Z95",
    "Calibration",
    "Intervals",
    "calibration_factor",
    "intervals",
]
