"""Auditing the mechanisms' tables: `fusion verify` checks every recommendation and decision against the registry,
and `fusion decisions` reports the overrides (FERC Order 844 and CAISO exceptional-dispatch style: counts, reasons,
MW moved and cost impact, per period and authority). Reads only; imports no solver.

A recommendation is `verified` when its rows still hold the content its digest names and the registered operator
(current or retired key) signed that digest. A decision is `tampered` unless its id is the hash of its content,
its signature is valid under the key it names, that key is registered for its authority's signer (a key retired
since counts for decisions dated before its retirement), and the recommendation it decides on still verifies with
the digest it names; it is then `invalid` (never in effect) when it breaks a rule `fusion decide` enforces
(`mechanisms.rules`: scope, a refused or superseded recommendation, reason codes, what it adopts), else
`verified`. A decision takes effect once `threshold` distinct registered
signers of its authority have signed its id. Refused attempts are `refusal`s when signed by a key registered for
the signer they name, else `unattested` (a refusal anyone could have written: not counted as that signer's).
A recommendation that verifies but read a release `fusion verify` does not call verified or legacy (itself, or
through a forecast it read: `mechanisms.inputs`) is `unverified_input`, naming the releases; so is a decision on it
that would otherwise be `verified` (its signatures count towards its threshold as a verified one's: it is in effect,
flagged). `tampered`, `invalid` and `unverified_input` make `fusion verify` fail. A row holding a NaN or an
infinity, which Fusion never writes (no digest or id is computed over one), is `tampered`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from fusion.api import FusedStore, unverified_releases
from fusion.config.federation import Config
from mechanisms.authorities import Parties, load_parties
from mechanisms.inputs import UNVERIFIED_INPUT, ReleaseTrust, UnverifiedRead, unverified_reads
from mechanisms.records import RECORDED, Decision, Recommendation
from mechanisms.rules import signed_by_registered, why_refused
from mechanisms.tables import audit_store, read_decisions, recommendation_pages, superseding_of

#: Statuses that make `fusion verify` fail: rows Fusion did not write as they are (`tampered`), decisions that
#: `fusion decide` would have refused (`invalid`), and recommendations that read a release `fusion verify` does not
#: call verified or legacy, with the decisions on them (`unverified_input`).
FAILING = frozenset({"tampered", "invalid", UNVERIFIED_INPUT})
#: The statuses of a decision whose signature counts towards its authority's threshold.
SIGNED = frozenset({"verified", UNVERIFIED_INPUT})


@dataclass(frozen=True)
class RecordCheck:
    table: str  # "recommendations" | "decisions"
    record_id: str
    status: str  # "verified" | "refusal" | "unattested" | "unverified_input" | "invalid" | "tampered"
    effect: str  # a recommendation's kind and outcome; a decision's action and its signatures of the threshold
    reason: str


@dataclass(frozen=True)
class Audit:
    """What `fusion verify` finds in the mechanisms' tables: a check of each recommendation, in order of id, and each
    decision row with its own check, in the order the table holds them. A row's check is carried with it: a copy of
    a row, changed or not, shares the id it carries and its signer, never its check."""

    recommendations: list[RecordCheck]
    decisions: list[tuple[Decision, RecordCheck]]
    #: The recommendations decided on that read a release `fusion verify` does not call verified or legacy, by id:
    #: what they read (their decisions are `unverified_input`).
    unverified_inputs: dict[str, UnverifiedRead] = field(default_factory=dict)

    @property
    def checks(self) -> list[RecordCheck]:
        """The checks as `fusion verify` lists them: the recommendations', then the decisions'."""
        return self.recommendations + [check for _, check in self.decisions]


#: How the audit takes the releases `fusion verify` does not call verified or legacy, with their status (None where
#: no release-signing key is registered): `fusion.api.unverified_releases` unless the caller keeps them already.
Unverified = Callable[[], Mapping[str, str] | None]


def verify_mechanisms(config: Config, store: FusedStore, *, unverified: Unverified | None = None) -> list[RecordCheck]:
    """The checks `fusion verify` lists (`audit_mechanisms`), without the rows they are of."""
    return audit_mechanisms(config, store, unverified=unverified).checks


def audit_mechanisms(config: Config, store: FusedStore, *, unverified: Unverified | None = None) -> Audit:
    """Every recommendation and decision in the snapshot `store` reads, checked. The tables are read whole, however
    large, under limits of the audit's own (`mechanisms.tables.audit_store`), `recommendations` a page at a time:
    what is held is a check per row or recommendation, and the recommendations decided on. `unverified`: how to take
    the releases `fusion verify` does not call verified or legacy (default: `fusion.api.unverified_releases`), called
    once, and only when a recommendation names a release or forecast it read."""
    parties = load_parties(config)
    trust = ReleaseTrust(unverified or (lambda: unverified_releases(config)))
    with audit_store(store) as audited:
        decisions = read_decisions(audited)
        decided = {decision.recommendation_id for decision in decisions}
        recommendations: list[RecordCheck] = []
        intact: dict[str, Recommendation] = {}  # those decided on that verify, by id
        flagged: dict[str, UnverifiedRead] = {}  # those decided on that read a release that does not verify
        # A recommendation decided on -> those that verify superseding it (one that does not verify supersedes nothing).
        superseding: dict[str, dict[str, datetime]] = {}
        for page in recommendation_pages(audited):
            checked = {rid: _recommendation_check(rid, rows, parties) for rid, rows in sorted(page.items())}
            read = unverified_reads(audited, {rid: rec for rid, (_, rec) in checked.items() if rec is not None}, trust)
            for rid, (check, recommendation) in checked.items():
                if rid in read:
                    check = replace(check, status=UNVERIFIED_INPUT, reason="; ".join(
                        filter(None, (read[rid].why(), check.reason))))
                recommendations.append(check)
                if recommendation is None:
                    continue
                if rid in decided:
                    intact[rid] = recommendation
                    if rid in read:
                        flagged[rid] = read[rid]
                for superseded, found in superseding_of([recommendation]).items():
                    if superseded in decided:
                        superseding.setdefault(superseded, {}).update(found)
    signers: dict[str, set[str]] = defaultdict(set)
    verdicts = []
    for decision in decisions:
        status, why = _decision_status(decision, parties, intact, superseding.get(decision.recommendation_id, {}))
        if status == "verified" and decision.recommendation_id in flagged:
            status, why = UNVERIFIED_INPUT, flagged[decision.recommendation_id].why(
                f"its recommendation {decision.recommendation_id}")
        if status in SIGNED:
            signers[decision.decision_id].add(decision.signer)
        verdicts.append((decision, status, why))
    checked_decisions = []
    for decision, status, why in verdicts:
        effect = decision.action
        if status in SIGNED:
            authority = parties.authorities.get(decision.authority)
            threshold = authority.threshold if authority else 1
            count = len(signers[decision.decision_id])
            effect += f": {count} of {threshold} signature(s), " + ("in effect" if count >= threshold else "pending")
        elif status == "invalid":
            effect += ": never in effect"
        checked_decisions.append((decision, RecordCheck("decisions", _key(decision), status, effect, why)))
    return Audit(recommendations, checked_decisions, flagged)


def _recommendation_check(
    rid: str, rows: list[dict[str, Any]], parties: Parties
) -> tuple[RecordCheck, Recommendation | None]:
    """One recommendation's check, and the recommendation when it verifies (a refusal too)."""
    try:
        recommendation = Recommendation.from_rows(rows)
    except ValueError as exc:
        return RecordCheck("recommendations", rid, "tampered", "?", f"its rows are inconsistent: {exc}"), None
    why = recommendation.tampered(parties.operator_keys)
    if why is None and recommendation.recorded_id != rid:
        why = "its id is not its digest's"
    effect = f"{recommendation.kind} ({recommendation.outcome})"
    if why:
        return RecordCheck("recommendations", rid, "tampered", effect, why), None
    refused = recommendation.outcome != RECORDED
    return RecordCheck("recommendations", rid, "refusal" if refused else "verified", effect,
                       recommendation.refusal or ""), recommendation


