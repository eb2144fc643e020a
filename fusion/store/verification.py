"""Checking the store's releases and training rounds against the key holder's registered signatures
(fusion/store/provenance.py says what a signature covers and how releases chain): each release is verified, legacy,
tampered, missing or, in a production store, a violation; a release removed whole is named by a later signature or
by its sequence number; a training round is verified, legacy, tampered, missing or superseded."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion.config.federation import PrivacyMode
from fusion.store.delta import Store
from fusion.store.mode import inferred_mode, releases_with_test_cells, store_mode
from fusion.store.provenance import (
    CELL_ORDER,
    REJECT_COLUMNS,
    REJECT_ORDER,
    ROUNDS_TABLE,
    SIGNATURE_FIELD,
    ReleaseSignature,
    _authentic,
    _Canonical,
    record_digest,
)
from fusion.store.signed_budget import BudgetClaim, PeriodFinding, budget_checks, parse_budget_claim
from privacy.signing import verify


@dataclass(frozen=True)
class ReleaseCheck:
    release_id: str
    rows: int  # rows in `releases` now
    # "verified" | "legacy" | "superseded" | "tampered" | "missing" | "violation" | "overspent" | "ledger"
    status: str
    reason: str
    sequence: int | None = None  # its place in the chain of signed releases (None: signed before the chain)


#: How `verify_releases` names a release audit row without a release id (Fusion writes none such).
NO_RELEASE_ID = "(no release id)"

#: Statuses that mean the release is what was published ("superseded": a training round's attempt charged, lost in a
#: crash before it was committed, and named by the signed attempt that replaced it).
GOOD = ("verified", "legacy", "superseded")

#: How training rounds' ids begin (training/secure_sum.py RoundId; releases' begin with "r-").
ROUND_PREFIX = "t-"


def verify_releases(
    store: Store,
    public_keys: Sequence[bytes],
    *,
    unsigned: frozenset[str] = frozenset(),
    unsigned_rounds: frozenset[str] = frozenset(),
    release_id: str | None = None,
    seen: int = 0,
) -> list[ReleaseCheck]:
    """Check every release in the store (or one) against the key holder's registered public keys. `unsigned`:
    the releases registered as published before the key holder had a key (`legacy` when they have no
    signature); any other release without a valid signature is `tampered`. A release the budget ledger charged
    but that has neither rows nor an audit record is `missing` (a pass that crashed before committing: re-run
    it; or the release was removed). A release removed whole is `missing` too, found through the chain of
    signatures; `seen`: the highest sequence number the caller saw before, so the newest releases are covered.
    In a production store (fusion/store/mode.py) a release holding test-mode cells (noise off or seeded, epsilon
    inf, charged nothing to the budget) is a `violation`, however well signed. Training rounds (ids "t-...") are
    checked the same way against their rows in `models` (`_verify_rounds`; `unsigned_rounds`: those registered as
    committed before Fusion signed rounds, `legacy` when they have no signature), and their signed budget claims
    recompose each period with the releases'."""
    releases = store.read("releases")
    releases = releases.sort_by([("release_id", "ascending"), *((c, "ascending") for c in CELL_ORDER)])
    canonical = _Canonical(releases)
    bounds = _runs(releases)
    rejects = store.read("rejects").sort_by([("release_id", "ascending"), *((c, "ascending") for c in REJECT_ORDER)])
    rejects_canonical, rejects_bounds = _Canonical(rejects), _runs(rejects)
    audit = store.read("audit")
    records = _records(audit, "release")
    round_records = _records(audit, "training_round")
    budget = store.read("budget")
    charged = {r for ids_ in budget.column("release_ids").to_pylist() for r in ids_ or () if r}
    rounds_charged = {r for r in charged if r.startswith(ROUND_PREFIX)}
    known = set(bounds) | set(records) | (charged - rounds_charged)
    checks, claims, periods = [], {}, {}
    round_checks, round_claims = _verify_rounds(store, round_records, rounds_charged, public_keys, unsigned_rounds)
    periods.update({c.release_id: c for c in round_claims if c.budget is not None})
    for rid in sorted(known):
        start, end = bounds.get(rid, (0, 0))

        def digest(columns: Sequence[str], start: int = start, end: int = end) -> str:
            return canonical.digest(start, end, columns)

        status, reason, claim = _check(
            rid, end - start, releases.column_names, digest, records.get(rid, []), public_keys, unsigned, rid in charged
        )
        if status == "verified" and claim is not None and claim.rejects is not None:
            status, reason = _check_rejects(claim.rejects, rejects_bounds.get(rid, (0, 0)), rejects_canonical)
        checks.append(ReleaseCheck(rid, end - start, status, reason, None if claim is None else claim.sequence))
        if claim is not None and claim.sequence is not None:
            claims[rid] = claim
        if claim is not None and claim.budget is not None:
            periods[rid] = claim
    # Production if recorded so, or if any release shows calibrated noise: the recorded mode is a table property
    # anyone who can write the store could set to "test", which must not hide test cells beside production ones.
    if PrivacyMode.PRODUCTION in (store_mode(store, releases), inferred_mode(releases)):
        test_cells = releases_with_test_cells(releases)
        checks = [
            replace(c, status="violation", reason=test_cells[c.release_id])
            if c.release_id in test_cells and c.status in GOOD
            else c
            for c in checks
        ]
    checks += round_checks
    findings, period_of = _budget_findings(periods, budget.to_pylist() if periods else [])
    checks += [ReleaseCheck(f"(period {f.period})", 0, f.status, f.reason) for f in findings]
    tampered = any(c.status == "tampered" for c in checks)
    gaps = _chain_gaps(claims, known | {c.release_id for c in round_checks} | unsigned, seen, tampered=tampered) + [
        ReleaseCheck(rid, 0, "missing", "registered as published before the key holder had a signing key, but "
                     "its rows and audit record are gone")
        for rid in sorted(unsigned - known)
    ]
    if release_id is None:
        return checks + gaps
    own = [c for c in checks + gaps if c.release_id == release_id] or [
        ReleaseCheck(release_id, 0, "missing", "no such release")
    ]
    if release_id in period_of:  # what is wrong with its period's budget
        own += [c for c in checks if c.release_id == f"(period {period_of[release_id]})"]
    return own + ([g for g in gaps if g.release_id.startswith("(")] if seen else [])


