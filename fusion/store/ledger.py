"""The privacy-budget ledger: one row per privacy period in the store's `budget` table.

A spend is a compare-and-swap on that row (a Delta merge whose predicate includes the number of releases the
writer read), retried on conflict. So two releases racing for the last of a period's budget cannot both
succeed, and a release that was already charged (a re-run after a crash) is never charged twice. Each charge
is bound to the SHA-256 of the aggregate envelope it pays for: the key holder decrypts only what was paid
for, and a second, different aggregate for the same release (a second noisy view) is refused.

The row keeps every release's mechanism and interval, and `epsilon_spent` is the PLD epsilon of the period's
releases composed as the privacy unit implies (privacy.accountant.period_loss): in parallel at event level (the
worst instant's releases), sequentially at entity level. The RDP curve and epsilon of the same composition are
kept beside it as a cross-check that the PLD epsilon never exceeds. Rows written before the ledger kept
mechanisms (NULL `composition`) go on as they were accounted: their RDP curves add, sequentially; an older table
gains the new columns with its first spend (the merge evolves its schema).

The key holder's ledger also keeps its own record of each period's row (fusion/store/charge_record.py), written
before the store's: a store row behind that record (deleted, its releases or mechanisms rewritten, or a pass that
crashed between the two writes) is rebuilt from it before anything more is charged, and the rebuild is reported
(`BudgetLedger.restored`), so a store writer cannot roll a period's spend back. A release the store's row lists but
the record does not (listed there by another writer, or charged before the record was kept) is let through as paid
only once the record holds it too, its charge recomposed as a charge is: the record holds every charge the key holder
let decrypt, so a row that is rewritten after the release cannot take the charge back.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake.exceptions import CommitFailedError

from fusion.errors import FusionError, InternalError, ReleaseRefused
from fusion.release.plan import Period
from fusion.runtime.faults import crash_point
from fusion.store.charge_record import ChargeRecord
from fusion.store.delta import Store
from privacy.accountant import (
    ORDERS,
    Composition,
    NormBoundMechanism,
    PeriodLoss,
    ReleaseCharge,
    epsilon_from_rdp,
    mechanism_rdp,
    period_loss,
)
from privacy.pld import SkellamMechanism
from schemas.tables import BUDGET_SCHEMA

_ATTEMPTS = 50


class BudgetExceeded(ReleaseRefused):
    """The release would take its privacy period past the epsilon cap."""


@dataclass(frozen=True)
class Spend:
    """The outcome of a spend: `charged` is False when this release had already been charged."""

    period: str
    charged: bool
    epsilon_before: float
    epsilon_after: float
    cap: float


@dataclass(frozen=True)
class _PeriodRow:
    releases: int
    release_ids: tuple[str, ...]
    aggregates: tuple[str, ...]  # SHA-256 of the aggregate envelope each release was charged for
    composition: Composition | None  # None: an older row, accounted by its RDP curve alone, sequentially
    charges: tuple[ReleaseCharge, ...]  # one per release (rows with a composition only)
    rdp: np.ndarray  # the composed RDP curve
    epsilon_spent: float  # PLD (RDP for an older row)
    epsilon_rdp: float  # the RDP conversion of `rdp`: the cross-check

    @classmethod
    def empty(cls, composition: Composition) -> _PeriodRow:
        return cls(0, (), (), composition, (), np.zeros(ORDERS.size), 0.0, 0.0)

    def recomposed(self, delta: float) -> _PeriodRow:
        """This row with its loss composed anew from its charges (a row read from the store states its own loss, which
        another writer may have understated); an older row, which keeps no charges, as it is."""
        if self.composition is None or not self.charges:
            return self
        loss = period_loss(self.charges, composition=self.composition, delta=delta)
        return replace(self, rdp=loss.rdp, epsilon_spent=loss.epsilon, epsilon_rdp=loss.epsilon_rdp)

    def with_release(self, release_id: str, aggregate_sha256: str, charge: ReleaseCharge, delta: float) -> _PeriodRow:
        """This row with one more release charged, its loss recomposed."""
        if self.composition is None:  # an older row: add the RDP curve, as it was accounted
            rdp = self.rdp + (0.0 if charge.mechanism is None else mechanism_rdp(charge.mechanism))
            spent = epsilon_from_rdp(rdp, delta=delta)
            loss = PeriodLoss(spent, spent, rdp)
            charges = self.charges
        else:
            charges = (*self.charges, charge)
            loss = period_loss(charges, composition=self.composition, delta=delta)
            if loss.epsilon > loss.epsilon_rdp:
                raise InternalError(
                    f"the PLD epsilon {loss.epsilon} of period releases exceeds their RDP epsilon "
                    f"{loss.epsilon_rdp}; this is probably a bug"
                )
        return replace(
            self,
            releases=self.releases + 1,
            release_ids=(*self.release_ids, release_id),
            aggregates=(*self.aggregates, aggregate_sha256),
            charges=charges,
            rdp=loss.rdp,
            epsilon_spent=loss.epsilon,
            epsilon_rdp=loss.epsilon_rdp,
        )


#: The ledger's files are compacted into one once there are this many, as a period opens (before its row is
#: inserted). Each period's row is a file of its own (inserted by a merge, rewritten by each charge), and every
#: charge reads and merges over every file: with daily periods, a year of them made a charge take 0.6 s (0.07 s at
#: 50 periods). Compacted as a period opens, the closed periods' rows share one file that no charge rewrites.
COMPACT_FILES = 8


@dataclass(frozen=True)
class RestoredRow:
    """A period's store row found behind the key holder's record and rebuilt from it before a charge."""

    period: str
    store_release_ids: tuple[str, ...] | None  # None: the store held no row for the period
    store_epsilon_spent: float | None
    recorded_release_ids: tuple[str, ...]
    recorded_epsilon_spent: float


class BudgetLedger:
    """The budget table's rows; with `record` (the key holder's own record of its charges), also checked against
    that record on every charge."""

    def __init__(self, store: Store, record: ChargeRecord | None = None) -> None:
        self.store = store
        self.record = record
        self.restored: list[RestoredRow] = []  # the store rows this ledger's charges rebuilt from `record`

    def rows(self) -> pa.Table:
        return self.store.read("budget")

    def _row(self, period: Period, cap: float, delta: float, composition: Composition) -> _PeriodRow | None:
        """The period's row, after checking the ledger's periods are the config's (no overlaps, same cap, delta
        and composition: a cap only bounds a period at the delta its spending was converted with, so a looser
        delta mid-period would let the period take more releases than its cap allowed when it was opened; and
        releases charged in parallel cannot become sequential ones, or back, halfway through a period)."""
        # Every period's bounds and terms are checked; only this period's row (its lists grow with its releases)
        # is read in full: reading every row whole made each charge cost more with every release of the ledger.
        dataset = self.store.dataset("budget")
        terms = ["period", "period_start", "period_end", "epsilon_cap", "delta", "composition"]
        all_rows = dataset.to_table(columns=terms).to_pylist()
        for r in all_rows:
            same = (r["period"], r["period_start"], r["period_end"]) == (period.name, period.start, period.end)
            overlaps = r["period_start"] < period.end and period.start < r["period_end"]
            if overlaps and not same:
                raise FusionError(
                    f"the budget ledger holds period {r['period']} ({r['period_start']} .. {r['period_end']}), "
                    f"which overlaps {period.name} but differs from it: the privacy period changed since budget "
                    "was spent; restore the previous `period` (a ledger keeps one period grid)"
                )
            if same:
                _check_terms(r, period, cap=cap, delta=delta, composition=composition)
        if not any(r["period"] == period.name for r in all_rows):
            return None
        start = pa.scalar(period.start, BUDGET_SCHEMA.field("period_start").type)
        held = dataset.to_table(filter=pc.field("period_start") == start).cast(BUDGET_SCHEMA)  # no text filter:
        rows = [r for r in held.to_pylist() if r["period"] == period.name]  # merges write string_view
        if not rows:  # held under another start (the checks above allow no such row): read every row
            rows = [r for r in self.rows().to_pylist() if r["period"] == period.name]
        if len(rows) > 1:
            raise InternalError(f"the budget table holds {len(rows)} rows for period {period.name}")
        return _parse_row(rows[0])

    def check(self, *, period: Period, release_id: str, charge: ReleaseCharge, cap: float, delta: float) -> None:
        """Raise BudgetExceeded now if the release could not be charged (a preview; `spend` decides)."""
        row = self._base(period, cap, delta, charge.composition) or _PeriodRow.empty(charge.composition)
        if release_id not in row.release_ids:
            _refuse_if_over(period, release_id, row, row.with_release(release_id, "", charge, delta), cap)
        elif (mismatch := _listed_otherwise(row, release_id, charge)) is not None:
            raise mismatch

    def charged(self, *, period: Period, cap: float, delta: float, composition: Composition) -> dict[str, str]:
        """Release id -> the SHA-256 of the aggregate it was charged for, of every release the period's row holds as
        the next charge would start from it: the store's row, or the key holder's record where the store's row is
        behind it (deleted, rolled back, or a pass that crashed between the two writes)."""
        row = self._base(period, cap, delta, composition)
        return {} if row is None else dict(zip(row.release_ids, row.aggregates, strict=True))

    def preview(
        self, *, period: Period, charges: Sequence[ReleaseCharge], cap: float, delta: float
    ) -> tuple[float, float]:
        """(epsilon spent in the period now, epsilon after `charges` too, none yet made): what a run of several
        charges, such as a training run's rounds, would spend. Refuses nothing: compare the second with `cap`."""
        if not charges:
            raise InternalError("nothing to preview; this is probably a bug")
        composition = charges[0].composition
        row = self._base(period, cap, delta, composition) or _PeriodRow.empty(composition)
        after = row
        for k, charge in enumerate(charges):
            after = after.with_release(f"preview-{k}", "", charge, delta)
        return row.epsilon_spent, after.epsilon_spent

    def spend(
        self,
        *,
        period: Period,
        release_id: str,
        aggregate_sha256: str,
        charge: ReleaseCharge,
        cap: float,
        delta: float,
    ) -> Spend:
        """Charge one release to its period, or raise BudgetExceeded. Idempotent per release."""
        (outcome,) = self.spend_all(
            period=period, releases=[(release_id, aggregate_sha256, charge)], cap=cap, delta=delta
        )
        if isinstance(outcome, ReleaseRefused):
            raise outcome
        return outcome

    def spend_all(
        self,
        *,
        period: Period,
        releases: Sequence[tuple[str, str, ReleaseCharge]],
        cap: float,
        delta: float,
    ) -> list[Spend | ReleaseRefused]:
        """Charge several releases, each (release id, aggregate SHA-256, charge), to one period in one commit:
        exactly as charging them one after another, in order (each its own entry in the period's row, its own
        Spend; one over the cap, or already charged for another aggregate, is refused and the others go on).
        One outcome per release, in order: its Spend, or the refusal (BudgetExceeded or ReleaseRefused)."""
        compositions = {charge.composition for _, _, charge in releases}
        if len(compositions) != 1:
            raise InternalError(
                f"releases of one period charged under {len(compositions)} compositions; this is probably a bug"
            )
        (composition,) = compositions
        with self.record.lock() if self.record is not None else nullcontext():
            return self._spend_all(period, releases, cap=cap, delta=delta, composition=composition)

    def _base(self, period: Period, cap: float, delta: float, composition: Composition) -> _PeriodRow | None:
        """The period's row as a charge would start from it (the store's, or the key holder's record when the
        store's is behind it)."""
        held = self._held(period, cap, delta, composition)
        current = self._row(period, cap, delta, composition)
        return _reconcile(current, None if held is None else _parse_row(held), delta=delta)[0]

    def _held(self, period: Period, cap: float, delta: float, composition: Composition) -> dict[str, Any] | None:
        """The key holder's record of the period's row (None: no record kept, or none of this period yet)."""
        held = None if self.record is None else self.record.read(period.name)
        if held is not None:
            _check_terms(held, period, cap=cap, delta=delta, composition=composition)
        return held

    def _spend_all(
        self,
        period: Period,
        releases: Sequence[tuple[str, str, ReleaseCharge]],
        *,
        cap: float,
        delta: float,
        composition: Composition,
    ) -> list[Spend | ReleaseRefused]:
        for _ in range(_ATTEMPTS):
            current = self._row(period, cap, delta, composition)
            held = self._held(period, cap, delta, composition)
            recorded = None if held is None else _parse_row(held)
            base, behind = _reconcile(current, recorded, delta=delta)
            row = base or _PeriodRow.empty(composition)
            after = row
            outcomes: list[Spend | ReleaseRefused] = []
            for release_id, aggregate_sha256, charge in releases:
                if release_id in after.release_ids:
                    charged_for = after.aggregates[after.release_ids.index(release_id)]
                    if charged_for != aggregate_sha256:
                        outcomes.append(
                            ReleaseRefused(
                                f"release {release_id} was already charged for another aggregate "
                                f"({charged_for[:12]}...); decrypting a different one would publish a second noisy "
                                "view of the same data"
                            )
                        )
                    elif (mismatch := _listed_otherwise(after, release_id, charge)) is not None:
                        outcomes.append(mismatch)
                    else:
                        outcomes.append(Spend(period.name, False, after.epsilon_spent, after.epsilon_spent, cap))
                    continue
                charged = after.with_release(release_id, aggregate_sha256, charge, delta)
                try:
                    _refuse_if_over(period, release_id, after, charged, cap)
                except BudgetExceeded as exc:
                    outcomes.append(exc)
                    continue
                outcomes.append(Spend(period.name, True, after.epsilon_spent, charged.epsilon_spent, cap))
                after = charged
            # A release the row lists but the key holder's record does not (listed by another writer of the store,
            # or charged before the record was kept) is let through as paid: the record takes it in first, as a charge
            # would, so that no later rewrite of the store's row can take back a charge that let a release decrypt.
            recorded_ids = () if recorded is None else recorded.release_ids
            adopted = self.record is not None and any(
                isinstance(outcome, Spend) and not outcome.charged and release_id not in recorded_ids
                for outcome, (release_id, _, _) in zip(outcomes, releases, strict=True)
            )
            if after is row and not behind and not adopted:  # nothing new to charge, rebuild or record
                return outcomes
            if adopted and after is row:  # its loss as this ledger composes its charges, not as the row states it
                after = row.recomposed(delta)
            doc = _row_doc(period, after, cap=cap, delta=delta)
            new = pa.Table.from_pylist([doc], schema=BUDGET_SCHEMA)
            if current is None:  # a period opens: compact the others' rows first, so that its own stays a file
                self.store.compact("budget", min_files=COMPACT_FILES)  # its charges rewrite, not the whole ledger
            charging = self.record is not None and (after is not row or adopted)
            if charging:  # the key holder's record first: a crash after it leaves the store behind, rebuilt next time
                assert self.record is not None
                self.record.write(period.name, doc)
                crash_point("after_charge_record")
            try:
                if self._swap(new, 0 if current is None else current.releases, exists=current is not None):
                    if behind:
                        assert recorded is not None
                        self.restored.append(
                            RestoredRow(
                                period=period.name,
                                store_release_ids=None if current is None else current.release_ids,
                                store_epsilon_spent=None if current is None else current.epsilon_spent,
                                recorded_release_ids=recorded.release_ids,
                                recorded_epsilon_spent=recorded.epsilon_spent,
                            )
                        )
                    return outcomes
            except CommitFailedError:
                pass  # another writer committed first: read again
            if charging:  # not committed: the record goes back to what the store may still catch up with
                assert self.record is not None
                self.record.write(period.name, held)
            time.sleep(random.uniform(0.01, 0.1))
        raise FusionError(f"could not update the budget of period {period.name}: too much contention; retry")

    def _swap(self, new: pa.Table, releases: int, *, exists: bool) -> bool:
        """Write `new` only if the period's row still holds `releases` releases (or is still absent)."""
        table = self.store.delta_table("budget")
        # merge_schema: a table from before the ledger kept mechanisms gains those (nullable) columns with the
        # first new row, rather than dropping them silently.
        if exists:
            predicate = f"t.period = s.period AND t.releases = {int(releases)}"
            merge = table.merge(new, predicate=predicate, source_alias="s", target_alias="t", merge_schema=True)
            return int(merge.when_matched_update_all().execute()["num_target_rows_updated"]) == 1
        merge = table.merge(new, predicate="t.period = s.period", source_alias="s", target_alias="t", merge_schema=True)
        return int(merge.when_not_matched_insert_all().execute()["num_target_rows_inserted"]) == 1