def _decision_status(
    decision: Decision, parties: Parties, intact: dict[str, Recommendation], superseding: dict[str, datetime]
) -> tuple[str, str]:
    strange = decision.non_finite()
    if strange:
        return "tampered", f"it holds a non-finite value ({strange}), which Fusion never records"
    if decision.recorded_id and decision.recorded_id != decision.decision_id:
        return "tampered", "its content no longer hashes to its id (a field changed)"
    if decision.outcome != RECORDED:
        if decision.signature and not decision.signature_valid():
            return "tampered", "a refusal record whose signature does not match it"
        if signed_by_registered(parties, decision):
            return "refusal", decision.refusal or ""
        return "unattested", (
            f"a refusal not signed by a key registered for authority {decision.authority}'s signer "
            f"{decision.signer} (not counted as theirs): {decision.refusal or ''}"
        )
    if not decision.signature_valid():
        return "tampered", "its signature does not match it (altered, or not signed by the key it names)"
    if not signed_by_registered(parties, decision):
        return "tampered", (
            f"signed by a key not registered for authority {decision.authority}'s signer {decision.signer}"
        )
    recommendation = intact.get(decision.recommendation_id)
    if recommendation is None or recommendation.recorded_digest != decision.recommendation_sha256:
        return "tampered", (
            f"recommendation {decision.recommendation_id} is missing, tampered or has another digest "
            "than the one decided on"
        )
    why = why_refused(
        parties,
        recommendation,
        decision,
        signer=decision.signer,
        key=bytes.fromhex(decision.signer_key),
        superseding=superseding,
        at=decision.decided_at,
    )
    if why:
        return "invalid", f"`fusion decide` would have refused it: {why}"
    return "verified", ""


