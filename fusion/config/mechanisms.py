"""The config's `[mechanisms]` block: which network the mechanisms recommend on, which released metric gives its
loads, and where the mechanisms' operator keeps its signing key. Only the values live here (pydantic, no scipy):
the mechanisms are in the top-level `mechanisms/` package, imported only by their own commands."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fusion.config.federation import Config


class LoadStatistic(StrEnum):
    """Which statistic of the load metric's cells a bus load follows: the cell's mean (a forecast of it, or the
    release's unclipped `ratio_mean` with `mean_sd`) or its sum (`sum`, `sum_sd`)."""

    MEAN = "mean"
    SUM = "sum"


class MechanismsConfig(BaseModel):
    """`[mechanisms]`: the network file (a path relative to the config, or the name of a shipped network such as
    `case5`), the metric whose forecasts (or releases) give the loads of the buses mapped to regions, and the
    operator's key directory (private: it signs every recommendation)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    network: str = Field(default="case5", min_length=1)
    load_metric: str | None = None
    statistic: LoadStatistic = LoadStatistic.MEAN
    # The reserve a dispatch holds for the loads' uncertainty: z times the SD of the total load (regions
    # independent; buses of one region move together). 1.645: the one-sided 95% quantile of a normal.
    reserve_z: float = Field(default=1.645, ge=0, le=10)
    # Value of lost load ($/MWh): when set, unserved load is allowed at this price (it overrides the network's).
    voll: float | None = Field(default=None, gt=0)
    keys: str = Field(default="mechanism-keys", min_length=1)

    def check(self, config: Config) -> None:
        """Refuse a load metric the federation does not release, and an operator key directory that overlaps a
        place other parties read."""
        from fusion.config.federation import _overlap

        names = [m.name for m in config.metrics]
        if self.load_metric is not None and self.load_metric not in names:
            raise ValueError(f"mechanisms.load_metric = '{self.load_metric}' is not a metric of this federation "
                             f"({', '.join(names)})")
        keys = config.resolve(self.keys)
        for label, other in (("store", config.store_path), ("exchange", config.exchange_path)):
            if _overlap(keys, other):
                raise ValueError(f"mechanisms.keys ({keys}) overlaps federation.{label} ({other}), which other "
                                 "parties read; the operator's signing key stays private")


__all__ = ["LoadStatistic", "MechanismsConfig"]