def _records(audit: Any, action: str) -> dict[str, list[dict[str, Any]]]:
    """Release (or round) id -> the `audit` rows of `action` that name it (NO_RELEASE_ID: rows without an id,
    which Fusion never writes)."""
    rows = audit.filter(pc.equal(audit.column("action"), action))
    records: dict[str, list[dict[str, Any]]] = {}
    for row in rows.select(["event_id", "release_id", "detail", "content_sha256"]).to_pylist():
        records.setdefault(row["release_id"] or NO_RELEASE_ID, []).append(row)
    return records


def unsigned_rounds(store: Store) -> list[str]:
    """The training rounds committed in `models` whose audit record holds no signature: rounds committed by a
    Fusion from before rounds were signed (or whose signature was removed since), the ones the key holder may
    register as legacy (`fusion keys --register-unsigned-rounds`)."""
    committed = {rid for rid in store.read(ROUNDS_TABLE).column("release_id").to_pylist() if rid}
    records = _records(store.read("audit"), "training_round")
    return sorted(
        rid
        for rid in committed & set(records)
        if [r["event_id"] for r in records[rid]] == [f"{rid}:trained"] and _holds_no_signature(records[rid][0])
    )


def _verify_rounds(
    store: Store,
    records: dict[str, list[dict[str, Any]]],
    charged: set[str],
    public_keys: Sequence[bytes],
    unsigned: frozenset[str],
) -> tuple[list[ReleaseCheck], list[ReleaseSignature]]:
    """(a check per training round, the authentic signatures among them): each round's `models` row against the
    signature in its `training_round` audit row (training/run.py commit_round), or, for a round in `unsigned`
    (registered as committed before Fusion signed rounds), `legacy` while its audit record holds no signature; an
    attempt charged but never committed is `superseded` once a signed later attempt at the same round names it,
    `missing` until then."""
    models = store.read(ROUNDS_TABLE)
    ids = models.column("release_id").to_pylist()
    rows_of: dict[str, list[int]] = {}
    for index, rid in enumerate(ids):
        rows_of.setdefault(rid or NO_RELEASE_ID, []).append(index)
    checks, claims = [], []
    successors: dict[str, str] = {}  # an attempt -> the signed attempt at the same round that supersedes it
    for rid in sorted(set(records) | set(rows_of) | charged | unsigned):
        rows = models.take(pa.array(rows_of.get(rid, []), pa.int64()))
        status, reason, claim = _check_round(
            rid, rows, records.get(rid, []), public_keys, charged=rid in charged, registered_unsigned=rid in unsigned
        )
        checks.append(ReleaseCheck(rid, rows.num_rows, status, reason))
        if claim is not None:
            claims.append(claim)
            if status == "verified":
                successors.update(dict.fromkeys(claim.supersedes, rid))
    checks = [
        replace(c, status="superseded", reason=f"charged, then lost in a crash before it was committed and not "
                f"resumable; the round's signed attempt {successors[c.release_id]} replaces it")
        if c.status == "missing" and c.release_id in successors
        else c
        for c in checks
    ]  # fmt: skip
    return checks, claims


