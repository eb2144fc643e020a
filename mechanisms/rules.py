"""The rules a decision must meet, in one place: `fusion decide` refuses a decision that breaks one, and `fusion
verify` reports a stored decision that breaks one as `invalid` (never in effect), whoever wrote its row.

Static checks only, over the registry and the stored recommendations: the authority and its signer's key
registered, the recommendation within the authority's scope (kinds, regions), intact and the one decided on, a
recorded recommendation (not a refused attempt), not superseded when the decision was made, a known action, a
reason code for an override or a rejection, what is adopted consistent with the action, and an effect that ends
after it starts. Whether an override can be re-solved needs the solver: `decide` checks that after these. Imports
no solver.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from mechanisms.authorities import Parties
from mechanisms.records import RECORDED, Action, Adopted, Decision, Kind, ReasonCode, Recommendation, timestamp


def why_refused(
    parties: Parties,
    recommendation: Recommendation,
    decision: Decision,
    *,
    signer: str,
    key: bytes,
    superseding: Mapping[str, datetime],
    at: datetime | None,
) -> str | None:
    """Why `signer`, holding `key`, may not make `decision` on `recommendation`, or None. `superseding`: the recorded
    recommendations that name this one as superseded and verify (id -> created_at); one created before `at` (the
    decision's time; None: any) makes it superseded."""
    name = decision.authority
    authority = parties.authorities.get(name)
    if authority is None:
        return f"authority {name} is not registered under [[authorities]] in the registry"
    if not authority.holds(signer, key, at):
        return (
            f"the key {key.hex()[:16]}... is not registered for authority {name}'s signer {signer} "
            f"(`fusion mechanism-keys --authority {name} --signer {signer}` registers one)"
        )
    scope = authority.out_of_scope(recommendation.kind, recommendation.regions)
    if scope:
        return scope
    rid = recommendation.recorded_id or recommendation.recommendation_id  # computed: not over a non-finite value
    tampered = recommendation.tampered(parties.operator_keys)
    if tampered:
        return f"recommendation {rid} is tampered: {tampered}"
    if decision.recommendation_sha256 != recommendation.recorded_digest:  # intact: its digest, not recomputed
        return f"recommendation {rid} has another digest than the one decided on"
    if recommendation.outcome != RECORDED:
        return f"recommendation {rid} is a refused attempt, not a recommendation"
    newer = sorted(i for i, created in superseding.items() if at is None or created < at)
    if newer:
        return (
            f"recommendation {rid} is superseded by {newer[0]} (newer inputs for the same window): decide on {newer[0]}"
        )
    if decision.action not in {a.value for a in Action}:
        return f"unknown action {decision.action!r} (ratify, override or reject)"
    codes = ", ".join(c.value for c in ReasonCode)
    if decision.action != Action.RATIFY.value and decision.reason_code is None:
        article = "an" if decision.action == Action.OVERRIDE.value else "a"
        return f"{article} {decision.action} needs a reason code (--reason-code: {codes})"
    if decision.reason_code is not None and decision.reason_code not in {c.value for c in ReasonCode}:
        return f"unknown reason code {decision.reason_code!r} ({codes})"
    if decision.action == Action.OVERRIDE.value and not decision.adopted:
        return "an override names what it changes: --set UNIT=MW (dispatch, auction) or --point N (pareto)"
    if decision.action == Action.RATIFY.value and decision.adopted != ratified(recommendation):
        return "a ratification adopts the recommendation as it is (its proposed point, for a frontier)"
    if decision.action == Action.REJECT.value and decision.adopted:
        return "a rejection adopts nothing"
    start, end = decision.effective_from, decision.effective_to
    if start is not None and end is not None and start >= end:
        return (f"its effect would end ({timestamp(end)}, --effective-to) no later than it starts "
                f"({timestamp(start)}, --effective-from)")
    return None


def ratified(recommendation: Recommendation) -> tuple[Adopted, ...]:
    """What a ratification adopts: a frontier's proposed point; nothing else (the recommendation as it is)."""
    proposed = proposed_point(recommendation)
    return (Adopted("point", float(proposed), "index"),) if proposed is not None else ()


def proposed_point(recommendation: Recommendation) -> int | None:
    if recommendation.kind != Kind.PARETO.value or recommendation.outcome != RECORDED:
        return None
    value = recommendation.items_of("proposed_point").get("index")
    return None if value is None else int(value)


def signed_by_registered(parties: Parties, decision: Decision) -> bool:
    """Whether a stored decision row carries a valid signature by a key registered for its authority's signer when
    it was made (a key retired since counts for what it signed before)."""
    authority = parties.authorities.get(decision.authority)
    try:
        key = bytes.fromhex(decision.signer_key)
    except ValueError:
        return False
    return (authority is not None and authority.holds(decision.signer, key, decision.decided_at)
            and decision.signature_valid())


__all__ = ["proposed_point", "ratified", "signed_by_registered", "why_refused"]
