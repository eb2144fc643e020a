"""Bus loads from the common-knowledge store, read only through Fusion's public API (sandboxed SQL).

A bus mapped to a region (`region` and `scale` in the network file) carries `scale` x the region's value of the
configured load metric for the dispatch window: the latest forecast of it when the `forecasts` table holds any
forecast of the metric for that window, else the released cell (its unclipped `ratio_mean` for the mean, or its
`sum`). Either way the value's SD travels with it (a forecast's `sd`, a release's noise SD), and the dispatch
holds a reserve of z x the SD of the total load (regions independent, the buses of one region moving together).
A bus whose region has no forecast (when others do) or no release is refused, naming the bus and the region; so is
one whose value is negative (a release's noise on a small load, unclipped), naming the release or forecast too: a
negative load would be generation nobody offered, at no cost, and Fusion does not clip it to 0 silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from fusion.api import FusedStore
from fusion.config.mechanisms import LoadStatistic
from fusion.errors import FusionError
from mechanisms.network import Network
from schemas.tables import TABLE_SCHEMAS


class MissingLoad(FusionError):
    """A bus mapped to a region has no forecast or release to take its load from, or only a negative one."""


@dataclass(frozen=True)
class RegionLoad:
    region: str
    value: float  # the region's statistic (the metric's unit)
    sd: float  # its SD: a forecast's, or the release's noise SD
    record: str  # "forecast:<id>" or "release:<id>"


@dataclass(frozen=True)
class BusLoads:
    mw: np.ndarray  # (B,) MW
    source: str  # "network" (fixed loads only), "forecasts" or "releases"
    regions: dict[str, RegionLoad] = field(default_factory=dict)
    sd: np.ndarray | None = None  # (B,) MW, each bus's SD (scale x its region's)
    total_sd: float = 0.0  # MW, the SD of the total load (regions independent, a region's buses together)

    def margin(self, z: float) -> np.ndarray:
        """(B,) MW per bus of the high-load scenario the dispatch holds reserve for: z x the total load's SD,
        spread over the buses in proportion to their SDs."""
        if self.sd is None or self.sd.sum() <= 0 or z <= 0:
            return np.zeros(len(self.mw))
        return z * self.total_sd * self.sd / self.sd.sum()

    def inputs(self) -> dict[str, Any]:
        """What a recommendation records of where its loads came from."""
        kind = "forecast" if self.source == "forecasts" else "release"
        return {
            "load_source": self.source,
            f"{kind}_ids": sorted({r.record.split(":", 1)[1] for r in self.regions.values()}),
            "region_loads": {r.region: {"value": r.value, "sd": r.sd, "record": r.record}
                             for r in self.regions.values()},
        }


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _at(moment: datetime) -> str:
    return f"TIMESTAMPTZ '{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S}+00'"


def read_loads(store: FusedStore | None, network: Network, *, metric: str | None, statistic: LoadStatistic,
               at: datetime, skip: frozenset[str] = frozenset()) -> BusLoads:
    """The loads of `network`'s buses for the window starting `at`. `skip`: tables to treat as empty (a replay of
    a recommendation made before they existed)."""
    fixed = network.fixed_loads()
    regions = network.regions()
    if not regions:
        return BusLoads(fixed, "network")
    if store is None or metric is None:
        raise FusionError(f"network {network.name} maps buses to regions {list(regions)}: set "
                          "[mechanisms] load_metric to the metric whose forecasts or releases give their loads")
    found = _forecasts(store, metric, statistic, at) if "forecasts" not in skip else {}
    source = "forecasts" if found else "releases"
    if not found:
        found = _released(store, metric, statistic, at)
    mw = fixed.copy()
    sd = np.zeros(len(mw))
    by_region: dict[str, float] = {}
    for i, bus in enumerate(network.buses):
        if bus.region is None:
            continue
        load = found.get(bus.region)
        if load is None:
            raise MissingLoad(_missing(bus.id, bus.region, metric, at, source, found))
        if load.value < 0:
            raise MissingLoad(_negative(bus.id, load, metric, at))
        mw[i] = bus.scale * load.value if bus.scale is not None else load.value
        sd[i] = (bus.scale or 1.0) * load.sd
        by_region[bus.region] = by_region.get(bus.region, 0.0) + (bus.scale or 1.0) * load.sd
    total_sd = math.sqrt(sum(sd * sd for sd in by_region.values()))
    return BusLoads(mw, source, {r: found[r] for r in regions}, sd, total_sd)


def _missing(bus: str, region: str, metric: str, at: datetime, source: str, found: dict[str, RegionLoad]) -> str:
    when = f"{at.astimezone(UTC):%Y-%m-%dT%H:%MZ}"
    if source == "forecasts":
        return (f"no forecast of {metric} for region {region} (bus {bus}) at {when}, though the forecasts table "
                f"holds forecasts for {', '.join(sorted(found))} then: run `fusion forecast --metric {metric} "
                f"--region {region}`, or map bus {bus} to a region that has one")
    return (f"no release of {metric} for region {region} (bus {bus}) at {when}: release that window first, "
            "choose another time with --at, or map the bus to a region that has data")


def _negative(bus: str, load: RegionLoad, metric: str, at: datetime) -> str:
    kind, record = load.record.split(":", 1)
    return (f"the {kind} {record} of {metric} for region {load.region} (bus {bus}) at "
            f"{at.astimezone(UTC):%Y-%m-%dT%H:%MZ} is {load.value:g}, below 0 (noise on a small value): a bus load is "
            "at least 0 MW; choose another time with --at, or map the bus to a region with a larger load")


def _forecasts(store: FusedStore, metric: str, statistic: LoadStatistic, at: datetime) -> dict[str, RegionLoad]:
    """The latest forecast per region of `metric` for the window at `at` (empty if the table holds none)."""
    if "forecasts" not in TABLE_SCHEMAS:
        return {}
    table = store.sql(
        "SELECT forecast_id, region, mean, sd FROM forecasts "
        f"WHERE purpose = 'forecast' AND metric = {_literal(metric)} AND statistic = {_literal(statistic.value)} "
        f"AND window_start = {_at(at)} "
        "QUALIFY row_number() OVER (PARTITION BY region ORDER BY issued_at DESC, forecast_id DESC) = 1"
    )
    return {
        row["region"]: RegionLoad(row["region"], float(row["mean"]), float(row["sd"]), f"forecast:{row['forecast_id']}")
        for row in table.to_pylist()
    }


#: The two-sided 95% normal quantile the releases' intervals use.
_Z95 = 1.959963984540054


def _released(store: FusedStore, metric: str, statistic: LoadStatistic, at: datetime) -> dict[str, RegionLoad]:
    """The released cell per region of `metric` for the window at `at`; a cell whose mean is withheld (its count's
    interval includes 0) gives no load. Rows released before `mean_sd` existed take the SD their 95% interval
    implies (half its width over 1.96), never 0: a load is never treated as exact."""
    mean_sd = f"coalesce(mean_sd, (mean_ci_high - mean_ci_low) / {2 * _Z95!r})"
    value, sd = (("coalesce(ratio_mean, mean)", mean_sd) if statistic is LoadStatistic.MEAN else ("sum", "sum_sd"))
    table = store.sql(
        f"SELECT release_id, region, {value} AS value, {sd} AS sd FROM releases "
        f"WHERE metric = {_literal(metric)} AND window_start = {_at(at)} "
        "QUALIFY row_number() OVER (PARTITION BY region ORDER BY released_at DESC, release_id DESC) = 1"
    )
    return {
        row["region"]: RegionLoad(row["region"], float(row["value"]), float(row["sd"]), f"release:{row['release_id']}")
        for row in table.to_pylist()
        if row["value"] is not None and row["sd"] is not None
    }


def default_window(store: FusedStore | None, metric: str | None, statistic: LoadStatistic,
                   window: timedelta) -> datetime:
    """The window a dispatch is for when none is given: the first forecast window after the metric's last release,
    else its last released window, else (no data needed) the current window."""
    if store is not None and metric is not None:
        last = store.sql(f"SELECT max(window_start) AS t FROM releases WHERE metric = {_literal(metric)}")
        released = last.column("t")[0].as_py()
        if "forecasts" in TABLE_SCHEMAS:
            after = f"AND window_start > {_at(released)}" if released is not None else ""
            first = store.sql(
                f"SELECT min(window_start) AS t FROM forecasts WHERE purpose = 'forecast' AND metric = "
                f"{_literal(metric)} AND statistic = {_literal(statistic.value)} {after}"
            ).column("t")[0].as_py()
            if first is not None:
                return first.astimezone(UTC)
        if released is not None:
            return released.astimezone(UTC)
        raise MissingLoad(f"no release or forecast of {metric} in the store yet: release some windows (and run "
                          "`fusion forecast`) first, or pass --at")
    start = datetime.now(UTC)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((start - epoch) // window) * window


__all__ = ["BusLoads", "MissingLoad", "RegionLoad", "default_window", "read_loads"]
