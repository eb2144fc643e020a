"""`fusion recommend`: run a mechanism on the store's data, sign its recommendation and append it to the store;
`--replay` recomputes a recommendation from the store versions it recorded and compares digests.

A recommendation is only that: nothing in Fusion executes it. Its rows record what it read (store versions,
forecast or release ids, the network's digest, the bids), its parameters and every number it proposes, so anyone
holding the store can check it (`fusion verify`) and recompute it (`--replay`). A refused attempt (an infeasible
network, a load missing for a bus) is recorded too, as a signed refusal, and nothing else is written.

A new recommendation supersedes the one in force for its kind, network and window only where what verifies differs:
the releases and forecasts it read, their values, its parameters or its answer. A run that differs from the one in
force only in what rows written into the store without the key holder can change (UNTRUSTED_INPUTS: the tables'
versions, the releases and forecasts left out as not verified) keeps it in force and writes nothing: such a row must
not displace a decision already made on it. The run's Outcome names what it left out (`fusion recommend` says so),
and `fusion verify` reports the rows themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fusion.api import FusedStore, unverified_releases
from fusion.config.federation import Config
from fusion.config.mechanisms import LoadStatistic, MechanismsConfig
from fusion.errors import FusionError
from mechanisms.authorities import load_operator_key, load_parties
from mechanisms.bids import bids_of, read_bids
from mechanisms.loads import TRUST_INPUTS, MissingLoad, default_window, read_loads
from mechanisms.network import Network, load_network, network_path
from mechanisms.opf import Dispatch, Grid, Infeasible, solve_dispatch
from mechanisms.pareto import sweep
from mechanisms.records import RECORDED, REFUSED, Item, Kind, Recommendation, now, timestamp
from mechanisms.tables import read_recommendation, system_store, verified_recommendations, write_rows
from mechanisms.vcg import run_auction

MECHANISM_VERSION = "1"
MECHANISMS = {Kind.DISPATCH: "dc-opf/highs", Kind.PARETO: "epsilon-constraint/highs",
              Kind.AUCTION: "vcg-clarke/highs"}
ADVISORY = "Advisory only: nothing is executed unless an authority ratifies or overrides it (`fusion decide`)."
#: What a recommendation's inputs record that rows written into the store without the key holder can change: the
#: tables' Delta versions (any commit moves them) and the releases and forecasts left out as not verified or not
#: replaying (mechanisms.loads). A run that differs from the recommendation in force in these alone keeps it in force
#: (`same_verified_basis`).
UNTRUSTED_INPUTS = ("store_versions", "unverified_releases_skipped", "forecasts_skipped", "forecasts_not_replayed")


class ReplayMismatch(FusionError):
    """A replay did not reproduce the recorded digest."""


@dataclass(frozen=True)
class Request:
    """What `fusion recommend` was asked for."""

    kind: Kind
    at: datetime | None = None
    points: int = 41
    carbon_price: float | None = None
    loading_caps: tuple[float, ...] = (1.0,)
    bids: Path | None = None
    voll: float | None = None


@dataclass(frozen=True)
class Outcome:
    recommendation: Recommendation
    written: bool  # False: the store held it already (same inputs, same answer), or it was `kept`
    dispatch: Dispatch | None = None  # the proposed dispatch, for display
    extra: dict[str, Any] = field(default_factory=dict)
    #: True: `recommendation` is the one in force, kept: the run read the same verified releases and forecasts and
    #: gave the same answer, and differed only in UNTRUSTED_INPUTS (what it left out is in extra["left_out"]).
    kept: bool = False


def mechanisms_config(config: Config) -> MechanismsConfig:
    if config.mechanisms is None:
        raise FusionError("the federation config has no [mechanisms] block; add one naming the network and the load "
                          "metric (see docs/mechanisms.md)")
    return config.mechanisms


def recommend(config: Config, request: Request) -> Outcome:
    """Compute, sign and append a recommendation; a refusal is signed, appended and raised."""
    settings = mechanisms_config(config)
    private, public = load_operator_key(config)  # before any work: an unregistered operator signs nothing
    with system_store(config) as store:
        window = config.window
        unverified = _unverified(config, settings.load_metric)
        valid_from = request.at or default_window(store, settings.load_metric, settings.statistic, window, unverified)
        _on_grid(valid_from, window)
        parameters = _parameters(config, settings, request)
        bids = None
        if request.kind is Kind.AUCTION:
            if request.bids is None:
                raise FusionError("fusion recommend auction needs --bids FILE (signed bids; `fusion bid` writes them)")
            bids = read_bids(request.bids, window=valid_from, bidders=load_parties(config).bidders)
        run = _Run(config, request.kind, parameters, valid_from, store.versions, bids, unverified=unverified)
        try:
            recommendation, dispatch, extra = run.compute(store)
        except (Infeasible, MissingLoad) as exc:
            refusal = run.refusal(exc)
            _append(config, store, refusal.signed(private, public, supersedes=None, created_at=now()))
            raise
        head = _head(store, recommendation, load_parties(config).operator_keys)
    if head is not None and same_verified_basis(head, recommendation):
        return Outcome(head, False, dispatch, extra, kept=True)
    supersedes = head.recommendation_id if head is not None else None
    signed = recommendation.signed(private, public, supersedes=supersedes, created_at=now())
    with system_store(config) as store:
        written = _append(config, store, signed)
    return Outcome(signed if written else _stored(config, signed.recommendation_id), written, dispatch, extra)


def replay(config: Config, recommendation_id: str) -> tuple[Recommendation, Recommendation]:
    """(the stored recommendation, its recomputation from the store versions and parameters it recorded)."""
    original = _stored(config, recommendation_id)
    versions = original.inputs.get("store_versions", {})
    network = _network(config, original.parameters)
    recorded = original.inputs.get("network", {}).get("sha256")
    if recorded != network.digest():
        raise ReplayMismatch(
            f"recommendation {recommendation_id} was made on network {original.parameters.get('network')} with "
            f"sha256 {recorded}; the file now has {network.digest()}: restore the network file to replay it"
        )
    pinned = {name: int(v) for name, v in versions.items() if v is not None}
    skip = frozenset(name for name, v in versions.items() if v is None)
    # Under the rule the recommendation recorded: releases verified (now), or not where nothing could be verified
    # then. One made before recommendations recorded it leaves out what does not verify, recording nothing.
    verified = original.inputs.get("releases_verified")
    with system_store(config, versions=pinned) as store:
        unverified = None if verified is False else _unverified(config, original.parameters.get("load_metric"))
        run = _Run(config, Kind(original.kind), original.parameters, original.valid_from, versions,
                   original.inputs.get("bids"), skip=skip, unverified=unverified, record_trust=verified is not None)
        try:
            again, _, _ = run.compute(store)
        except (Infeasible, MissingLoad) as exc:
            again = run.refusal(exc)
    return original, again


def _unverified(config: Config, metric: str | None) -> dict[str, str] | None:
    """The releases `fusion verify` does not call verified or legacy, with their status (None where no
    release-signing key is registered): checked once per recommendation, after its store is opened, so that every
    release it reads is checked; not at all where no load metric is read."""
    return unverified_releases(config) if metric is not None else None


def _stored(config: Config, recommendation_id: str) -> Recommendation:
    with system_store(config) as store:
        found = read_recommendation(store, recommendation_id)
    if found is None:
        raise FusionError(f"no recommendation {recommendation_id} in the store (`fusion sql --config ... \"SELECT "
                          "DISTINCT recommendation_id, kind, valid_from FROM recommendations\"` lists them)")
    return found


def _on_grid(moment: datetime, window: timedelta) -> None:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    if (moment - epoch) % window:
        floor = epoch + ((moment - epoch) // window) * window
        raise FusionError(f"--at {timestamp(moment)} is not on the {window} window grid; use {floor.isoformat()}")


def _parameters(config: Config, settings: MechanismsConfig, request: Request) -> dict[str, Any]:
    if request.voll is not None and not (math.isfinite(request.voll) and request.voll > 0):
        raise FusionError(f"--voll {request.voll:g}: the value of lost load is a finite price above 0 $/MWh (what a "
                          "MW of unserved load costs)")
    if request.carbon_price is not None and not (math.isfinite(request.carbon_price) and request.carbon_price >= 0):
        raise FusionError(f"--carbon-price {request.carbon_price:g}: a finite price of at least 0 $/t")
    params: dict[str, Any] = {
        "network": settings.network, "load_metric": settings.load_metric, "statistic": settings.statistic.value,
        "reserve_z": settings.reserve_z, "voll": request.voll if request.voll is not None else settings.voll,
        "window_seconds": int(config.window.total_seconds()),
    }
    if request.kind is Kind.PARETO:
        if request.points < 2:
            raise FusionError("--points: a frontier needs at least 2 points")
        bad = [c for c in request.loading_caps if not 0 < c <= 1]
        if bad:
            raise FusionError(f"--loading-caps: each a fraction of the lines' limits in (0, 1], got {bad}")
        params |= {"points": request.points, "carbon_price": request.carbon_price,
                   "loading_caps": list(request.loading_caps)}
    return params


def _network(config: Config, parameters: dict[str, Any]) -> Network:
    network = load_network(network_path(str(parameters["network"]), base=config.base))
    strange = sorted(set(network.regions()) - set(config.regions))
    if strange:
        raise FusionError(f"network {network.name} maps buses to {strange}, which are not regions of this "
                          f"federation ({', '.join(config.regions)})")
    return network


class _Run:
    """One computation of a recommendation: its inputs are filled in as they are read, so a refusal records what
    was read before it."""

    def __init__(self, config: Config, kind: Kind, parameters: dict[str, Any], valid_from: datetime,
                 versions: dict[str, int | None], bids: list[dict[str, Any]] | None, *,
                 unverified: dict[str, str] | None, skip: frozenset[str] = frozenset(),
                 record_trust: bool = True) -> None:
        self.config, self.kind, self.parameters = config, kind, parameters
        self.valid_from = valid_from.astimezone(UTC)
        self.valid_to = self.valid_from + timedelta(seconds=int(parameters["window_seconds"]))
        self.network = _network(config, parameters)
        self.skip, self.unverified, self.record_trust = skip, unverified, record_trust
        self.inputs: dict[str, Any] = {
            "network": {"name": self.network.name, "sha256": self.network.digest()},
            "store_versions": {name: versions.get(name) for name in ("releases", "forecasts") if name in versions},
        }
        if bids is not None:
            self.inputs["bids"] = bids
        self.bids = bids

    def _record(self, summary: str, items: list[Item], *, outcome: str = RECORDED,
                refusal: str | None = None) -> Recommendation:
        return Recommendation(
            kind=self.kind.value, mechanism=MECHANISMS[self.kind], mechanism_version=MECHANISM_VERSION,
            valid_from=self.valid_from, valid_to=self.valid_to, regions=self.network.regions(), inputs=self.inputs,
            parameters=self.parameters, summary=summary, items=tuple(items), outcome=outcome, refusal=refusal,
        )

    def _read(self, record: dict[str, Any]) -> None:
        """Add what was read to the inputs (without the releases' verification for a replay of a recommendation
        made before recommendations recorded it)."""
        self.inputs |= {k: v for k, v in record.items() if self.record_trust or k not in TRUST_INPUTS}

    def refusal(self, exc: Exception) -> Recommendation:
        if isinstance(exc, MissingLoad):
            self._read(exc.inputs)
        what = "load" if isinstance(exc, MissingLoad) else "infeasible"
        return self._record(f"refused: {exc}", [Item.of("refusal", what, None, None)], outcome=REFUSED,
                            refusal=str(exc))

    def compute(self, store: FusedStore) -> tuple[Recommendation, Dispatch, dict[str, Any]]:
        grid = Grid.from_network(self.network)
        loads = read_loads(store, self.network, metric=self.parameters["load_metric"],
                           statistic=LoadStatistic(self.parameters["statistic"]), at=self.valid_from,
                           unverified=self.unverified, skip=self.skip)
        self._read(loads.inputs())
        margin = loads.margin(float(self.parameters["reserve_z"]))
        reserve = margin if margin.sum() > 0 else None
        voll = self.parameters["voll"]
        extra: dict[str, Any] = {"reserve_mw": float(margin.sum()), "loads": loads, "left_out": {
            name: (self.unverified or {}).get(name, "unverified")
            for name in loads.trust.get("unverified_releases_skipped", ())},
            "not_replayed": dict(loads.trust.get("forecasts_not_replayed", {}))}
        uncertainty = _reserve_items(self.network, margin, loads.total_sd)
        if self.kind is Kind.DISPATCH:
            dispatch = solve_dispatch(grid, loads.mw, reserve=reserve, voll=voll)
            items = dispatch_items(dispatch) + uncertainty
            summary = _dispatch_summary(dispatch, loads.source, float(margin.sum()))
        elif self.kind is Kind.PARETO:
            frontier = sweep(grid, loads.mw, points=int(self.parameters["points"]),
                             loading_caps=tuple(self.parameters["loading_caps"]),
                             carbon_price=self.parameters["carbon_price"], reserve=reserve, voll=voll)
            dispatch = frontier.points[frontier.proposed].dispatch
            items = dispatch_items(dispatch) + uncertainty + [
                Item.of("proposed_point", "index", frontier.proposed, None)]
            for p in frontier.points:
                key = f"{p.index:03d}"
                items += [Item.of("frontier_cost", key, p.cost, "$/h"), Item.of("frontier_co2", key, p.co2, "t/h"),
                          Item.of("frontier_carbon_price", key, p.carbon_price, "$/t"),
                          Item.of("frontier_max_loading", key, p.dispatch.max_loading, "fraction"),
                          Item.of("frontier_loading_cap", key, p.loading_cap, "fraction")]
                items += [Item.of("frontier_dispatch_mw", f"{key}/{unit}", mw, "MW")
                          for unit, mw in p.dispatch.by_unit().items()]
            items += [Item.of("skipped_loading_cap", f"{alpha:g}", alpha, "fraction") for alpha, _ in frontier.skipped]
            skipped = "".join(f" Loading cap {alpha:g} skipped: no dispatch is feasible under it ({why})."
                              for alpha, why in frontier.skipped)
            summary = f"{frontier.rationale}. {len(frontier.points)} frontier points.{skipped} {ADVISORY}"
            extra["frontier"] = frontier
        else:
            auction = run_auction(grid, loads.mw, bids_of(self.bids or []), voll=voll)
            dispatch = auction.dispatch
            items = dispatch_items(dispatch)
            for o in auction.outcomes:
                items += [Item.of("allocation_mw", o.bidder, o.allocation_mw, "MW"),
                          Item.of("bid_cost", o.bidder, o.bid_cost, "$/h"),
                          Item.of("vcg_payment", o.bidder, o.vcg_payment, "$/h"),
                          Item.of("lmp_payment", o.bidder, o.lmp_payment, "$/h"),
                          Item.of("pivotal", o.bidder, float(o.pivotal), None)]
            ratio = auction.vcg_total / auction.lmp_total if auction.lmp_total > 0 else float("inf")
            items += [Item.of("objective", "vcg_total", auction.vcg_total, "$/h"),
                      Item.of("objective", "lmp_total", auction.lmp_total, "$/h")]
            pivotal = [o.bidder for o in auction.outcomes if o.pivotal]
            summary = (
                f"VCG payments {auction.vcg_total:,.2f} $/h against {auction.lmp_total:,.2f} $/h under LMP "
                f"settlement ({ratio:.2f}x" + (f"; pivotal: {', '.join(pivotal)}, paid off the value of lost load"
                                                if pivotal else "")
                + "): VCG is a diagnostic, the rent of truthful bidding; settle on LMPs. " + ADVISORY
            )
            extra["auction"] = auction
        return self._record(summary, items), dispatch, extra


def dispatch_items(d: Dispatch) -> list[Item]:
    """A dispatch in long form: loads, MW per unit, flows, LMPs with their parts, shadow prices, objectives."""
    items = [Item.of("load_mw", b, v, "MW") for b, v in zip(d.bus_ids, d.loads.tolist(), strict=True)]
    items += [Item.of("dispatch_mw", u, v, "MW") for u, v in zip(d.supply_ids, d.mw.tolist(), strict=True)]
    items += [Item.of("flow_mw", line, v, "MW") for line, v in zip(d.line_ids, d.flows.tolist(), strict=True)]
    for name, values in (("lmp", d.lmp), ("lmp_congestion", d.congestion)):
        items += [Item.of(name, b, v, "$/MWh") for b, v in zip(d.bus_ids, values.tolist(), strict=True)]
    items += [Item.of("lmp_energy", b, d.energy, "$/MWh") for b in d.bus_ids]
    if d.shed.sum() > 0:
        items += [Item.of("shed_mw", b, v, "MW") for b, v in zip(d.bus_ids, d.shed.tolist(), strict=True) if v > 0]
    if d.reserve_price is not None:
        items += [Item.of("reserve_mw", u, v, "MW") for u, v in zip(d.supply_ids, d.reserve.tolist(), strict=True)]
        items += [Item.of("reserve_price", b, v, "$/MWh")
                  for b, v in zip(d.bus_ids, d.reserve_price.tolist(), strict=True)]
    items += [Item.of("shadow_price", b.constraint, b.shadow_price, b.unit) for b in d.binding]
    items += [Item.of("objective", "cost", d.cost, "$/h"), Item.of("objective", "co2", d.co2, "t/h"),
              Item.of("objective", "max_loading", d.max_loading, "fraction")]
    return items


def _reserve_items(network: Network, margin: np.ndarray, total_sd: float) -> list[Item]:
    """The loads' uncertainty as stated in a recommendation: the total load's SD, and the high-load scenario the
    dispatch holds deliverable reserve for (MW added per bus: the override re-solve reads them back)."""
    return [Item.of("uncertainty", "load_sd", total_sd, "MW"),
            Item.of("uncertainty", "reserve", float(margin.sum()), "MW"),
            *(Item.of("reserve_margin_mw", b.id, m, "MW")
              for b, m in zip(network.buses, margin.tolist(), strict=True) if m > 0)]


def _dispatch_summary(d: Dispatch, source: str, reserve: float) -> str:
    binding = ", ".join(f"{b.constraint} ({b.shadow_price:,.2f} {b.unit})" for b in d.binding
                        if b.constraint.startswith("line") or b.constraint in ("reserve", "co2 cap")) or "none"
    shed = f"; {d.shed.sum():,.2f} MW unserved" if d.shed.sum() > 0 else ""
    return (
        f"least-cost dispatch of {d.loads.sum():,.2f} MW (loads from {source}; reserve {reserve:,.2f} MW held for "
        f"their uncertainty{shed}): {d.cost:,.2f} $/h, {d.co2:,.3f} t/h; LMPs {d.lmp.min():,.2f} to "
        f"{d.lmp.max():,.2f} $/MWh (energy {d.energy:,.2f}); binding: {binding}. {ADVISORY}"
    )


def same_verified_basis(recorded: Recommendation, again: Recommendation) -> bool:
    """Whether `again` holds what `recorded` holds but for UNTRUSTED_INPUTS: the same verified releases and forecasts
    read, with the same values, the same parameters, network and answer (every item, the summary)."""

    def basis(recommendation: Recommendation) -> dict[str, Any]:
        inputs = {k: v for k, v in recommendation.inputs.items() if k not in UNTRUSTED_INPUTS}
        return replace(recommendation, inputs=inputs).content()

    return basis(recorded) == basis(again)


def _head(store: FusedStore, recommendation: Recommendation,
          operator_keys: tuple[bytes, ...]) -> Recommendation | None:
    """The latest recorded recommendation of the same kind, network and window that nothing supersedes yet: the
    one in force, which a new recommendation replaces. Only recommendations that verify count, as heads and as
    superseding: a row written into the store without the operator's key neither hides a head nor becomes one."""
    same = [
        r for r in verified_recommendations(
            store,
            f"kind = '{recommendation.kind}' AND outcome = 'recorded' AND valid_from = TIMESTAMPTZ "
            f"'{recommendation.valid_from:%Y-%m-%d %H:%M:%S}+00'",
            operator_keys,
        ).values()
        if r.recommendation_id != recommendation.recommendation_id
        and r.parameters.get("network") == recommendation.parameters.get("network")
    ]
    replaced = {r.supersedes for r in same}
    heads = sorted((r for r in same if r.recommendation_id not in replaced),
                   key=lambda r: (r.created_at or datetime.min.replace(tzinfo=UTC), r.recommendation_id))
    return heads[-1] if heads else None


def _append(config: Config, store: FusedStore, recommendation: Recommendation) -> bool:
    if read_recommendation(store, recommendation.recommendation_id) is not None:
        return False
    return write_rows(config, "recommendations", recommendation.rows()) > 0


def fixed_loads_of(recommendation: Recommendation, network: Network) -> np.ndarray:
    """The bus loads a recommendation was computed for (its load_mw items), in the network's bus order."""
    loads = recommendation.items_of("load_mw")
    return np.array([loads[b.id] or 0.0 for b in network.buses])


def network_of(config: Config, recommendation: Recommendation) -> Network:
    """The network a recommendation was made on, refused if the file changed since."""
    network = _network(config, recommendation.parameters)
    if recommendation.inputs.get("network", {}).get("sha256") != network.digest():
        raise FusionError(f"the network file of recommendation {recommendation.recommendation_id} changed since it "
                          "was made; restore it to re-solve")
    return network


__all__ = [
    "ADVISORY", "UNTRUSTED_INPUTS", "Outcome", "ReplayMismatch", "Request", "dispatch_items", "fixed_loads_of",
    "network_of", "recommend", "replay", "same_verified_basis",
]
