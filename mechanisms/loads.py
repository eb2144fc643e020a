"""Bus loads from the common-knowledge store, read only through Fusion's public API (sandboxed SQL).

A bus mapped to a region (`region` and `scale` in the network file) carries `scale` x the region's value of the
configured load metric for the dispatch window: the latest forecast of it when the `forecasts` table holds any
forecast of the metric for that window, else the released cell (its unclipped `ratio_mean` for the mean, or its
`sum`). Either way the value's SD travels with it (a forecast's `sd`, a release's noise SD), and the dispatch
holds a reserve of z x the SD of the total load (regions independent, the buses of one region moving together).
A bus whose region has no forecast (when others do) or no release is refused, naming the bus and the region (and
saying so where the region's release withholds its mean, or where only releases that do not verify hold the
window); so is one whose value is negative (a release's noise on a small load, unclipped), naming the release or
forecast too: a negative load would be generation nobody offered, at no cost, and Fusion does not clip it to 0
silently.

Where the key holder has a release-signing key registered, loads come only from releases `fusion verify` calls
verified or legacy, as forecasts do (forecasting.series): the others (`fusion.api.unverified_releases`, taken once
per recommendation) are left out, a window's latest good release counting, and so is every forecast that read one
of them (its `input_release_ids`). `forecasts` rows are not signed, so a forecast counts only where it replays: it
is computed again from the releases it names and compared, value by value (forecasting.replay); one that does not
(a row written into the store with made-up values or id) is left out like a forecast that read an unverified
release, the region's latest forecast that replays counting. The recommendation's inputs record that releases were
verified and which of the window's releases and forecasts were left out, and why a forecast did not replay.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
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
    """A bus mapped to a region has no forecast or release to take its load from, or only a negative one. `inputs`:
    what the refusal records of the releases and forecasts read (whether releases were verified, those left out)."""

    def __init__(self, message: str, *, inputs: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.inputs = inputs or {}


#: The keys of a recommendation's inputs that record the releases' verification (BusLoads.trust).
TRUST_INPUTS = ("releases_verified", "unverified_releases_skipped", "forecasts_skipped", "forecasts_not_replayed")


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
    trust: dict[str, Any] = field(default_factory=dict)  # what the inputs record of the releases' verification

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
            **self.trust,
        }


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _at(moment: datetime) -> str:
    return f"TIMESTAMPTZ '{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S}+00'"


def read_loads(store: FusedStore | None, network: Network, *, metric: str | None, statistic: LoadStatistic,
               at: datetime, unverified: Mapping[str, str] | None, skip: frozenset[str] = frozenset()) -> BusLoads:
    """The loads of `network`'s buses for the window starting `at`. `unverified`: the releases `fusion verify` does
    not call verified or legacy, with their status (fusion.api.unverified_releases; None where no release-signing
    key is registered: nothing can be verified, every release is read), left out with every forecast that read one.
    `skip`: tables to treat as empty (a replay of a recommendation made before they existed)."""
    fixed = network.fixed_loads()
    regions = network.regions()
    if not regions:
        return BusLoads(fixed, "network")
    if store is None or metric is None:
        raise FusionError(f"network {network.name} maps buses to regions {list(regions)}: set "
                          "[mechanisms] load_metric to the metric whose forecasts or releases give their loads")
    bad = dict(unverified or {})
    forecasts = (_forecasts(store, metric, statistic, at, bad, replay=unverified is not None)
                 if "forecasts" not in skip else _Found({}))
    source = "forecasts" if forecasts.loads else "releases"
    found = forecasts if forecasts.loads else _released(store, metric, statistic, at, bad)
    trust = _trust(unverified, forecasts, found if source == "releases" else None)
    mw = fixed.copy()
    sd = np.zeros(len(mw))
    by_region: dict[str, float] = {}
    for i, bus in enumerate(network.buses):
        if bus.region is None:
            continue
        load = found.loads.get(bus.region)
        if load is None:
            raise MissingLoad(_missing(bus.id, bus.region, metric, statistic, at, source, found, bad), inputs=trust)
        if load.value < 0:
            raise MissingLoad(_negative(bus.id, load, metric, at), inputs=trust)
        mw[i] = bus.scale * load.value if bus.scale is not None else load.value
        sd[i] = (bus.scale or 1.0) * load.sd
        by_region[bus.region] = by_region.get(bus.region, 0.0) + (bus.scale or 1.0) * load.sd
    total_sd = math.sqrt(sum(sd * sd for sd in by_region.values()))
    return BusLoads(mw, source, {r: found.loads[r] for r in regions}, sd, total_sd, trust)


@dataclass(frozen=True)
class _Found:
    """What the forecasts or the releases give for the window: a load per region, and why a region has none."""

    loads: dict[str, RegionLoad]
    withheld: dict[str, str] = field(default_factory=dict)  # region -> its latest good release, no value in it
    left_out: dict[str, tuple[str, ...]] = field(default_factory=dict)  # region -> its forecasts or releases left out
    reads: dict[str, frozenset[str]] = field(default_factory=dict)  # region -> the unverified releases they are or read
    #: region -> its forecasts left out as not replaying (forecasting.replay), each with why
    not_replayed: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def unverified(self) -> frozenset[str]:
        """The unverified releases left out, or read by the forecasts left out."""
        return frozenset(name for names in self.reads.values() for name in names)


def _trust(unverified: Mapping[str, str] | None, forecasts: _Found, releases: _Found | None) -> dict[str, Any]:
    """What a recommendation's inputs record of the releases' verification: `releases_verified` (false where no
    release-signing key is registered), the window's releases left out as unverified (`unverified_releases_skipped`,
    with those the forecasts left out read) and, where there were any, the forecasts left out for reading one
    (`forecasts_skipped`) and those left out as not replaying, each with why (`forecasts_not_replayed`)."""
    if unverified is None:
        return {"releases_verified": False}
    skipped = forecasts.unverified | (releases.unverified if releases is not None else frozenset())
    record: dict[str, Any] = {"releases_verified": True, "unverified_releases_skipped": sorted(skipped)}
    if forecasts.left_out:
        record["forecasts_skipped"] = sorted({f for ids in forecasts.left_out.values() for f in ids})
    if forecasts.not_replayed:
        record["forecasts_not_replayed"] = dict(sorted(
            (f, why) for by_id in forecasts.not_replayed.values() for f, why in by_id.items()))
    return record


def _listed(ids: Iterable[str], statuses: Mapping[str, str], most: int = 5) -> str:
    """'r-a (tampered), r-b (missing) and 3 more'."""
    names = [f"{name} ({statuses[name]})" if name in statuses else name for name in sorted(ids)]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _missing(bus: str, region: str, metric: str, statistic: LoadStatistic, at: datetime, source: str, found: _Found,
             unverified: Mapping[str, str]) -> str:
    when = f"{at.astimezone(UTC):%Y-%m-%dT%H:%MZ}"
    left_out = found.left_out.get(region, ())
    if source == "forecasts":
        read = (f" (its forecasts {_listed(left_out, {})} are left out: they read releases that `fusion verify` "
                f"does not call verified or legacy, {_listed(found.reads[region], unverified)})" if left_out else "")
        forged = found.not_replayed.get(region, {})
        if forged:
            read += (f" (its forecasts {_listed(forged, {})} are left out: they do not replay from the releases they "
                     f"name; {_why(forged)})")
        return (f"no forecast of {metric} for region {region} (bus {bus}) at {when}{read}, though the forecasts "
                f"table holds forecasts for {', '.join(sorted(found.loads))} then: run `fusion forecast --metric "
                f"{metric} --region {region}`, or map bus {bus} to a region that has one")
    also = (f" (releases that `fusion verify` does not call verified or legacy left out: "
            f"{_listed(left_out, unverified)})" if left_out else "")
    release = found.withheld.get(region)
    if release is not None:
        what = ("withholds its mean (its count's interval includes 0, so no mean is released)"
                if statistic is LoadStatistic.MEAN else f"holds no {statistic.value} with its SD")
        return (f"the release {release} of {metric} for region {region} (bus {bus}) at {when} {what}{also}: choose "
                "another time with --at, or map the bus to a region that has data")
    if left_out:
        return (f"no release of {metric} for region {region} (bus {bus}) at {when} that `fusion verify` calls "
                f"verified or legacy; left out: {_listed(left_out, unverified)}. Check `fusion verify`, choose "
                "another time with --at, or map the bus to a region that has data")
    return (f"no release of {metric} for region {region} (bus {bus}) at {when}: release that window first, "
            "choose another time with --at, or map the bus to a region that has data")


def _why(reasons: Mapping[str, str], most: int = 2) -> str:
    """'fc-a: its mean at ... differs; fc-b: ...', at most `most` of them."""
    named = [f"{name}: {why}" for name, why in sorted(reasons.items())]
    return "; ".join(named[:most]) + (f"; and {len(named) - most} more" if len(named) > most else "")


def _negative(bus: str, load: RegionLoad, metric: str, at: datetime) -> str:
    kind, record = load.record.split(":", 1)
    return (f"the {kind} {record} of {metric} for region {load.region} (bus {bus}) at "
            f"{at.astimezone(UTC):%Y-%m-%dT%H:%MZ} is {load.value:g}, below 0 (noise on a small value): a bus load is "
            "at least 0 MW; choose another time with --at, or map the bus to a region with a larger load")


def _ids(names: Iterable[str]) -> str:
    """A SQL list of string literals."""
    return "[" + ", ".join(map(_literal, sorted(names))) + "]"


#: Which of a window's forecasts is its latest: the one from the latest origin (the last window its history holds),
#: then the one that read the latest releases, then the last issued. A genuine forecast replays whenever it is issued,
#: so the order of issue alone would let a copy of an old forecast, appended under a later issued_at, displace one
#: made after more was released.
_LATEST_FORECAST = "origin DESC, releases_version DESC, issued_at DESC, forecast_id DESC"


def _forecasts(store: FusedStore, metric: str, statistic: LoadStatistic, at: datetime,
               unverified: Mapping[str, str], *, replay: bool) -> _Found:
    """The latest forecast per region (`_LATEST_FORECAST`) of `metric` for the window at `at` (none if the table
    holds none), leaving out every forecast that read a release of `unverified` (its `input_release_ids`) and, with
    `replay` (a release-signing key registered), every one that does not replay: `forecasts` rows are not signed, so
    each is computed again from the verified releases it names (forecasting.replay), the latest first, until one per
    region replays. forecasting/ reads only releases that verify when it issues a forecast; one issued before a
    release it read stopped verifying (or before a release-signing key was registered) is left out here."""
    if "forecasts" not in TABLE_SCHEMAS:
        return _Found({})
    where = (f"purpose = 'forecast' AND metric = {_literal(metric)} AND statistic = {_literal(statistic.value)} "
             f"AND window_start = {_at(at)}")
    bad = _ids(unverified)
    table = store.sql(
        f"SELECT forecast_id, issued_at, region, mean, sd FROM forecasts WHERE {where} "
        + (f"AND NOT list_has_any(input_release_ids, {bad}) " if unverified else "")
        + (f"ORDER BY region, {_LATEST_FORECAST}" if replay else
           f"QUALIFY row_number() OVER (PARTITION BY region ORDER BY {_LATEST_FORECAST}) = 1")
    )
    loads, not_replayed = _replayed(store, table.to_pylist(), unverified) if replay else (_loads(table.to_pylist()), {})
    if not unverified:
        return _Found(loads, not_replayed=not_replayed)
    tainted = store.sql(
        f"SELECT DISTINCT region, forecast_id, list_intersect(input_release_ids, {bad}) AS read FROM forecasts "
        f"WHERE {where} AND list_has_any(input_release_ids, {bad})"
    ).to_pylist()
    left_out: dict[str, set[str]] = {}
    reads: dict[str, set[str]] = {}
    for row in tainted:
        left_out.setdefault(row["region"], set()).add(row["forecast_id"])
        reads.setdefault(row["region"], set()).update(row["read"])
    return _Found(loads, left_out={r: tuple(sorted(ids)) for r, ids in left_out.items()},
                  reads={r: frozenset(names) for r, names in reads.items()}, not_replayed=not_replayed)


def _loads(rows: Iterable[dict[str, Any]]) -> dict[str, RegionLoad]:
    """Each region's load from its forecast row (the first of each region in `rows`)."""
    loads: dict[str, RegionLoad] = {}
    for row in rows:
        loads.setdefault(row["region"], RegionLoad(row["region"], float(row["mean"]), float(row["sd"]),
                                                   f"forecast:{row['forecast_id']}"))
    return loads


