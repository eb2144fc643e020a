"""What a release protects and at what cost: the privacy unit (a reading or an entity), production or test mode, the
budget and noise (`PrivacyConfig`), the public metrics whose clamp bounds and resolution fix the sensitivity, and
the optional statistics that add vector sums per reading."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Self

from pydantic import Field, field_validator, model_validator

from fusion.config.base import Frozen, Name
from fusion.runtime.durations import parse_duration


class PrivacyUnit(StrEnum):
    READING = "reading"  # event level: one reading
    ENTITY = "entity"  # one meter, household, vehicle...: contributions bounded per release


class PrivacyMode(StrEnum):
    PRODUCTION = "production"
    TEST = "test"


class MetricConfig(Frozen):
    """A public metric: clamp bounds and resolution fix its encoding; the plausible range rejects nonsense."""

    name: Name
    unit: str = Field(min_length=1)
    lower: float
    upper: float
    resolution: float = Field(gt=0)
    plausible: tuple[float, float]

    @model_validator(mode="after")
    def _ranges(self) -> Self:
        if not (math.isfinite(self.lower) and math.isfinite(self.upper) and self.lower < self.upper):
            raise ValueError(f"need finite lower < upper, got lower={self.lower}, upper={self.upper}")
        if self.resolution > self.upper - self.lower:
            raise ValueError(
                f"resolution {self.resolution} is coarser than the clamp range [{self.lower}, {self.upper}]"
            )
        low, high = self.plausible
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"plausible must be a finite [low, high] with low < high, got {self.plausible}")
        return self


class PrivacyConfig(Frozen):
    # Below 1e-6 no noise the accountants can certify reaches it (a fine resolution's even less): refused at once.
    epsilon: float = Field(ge=1e-6, le=20)
    delta: float = Field(gt=0, lt=0.01)
    quorum: int = Field(ge=1)
    # Institutions that might collude with the aggregator, the key holder and one contributor that keeps its own
    # noise draws. Each institution seals a share v/(quorum - 1 - max_colluding), so the noise such a coalition
    # does not know is still v with as few as `quorum` contributors, and removes its excess layers once the roster
    # is known (privacy/noise_shares.py); production needs quorum >= max_colluding + 2; each institution answers
    # only a roster more than (institutions + max_colluding + 1) / 2 have signed ((institutions + max_colluding) / 2
    # at quorum max_colluding + 2, revealing noise layers only at the former; docs/concepts/trust-model.md).
    max_colluding: int = Field(default=0, ge=0)
    unit: PrivacyUnit = PrivacyUnit.READING
    # Entity level: each entity contributes to at most `max_partitions` cells (L0) per release and at most
    # `max_readings_per_partition` readings (Linf) per cell; which ones are kept is chosen uniformly at random.
    max_partitions: int | None = Field(default=None, ge=1)
    max_readings_per_partition: int | None = Field(default=None, ge=1)
    # The budget ledger: releases whose intervals fall in one period compose; their total may not pass the cap.
    period: str = "1d"
    epsilon_cap: float | None = Field(default=None, gt=0)  # default: epsilon (one release per period)
    mode: PrivacyMode = PrivacyMode.PRODUCTION
    noise: bool = True  # test mode only: switch noise off to check exact answers
    seed: int | None = None  # test mode only: reproducible noise

    @field_validator("period")
    @classmethod
    def _period(cls, period: str) -> str:
        seconds = parse_duration(period).total_seconds()
        if seconds <= 0 or seconds % 3600:
            raise ValueError(f"period '{period}' must be a positive number of whole hours (e.g. 1d, 7d, 12h)")
        return period

    @property
    def cap(self) -> float:
        """The epsilon cap per period."""
        return self.epsilon_cap if self.epsilon_cap is not None else self.epsilon

    @model_validator(mode="after")
    def _entity_caps(self) -> Self:
        caps = (self.max_partitions, self.max_readings_per_partition)
        if self.unit is PrivacyUnit.ENTITY and None in caps:
            raise ValueError("unit = 'entity' needs max_partitions (L0) and max_readings_per_partition (Linf)")
        if self.unit is PrivacyUnit.READING and caps != (None, None):
            raise ValueError("max_partitions and max_readings_per_partition apply only to unit = 'entity'")
        if self.epsilon > self.cap:
            raise ValueError(f"epsilon {self.epsilon} per release exceeds the period's epsilon_cap {self.cap}")
        return self

    @model_validator(mode="after")
    def _test_only_switches(self) -> Self:
        if self.mode is PrivacyMode.PRODUCTION:
            if not self.noise:
                raise ValueError("noise = false is a test-only switch; production configs must add noise")
            if self.seed is not None:
                raise ValueError("seed is test-only; production noise comes from a secure generator")
        return self


class StatisticsConfig(Frozen):
    """Optional statistics beyond count, sum and mean. Each is one more vector sum per reading (one more slot
    per cell and a little more noise); all are post-processed from the same noisy release, at no extra budget."""

    variance: bool = False  # sum of squares -> stddev per cell
    quantiles: bool = False  # histogram over `histogram_bins` equal-width bins of the clamp range -> p10, median, p90
    histogram_bins: int = Field(default=16, ge=2, le=256)
