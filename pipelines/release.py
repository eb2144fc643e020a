"""The key holder's step: decrypt the aggregate, decode noisy cells, sign them, and commit them to the store.

This is the only code that loads the HE secret key. The commit is idempotent: audit and rejects rows are
merged on deterministic keys first, the releases last, so a crash at any point can be re-run safely and an
interval is never released twice. The release's signature (fusion/store/provenance.py) rides in its audit row; a
re-run after a crash reuses that row's time, so it publishes exactly the rows that were signed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion.config.federation import Config
from fusion.config.parameters import NOISE_MARGIN_SDS
from fusion.errors import FusionError, ReleaseNotReady, ReleaseRefused
from fusion.keys.holder import load_checked_secret_context, published_context_digest
from fusion.keys.registry import (
    key_holder_signing_key_file,
    load_aggregator_public_key,
    load_key_holder_public_keys,
    load_key_holder_signing_key,
)
from fusion.release.estimates import decode_release, release_quantiles
from fusion.release.exchange import FileTooLarge, aggregate_path, exists, read_bounded, read_bytes, refusal_path
from fusion.release.plan import ReleasePlan, noise_variance_problem
from fusion.release.rejects import decode_reject_tallies
from fusion.runtime.faults import crash_point
from fusion.store.charge_record import ChargeRecord
from fusion.store.delta import Store
from fusion.store.ledger import BudgetLedger, Spend
from fusion.store.mode import bind_store_mode
from fusion.store.provenance import (
    SIGNATURE_FIELD,
    ChainLink,
    ReleaseSignature,
    next_link,
    rows_digest,
    sign_release,
    store_id,
)
from fusion.store.signed_budget import budget_claim
from pipelines.aggregate_envelope import AGGREGATE_MISMATCH, AggregateProblem, recompute_problem
from privacy import he
from privacy.envelope import EnvelopeError, EnvelopeHeader, max_envelope_bytes, signature_valid, unpack_envelope
from privacy.signing import public_key, verify
from schemas.tables import AUDIT_SCHEMA


@dataclass(frozen=True)
class ReleaseOutcome:
    release_id: str
    status: str  # "released" | "already_released"
    cells: int = 0
    contributors: tuple[str, ...] = ()
    epsilon: float = 0.0
    period: str = ""
    period_epsilon_spent: float = 0.0


def audit_row(
    *,
    event_id: str,
    action: str,
    actor_role: str,
    actor: str,
    plan: ReleasePlan,
    reason: str | None = None,
    content: bytes | None = None,
    detail: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "at": at or datetime.now(UTC),
        "actor_role": actor_role,
        "actor": actor,
        "action": action,
        "release_id": plan.key.release_id,
        "interval_start": plan.layout.start,
        "interval_end": plan.layout.end,
        "reason": reason,
        "content_sha256": hashlib.sha256(content).hexdigest() if content is not None else None,
        "detail": json.dumps(detail, sort_keys=True, default=str) if detail is not None else None,
    }


def _rejects_rows(plan: ReleasePlan, totals: np.ndarray, header: EnvelopeHeader, at: datetime) -> pa.Table:
    return decode_reject_tallies(
        totals,
        layout=plan.layout,
        weight=plan.params.tally_weight,
        noise_variance=header.noise_variance,
        release_id=plan.key.release_id,
        recorded_at=at,
    )


def release(plan: ReleasePlan, store: Store) -> ReleaseOutcome:
    """Decrypt and commit the release of `plan`'s interval; refuses if the aggregator refused it."""
    prepared = prepare_release(plan, store)
    return prepared if isinstance(prepared, ReleaseOutcome) else publish_releases([prepared], store)[0]


@dataclass(frozen=True)
class PreparedRelease:
    """A release charged, decrypted, decoded and signed, not yet committed (`publish_releases` commits it)."""

    plan: ReleasePlan
    cells: pa.Table
    audits: list[dict[str, Any]]
    rejects: pa.Table
    rows_sha256: str
    decoded: Callable[[datetime], pa.Table]  # the cells as released at a given time (a racing pass's record)
    outcome: ReleaseOutcome  # what publishing it reports