def _check_round(
    release_id: str,
    rows: Any,
    records: list[dict[str, Any]],
    public_keys: Sequence[bytes],
    *,
    charged: bool,
    registered_unsigned: bool,
) -> tuple[str, str, ReleaseSignature | None]:
    """(status, reason, the signature once it is authentic) of one training round; `registered_unsigned`: the
    key holder registered it as committed before Fusion signed rounds."""
    own = [r for r in records if r["event_id"] == f"{release_id}:trained"]
    if len(records) > len(own):
        return "tampered", "an audit record of its training round that Fusion did not write", None
    if len(own) > 1:  # Fusion writes one (the audit's event ids are unique): which copy to believe is no question
        return "tampered", f"{len(own)} audit records of its training round, where Fusion writes one", None
    if registered_unsigned and rows.num_rows == 0 and (not own or _holds_no_signature(own[0])):
        gone = "row is gone" if own else "row and audit record are gone"
        return "missing", f"registered as committed before Fusion signed training rounds, but its `models` {gone}", None
    if not own:
        if rows.num_rows == 0:
            if charged:
                return "missing", (
                    "a training round charged to the budget but never committed: a run that crashed after the "
                    "charge (resume it: the run completes this attempt, or supersedes it with a new one if its "
                    "aggregate is gone from the exchange), or the round's row and audit record were removed"
                ), None
            return "missing", "no such training round", None
        return "tampered", "no audit record of its training round (removed, or a `models` row added without one)", None
    if registered_unsigned and _holds_no_signature(own[0]):
        return "legacy", "committed before Fusion signed training rounds (registered by the key holder)", None
    claim, fault = _signature(own[0], release_id)
    if claim is None:
        return "tampered", fault, None
    if not claim.is_round:
        return "tampered", "its signature is not a training round's", None
    if not _authentic(claim, public_keys):
        return "tampered", "the signature was not made by the registered key holder", None
    if own[0]["content_sha256"] != claim.aggregate_sha256:
        return "tampered", "the audit record names another aggregate envelope than the one signed", claim
    if rows.num_rows == 0:
        return "missing", (
            "signed but its `models` row is not committed: a run that crashed (resume it: the run commits the row "
            "signed, or supersedes the attempt with a new one if its aggregate is gone from the exchange), or its "
            "row was removed"
        ), claim
    if rows.num_rows != claim.rows:
        return "tampered", f"{rows.num_rows} rows in `models`, {claim.rows} signed", claim
    missing = [c for c in claim.columns if c not in rows.column_names]
    if missing:
        return "tampered", f"signed columns missing from `models`: {missing}", claim
    if record_digest(rows, claim.columns) != claim.rows_sha256:
        return "tampered", "its row in `models` differs from the row signed", claim
    return "verified", "", claim