def _replayed(store: FusedStore, rows: list[dict[str, Any]],
              unverified: Mapping[str, str]) -> tuple[dict[str, RegionLoad], dict[str, dict[str, str]]]:
    """Each region's load from the first of its forecast rows (latest first) whose forecast replays, and the
    forecasts passed over as not replaying (region -> forecast_id -> why). Each forecast is computed again once."""
    from forecasting.replay import ForecastReplay

    loads: dict[str, RegionLoad] = {}
    not_replayed: dict[str, dict[str, str]] = {}
    with ForecastReplay(store, unverified=unverified) as replay:
        for row in rows:
            region = row["region"]
            if region in loads:
                continue
            why = replay.why_not(row["forecast_id"], row["issued_at"])
            if why is None:
                loads[region] = _loads([row])[region]
            else:
                issued = f"{row['issued_at'].astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
                not_replayed.setdefault(region, {}).setdefault(row["forecast_id"], f"(issued {issued}) {why}")
    return loads, not_replayed


#: The two-sided 95% normal quantile the releases' intervals use.
_Z95 = 1.959963984540054


def _released(store: FusedStore, metric: str, statistic: LoadStatistic, at: datetime,
              unverified: Mapping[str, str]) -> _Found:
    """The released cell per region of `metric` for the window at `at`, the latest of the releases not in
    `unverified` (those of the window are named as left out); a cell whose mean is withheld (its count's interval
    includes 0) gives no load, and says so. Rows released before `mean_sd` existed take the SD their 95% interval
    implies (half its width over 1.96), never 0: a load is never treated as exact."""
    mean_sd = f"coalesce(mean_sd, (mean_ci_high - mean_ci_low) / {2 * _Z95!r})"
    value, sd = (("coalesce(ratio_mean, mean)", mean_sd) if statistic is LoadStatistic.MEAN else ("sum", "sum_sd"))
    where = f"metric = {_literal(metric)} AND window_start = {_at(at)}"
    table = store.sql(
        f"SELECT release_id, region, {value} AS value, {sd} AS sd FROM releases WHERE {where} "
        + (f"AND release_id NOT IN ({', '.join(map(_literal, sorted(unverified)))}) " if unverified else "")
        + "QUALIFY row_number() OVER (PARTITION BY region ORDER BY released_at DESC, release_id DESC) = 1"
    ).to_pylist()
    loads = {
        row["region"]: RegionLoad(row["region"], float(row["value"]), float(row["sd"]), f"release:{row['release_id']}")
        for row in table
        if row["value"] is not None and row["sd"] is not None
    }
    withheld = {row["region"]: row["release_id"] for row in table if row["value"] is None}
    if not unverified:
        return _Found(loads, withheld)
    rows = store.sql(
        f"SELECT DISTINCT region, release_id FROM releases WHERE {where} "
        f"AND release_id IN ({', '.join(map(_literal, sorted(unverified)))})"
    ).to_pylist()
    left_out: dict[str, set[str]] = {}
    for row in rows:
        left_out.setdefault(row["region"], set()).add(row["release_id"])
    return _Found(loads, withheld, {r: tuple(sorted(ids)) for r, ids in left_out.items()},
                  {r: frozenset(ids) for r, ids in left_out.items()})