def prepare_release(plan: ReleasePlan, store: Store, *, context: Any = None) -> PreparedRelease | ReleaseOutcome:
    """Charge, decrypt, decode and sign the release of `plan`'s interval (an outcome if it is already released);
    `context`: the secret HE context, when the caller holds one already."""
    (result,) = prepare_releases([plan], store, context=context)
    if isinstance(result, ReleaseRefused):
        raise result
    return result


@dataclass(frozen=True)
class _Opened:
    """An aggregate envelope checked and ready to be charged and decrypted."""

    plan: ReleasePlan
    data: bytes
    header: EnvelopeHeader
    ciphertexts: list[bytes]
    signing_key: bytes


def prepare_releases(
    plans: Sequence[ReleasePlan], store: Store, *, context: Any = None
) -> list[PreparedRelease | ReleaseOutcome | ReleaseRefused]:
    """prepare_release for several intervals at once, each still charged, decrypted, decoded and signed as its own
    release; one result per plan, in order (a refusal is returned, not raised, and the others go on).

    What they share: the charges of one period go into one ledger commit (and one audit commit records them),
    the secret context is loaded once, and the quantiles of all their cells are computed in one call
    (fusion.release.estimates.release_quantiles: the same numbers as decoding each alone)."""
    results: dict[int, PreparedRelease | ReleaseOutcome | ReleaseRefused] = {}
    opened: dict[int, _Opened] = {}
    for mode in dict.fromkeys(p.config.privacy.mode for p in plans):  # test-mode cells never beside production
        bind_store_mode(store, mode)
    released = store.present_releases((p.key.release_id, p.key.start, p.key.end) for p in plans)
    for i, plan in enumerate(plans):
        try:
            one = _open_aggregate(plan, store, released)
        except ReleaseRefused as exc:
            results[i] = exc
            continue
        if isinstance(one, ReleaseOutcome):
            results[i] = one
        else:
            opened[i] = one
    # The secret key checked before anything is charged: one missing or damaged would spend budget on nothing.
    if opened and context is None:
        context = load_checked_secret_context(plans[0].config)
    # Pay first: the key holder decrypts only an aggregate whose release has been charged to its period. The
    # charge is bound to the ciphertexts (re-summing the same contributions gives the same bytes).
    spends = _spend_all([(i, o.plan, o.header.payload_sha256) for i, o in opened.items()], store)
    for i, spend in spends.items():
        if isinstance(spend, ReleaseRefused):
            results[i] = spend
            del opened[i]
    if opened:
        crash_point("after_ledger")
    totals = {i: he.decrypt_vector(context, o.ciphertexts, o.plan.layout.slots) for i, o in opened.items()}
    if opened:
        crash_point("after_decrypt")
    quantiles = release_quantiles(
        [(totals[i], o.plan.layout, o.plan.params, o.header.noise_variance) for i, o in opened.items()]
    )
    try:  # a pass that crashed before committing the rows recorded them: read once for every window
        records = _recorded_releases([o.plan for o in opened.values()], store)
    except ReleaseRefused:  # one unreadable record: each window on its own, so only that one is refused
        records = {}
    for (i, one), cell_quantiles in zip(opened.items(), quantiles, strict=True):
        spend = spends[i]
        assert isinstance(spend, Spend)
        try:
            release_id = one.plan.key.release_id
            recorded = records[release_id] if release_id in records else _recorded_release(one.plan, store)
            results[i] = _signed(one, store, totals[i], spend, cell_quantiles, recorded)
        except ReleaseRefused as exc:
            results[i] = exc
    return [results[i] for i in range(len(plans))]