@dataclass(frozen=True)
class PeriodBudget:
    """A period's budget as the key holder's ledger counts it (`fusion budget`, the dashboard's Budget page)."""

    row: dict[str, Any]  # the `budget` columns the period's next charge starts from
    store_behind: bool | None  # the store's row is behind the key holder's record (None: the record holds no row)
    store_rows: tuple[dict[str, Any], ...]  # the store's own rows of the period, as published (the ledger keeps one)


#: The columns that fix a period's terms: a row under other terms than the record's is not the period's row.
_TERMS = ("period_start", "period_end", "epsilon_cap", "delta", "composition")


def reconciled_periods(
    store_rows: Iterable[dict[str, Any]], recorded_rows: Iterable[dict[str, Any]]
) -> list[PeriodBudget]:
    """Every period of the store's `budget` rows and of the key holder's record of them (`ChargeRecord.rows`), as
    `BudgetLedger` counts it: a store row holding every recorded release as recorded (and no less spend) as it is;
    one behind the record (missing, rolled back, rewritten, one of several, under other terms, or a pass that
    crashed between the two writes) as the record has it, with any release the store's rows list beyond it composed
    on top (never less spend than either shows). A period the record does not hold is its store rows as they are.
    Ordered by period."""
    recorded = {r["period"]: r for r in recorded_rows}
    published: dict[str, list[dict[str, Any]]] = {}
    for r in store_rows:
        published.setdefault(r["period"], []).append(r)
    periods: list[PeriodBudget] = []
    for name in sorted(published.keys() | recorded.keys()):
        rows = tuple(published.get(name, ()))
        held = recorded.get(name)
        if held is None:
            periods.extend(PeriodBudget(r, None, rows) for r in rows)
            continue
        base = _parse_row(held)
        behind = len(rows) != 1 or any(rows[0].get(term) != held.get(term) for term in _TERMS)
        for r in rows:
            try:
                current = _parse_row(r)
            except (InternalError, ValueError, TypeError, KeyError):  # a row the ledger could not have written
                behind = True
                continue
            reconciled, differs = _reconcile(current, base, delta=held["delta"])
            assert reconciled is not None  # `base` is always there to fall back on
            base, behind = reconciled, behind or differs
        row = _row_doc(
            Period(name, held["period_start"], held["period_end"]), base, cap=held["epsilon_cap"], delta=held["delta"]
        )
        row["updated_at"] = (held if behind else rows[0])["updated_at"]
        periods.append(PeriodBudget(row, behind, rows))
    return periods


