"""The Provenance view: the chain of signed releases and what `fusion verify` reports on each (fusion.api.verify:
the key holder's signatures, the budget ledger's charges, the chain's sequence numbers), the recommendations' and
decisions' signatures when the store has any, and the audit events, filterable."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from dashboard import params
from dashboard.snapshot import Snapshot
from fusion import api
from fusion.config.federation import Config
from fusion.errors import FusionError

#: Audit events per page.
PAGE_EVENTS = 200
#: The verify report is computed again at least this often (seconds), in the background, even where no table
#: changed version and no data file its size or time: a rewrite in place that kept both would otherwise stand.
REVERIFY_S = 600.0
#: Statuses that mean a release is what was published (fusion.store.verification.GOOD).
GOOD = ("verified", "legacy", "superseded")


class ReleaseCheck(BaseModel):
    """`fusion verify`'s line for one release, with its audit record of publication."""

    release_id: str
    sequence: int | None  # its place in the chain of signed releases
    rows: int
    status: str  # verified | legacy | tampered | missing | violation
    reason: str
    released_at: datetime | None
    aggregate_sha256: str | None  # the aggregate envelope the key holder decrypted


class RecordCheck(BaseModel):
    """`fusion verify`'s line for one recommendation or decision."""

    table: str
    record_id: str
    status: str  # verified | refusal | unattested | unverified_input | invalid | tampered
    effect: str
    reason: str


class AuditEvent(BaseModel):
    event_id: str
    at: datetime
    actor_role: str
    actor: str
    action: str
    release_id: str | None
    interval_start: datetime | None
    interval_end: datetime | None
    reason: str | None
    content_sha256: str | None
    detail: str | None


class AuditFilter(BaseModel):
    action: str | None
    role: str | None
    release: str | None
    text: str | None
    start: datetime | None
    end: datetime | None


#: What verifying gives: (why nothing could be verified, or None; the checks in chain order).
Verified = tuple[str | None, list[ReleaseCheck]]


class ProvenanceView(BaseModel):
    verify_error: str | None  # why nothing could be verified (no signing key registered)
    verify_current: bool  # false: an earlier report (earlier table versions or files, or older than REVERIFY_S),
    # shown while the current one is computed
    counts: dict[str, int]  # status -> releases
    checks: list[ReleaseCheck]  # in chain order
    record_error: str | None  # why the recommendations and decisions could not be checked
    record_checks: list[RecordCheck]
    actions: list[str]  # the audit's actions and roles, for the filter
    roles: list[str]
    filter: AuditFilter
    events: list[AuditEvent]  # newest first
    matching: int  # events matching the filter
    page: int
    pages: int