def _open_aggregate(plan: ReleasePlan, store: Store, released: set[str]) -> _Opened | ReleaseOutcome:
    """The plan's aggregate envelope, checked (layout, parameters, signature, context, quorum, and recomputed from
    the exchange: pipelines/aggregate_envelope.py), or the outcome of a release already made (its id in
    `released`, the store's, read once for every plan); raises ReleaseRefused."""
    release_id = plan.key.release_id
    exchange = plan.config.exchange_path
    if release_id in released:
        return ReleaseOutcome(release_id=release_id, status="already_released")
    if not exists(aggregate_path(exchange, plan.key)):
        _refuse(plan, store)
    path = aggregate_path(exchange, plan.key)
    ciphertext_count = he.ciphertexts_for(plan.layout.slots)
    try:
        data = read_bounded(path, max_envelope_bytes(ciphertext_count))
        header, ciphertexts = unpack_envelope(data, max_ciphertexts=ciphertext_count)
    except (EnvelopeError, FileTooLarge) as exc:  # damaged, or not the aggregator's: nothing to charge or decrypt
        reason = f"the aggregate envelope {path} is unreadable ({exc}): it is not decrypted, nothing is charged"
        audit_event(plan, store, action="release_refused", reason=reason, detail={"aggregate": str(path)})
        raise ReleaseRefused(
            f"release {release_id} refused: {reason}; re-run `fusion aggregate` to seal the interval's aggregate again"
        ) from None
    if (header.kind, header.layout_digest, header.parameters_digest) != (
        "aggregate",
        plan.key.layout_digest,
        plan.key.parameters_digest,
    ):
        raise ReleaseRefused("the aggregate envelope does not match this interval's layout or parameters")
    if not signature_valid(header, load_aggregator_public_key(plan.config)):
        raise ReleaseRefused(
            "the aggregate envelope is not signed by the federation's registered aggregator: it is not decrypted"
        )
    if header.context_sha256 != published_context_digest(plan.config):
        raise ReleaseRefused(
            "the aggregate was encrypted under another public HE context than the one this key holder published "
            "(keys re-created, or a stale context): restore the key holder's HE keys that were published when the "
            "contributions were sealed; otherwise this interval cannot be released (an institution never seals an "
            "interval twice: a second noisy version of its data would weaken the guarantee)"
        )
    if len(header.contributors) < plan.params.quorum:
        raise ReleaseRefused(
            f"the aggregate has {len(header.contributors)} contributors; quorum is {plan.params.quorum}"
        )
    _check_noise_variance(plan, header)
    problem = recompute_problem(plan, header)  # the aggregator's signature says who sealed it, not what it holds
    if problem is not None:
        _refuse_unrecomputed(plan, store, path, data, problem)
    signing_key = registered_signing_key(plan.config)  # before anything is charged: nothing unsigned is published
    return _Opened(plan, data, header, ciphertexts, signing_key)


def _refuse_unrecomputed(
    plan: ReleasePlan, store: Store, path: str, data: bytes, problem: AggregateProblem
) -> NoReturn:
    """Record in `audit` that the aggregate is not what the exchange's signed envelopes give (or that they are no
    longer there to tell), and refuse the release: nothing is charged or decrypted."""
    detail = {"aggregate": str(path), "aggregate_sha256": hashlib.sha256(data).hexdigest(), "found": problem.found}
    audit_event(plan, store, action="release_refused", reason=problem.reason, detail=detail)
    if problem.reason == AGGREGATE_MISMATCH:
        fix = (
            "the aggregator runs `fusion aggregate` again (an honest one seals the same sum from the same envelopes); "
            "if the aggregate still differs, the aggregator's operator finds out what sealed it"
        )
    else:
        fix = (
            "restore the exchange: an institution whose contribution is missing or refused runs `fusion contribute` "
            "again (it re-publishes its kept envelope), one whose answer is, `fusion contribute --unmask`; then "
            "`fusion release` again"
        )
    raise ReleaseRefused(
        f"release {plan.key.release_id} refused ({problem.reason}): the aggregate {path} is not what the signed "
        f"contributions and answers in the exchange give: {problem.found}. It is not decrypted, nothing is charged; "
        f"{fix}"
    )