def _check_terms(r: dict[str, Any], period: Period, *, cap: float, delta: float, composition: Composition) -> None:
    """Refuse a config whose cap, delta or composition differ from those the period's row was opened with."""
    if r["epsilon_cap"] != cap:
        raise FusionError(
            f"period {period.name} was opened with epsilon_cap {r['epsilon_cap']}, the config now says "
            f"{cap}; a period's cap cannot change once budget is spent in it"
        )
    if r["delta"] != delta:
        raise FusionError(
            f"period {period.name} was opened with delta {r['delta']}, the config now says {delta}; "
            "a period's delta cannot change once budget is spent in it (restore privacy.delta until "
            f"{r['period_end']})"
        )
    if r.get("composition") not in (None, composition.value):
        raise FusionError(
            f"period {period.name} composes its releases in {r['composition']} (its privacy unit), the "
            f"config now implies {composition.value}; a period's privacy unit cannot change once budget is "
            f"spent in it (restore privacy.unit until {r['period_end']})"
        )


def _reconcile(
    current: _PeriodRow | None, recorded: _PeriodRow | None, *, delta: float
) -> tuple[_PeriodRow | None, bool]:
    """(the row to charge onto, whether the store's row is behind the key holder's record). The store's row is
    trusted when it starts with every release the record holds, each for the same aggregate and mechanism;
    otherwise (deleted, rewritten, or a crash between the two writes) the record's row is, with any release the
    store's row holds beyond it composed on top (never less spend than either shows)."""
    if recorded is None:
        return current, False
    if current is not None and _extends(current, recorded):
        return current, False
    base = recorded
    if current is not None and current.composition is not None and current.composition == recorded.composition:
        for release_id, aggregate, charge in zip(current.release_ids, current.aggregates, current.charges, strict=True):
            if release_id not in base.release_ids:
                base = base.with_release(release_id, aggregate, charge, delta)
    return base, True