def provenance_view(
    snapshot: Snapshot,
    *,
    action: str | None = None,
    role: str | None = None,
    release: str | None = None,
    text: str | None = None,
    start: str | None = None,
    end: str | None = None,
    page: str | None = None,
) -> ProvenanceView:
    kinds = snapshot.cached("audit kinds", ["audit"], lambda shot: shot.rows(
        "SELECT list(DISTINCT action ORDER BY action) AS actions, list(DISTINCT actor_role ORDER BY actor_role) "
        "AS roles FROM audit")[0])
    actions, roles = kinds["actions"] or [], kinds["roles"] or []
    chosen = AuditFilter(
        action=params.choice("action", action, actions), role=params.choice("role", role, roles),
        release=params.text("release", release), text=params.text("text", text),
        start=params.time("start", start), end=params.time("end", end),
    )
    params.time_range(chosen.start, chosen.end)
    number = params.page("page", page)
    where = _where(chosen)
    matching = int(snapshot.rows(f"SELECT count(*) AS n FROM audit{where}")[0]["n"])
    pages = max(1, -(-matching // PAGE_EVENTS))
    if number > pages:
        raise params.BadParameter("page", f"{number} is past the last page, {pages}, of the events matching")
    events = [AuditEvent(**row) for row in snapshot.rows(
        f'SELECT * FROM audit{where} ORDER BY "at" DESC, event_id '
        f"LIMIT {PAGE_EVENTS} OFFSET {(number - 1) * PAGE_EVENTS}"
    )]
    (verify_error, checks), verify_current = snapshot.recent(*verify_job(snapshot.config), max_age=REVERIFY_S)
    # The newest release shown: removed whole later, it is reported missing (as `fusion verify --seen` does).
    snapshot.saw(max((c.sequence or 0 for c in checks if c.status in GOOD), default=0))
    record_error, records = record_checks(snapshot)
    return ProvenanceView(
        verify_error=verify_error, verify_current=verify_current, counts=dict(Counter(c.status for c in checks)),
        checks=checks, record_error=record_error, record_checks=records, actions=actions, roles=roles,
        filter=chosen, events=events, matching=matching, page=number, pages=pages,
    )


def _where(chosen: AuditFilter) -> str:
    """The SQL filter: store values and checked text as literals (dashboard.params)."""
    terms = []
    if chosen.action:
        terms.append(f"action = {params.sql_text(chosen.action)}")
    if chosen.role:
        terms.append(f"actor_role = {params.sql_text(chosen.role)}")
    if chosen.release:
        terms.append(f"contains(coalesce(release_id, ''), {params.sql_text(chosen.release)})")
    if chosen.text:
        needle = params.sql_text(chosen.text.lower())
        anywhere = " OR ".join(f"contains(lower(coalesce({c}, '')), {needle})"
                               for c in ("actor", "reason", "detail", "event_id"))
        terms.append(f"({anywhere})")
    if chosen.start:
        terms.append(f'"at" >= {params.sql_time(chosen.start)}')
    if chosen.end:
        terms.append(f'"at" < {params.sql_time(chosen.end)}')
    return f" WHERE {' AND '.join(terms)}" if terms else ""


def _registry_stamp(config: Config) -> int:
    """When the registry last changed (a key registered or rotated changes what verifies)."""
    try:
        return os.stat(config.registry_path).st_mtime_ns
    except FileNotFoundError:
        return 0


#: Every table verify reads: an edit of any of them must not leave a cached verdict standing.
VERIFIED_TABLES = ("releases", "audit", "budget", "rejects", "models")


def verify_job(config: Config) -> tuple[str, tuple[str, ...], Callable[[Snapshot], Verified]]:
    """The verify report as Snapshot.recent computes it: once per version of the tables it reads (and state of
    their data files) and of the registry (it reads every release's rows: seconds on a large store), and again
    after REVERIFY_S."""
    return f"verify {_registry_stamp(config)}", VERIFIED_TABLES, _verify


def unverified(snapshot: Snapshot) -> dict[str, str] | None:
    """The releases forecasts leave out (fusion.api.unverified_releases), each with its status; None where no
    release-signing key is registered. Computed once per version of the tables verify reads and of the registry,
    and never an earlier one served while the current one is computed: what is drawn must be what is trusted."""
    return snapshot.cached(f"unverified {_registry_stamp(snapshot.config)}", VERIFIED_TABLES,
                           lambda shot: api.unverified_releases(shot.config))


def _verify(shot: Snapshot) -> Verified:
    """(why nothing could be verified, or None; the checks in chain order)."""
    try:
        found = api.verify(shot.config, seen=shot.seen)
    except FusionError as exc:
        return without_paths(shot.config, exc), []
    # A release's time and aggregate are its one audit record's: where it has several (Fusion writes one; verify
    # calls it tampered), none is shown, rather than whichever a copy made up (the earliest time, any digest).
    published = {row["release_id"]: row for row in shot.rows(
        'SELECT release_id, CASE WHEN count(*) = 1 THEN min("at") END AS "at", '
        "CASE WHEN count(*) = 1 THEN min(content_sha256) END AS sha FROM audit "
        "WHERE action IN ('release', 'training_round') GROUP BY release_id")}
    checks = [
        ReleaseCheck(release_id=c.release_id, sequence=c.sequence, rows=c.rows, status=c.status, reason=c.reason,
                     released_at=published.get(c.release_id, {}).get("at"),
                     aggregate_sha256=published.get(c.release_id, {}).get("sha"))
        for c in found
    ]
    return None, sorted(checks, key=_chain_order)


def without_paths(config: Config, exc: FusionError) -> str:
    """An error as a page may say it to whoever holds the token, in one line: its public text (FusionError.public)
    where it has one, the federation's directory written <federation> (a registry that cannot be read names its
    file), and the store and the registry written <store> and <registry> where they lie elsewhere (a store that
    cannot be read now names itself): where the federation lives on the server is not a reader's to know."""
    text = exc.public if exc.public is not None else str(exc)
    bases = {str(config.base.resolve()), str(config.base)} - {"", "."}
    for place, name in ((config.store_path, "<store>"), (config.registry_path, "<registry>")):
        if not any(place.startswith(base + os.sep) for base in bases):
            text = text.replace(place, name)
    for place in sorted(bases, key=len, reverse=True):
        text = text.replace(place, "<federation>")
    return " ".join(text.split())


def _chain_order(check: ReleaseCheck) -> tuple[Any, ...]:
    return (check.sequence is None, check.sequence or 0, check.released_at is None, check.released_at or 0,
            check.release_id)


def record_checks(snapshot: Snapshot) -> tuple[str | None, list[RecordCheck]]:
    """(why they could not be checked, or None; the mechanisms' records checked as `fusion verify` checks them),
    none when the store has no such tables."""
    error, checks, _ = _mechanism_checks(snapshot)
    return error, checks


def decision_checks(snapshot: Snapshot) -> dict[str, tuple[str, str]]:
    """Each decision row's (status, effect) as `fusion verify` checks it, by the row's identity
    (`mechanisms.audit.row_identity`: a copy of a row, changed in any field, is another row with a check of its
    own); none when they could not be checked."""
    return _mechanism_checks(snapshot)[2]


#: (why the records could not be checked, or None; their checks; each decision row's status and effect by identity).
MechanismChecks = tuple[str | None, list[RecordCheck], dict[str, tuple[str, str]]]


#: Every table the mechanisms' check reads: their own, and what a recommendation read is checked against (the
#: releases verify reads, and the forecasts a recommendation names).
CHECKED_TABLES = ("recommendations", "decisions", "forecasts", *VERIFIED_TABLES)


def _mechanism_checks(snapshot: Snapshot) -> MechanismChecks:
    if not (snapshot.has("recommendations") or snapshot.has("decisions")):
        return None, [], {}

    def compute(shot: Snapshot) -> MechanismChecks:
        from mechanisms.audit import audit_mechanisms, row_identity  # reads only; imports no solver

        try:
            # The releases verify does not call verified or legacy: those forecasts leave out, computed once per
            # version of the tables verify reads (`unverified`), and only when a recommendation read any release.
            audit = audit_mechanisms(shot.config, shot.store, unverified=lambda: unverified(shot))
        except FusionError as exc:  # a malformed registry entry: shown where the checks would be
            return without_paths(shot.config, exc), [], {}
        by_row = {row_identity(decision): (check.status, check.effect) for decision, check in audit.decisions}
        return None, [RecordCheck(**vars(c)) for c in audit.checks], by_row

    return snapshot.cached(f"mechanisms {_registry_stamp(snapshot.config)}", CHECKED_TABLES, compute)