def _signed(
    one: _Opened,
    store: Store,
    totals: np.ndarray,
    spend: Spend,
    quantiles: dict[str, np.ndarray],
    recorded: tuple[datetime, dict[str, Any]] | None,
) -> PreparedRelease:
    """A charged, decrypted release decoded and signed (its audit rows and rejects ready to commit); `recorded`:
    the time and signature a pass that crashed before committing the rows recorded (_recorded_release)."""
    plan, data, header = one.plan, one.data, one.header
    release_id = plan.key.release_id
    fid = plan.config.federation.id

    def decoded(at: datetime) -> pa.Table:
        return decode_release(
            totals,
            layout=plan.layout,
            params=plan.params,
            units=tuple(m.unit for m in plan.config.metrics),
            noise_variance=header.noise_variance,
            contributors=len(header.contributors),
            release_id=release_id,
            released_at=at,
            quantiles=quantiles,
        )

    now = recorded[0] if recorded else datetime.now(UTC)
    cells = decoded(now)
    _check_plausible(plan, cells, header)
    rejects = _rejects_rows(plan, totals, header, now)
    signature = sign_release(
        cells,
        release_id=release_id,
        aggregate_sha256=hashlib.sha256(data).hexdigest(),
        signing_key=one.signing_key,
        link=_recorded_link(plan, recorded[1]) if recorded else _next_link(plan, store),
        budget=budget_claim(
            period=plan.period,
            charge=plan.params.charge(plan.key.start, plan.key.end),
            cap=plan.config.privacy.cap,
            delta=plan.params.delta,
            epsilon_after=spend.epsilon_after,
            charged_for=header.payload_sha256,
        ),
        rejects=rejects,
    )
    audits = [
        audit_row(
            event_id=f"{release_id}:refused-envelope:{i}",
            action="envelope_refused",
            actor_role="aggregator",
            actor=fid,
            plan=plan,
            reason=r["reason"],
            detail=r,
            at=now,
        )
        for i, r in enumerate(header.refused)
    ]
    audits.append(
        audit_row(
            event_id=f"{release_id}:released",
            action="release",
            actor_role="key_holder",
            actor=fid,
            plan=plan,
            content=data,
            at=now,
            detail={
                "contributors": list(header.contributors),
                "cells": plan.layout.cells,
                "epsilon": plan.params.epsilon,
                "delta": plan.params.delta,
                "noise_variance": header.noise_variance,
                "period": spend.period,
                "period_epsilon_spent": spend.epsilon_after,
                SIGNATURE_FIELD: signature.to_doc(),
            },
        )
    )
    outcome = ReleaseOutcome(
        release_id=release_id,
        status="released",
        contributors=header.contributors,
        epsilon=plan.params.epsilon,
        period=spend.period,
        period_epsilon_spent=spend.epsilon_after,
    )
    return PreparedRelease(plan, cells, audits, rejects, signature.rows_sha256, decoded, outcome)