def _listed_otherwise(row: _PeriodRow, release_id: str, charge: ReleaseCharge) -> ReleaseRefused | None:
    """The refusal when the period's row lists the release with another charge than its own (its mechanism,
    interval or composition): an entry this ledger did not write, which would let the release through as already
    paid at another price (a free mechanism, or one that composes in parallel). None when it is its own, or the
    row is an older one that records no charges."""
    if row.composition is None:
        return None
    listed = row.charges[row.release_ids.index(release_id)]
    if listed == charge:
        return None
    return ReleaseRefused(
        f"release {release_id} is listed in period's budget row with another charge ({listed}) than its own "
        f"({charge}): the row was not written by this ledger, so nothing is decrypted; `fusion verify` reports the "
        "row, and the key holder's record of the period rebuilds it"
    )


def _extends(current: _PeriodRow, recorded: _PeriodRow) -> bool:
    """Whether the store's row holds the recorded releases first, as recorded (and no less spend)."""
    n = recorded.releases
    return (
        current.composition == recorded.composition
        and current.release_ids[:n] == recorded.release_ids
        and current.aggregates[:n] == recorded.aggregates
        and current.charges[:n] == recorded.charges
        and current.epsilon_spent >= recorded.epsilon_spent
        and bool(np.all(current.rdp >= recorded.rdp))
    )


