"""`fusion decide`: an authority's signer ratifies, overrides or rejects a recommendation.

A decision is refused, recorded as a refusal (signed with the key presented) and raised, when: the authority or
the key is not registered, the recommendation is outside the authority's scope (regions, kinds), the
recommendation is tampered (its rows differ from its digest, or its signature is not the operator's), superseded
by a newer one, or a refused attempt itself; an override or a rejection has no reason code; its effect would end
no later than it starts; an override cannot be re-solved (an unknown unit, MW outside its range, a network left
infeasible); a ratification of a recommendation that read a release `fusion verify` does not call verified or legacy
(`mechanisms.inputs`, checked for that recommendation alone: it would adopt what that release says; an override, or
a fresh recommendation, is the way). Nothing else is written then. The static checks are
`mechanisms.rules.why_refused`, which `fusion verify` applies to every stored decision too.

An override's cost impact is found by re-solving the recommendation's own problem (its network, recorded loads,
reserve and value of lost load) with the override fixed: CAISO's price-impact analysis of exceptional dispatch.
The decision's id hashes its content, so k signers of a k-of-n authority sign one id (`--join`): it takes effect
once k have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from fusion.api import FusedStore, unverified_releases
from fusion.config.federation import Config
from fusion.errors import FusionError
from mechanisms.authorities import load_parties, load_private, signer_key_file
from mechanisms.bids import bids_of
from mechanisms.inputs import ReleaseTrust, UnverifiedRead, unverified_reads
from mechanisms.opf import Grid, Infeasible, solve_dispatch
from mechanisms.recommend import fixed_loads_of, network_of
from mechanisms.records import RECORDED, REFUSED, Action, Adopted, Decision, Kind, ReasonCode, Recommendation, now
from mechanisms.rules import proposed_point, ratified, signed_by_registered, why_refused
from mechanisms.tables import read_decisions, read_recommendation, read_superseding, system_store, write_rows
from mechanisms.vcg import bid_supply

ROUND = 6


class DecisionRefused(FusionError):
    """A decision that may not be made; it is recorded as a refusal in `decisions`."""


@dataclass(frozen=True)
class DecideRequest:
    action: Action
    recommendation_id: str
    authority: str
    signer: str
    key_file: Path | None = None
    reason_code: ReasonCode | None = None
    reason: str | None = None
    set_mw: tuple[tuple[str, float], ...] = ()  # an override's units and MW
    point: int | None = None  # the frontier point adopted (pareto)
    effective_from: datetime | None = None
    effective_to: datetime | None = None
    join: str | None = None  # a decision of the same authority to co-sign

    def __post_init__(self) -> None:
        """A signed decision holds finite numbers only: a --set MW that is not one is refused before anything is
        decided (like a --set that is not UNIT=MW), so it is not recorded."""
        bad = next(((unit, mw) for unit, mw in self.set_mw if not math.isfinite(mw)), None)
        if bad is not None:
            raise FusionError(f"--set {bad[0]}={bad[1]}: a unit's MW is a finite number")


@dataclass(frozen=True)
class DecisionOutcome:
    decision: Decision
    written: bool  # False: this signer had signed this decision already
    signatures: int  # distinct signers of this decision so far
    threshold: int
    #: What the recommendation read that `fusion verify` does not call verified or legacy (an override's only: a
    #: ratification of such a recommendation is refused); None when all it read verifies.
    unverified_input: UnverifiedRead | None = None

    @property
    def effective(self) -> bool:
        return self.decision.outcome == RECORDED and self.signatures >= self.threshold


def decide(config: Config, request: DecideRequest) -> DecisionOutcome:
    key_file = request.key_file or signer_key_file(config, request.authority, request.signer)
    private, public = load_private(key_file, f"{request.authority}/{request.signer}'s signing key "
                                             "(`fusion mechanism-keys --authority ID --signer NAME`)")
    parties = load_parties(config)
    decided_at = now()  # before the checks: a recommendation superseded after this moment does not undo them
    with system_store(config) as store:  # whatever the [sql] bounds on people's queries
        try:
            recommendation = read_recommendation(store, request.recommendation_id)
        except FusionError:  # the store could not be read (a file, the disk): nothing to say of the recommendation
            raise
        except ValueError as exc:  # rows that no longer form one recommendation
            raise _refuse(config, _draft_bare(request), private, public, request.signer,
                          f"recommendation {request.recommendation_id} is tampered: {exc}") from None
        if recommendation is None:
            raise FusionError(f"no recommendation {request.recommendation_id} in the store")
        draft = _draft(store, recommendation, request)
        why = why_refused(
            parties,
            recommendation,
            draft,
            signer=request.signer,
            key=public,
            superseding=read_superseding(store, request.recommendation_id, parties.operator_keys),
            at=decided_at,
        )
        unverified = None
        if why is None and draft.action in (Action.RATIFY.value, Action.OVERRIDE.value):
            unverified = _unverified_read(config, store, recommendation)
            if unverified is not None and draft.action == Action.RATIFY.value:
                why = (f"{unverified.why(f'recommendation {recommendation.recommendation_id}')}; a ratification "
                       "would adopt it as it is: override it (with a reason code), or ratify a fresh recommendation "
                       "(`fusion recommend` leaves such releases out)")
        if why is None:
            try:
                draft = _with_override(config, recommendation, draft, request)
            except (Infeasible, FusionError) as exc:
                why = f"the override cannot be re-solved: {exc}"
        if why is not None:
            raise _refuse(config, draft, private, public, request.signer, why)
        draft = replace(draft, previous_decision_id=_previous(store, draft))
    signed = draft.signed(private, public, signer=request.signer, decided_at=decided_at)
    written = write_rows(config, "decisions", signed.rows()) > 0
    with system_store(config) as store:
        signers = {d.signer for d in _recorded(store, request.recommendation_id)
                   if d.decision_id == signed.decision_id and signed_by_registered(parties, d)}
    return DecisionOutcome(signed, written, len(signers), parties.authorities[request.authority].threshold,
                           unverified)


def _unverified_read(config: Config, store: FusedStore, recommendation: Recommendation) -> UnverifiedRead | None:
    """What `recommendation` read that `fusion verify` does not call verified or legacy, as the audit finds it
    (`mechanisms.inputs`), checked for it alone; None when all it read verifies or nothing can be verified."""
    rid = recommendation.recommendation_id
    return unverified_reads(store, {rid: recommendation}, ReleaseTrust(lambda: unverified_releases(config))).get(rid)


def _draft_bare(request: DecideRequest) -> Decision:
    return Decision(request.recommendation_id, "", request.action.value, request.authority, request.effective_from,
                    request.effective_to, _code(request), request.reason)


def _code(request: DecideRequest) -> str | None:
    return request.reason_code.value if request.reason_code else None


def _draft(store: FusedStore, recommendation: Recommendation, request: DecideRequest) -> Decision:
    """The decision as asked, before checks: its content is what the signers sign."""
    if request.join:
        joined = [d for d in _recorded(store, request.recommendation_id) if d.decision_id == request.join]
        if not joined:
            raise FusionError(f"--join {request.join}: no recorded decision of that id on recommendation "
                              f"{request.recommendation_id}")
        first = joined[0]
        if first.authority != request.authority or first.action != request.action.value:
            raise FusionError(f"--join {request.join}: that decision is authority {first.authority}'s "
                              f"{first.action}, not {request.authority}'s {request.action.value}")
        return replace(first, signer="", signer_key="", decided_at=None, signature="")
    if request.action is Action.RATIFY and request.set_mw:
        raise FusionError("ratify adopts the recommendation as it is; changing MW is an override (with --set and "
                          "a reason code)")
    proposed = proposed_point(recommendation)
    if request.action is Action.RATIFY and request.point is not None and request.point != proposed:
        raise FusionError(f"ratify adopts the proposed point {proposed}; adopting point {request.point} is an "
                          "override (`fusion decide override --point N --reason-code ...`)")
    adopted = ratified(recommendation) if request.action is Action.RATIFY else ()
    if request.action is Action.OVERRIDE:
        adopted = tuple(Adopted(unit, float(mw), "MW") for unit, mw in request.set_mw)
        if request.point is not None:
            adopted = (Adopted("point", float(request.point), "index"), *adopted)
    return Decision(
        recommendation_id=request.recommendation_id,
        recommendation_sha256=recommendation.recorded_digest or recommendation.digest,
        action=request.action.value, authority=request.authority,
        effective_from=request.effective_from or recommendation.valid_from,
        effective_to=request.effective_to or recommendation.valid_to,
        reason_code=_code(request), reason=request.reason, adopted=adopted,
    )


def _with_override(config: Config, recommendation: Recommendation, draft: Decision,
                   request: DecideRequest) -> Decision:
    """An override's deviation (MW moved from the recommendation) and cost impact ($/h, re-solved)."""
    if draft.action != Action.OVERRIDE.value or request.join:
        return draft
    kind = recommendation.kind
    recommended = recommendation.items_of("dispatch_mw")
    fixed = {a.item_key: a.value for a in draft.adopted if a.unit == "MW"}
    if kind == Kind.PARETO.value:
        if fixed:
            raise FusionError("a Pareto recommendation is overridden by choosing another frontier point (--point N)")
        point, proposed = int(request.point or 0), proposed_point(recommendation)
        costs = recommendation.items_of("frontier_cost")
        key, base = f"{point:03d}", f"{proposed:03d}"
        if key not in costs:
            raise FusionError(f"--point {point}: the frontier has points 0 to {len(costs) - 1}")
        if point == proposed:
            raise FusionError(f"point {point} is the proposed one: that is a ratification")
        mw = recommendation.items_of("frontier_dispatch_mw")
        units = sorted({k.split("/", 1)[1] for k in mw})
        deviation = sum(abs((mw[f"{key}/{u}"] or 0.0) - (mw[f"{base}/{u}"] or 0.0)) for u in units)
        impact = (costs[key] or 0.0) - (costs[base] or 0.0)
        return replace(draft, deviation_mw=round(deviation, ROUND), cost_impact=round(impact, ROUND))
    if request.point is not None:
        raise FusionError("--point chooses a point of a Pareto frontier; this recommendation is a " + kind)
    network = network_of(config, recommendation)
    grid = Grid.from_network(network)
    loads = fixed_loads_of(recommendation, network)
    voll = recommendation.parameters.get("voll")
    if kind == Kind.AUCTION.value:
        supply = bid_supply(grid, bids_of(recommendation.inputs.get("bids", [])))
        again = solve_dispatch(grid, loads, supply=supply, voll=voll, fixed=fixed)
    else:
        margins = recommendation.items_of("reserve_margin_mw")
        reserve = np.array([margins.get(b.id) or 0.0 for b in network.buses]) if margins else None
        again = solve_dispatch(grid, loads, reserve=reserve, voll=voll, fixed=fixed)
    deviation = sum(abs(mw - (recommended.get(unit) or 0.0)) for unit, mw in fixed.items())
    impact = again.cost - (recommendation.items_of("objective").get("cost") or 0.0)
    return replace(draft, deviation_mw=round(deviation, ROUND), cost_impact=round(impact, ROUND))