#: How the overrides report marks decisions on a recommendation that read a release that does not verify.
ON_UNVERIFIED_INPUT = ", unverified input"


def overrides_report(
    config: Config, store: FusedStore, *, period: str = "month", audit: Audit | None = None
) -> tuple[pa.Table, pa.Table]:
    """(a summary per period, authority, action, reason code and status: decisions in effect, pending (short of
    their threshold of distinct signers with verified signatures) and refused attempts, with the MW they moved and
    their cost impact; every override and rejection in effect). Tampered and invalid decisions, and unattested
    refusals, are left out (`fusion verify` names them); decisions on a recommendation that read a release `fusion
    verify` does not call verified or legacy are counted, their status marked (`in effect, unverified input`), and
    the overrides and rejections among them name those releases. `audit`: the store's, where the caller has it."""
    parties = load_parties(config)
    audit = audit or audit_mechanisms(config, store)
    by_id: dict[str, list[Decision]] = defaultdict(list)
    summary: dict[tuple[str, str, str, str, str], dict[str, Any]] = {}

    def count(key: tuple[str, str, str, str, str], decision: Decision) -> None:
        row = summary.setdefault(key, {"decisions": 0, "deviation_mw": 0.0, "cost_impact": 0.0})
        row["decisions"] += 1
        row["deviation_mw"] += decision.deviation_mw or 0.0
        row["cost_impact"] += decision.cost_impact or 0.0

    for decision, check in audit.decisions:  # each row with its own check
        if check.status == "refusal":
            count((_period(decision.decided_at, period), decision.authority, decision.action,
                   decision.reason_code or "-", "refused"), decision)
        elif check.status in SIGNED:
            by_id[decision.decision_id].append(decision)
    listing = []
    for verified in by_id.values():
        signed = _first_per_signer(verified)
        first = signed[0]
        authority = parties.authorities.get(first.authority)
        threshold = authority.threshold if authority else 1
        in_effect = len(signed) >= threshold
        last = signed[threshold - 1] if in_effect else signed[-1]  # the signature that put it in effect
        read = audit.unverified_inputs.get(first.recommendation_id)
        count((_period(last.decided_at, period), first.authority, first.action, first.reason_code or "-",
               ("in effect" if in_effect else "pending") + (ON_UNVERIFIED_INPUT if read else "")), first)
        if in_effect and first.action != "ratify":
            listing.append({
                "decided_at": f"{_when(last):%Y-%m-%d %H:%M}Z", "decision_id": first.decision_id,
                "authority": first.authority, "action": first.action, "reason_code": first.reason_code,
                "reason": first.reason,
                "adopted": ", ".join(f"{a.item_key}={a.value:g} {a.unit}" for a in first.adopted),
                "deviation_mw": first.deviation_mw, "cost_impact_usd_h": first.cost_impact,
                "signers": ", ".join(d.signer for d in signed),
                "unverified_input": ", ".join(read.names()) if read else None,
            })
    rows = [{"period": p, "authority": a, "action": act, "reason_code": code, "status": status, **values}
            for (p, a, act, code, status), values in sorted(summary.items())]
    summary_schema = pa.schema([("period", pa.string()), ("authority", pa.string()), ("action", pa.string()),
                                ("reason_code", pa.string()), ("status", pa.string()), ("decisions", pa.int64()),
                                ("deviation_mw", pa.float64()), ("cost_impact", pa.float64())])
    listing_schema = pa.schema([("decided_at", pa.string()), ("decision_id", pa.string()),
                                ("authority", pa.string()), ("action", pa.string()), ("reason_code", pa.string()),
                                ("reason", pa.string()), ("adopted", pa.string()), ("deviation_mw", pa.float64()),
                                ("cost_impact_usd_h", pa.float64()), ("signers", pa.string()),
                                ("unverified_input", pa.string())])
    listing.sort(key=lambda r: (r["decided_at"], r["decision_id"]))
    return (pa.Table.from_pylist(rows, schema=summary_schema),
            pa.Table.from_pylist(listing, schema=listing_schema))