def publish_releases(prepared: Sequence[PreparedRelease], store: Store) -> list[ReleaseOutcome]:
    """Commit prepared releases together: one commit of `audit`, one of `rejects`, then one of `releases`, so that
    every one of them becomes queryable at the same moment."""
    # Audit and rejects first, releases last: each insert is keyed, so a re-run after a crash anywhere here
    # completes the release without duplicating a row, and `has_release` turns true only at the very end.
    store.insert_new("audit", pa.Table.from_pylist([a for p in prepared for a in p.audits], schema=AUDIT_SCHEMA))
    store.insert_new("rejects", pa.concat_tables([p.rejects for p in prepared]))
    crash_point("after_audit")  # the signature is recorded; a re-run must publish exactly the rows it signed
    published = []
    records = _recorded_releases([p.plan for p in prepared], store)
    for p in prepared:
        cells = p.cells
        recorded = records[p.plan.key.release_id]
        if recorded is not None and recorded[1].get("rows_sha256") != p.rows_sha256:
            # A racing pass recorded this release first, with its own time: publish the rows it signed.
            cells = p.decoded(recorded[0])
            if rows_digest(cells, cells.column_names) != recorded[1].get("rows_sha256"):
                raise ReleaseRefused(
                    f"release {p.plan.key.release_id}'s audit row records a signature on other rows than this pass "
                    "decodes (a pass under other parameters or keys recorded it first); nothing was published"
                )
        published.append(cells)
    present = (
        store.present_releases((p.plan.key.release_id, p.plan.key.start, p.plan.key.end) for p in prepared)
        if len(prepared) > 1
        else set()
    )
    inserted = store.insert_new("releases", pa.concat_tables(published))
    crash_point("after_commit")
    if inserted == 0:
        return [ReleaseOutcome(release_id=p.outcome.release_id, status="already_released") for p in prepared]
    for table in ("releases", "audit", "rejects"):  # one file a release each: keep reads of them fast
        store.compact(table)
    return [
        ReleaseOutcome(release_id=p.outcome.release_id, status="already_released")
        if p.outcome.release_id in present
        else dataclasses.replace(p.outcome, cells=cells.num_rows)
        for p, cells in zip(prepared, published, strict=True)
    ]


def registered_signing_key(config: Config) -> bytes:
    """The key holder's release-signing key (releases and training rounds), refused unless it is the one the
    registry names (a key recreated by hand would publish releases nobody can verify)."""
    key = load_key_holder_signing_key(config)
    registered = load_key_holder_public_keys(config)
    try:
        own = public_key(key)
    except ValueError as exc:  # not an Ed25519 private key (truncated, or another file copied over it)
        raise FusionError(
            f"the key holder's release-signing key {key_holder_signing_key_file(config)} is unreadable ({exc}); "
            "restore it from the key holder's backup"
        ) from None
    if not registered or own != registered[0]:
        raise FusionError(
            f"the key holder's release-signing key is not the one registered in {config.registry_path}; "
            "register it (`fusion keys --release-signing --overwrite` creates and registers a new one)"
        )
    return key


def _recorded_release(plan: ReleasePlan, store: Store) -> tuple[datetime, dict[str, Any]] | None:
    """(time, signature) of this release's audit row, if a pass recorded it."""
    return _read_recorded([plan], store)[plan.key.release_id]


def _recorded_releases(plans: Sequence[ReleasePlan], store: Store) -> dict[str, tuple[datetime, dict[str, Any]] | None]:
    """Release id -> _recorded_release of each of `plans`, reading `audit` once for all of them (the windows of a
    stream's burst). Raises ReleaseRefused for a recorded row without a readable signature."""
    if len(plans) == 1:
        return {plans[0].key.release_id: _recorded_release(plans[0], store)}
    return _read_recorded(plans, store)


def _read_recorded(plans: Sequence[ReleasePlan], store: Store) -> dict[str, tuple[datetime, dict[str, Any]] | None]:
    events = {f"{p.key.release_id}:released": p.key.release_id for p in plans}
    found: dict[str, tuple[datetime, dict[str, Any]] | None] = dict.fromkeys(events.values())
    if not events:
        return found
    dataset = store.dataset("audit")
    columns = ["event_id", "at", "detail"]
    wanted = pa.array(list(events), pa.string())
    try:  # pushed down: only these releases' row groups are read
        audit = dataset.to_table(columns=columns, filter=pc.field("event_id").isin(wanted))
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):  # string_view files of old stores
        audit = dataset.to_table(columns=columns)
        audit = audit.filter(pc.is_in(pc.cast(audit.column("event_id"), pa.string()), value_set=wanted))
    for row in audit.to_pylist():
        release_id = events[str(row["event_id"])]
        if found[release_id] is not None:
            continue  # the first row recorded (event ids are keyed: there is one)
        try:
            detail = json.loads(row["detail"] or "{}")
            signature = detail.get(SIGNATURE_FIELD) if isinstance(detail, dict) else None
        except (ValueError, RecursionError):
            signature = None
        if not isinstance(signature, dict):
            raise ReleaseRefused(
                f"release {release_id}'s audit row holds no readable signature (the store was written by "
                "someone else, or by a Fusion version before signed releases); nothing was published"
            )
        found[release_id] = (row["at"], signature)
    return found


