"""Release parameters derived from a config: encodings, sensitivity, calibrated noise, and the wrap check."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime

import numpy as np

from fusion.config.federation import Config, PrivacyUnit
from fusion.errors import ConfigError
from privacy.accountant import (
    ORDERS,
    Composition,
    ReleaseCharge,
    calibrate_skellam_variance,
    mechanism_rdp,
    skellam_epsilon,
)
from privacy.encoding import (
    MetricEncoding,
    Sensitivity,
    balanced_encodings,
    entity_level_sensitivity,
    event_level_sensitivity,
)
from privacy.he import MAX_ABS_TOTAL, WrapRisk, check_no_wrap
from privacy.layout import BASE_COMPONENTS, SUMSQ, bin_components
from privacy.noise_shares import NoiseLayers
from privacy.pld import SkellamMechanism
from privacy.skellam import MAX_POISSON_RATE

#: Encrypted totals must stay below t/2 even with this many noise standard deviations added.
NOISE_MARGIN_SDS = 10.0
#: A derived per-cell cap below this means the resolution is too fine for the plaintext modulus.
MIN_DERIVED_CAP = 1_000_000


@dataclass(frozen=True)
class ReleaseParameters:
    """Everything every party must agree on to pack, noise, add and decode one release."""

    encodings: tuple[MetricEncoding, ...]  # in config metric order
    sensitivity: Sensitivity
    total_variance: float  # v: Skellam variance a release with `quorum` contributors carries (0 if noise off)
    quorum: int
    epsilon: float  # accounted epsilon of one release (<= the configured target); inf when noise is off
    delta: float
    noise: bool
    seeded: bool = False  # test mode with a seed: the noise can be regenerated, so it protects nothing
    max_colluding: int = 0  # institutions that may collude: their noise shares are not counted on
    institutions: int = 0  # the federation's institutions (N): the noise layers run from the quorum to N
    # Readings per cell each institution may contribute without any total wrapping mod t.
    cell_caps: dict[str, int] = field(default_factory=dict)
    # How releases of one privacy period compose: parallel at event level, sequential at entity level.
    composition: Composition = Composition.SEQUENTIAL

    @property
    def noise_label(self) -> str:
        if not self.noise:
            return "off (test mode)"
        return "skellam (seeded, test mode)" if self.seeded else "skellam"

    @property
    def mechanism(self) -> SkellamMechanism | None:
        """What one release is for the accountant: variance v on every slot, a privacy unit moving at most
        `coordinates` slots by `shift` each (None when noise is off, test only: such a release protects nothing)."""
        if not self.noise:
            return None
        return SkellamMechanism(self.total_variance, self.sensitivity.coordinates, self.sensitivity.shift)

    @property
    def rdp(self) -> np.ndarray:
        """The Renyi-DP curve of one release at the accountant's orders (zero when noise is off, test only)."""
        return np.zeros(ORDERS.size) if self.mechanism is None else mechanism_rdp(self.mechanism)

    def charge(self, start: datetime, end: datetime) -> ReleaseCharge:
        """What the release of the interval [start, end) costs its privacy period (fusion/store/ledger.py)."""
        return ReleaseCharge(mechanism=self.mechanism, start=start, end=end, composition=self.composition)

    @property
    def tally_weight(self) -> int:
        """What one rejected row adds to its tally slot: the largest move of any one slot by one reading (w), so a
        row that is rejected instead of accepted never moves the vector further than an accepted one."""
        return max(max(e.count_weight, e.sum_bound) for e in self.encodings)

    @property
    def layers(self) -> NoiseLayers:
        """The noise shares (privacy/noise_shares.py): what each contribution seals and what it later removes."""
        return NoiseLayers(
            total_variance=self.total_variance,
            quorum=self.quorum,
            institutions=max(self.institutions, self.quorum),
            max_colluding=self.max_colluding,
        )

    @property
    def share_variance(self) -> float:
        """Variance each institution seals: v / max(quorum - 1 - max_colluding, 1), so that with as few as `quorum`
        contributors the noise no admissible coalition knows (the aggregator, the key holder, one contributor that
        keeps its own draws and `max_colluding` others) is still v. Layers of it are removed once more contribute."""
        return self.layers.sealed

    def digest(self) -> str:
        doc = {
            "encodings": [(e.lower, e.upper, e.resolution, e.scale) for e in self.encodings],
            "variance": self.total_variance,
            "quorum": self.quorum,
            "max_colluding": self.max_colluding,
            "institutions": self.institutions,
            "noise_shares": "layered/v1",  # share v/(q-1-c), layers removed once the roster is known
            "delta": self.delta,
            "noise": self.noise,
            "seeded": self.seeded,
            "sensitivity": (self.sensitivity.l1, self.sensitivity.l2),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def layout_components(config: Config) -> tuple[str, ...]:
    """The per-cell components the config's statistics need, in slot order."""
    components: tuple[str, ...] = BASE_COMPONENTS
    if config.statistics.variance:
        components += (SUMSQ,)
    if config.statistics.quantiles:
        components += bin_components(config.statistics.histogram_bins)
    return components


def components_per_reading(config: Config) -> int:
    """Slots one reading touches: COUNT and SUM, SUMSQ, and exactly one histogram bin."""
    return 2 + int(config.statistics.variance) + int(config.statistics.quantiles)


def release_parameters(config: Config) -> ReleaseParameters:
    """Derive and check the parameters; raises ConfigError if an encrypted total could wrap mod t."""
    privacy = config.privacy
    encodings = tuple(balanced_encodings([(m.lower, m.upper, m.resolution) for m in config.metrics]))
    per_reading = components_per_reading(config)
    if privacy.unit is PrivacyUnit.ENTITY:
        assert privacy.max_partitions is not None and privacy.max_readings_per_partition is not None
        sensitivity = entity_level_sensitivity(
            list(encodings),
            max_partitions=privacy.max_partitions,
            max_per_partition=privacy.max_readings_per_partition,
            components=per_reading,
        )
    else:
        sensitivity = event_level_sensitivity(list(encodings), components=per_reading)
    if privacy.noise:
        variance = calibrate_skellam_variance(
            epsilon=privacy.epsilon, delta=privacy.delta, coordinates=sensitivity.coordinates, shift=sensitivity.shift
        )
        mechanism = SkellamMechanism(variance, sensitivity.coordinates, sensitivity.shift)
        epsilon = skellam_epsilon([mechanism], delta=privacy.delta)  # PLD (the RDP one is a looser cross-check)
    else:
        variance, epsilon = 0.0, math.inf
    params = ReleaseParameters(
        encodings=encodings,
        sensitivity=sensitivity,
        total_variance=variance,
        quorum=privacy.quorum,
        max_colluding=privacy.max_colluding,
        institutions=len(config.institutions),
        epsilon=epsilon,
        delta=privacy.delta,
        noise=privacy.noise,
        seeded=privacy.seed is not None,
        composition=Composition.SEQUENTIAL if privacy.unit is PrivacyUnit.ENTITY else Composition.PARALLEL,
    )
    if params.noise and params.share_variance / 2.0 > MAX_POISSON_RATE:
        raise ConfigError(
            f"metrics: the calibrated noise (variance {params.share_variance:.3e} per institution) is too large to "
            "sample exactly; coarsen a metric's resolution or narrow its clamp bounds"
        )
    return replace(params, cell_caps=_cell_caps(config, params))


def _cell_caps(config: Config, params: ReleaseParameters) -> dict[str, int]:
    """Each institution's readings-per-cell cap: as configured, or the largest that cannot wrap.

    Worst case: every institution at its cap, every reading at the bound, and all institutions' noise shares
    (variance v/q each) at NOISE_MARGIN_SDS standard deviations; the total must stay below t/2. Derived caps
    share what configured ones leave, and must be at least MIN_DERIVED_CAP.
    """
    institutions = config.institutions
    worst_weight = max(max(e.count_weight, e.sum_bound) for e in params.encodings)
    margin = NOISE_MARGIN_SDS * math.sqrt(params.share_variance * len(institutions))
    configured = {i.id: i.max_readings_per_cell for i in institutions if i.max_readings_per_cell is not None}
    largest = float(sum(configured.values()) * worst_weight) + margin
    try:
        check_no_wrap(largest)
    except WrapRisk as exc:
        raise ConfigError(f"institutions[*].max_readings_per_cell / metrics: {exc}") from None
    open_ones = [i.id for i in institutions if i.max_readings_per_cell is None]
    if not open_ones:
        return configured
    derived = int((MAX_ABS_TOTAL - 1 - largest) // (worst_weight * len(open_ones)))
    if derived < MIN_DERIVED_CAP:
        raise ConfigError(
            f"metrics: at this resolution an encrypted cell could hold only {derived} readings per institution "
            f"before wrapping mod t (at least {MIN_DERIVED_CAP} needed); coarsen a resolution or narrow the clamps"
        )
    return {**configured, **dict.fromkeys(open_ones, derived)}