def unverified_input_decisions(audit: Audit) -> pa.Table:
    """Each decision row on a recommendation that read a release `fusion verify` does not call verified or legacy
    (`unverified_input`), ratifications too, with its effect and the releases read: what `fusion decisions` flags."""
    rows = [{"decision": check.record_id, "authority": decision.authority, "action": decision.action,
             "recommendation_id": decision.recommendation_id, "effect": check.effect,
             "unverified_input": ", ".join(audit.unverified_inputs[decision.recommendation_id].names())}
            for decision, check in audit.decisions if check.status == UNVERIFIED_INPUT]
    schema = pa.schema([(name, pa.string()) for name in ("decision", "authority", "action", "recommendation_id",
                                                          "effect", "unverified_input")])
    return pa.Table.from_pylist(sorted(rows, key=lambda r: r["decision"]), schema=schema)


def _first_per_signer(rows: list[Decision]) -> list[Decision]:
    """One decision's verified rows, each signer's earliest only, by time: a row copied into the store again is
    still that one signer's signature, which counts once towards the threshold."""
    first: dict[str, Decision] = {}
    for row in sorted(rows, key=_when):
        first.setdefault(row.signer, row)
    return list(first.values())


def _key(decision: Decision) -> str:
    """A decision row's name in the checks: the id its row carries, and its signer. A copy of the row, changed or
    not, has the same name: a reader that looks a row's check up uses `row_identity`."""
    return f"{decision.recorded_id or decision.decision_id}/{decision.signer}"


def row_identity(decision: Decision) -> str:
    """A decision row's identity, for a reader that looks up its check (`Audit.decisions`): the id it carries, the
    id its content hashes to, its signer and a digest of all it holds. A copy changed in any field has another; rows
    with one identity are one row stored more than once, and have one check."""
    try:
        recomputed = decision.decision_id
    except ValueError:  # a NaN or an infinity: no id can be computed (it is tampered)
        recomputed = "-"
    digest = hashlib.sha256(repr(decision).encode()).hexdigest()
    return f"{decision.recorded_id}/{recomputed}/{decision.signer}/{digest}"


def _when(decision: Decision) -> datetime:
    return decision.decided_at or datetime.min.replace(tzinfo=UTC)


def _period(moment: datetime | None, period: str) -> str:
    if moment is None:
        return "?"
    moment = moment.astimezone(UTC)
    if period == "day":
        return f"{moment:%Y-%m-%d}"
    if period == "week":
        year, week, _ = moment.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{moment:%Y-%m}"


__all__ = ["FAILING", "ON_UNVERIFIED_INPUT", "SIGNED", "UNVERIFIED_INPUT", "Audit", "RecordCheck", "Unverified",
           "audit_mechanisms", "overrides_report", "row_identity", "unverified_input_decisions", "verify_mechanisms"]