def _next_link(plan: ReleasePlan, store: Store) -> ChainLink:
    """This release's place in the chain of signed releases, from the key holder's own chain state."""
    return next_link(
        store,
        plan.key.release_id,
        state_dir=key_holder_signing_key_file(plan.config).parent,
        public_keys=load_key_holder_public_keys(plan.config),
    )


def _recorded_link(plan: ReleasePlan, signature: dict[str, Any]) -> ChainLink | None:
    """The chain link of the signature a pass recorded for this release (None for one made before the chain): a
    re-run signs the same place again, not one after its own record. A record that is not the key holder's own
    signature is refused: nothing is published over it."""
    try:
        claim = ReleaseSignature.from_doc(signature)
        authentic = claim.release_id == plan.key.release_id and any(
            verify(key, claim.message(), bytes.fromhex(claim.signature))
            for key in load_key_holder_public_keys(plan.config)
        )
    except (ValueError, KeyError, TypeError):
        authentic = False
    if not authentic:
        raise ReleaseRefused(
            f"release {plan.key.release_id}'s audit row holds a signature the registered key holder did not make "
            "(the store was written by someone else); nothing was published"
        )
    return None if claim.sequence is None else ChainLink(claim.sequence, claim.previous or ())


def _check_noise_variance(plan: ReleasePlan, header: EnvelopeHeader) -> None:
    """Refuse, before anything is charged, an aggregate whose stated noise variance its contributions could not
    hold (noise_variance_problem)."""
    problem = noise_variance_problem(plan, header)
    if problem is not None:
        raise ReleaseRefused(f"the aggregate states {problem}")


def _check_plausible(plan: ReleasePlan, cells: pa.Table, header: EnvelopeHeader) -> None:
    """Refuse totals no honest contributions could produce (e.g. a payload under other keys decrypts to noise)."""
    count = np.asarray(cells.column("count").to_numpy())
    sd = np.asarray(cells.column("count_sd").to_numpy())
    ceiling = sum(plan.params.cell_caps[c] for c in header.contributors)
    if (count < -NOISE_MARGIN_SDS * sd - 1).any() or (count > ceiling + NOISE_MARGIN_SDS * sd + 1).any():
        raise ReleaseRefused(
            "the decrypted counts are impossible for honest contributions (wrong keys or a forged envelope?); "
            "nothing was published"
        )