def _parse_row(r: dict[str, Any]) -> _PeriodRow:
    composition = None if r.get("composition") is None else Composition(r["composition"])
    charges: tuple[ReleaseCharge, ...] = ()
    if composition is not None:
        bounds = r.get("norm_bounds") or [None] * len(r["mechanisms"] or ())
        charges = tuple(
            ReleaseCharge(
                mechanism=_mechanism(m, bound),
                start=m["interval_start"],
                end=m["interval_end"],
                composition=composition,
            )
            for m, bound in zip(r["mechanisms"] or (), bounds, strict=True)
        )
        if len(charges) != r["releases"]:
            raise InternalError(
                f"budget period {r['period']} lists {len(charges)} mechanisms for {r['releases']} releases"
            )
    return _PeriodRow(
        releases=r["releases"],
        release_ids=tuple(r["release_ids"]),
        aggregates=tuple(r["aggregates"]),
        composition=composition,
        charges=charges,
        rdp=np.asarray(r["rdp"], dtype=float),
        epsilon_spent=r["epsilon_spent"],
        epsilon_rdp=r["epsilon_spent"] if r.get("epsilon_rdp") is None else r["epsilon_rdp"],
    )


def recorded_charges(r: dict[str, Any]) -> dict[str, tuple[str, ReleaseCharge | None]]:
    """Release id -> (the aggregate SHA-256 it was charged for, its charge; None in a row from before the ledger
    kept mechanisms) of one `budget` row; InternalError for a row whose lists disagree."""
    row = _parse_row(r)
    if len(row.aggregates) != len(row.release_ids):
        raise InternalError(
            f"budget period {r['period']} lists {len(row.aggregates)} aggregates for {len(row.release_ids)} releases"
        )
    charges: Sequence[ReleaseCharge | None] = row.charges if row.composition is not None else [None] * row.releases
    return dict(zip(row.release_ids, zip(row.aggregates, charges, strict=False), strict=False))