def _previous(store: FusedStore, draft: Decision) -> str | None:
    """The latest other decision of this authority on this recommendation (what this one follows)."""
    earlier = [d for d in _recorded(store, draft.recommendation_id)
               if d.authority == draft.authority and d.decision_id != draft.decision_id]
    earlier.sort(key=lambda d: (d.decided_at or now(), d.decision_id))
    return earlier[-1].decision_id if earlier else None


def _recorded(store: FusedStore, recommendation_id: str) -> list[Decision]:
    """The recorded decisions on a recommendation. A row holding a non-finite number is none: Fusion never writes
    one, and no id can be computed over it (`fusion verify` reports it as tampered)."""
    return [d for d in read_decisions(store, recommendation_id=recommendation_id)
            if d.outcome == RECORDED and d.non_finite() is None]


def _refuse(config: Config, draft: Decision, private: bytes, public: bytes, signer: str, why: str) -> DecisionRefused:
    """Record a refused decision (signed with the key presented) and return the error to raise."""
    record = replace(draft, outcome=REFUSED, refusal=why, deviation_mw=None, cost_impact=None)
    write_rows(config, "decisions", record.signed(private, public, signer=signer, decided_at=now()).rows())
    return DecisionRefused(f"decision refused (recorded in `decisions`): {why}")


__all__ = ["DecideRequest", "DecisionOutcome", "DecisionRefused", "decide"]
