"""The central analytic Gaussian mechanism (Balle & Wang, ICML 2018): the yardstick `fusion plan` compares
Fusion's distributed Skellam noise with.

The Gaussian mechanism with sd sigma and L2 sensitivity D is (epsilon, delta)-DP exactly when
    Phi(D / (2 sigma) - epsilon sigma / D) - e^epsilon Phi(-D / (2 sigma) - epsilon sigma / D) <= delta,
and the left side decreases in sigma, so the smallest such sigma is found by bisection.
"""

from __future__ import annotations

import math

from scipy.special import ndtr  # the normal CDF (scipy.stats would load scipy.optimize: fusion verify's startup)


def gaussian_delta(*, sigma: float, l2: float, epsilon: float) -> float:
    """The exact delta of the Gaussian mechanism at `epsilon` (Balle & Wang 2018, Theorem 8)."""
    a = l2 / (2.0 * sigma)
    b = epsilon * sigma / l2
    return float(ndtr(a - b) - math.exp(epsilon) * ndtr(-a - b))


def analytic_gaussian_sigma(*, epsilon: float, delta: float, l2: float) -> float:
    """The smallest sd (to 1e-9 relative) at which the Gaussian mechanism is (epsilon, delta)-DP."""
    if not (epsilon > 0 and 0 < delta < 1 and l2 > 0):
        raise ValueError(f"need epsilon > 0, 0 < delta < 1 and l2 > 0, got {epsilon}, {delta}, {l2}")
    low, high = 1e-6 * l2, l2
    while gaussian_delta(sigma=high, l2=l2, epsilon=epsilon) > delta:
        low, high = high, high * 2.0
    while high / low > 1 + 1e-9:
        middle = math.sqrt(low * high)
        if gaussian_delta(sigma=middle, l2=l2, epsilon=epsilon) > delta:
            low = middle
        else:
            high = middle
    return high