def _mechanism(m: dict[str, Any], bound: dict[str, Any] | None) -> SkellamMechanism | NormBoundMechanism | None:
    """One charge's mechanism from its `mechanisms` entry and its `norm_bounds` entry (None: per-slot shape)."""
    if m["variance"] is None:
        return None
    if bound is not None:
        return NormBoundMechanism(m["variance"], bound["l1"], bound["l2"])
    return SkellamMechanism(m["variance"], m["coordinates"], m["shift"])


def _row_doc(period: Period, row: _PeriodRow, *, cap: float, delta: float) -> dict[str, Any]:
    mechanisms = norm_bounds = None
    if row.composition is not None:
        mechanisms = [
            {
                "interval_start": c.start,
                "interval_end": c.end,
                "variance": None if c.mechanism is None else c.mechanism.variance,
                "coordinates": c.mechanism.coordinates if isinstance(c.mechanism, SkellamMechanism) else None,
                "shift": c.mechanism.shift if isinstance(c.mechanism, SkellamMechanism) else None,
            }
            for c in row.charges
        ]
        if any(isinstance(c.mechanism, NormBoundMechanism) for c in row.charges):  # training rounds (training/)
            norm_bounds = [
                {"l1": c.mechanism.l1, "l2": c.mechanism.l2} if isinstance(c.mechanism, NormBoundMechanism) else None
                for c in row.charges
            ]
    return {
        "period": period.name,
        "period_start": period.start,
        "period_end": period.end,
        "epsilon_cap": cap,
        "epsilon_spent": row.epsilon_spent,
        "delta": delta,
        "releases": row.releases,
        "release_ids": list(row.release_ids),
        "aggregates": list(row.aggregates),
        "rdp": row.rdp.tolist(),
        "updated_at": datetime.now(UTC),
        "composition": None if row.composition is None else row.composition.value,
        "mechanisms": mechanisms,
        "epsilon_rdp": row.epsilon_rdp,
        "norm_bounds": norm_bounds,
    }


def _refuse_if_over(period: Period, release_id: str, before: _PeriodRow, after: _PeriodRow, cap: float) -> None:
    """Raise BudgetExceeded if charging the release takes the period past the cap."""
    if after.epsilon_spent > cap:
        spent = before.epsilon_spent
        raise BudgetExceeded(
            f"release {release_id} needs epsilon {after.epsilon_spent - spent:.4f} in period {period.name}, which "
            f"would reach {after.epsilon_spent:.4f}; the cap is {cap:.4f} and {max(cap - spent, 0.0):.4f} is left"
        )
