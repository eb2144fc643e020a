"""`fusion plan`: what a release will cost and how noisy its cells will be, before any budget is spent."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa

from fusion.config.federation import Config
from fusion.config.parameters import ReleaseParameters, components_per_reading, release_parameters
from fusion.release.predictions import metric_noise
from privacy.accountant import Composition, skellam_epsilon
from privacy.gaussian import analytic_gaussian_sigma
from privacy.masking_graph import neighbour_count
from privacy.noise_shares import roster_signatures_needed, unknown_shares


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
    releases_per_period: int | None  # None: event level, not limited by composition (parallel)
    contributors: int
    max_colluding: int = 0
    noise: tuple[NoiseComparison, ...] = ()  # at the quorum and with every institution contributing
    institutions: int = 0
    mask_neighbours: int = 0  # k of the masking graph (privacy/masking_graph.py); institutions - 1: complete
    quorum: int = 0
    roster_signatures: int = 0  # signatures on one roster before anyone answers it (pipelines/unmask.py)

    @property
    def masking(self) -> str:
        """The masking graph in words: complete, or each institution's k neighbours and the share threshold."""
        if self.mask_neighbours >= self.institutions - 1:
            return f"every institution masks with all {self.mask_neighbours} others (complete graph)"
        k = self.mask_neighbours
        return (
            f"each institution masks with k = {k} neighbours (a release-keyed Harary graph); shares of its secrets "
            f"go to those {k} and itself, threshold {k // 2 + 1}: up to {k // 2} of them may be absent or silent"
        )

    @property
    def fewest_contributors(self) -> str:
        """The fewest contributions a release is made with, in words: the quorum, or more where the unmask round
        needs more included institutions to sign one roster than the quorum."""
        if self.roster_signatures <= self.quorum:
            return f"a release needs the quorum, {self.quorum} contributions"
        return (
            f"a release needs {self.roster_signatures} contributions, not the quorum of {self.quorum}: the unmask "
            f"round needs {self.roster_signatures} included institutions to sign one roster (more than (institutions "
            "+ max_colluding + 1) / 2 while each sealed noise share is below the calibrated variance, so that no two "
            "rosters are both answered); with exactly the quorum the aggregator refuses the release"
        )

    @property
    def guarantee(self) -> str:
        """Who the per-release epsilon holds against, in words."""
        others = f"up to {self.max_colluding} other institution(s)" if self.max_colluding else "no other institution"
        return (
            "the aggregator, the key holder, any one contributing institution that keeps its own noise draws and "
            f"{others}, together"
        )


@dataclass(frozen=True)
class NoiseComparison:
    """The noise of a release with `contributors` contributors against the central analytic Gaussian at the same
    (epsilon, delta) and sensitivity, and against the floor sqrt(n / (n - 1 - c)) times it that any scheme in which
    each contributor knows its own share must pay."""

    contributors: int
    sd: float  # integer units, every excess layer removed
    central_sd: float
    floor_sd: float

    @property
    def to_central(self) -> float:
        return self.sd / self.central_sd

    @property
    def to_floor(self) -> float:
        return self.sd / self.floor_sd


def noise_comparisons(params: ReleaseParameters, *, epsilon: float, institutions: int) -> tuple[NoiseComparison, ...]:
    """NoiseComparison at the quorum and with all `institutions` contributing (one entry when they coincide)."""
    if not params.noise:
        return ()
    central = analytic_gaussian_sigma(epsilon=epsilon, delta=params.delta, l2=params.sensitivity.l2)
    out = []
    for n in sorted({params.quorum, institutions}):
        floor = central * math.sqrt(n / unknown_shares(n, params.max_colluding))
        out.append(NoiseComparison(n, math.sqrt(params.layers.total(n)), central, floor))
    return tuple(out)


#: `releases_that_fit` counts up to this many (a period admitting more says this many).
RELEASES_COUNTED = 10_000


def releases_that_fit(params: ReleaseParameters, cap: float) -> int | None:
    """How many releases of these parameters one period's cap admits, composed as the privacy unit implies (PLD),
    up to RELEASES_COUNTED. None at event level: releases of disjoint intervals compose in parallel (a reading lies
    in one interval), so composition does not limit how many a period takes; each must fit the cap on its own."""
    if not params.noise:
        return 0
    if params.composition is Composition.PARALLEL:
        return None if _fits(params, 1, cap) else 0
    low, high = 0, 1
    while high <= RELEASES_COUNTED and _fits(params, high, cap):
        low, high = high, high * 2
    high = min(high, RELEASES_COUNTED + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _fits(params, middle, cap) else (low, middle)
    return low


def _fits(params: ReleaseParameters, releases: int, cap: float) -> bool:
    """Whether `releases` releases composed sequentially stay within the cap."""
    assert params.mechanism is not None
    return skellam_epsilon([params.mechanism] * releases, delta=params.delta) <= cap


def privacy_plan(config: Config, *, contributors: int | None = None) -> tuple[PrivacyPlan, pa.Table]:
    """The release's privacy parameters, and per metric the noise SDs and 95% half-widths its cells will have
    when `contributors` institutions contribute (default: all of them; at the quorum the noise is smallest)."""
    params = release_parameters(config)
    n = contributors if contributors is not None else len(config.institutions)
    if not params.quorum <= n <= len(config.institutions):
        raise ValueError(f"contributors must be between the quorum ({params.quorum}) and {len(config.institutions)}")
    sd = math.sqrt(params.layers.total(n))  # each of n contributors keeps s_n once its excess layers are removed
    rows = []
    for metric, encoding in zip(config.metrics, params.encodings, strict=True):
        statistics = config.statistics  # fusion/release/predictions.py states what each prediction assumes
        predicted = metric_noise(encoding, noise_variance=sd**2, variance=statistics.variance,
                                 quantiles=statistics.quantiles, bins=statistics.histogram_bins)
        rows.append({"metric": metric.name, "unit": metric.unit, **predicted})
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
        max_colluding=params.max_colluding,
        noise=noise_comparisons(params, epsilon=config.privacy.epsilon, institutions=len(config.institutions)),
        institutions=len(config.institutions),
        mask_neighbours=neighbour_count(len(config.institutions), max_colluding=params.max_colluding),
        quorum=params.quorum,
        roster_signatures=roster_signatures_needed(
            len(config.institutions), quorum=params.quorum, max_colluding=params.max_colluding
        ),
    )
    return plan, pa.Table.from_pylist(rows)