def _spend_all(releases: Sequence[tuple[int, ReleasePlan, str]], store: Store) -> dict[int, Spend | ReleaseRefused]:
    """Charge each release (key, plan, aggregate SHA-256) to its privacy period before anything is decrypted: one
    ledger commit per period, then one audit commit recording every spend and refusal. A refusal (over the cap,
    or a second aggregate for a charged release) is returned for its release alone."""
    if not releases:
        return {}
    ledger = BudgetLedger(store, record=charge_record(releases[0][1].config, store))
    periods: dict[tuple[Any, ...], list[tuple[int, ReleasePlan, str]]] = {}
    for key, plan, sha256 in releases:
        charge = plan.params.charge(plan.key.start, plan.key.end)
        group = (plan.period, plan.config.privacy.cap, plan.params.delta, charge.composition)
        periods.setdefault(group, []).append((key, plan, sha256))
    outcomes: dict[int, Spend | ReleaseRefused] = {}
    rows = []
    for (period, cap, delta, _), members in periods.items():
        spent = ledger.spend_all(
            period=period,
            releases=[(p.key.release_id, sha, p.params.charge(p.key.start, p.key.end)) for _, p, sha in members],
            cap=cap,
            delta=delta,
        )
        for (key, plan, sha256), spend in zip(members, spent, strict=True):
            outcomes[key] = spend
            if isinstance(spend, ReleaseRefused):
                rows.append(
                    _event_row(plan, action="budget_refused", reason=str(spend), detail={"period": period.name})
                )
                continue
            # Recorded on every pass (a keyed insert, so once): a crash right after the charge cannot lose it.
            rows.append(
                _event_row(
                    plan,
                    action="budget_spend",
                    reason=None,
                    event=f"{plan.key.release_id}:budget-spend",
                    detail={
                        "period": spend.period,
                        "epsilon_before": spend.epsilon_before,
                        "epsilon_after": spend.epsilon_after,
                        "aggregate_sha256": sha256,
                        "cap": spend.cap,
                        "charged_on_this_pass": spend.charged,
                    },
                )
            )
    first = {period.name: members[0][1] for (period, *_), members in periods.items()}
    for restored in ledger.restored:  # a store row behind the key holder's record, rebuilt from it
        rows.append(
            _event_row(
                first[restored.period],
                action="budget_restored",
                reason=(
                    "the budget table's row of the period was behind the key holder's record of its charges "
                    "(deleted or rewritten, or a pass crashed between the two writes); rebuilt from the record"
                ),
                detail=dataclasses.asdict(restored),
            )
        )
    if rows:
        store.insert_new("audit", pa.Table.from_pylist(rows, schema=AUDIT_SCHEMA))
    return outcomes


def charge_record(config: Config, store: Store) -> ChargeRecord:
    """The key holder's own record of what it charged to each period of `store`, kept with its keys."""
    return ChargeRecord(key_holder_signing_key_file(config).parent, store_id(store))


def audit_event(
    plan: ReleasePlan,
    store: Store,
    *,
    action: str,
    reason: str | None,
    detail: dict[str, Any],
    event: str | None = None,
) -> None:
    """One key-holder audit row; without an explicit event id, the id is derived from the content."""
    row = _event_row(plan, action=action, reason=reason, detail=detail, event=event)
    store.insert_new("audit", pa.Table.from_pylist([row], schema=AUDIT_SCHEMA))


def _event_row(
    plan: ReleasePlan, *, action: str, reason: str | None, detail: dict[str, Any], event: str | None = None
) -> dict[str, Any]:
    """The key-holder audit row audit_event inserts."""
    digest = hashlib.sha256(json.dumps([action, reason, detail], sort_keys=True).encode()).hexdigest()[:12]
    return audit_row(
        event_id=event or f"{plan.key.release_id}:{action}:{digest}",
        action=action,
        actor_role="key_holder",
        actor=plan.config.federation.id,
        plan=plan,
        reason=reason,
        detail=detail,
    )


def _refuse(plan: ReleasePlan, store: Store) -> NoReturn:
    """Record in `audit` why the aggregator refused the release, and refuse it; or, when it has neither aggregated
    nor refused yet, say so (ReleaseNotReady: a poll, not a decision, so nothing is audited)."""
    path = refusal_path(plan.config.exchange_path, plan.key)
    if not exists(path):
        raise ReleaseNotReady(
            f"release {plan.key.release_id}: no aggregate yet (the aggregator has not finished the interval, or "
            "its unmask round is still open); run `fusion release` again once `fusion aggregate` has aggregated"
        )
    refusal = json.loads(read_bytes(path))
    audit_event(plan, store, action="release_refused", reason=refusal["reason"], detail=refusal)
    raise ReleaseRefused(f"release {plan.key.release_id} refused: {refusal['reason']}")
