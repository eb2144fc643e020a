"""`fusion plan`: what a release will cost and how noisy its cells will be, before any budget is spent."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa

from fusion.config import Config
from fusion.parameters import ReleaseParameters, components_per_reading, release_parameters
from fusion.quantiles import Z95
from privacy.accountant import epsilon_for


@dataclass(frozen=True)
class PrivacyPlan:
    unit: str
    components_per_reading: int
    l1: float
    l2: float
    total_variance: float
    share_variance: float
    epsilon: float
    delta: float
    period: str
    epsilon_cap: float
    releases_per_period: int
    contributors: int


def releases_that_fit(params: ReleaseParameters, cap: float) -> int:
    """How many releases of these parameters one period's cap admits (RDP composition), up to 10,000."""
    if not params.noise:
        return 0
    low, high = 0, 1
    while high <= 10_000 and _fits(params, high, cap):
        low, high = high, high * 2
    high = min(high, 10_001)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _fits(params, middle, cap) else (low, middle)
    return low


def _fits(params: ReleaseParameters, releases: int, cap: float) -> bool:
    return (
        epsilon_for(
            variance=params.total_variance,
            l1=params.sensitivity.l1,
            l2=params.sensitivity.l2,
            delta=params.delta,
            releases=releases,
        )
        <= cap
    )


def privacy_plan(config: Config, *, contributors: int | None = None) -> tuple[PrivacyPlan, pa.Table]:
    """The release's privacy parameters, and per metric the noise SDs and 95% half-widths its cells will have
    when `contributors` institutions contribute (default: all of them; at the quorum the noise is smallest)."""
    params = release_parameters(config)
    n = contributors if contributors is not None else len(config.institutions)
    if not params.quorum <= n <= len(config.institutions):
        raise ValueError(f"contributors must be between the quorum ({params.quorum}) and {len(config.institutions)}")
    sd = math.sqrt(n * params.share_variance)
    rows = []
    for metric, encoding in zip(config.metrics, params.encodings, strict=True):
        count_sd = sd / encoding.count_weight
        centred_sd = sd * encoding.sum_unit()
        sum_sd = math.hypot(centred_sd, encoding.centre * count_sd)
        row: dict[str, object] = {
            "metric": metric.name,
            "unit": metric.unit,
            "count_sd": count_sd,
            "count_ci_halfwidth": Z95 * count_sd,
            "sum_sd": sum_sd,
            "sum_ci_halfwidth": Z95 * sum_sd,
        }
        for readings in (100, 1000, 10000):  # a mean at the clamp range's centre, from this many readings
            row[f"mean_ci_halfwidth_n{readings}"] = Z95 * centred_sd / readings
        rows.append(row)
    plan = PrivacyPlan(
        unit=config.privacy.unit.value,
        components_per_reading=components_per_reading(config),
        l1=params.sensitivity.l1,
        l2=params.sensitivity.l2,
        total_variance=params.total_variance,
        share_variance=params.share_variance,
        epsilon=params.epsilon,
        delta=params.delta,
        period=config.privacy.period,
        epsilon_cap=config.privacy.cap,
        releases_per_period=releases_that_fit(params, config.privacy.cap),
        contributors=n,
    )
    return plan, pa.Table.from_pylist(rows)