def _holds_no_signature(record: dict[str, Any]) -> bool:
    """Whether an audit record is readable and holds no signature field (one written before Fusion signed it)."""
    try:
        doc = json.loads(record["detail"] or "{}")
    except (ValueError, RecursionError):
        return False  # unreadable: not a record Fusion wrote unsigned
    return isinstance(doc, dict) and SIGNATURE_FIELD not in doc


def _signature(record: dict[str, Any], release_id: str) -> tuple[ReleaseSignature | None, str]:
    """(the signature an audit record holds, or None and why it holds no usable one)."""
    try:
        doc = json.loads(record["detail"] or "{}")
        if not isinstance(doc, dict) or SIGNATURE_FIELD not in doc:
            return None, "its audit record holds no signature (removed, or written before Fusion signed it)"
        claim = ReleaseSignature.from_doc(doc[SIGNATURE_FIELD])
    except RecursionError:
        return None, "the signature record is unreadable: nested too deeply"
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"the signature record is unreadable: {exc}"
    if claim.release_id != release_id:
        return None, f"the signature is for {claim.release_id}"
    return claim, ""


def _runs(table: Any) -> dict[str, tuple[int, int]]:
    """Release id -> its rows [start, end) in `table`, sorted by release id."""
    ids = table.column("release_id").to_numpy(zero_copy_only=False)
    if not len(ids):
        return {}
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    return {str(ids[a]): (int(a), int(b)) for a, b in zip(starts, ends, strict=True)}


def _check_rejects(signed: dict[str, Any], bounds: tuple[int, int], canonical: _Canonical) -> tuple[str, str]:
    """(status, reason) of a verified release once its `rejects` rows are compared with the tallies it signed."""
    start, end = bounds
    if end - start != signed["rows"]:
        return "tampered", f"{end - start} rows in `rejects`, {signed['rows']} signed"
    if canonical.digest(start, end, REJECT_COLUMNS) != signed["sha256"]:
        return "tampered", "the reject tallies in `rejects` differ from those signed"
    return "verified", ""


def _budget_findings(
    claims: dict[str, ReleaseSignature], budget_rows: list[dict[str, Any]]
) -> tuple[list[PeriodFinding], dict[str, str]]:
    """(what is wrong with the periods of the authentic signatures holding a budget claim, release id -> its
    period): each period recomposed from its signed releases alone (fusion/store/signed_budget.py)."""
    signed: list[tuple[str, BudgetClaim]] = []
    unreadable = []
    for rid, claim in sorted(claims.items(), key=lambda item: (item[1].sequence or 0, item[0])):
        try:
            signed.append((rid, parse_budget_claim(claim.budget)))
        except (ValueError, KeyError, TypeError) as exc:
            unreadable.append(PeriodFinding("?", "ledger", f"release {rid}'s signed budget claim is unreadable: {exc}"))
    return unreadable + budget_checks(signed, budget_rows), {rid: c.period for rid, c in signed}