def default_window(store: FusedStore | None, metric: str | None, statistic: LoadStatistic, window: timedelta,
                   unverified: Mapping[str, str] | None) -> datetime:
    """The window a dispatch is for when none is given: the first forecast window after the metric's last release,
    else its last released window, else (no data needed) the current window. Releases of `unverified` do not count,
    nor forecasts that read one or (with `unverified` given: a release-signing key registered) that do not replay:
    read_loads leaves them out, so a row appended with a window of its own does not choose the dispatch's window."""
    if store is not None and metric is not None:
        trusted = (f" AND release_id NOT IN ({', '.join(map(_literal, sorted(unverified)))})" if unverified else "")
        last = store.sql(f"SELECT max(window_start) AS t FROM releases WHERE metric = {_literal(metric)}{trusted}")
        released = last.column("t")[0].as_py()
        if "forecasts" in TABLE_SCHEMAS:
            first = _first_forecast_window(store, metric, statistic, released, unverified)
            if first is not None:
                return first.astimezone(UTC)
        if released is not None:
            return released.astimezone(UTC)
        raise MissingLoad(f"no release or forecast of {metric} in the store yet: release some windows (and run "
                          "`fusion forecast`) first, or pass --at")
    start = datetime.now(UTC)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((start - epoch) // window) * window


def _first_forecast_window(store: FusedStore, metric: str, statistic: LoadStatistic, released: datetime | None,
                           unverified: Mapping[str, str] | None) -> datetime | None:
    """The first window after `released` of a forecast of `metric` that read no release of `unverified` and, with
    `unverified` given, replays (its issues in order of their first window, each computed again once)."""
    where = (f"purpose = 'forecast' AND metric = {_literal(metric)} AND statistic = {_literal(statistic.value)}"
             + (f" AND window_start > {_at(released)}" if released is not None else "")
             + (f" AND NOT list_has_any(input_release_ids, {_ids(unverified)})" if unverified else ""))
    if unverified is None:
        first: datetime | None = store.sql(f"SELECT min(window_start) AS t FROM forecasts WHERE {where}"
                                           ).column("t")[0].as_py()
        return first
    from forecasting.replay import ForecastReplay

    issues = store.sql(f"SELECT forecast_id, issued_at, min(window_start) AS first FROM forecasts WHERE {where} "
                       "GROUP BY forecast_id, issued_at ORDER BY first, issued_at DESC, forecast_id").to_pylist()
    with ForecastReplay(store, unverified=unverified) as replay:
        return next((i["first"] for i in issues if replay.why_not(i["forecast_id"], i["issued_at"]) is None), None)


def forecast_means(store: FusedStore, metric: str, statistic: LoadStatistic, *, since: datetime,
                   unverified: Mapping[str, str] | None) -> dict[datetime, dict[str, float]]:
    """window_start -> region -> the mean of the forecast read_loads takes a region's load from, for each window
    from `since` that has one: the latest (`_LATEST_FORECAST`) that read no release of `unverified` and, with
    `unverified` given, replays (each forecast computed again once)."""
    if "forecasts" not in TABLE_SCHEMAS:
        return {}
    rows = store.sql(
        f"SELECT forecast_id, issued_at, region, window_start, mean FROM forecasts WHERE purpose = 'forecast' "
        f"AND metric = {_literal(metric)} AND statistic = {_literal(statistic.value)} AND window_start >= {_at(since)}"
        + (f" AND NOT list_has_any(input_release_ids, {_ids(unverified)})" if unverified else "")
        + f" ORDER BY window_start, region, {_LATEST_FORECAST}"
    ).to_pylist()
    from forecasting.replay import ForecastReplay

    means: dict[datetime, dict[str, float]] = {}
    with ForecastReplay(store, unverified=unverified) as replay:
        for row in rows:
            taken = means.setdefault(row["window_start"], {})
            if row["region"] in taken:
                continue
            if unverified is None or replay.why_not(row["forecast_id"], row["issued_at"]) is None:
                taken[row["region"]] = float(row["mean"])
    return {start: by_region for start, by_region in means.items() if by_region}


__all__ = ["TRUST_INPUTS", "BusLoads", "MissingLoad", "RegionLoad", "default_window", "forecast_means", "read_loads"]
