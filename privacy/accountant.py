"""Renyi-DP accounting for the Skellam mechanism, conversion to (epsilon, delta), and noise calibration.

Bound (Agarwal, Kairouz, Liu, NeurIPS 2021), total variance v, L1/L2 sensitivities D1, D2:
    eps(alpha) <= alpha*D2^2/(2v) + min(((2*alpha-1)*D2^2 + 6*D1)/(4*v^2), 3*D1/(2*v))
RDP adds over releases; (epsilon, delta) comes from Opacus's conversion (Balle et al. 2020).
Only integer orders are used, so nothing relies on the bound between integers; the reported epsilon is the
minimum over those orders and therefore never below the true one.
"""

from __future__ import annotations

import math

import numpy as np

#: Integer Renyi orders at which the bound is evaluated.
ORDERS: np.ndarray = np.concatenate([np.arange(2, 64), np.arange(64, 257, 4), np.arange(288, 1025, 32)]).astype(float)


def skellam_rdp(*, variance: float, l1: float, l2: float, orders: np.ndarray = ORDERS) -> np.ndarray:
    """RDP epsilon of one Skellam release at each order (same shape as `orders`)."""
    _check_mechanism(variance=variance, l1=l1, l2=l2)
    a = np.asarray(orders, dtype=float)
    gaussian_part = a * l2**2 / (2.0 * variance)
    correction = np.minimum(((2.0 * a - 1.0) * l2**2 + 6.0 * l1) / (4.0 * variance**2), 3.0 * l1 / (2.0 * variance))
    return gaussian_part + correction


def _check_mechanism(*, variance: float, l1: float, l2: float) -> None:
    if not (math.isfinite(variance) and variance > 0):
        raise ValueError(f"variance must be positive and finite, got {variance}")
    if not (math.isfinite(l1) and math.isfinite(l2) and l1 >= 0 and l2 >= 0):
        raise ValueError(f"sensitivities must be finite and non-negative, got l1={l1}, l2={l2}")


def epsilon_for(*, variance: float, l1: float, l2: float, delta: float, releases: int = 1) -> float:
    """(epsilon, delta)-DP epsilon of `releases` compositions of the Skellam mechanism."""
    if releases < 1:
        raise ValueError("releases must be at least 1")
    return epsilon_from_rdp(releases * skellam_rdp(variance=variance, l1=l1, l2=l2), delta=delta)


def epsilon_from_rdp(rdp: np.ndarray, *, delta: float) -> float:
    """(epsilon, delta)-DP epsilon of a composed RDP curve given at ORDERS."""
    rdp = np.asarray(rdp, dtype=float)
    if rdp.shape != ORDERS.shape:
        raise ValueError(f"an RDP curve needs one value per order ({ORDERS.size}), got shape {rdp.shape}")
    if not rdp.any():
        return 0.0
    # Imported here: opacus brings torch (about 4 s), which commands that never convert a curve do not need.
    from opacus.accountants.analysis.rdp import get_privacy_spent

    epsilon, _ = get_privacy_spent(orders=ORDERS.tolist(), rdp=rdp, delta=delta)
    return float(epsilon)


def calibrate_variance(*, epsilon: float, delta: float, l1: float, l2: float, releases: int = 1) -> float:
    """The smallest total variance (to 0.1% relative) whose epsilon does not exceed the target.

    Bisection on log-variance; the returned variance always satisfies epsilon_for(...) <= epsilon.
    """
    if not (epsilon > 0 and 0 < delta < 1):
        raise ValueError(f"need epsilon > 0 and 0 < delta < 1, got epsilon={epsilon}, delta={delta}")
    if not (math.isfinite(l1) and math.isfinite(l2) and l1 > 0 and l2 > 0):
        raise ValueError(f"sensitivities must be positive and finite, got l1={l1}, l2={l2}")
    low, high = 1e-6, max(1.0, l2**2)
    while epsilon_for(variance=high, l1=l1, l2=l2, delta=delta, releases=releases) > epsilon:
        low, high = high, high * 4.0
        if high > 1e36:
            raise ValueError(f"no noise level reaches epsilon={epsilon}; the sensitivity is too large")
    while high / low > 1.001:
        middle = math.sqrt(low * high)
        if epsilon_for(variance=middle, l1=l1, l2=l2, delta=delta, releases=releases) > epsilon:
            low = middle
        else:
            high = middle
    return high