def _chain_gaps(
    claims: dict[str, ReleaseSignature], known: set[str], seen: int, *, tampered: bool = False
) -> list[ReleaseCheck]:
    """Releases removed whole (rows, audit record and budget charge): named as the predecessor of an authentic
    signature but found nowhere, or sequence numbers no authentic signature holds or names up to the highest
    one (or up to `seen`, the highest a reader saw before); runs of such numbers are reported as one range."""
    gaps = []
    accounted = set()
    for rid, claim in sorted(claims.items()):
        if claim.sequence is None:
            continue
        accounted.add(claim.sequence)
        if claim.previous:
            accounted.add(claim.sequence - 1)  # the predecessor's number, whatever happened to it
        for predecessor in claim.previous or ():
            if predecessor not in known:
                known = known | {predecessor}
                gaps.append(ReleaseCheck(
                    predecessor, 0, "missing",
                    f"removed: the signature of release {rid} names it as the release it follows, and its rows, "
                    "audit record and budget charge are gone",
                    claim.sequence - 1 or None,
                ))
    top = max(accounted, default=0)
    limit = max(top, seen)
    expected = 1
    for number in [*sorted(n for n in accounted if 0 < n <= limit), limit + 1]:
        if number > expected:  # expected .. number - 1: no authentic signature holds or names them
            last = number - 1
            label = f"(sequence {expected})" if last == expected else f"(sequences {expected}-{last})"
            reason = (
                f"no authentic signature holds or names these sequence numbers (of {top} given out so far): the "
                "releases that had them were removed whole (rows, audit records and budget charges)"
                + (", or are among those whose signatures are reported tampered" if tampered else "")
                if last < top
                else f"removed: a reader saw sequence number {seen} before; the highest in the store is {top}"
            )
            gaps.append(ReleaseCheck(label, 0, "missing", reason, expected))
        expected = number + 1
    return gaps


def _check(
    release_id: str,
    rows: int,
    published: Sequence[str],
    digest: Callable[[Sequence[str]], str],
    records: list[dict[str, Any]],
    public_keys: Sequence[bytes],
    unsigned: frozenset[str],
    charged: bool,
) -> tuple[str, str, ReleaseSignature | None]:
    """(status, reason, the signature once it is authentic: its chain links can then be trusted)."""
    own = [r for r in records if r["event_id"] == f"{release_id}:released"]
    if len(records) > len(own):
        return "tampered", "an audit record of its release that Fusion did not write", None
    if len(own) > 1:  # Fusion writes one (the audit's event ids are unique): which copy to believe is no question
        return "tampered", f"{len(own)} audit records of its release, where Fusion writes one", None
    if not own:
        if rows == 0:
            if charged:
                return "missing", (
                    "charged to the budget but not published: a pass that crashed before committing (re-run it), "
                    "or its rows and audit record were removed"
                ), None
            return "missing", "no such release", None
        if release_id in unsigned:
            return "legacy", "published before the key holder had a signing key", None
        return "tampered", "no audit record of its release (removed, or rows added without a release)", None
    record = own[0]
    try:
        doc = json.loads(record["detail"] or "{}")
        if not isinstance(doc, dict) or SIGNATURE_FIELD not in doc:
            if release_id in unsigned:
                return "legacy", "published before the key holder had a signing key", None
            return "tampered", "its audit record holds no signature (removed)", None
        claim = ReleaseSignature.from_doc(doc[SIGNATURE_FIELD])
        signature = bytes.fromhex(claim.signature)
    except RecursionError:
        return "tampered", "the signature record is unreadable: nested too deeply", None
    except (ValueError, KeyError, TypeError) as exc:
        return "tampered", f"the signature record is unreadable: {exc}", None
    if claim.release_id != release_id:
        return "tampered", f"the signature is for release {claim.release_id}", None
    if claim.is_round:
        return "tampered", "its signature is a training round's", None
    if not any(verify(key, claim.message(), signature) for key in public_keys):
        return "tampered", "the signature was not made by the registered key holder", None
    if record["content_sha256"] != claim.aggregate_sha256:
        return "tampered", "the audit record names another aggregate envelope than the one signed", claim
    if rows == 0:
        return "missing", (
            "signed but its rows are not committed: a pass that crashed (re-run it), or its rows were removed"
        ), claim
    if rows != claim.rows:
        return "tampered", f"{rows} rows in `releases`, {claim.rows} signed", claim
    missing = [c for c in claim.columns if c not in published]
    if missing:
        return "tampered", f"signed columns missing from `releases`: {missing}", claim
    if digest(claim.columns) != claim.rows_sha256:
        return "tampered", "the rows in `releases` differ from the rows signed", claim
    return "verified", "", claim
