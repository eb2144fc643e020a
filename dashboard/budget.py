"""The Budget view: epsilon spent and left per privacy period with the composition rule, and the releases the
ledger refused because they would have taken a period past its cap.

Where the key holder's record of its charges is readable by the dashboard's process (the key holder's keys directory,
as the config names it), each period is shown as the key holder's ledger counts it: the store's row checked against
that record, and marked where it is behind it (fusion/store/ledger.py `reconciled_periods`). Elsewhere the periods are
the store's `budget` rows as published, which anyone who can write to the store can change, and the page says so."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel

from dashboard.snapshot import Snapshot
from fusion.store.charge_record import key_holder_record

if TYPE_CHECKING:  # the accountant loads where a key holder's record is read
    from fusion.store.ledger import PeriodBudget

#: The most periods and refusals one view lists (newest first).
MAX_PERIODS = 2_000
MAX_REFUSALS = 500

#: How the ledger composes a period's releases (the text `fusion budget` prints).
COMPOSITION_RULES = {
    "parallel": "event level: each reading is in one interval, so releases of disjoint intervals do not add up; "
                "the period spends what its worst instant's releases compose to (PLD accounting)",
    "sequential": "entity level: all of the period's releases compose (PLD accounting)",
}


class BudgetPeriod(BaseModel):
    period: str
    period_start: datetime
    period_end: datetime
    composition: str  # parallel | sequential (older rows: sequential, RDP)
    epsilon_cap: float
    epsilon_spent: float
    epsilon_left: float
    epsilon_rdp: float | None  # the looser RDP bound of the same composition
    delta: float
    releases: int
    release_ids: list[str]
    # True: the store's row is behind the key holder's record (deleted, rolled back or rewritten, or a charge between
    # its two writes), and the figures are the record's; None: not compared (no record of the period readable here).
    store_behind: bool | None = None
    store_epsilon_spent: float | None = None  # what the store's own row says (None: no single row, or not compared)


class BudgetRefusal(BaseModel):
    """An audit event `budget_refused`: a release the ledger refused."""

    at: datetime
    actor: str
    release_id: str | None
    interval_start: datetime | None
    interval_end: datetime | None
    reason: str | None


class BudgetView(BaseModel):
    epsilon_per_release: float  # the config's [privacy] epsilon
    epsilon_cap: float
    period: str
    unit: str  # the privacy unit: reading (event level) or entity
    rules: dict[str, str]  # composition -> what it means
    periods: list[BudgetPeriod]  # newest first
    refusals: list[BudgetRefusal]  # newest first
    reconciled: bool  # the periods are checked against the key holder's record (False: as the store publishes them)
    source: str  # what the periods' figures are, in a sentence
    note: str | None = None


#: What the periods' figures are, without and with the key holder's record.
PUBLISHED = ("as the store's budget table publishes them, which anyone who can write to the store can change: only "
             "where the key holder's record of its charges is readable (its `fusion budget`, or this dashboard run "
             "with its keys directory) are they checked against that record, as its cap checks are")
RECONCILED = ("as the key holder's ledger counts them: the store's budget rows checked against the key holder's own "
              "record of its charges, as its cap checks are; a period whose store row is behind that record is marked")


def budget_view(snapshot: Snapshot) -> BudgetView:
    privacy = snapshot.config.privacy
    record = key_holder_record(snapshot.config)
    if record is None:
        periods = [
            BudgetPeriod(**row, release_ids=[str(r) for r in row.pop("ids") or []])
            for row in snapshot.rows(
                "SELECT period, period_start, period_end, coalesce(composition, 'sequential') AS composition, "
                "epsilon_cap, epsilon_spent, greatest(epsilon_cap - epsilon_spent, 0) AS epsilon_left, epsilon_rdp, "
                f"delta, releases, release_ids AS ids FROM budget ORDER BY period_start DESC LIMIT {MAX_PERIODS}"
            )
        ]
    else:
        from fusion.store.ledger import reconciled_periods

        recorded = record.rows()
        reconciled = reconciled_periods(snapshot.rows("SELECT * FROM budget"), recorded)
        newest = sorted(reconciled, key=lambda p: p.row["period_start"], reverse=True)[:MAX_PERIODS]
        periods = [_period(p) for p in newest]
    refusals = [
        BudgetRefusal(**row)
        for row in snapshot.rows(
            'SELECT "at", actor, release_id, interval_start, interval_end, reason FROM audit '
            "WHERE action = 'budget_refused' " f'ORDER BY "at" DESC, event_id LIMIT {MAX_REFUSALS}'
        )
    ]
    return BudgetView(
        epsilon_per_release=privacy.epsilon, epsilon_cap=privacy.cap, period=privacy.period,
        unit=str(getattr(privacy.unit, "value", privacy.unit)), rules=COMPOSITION_RULES, periods=periods,
        refusals=refusals, reconciled=record is not None, source=PUBLISHED if record is None else RECONCILED,
        note=None if periods else "no budget spent yet: nothing has been released",
    )


def _period(period: PeriodBudget) -> BudgetPeriod:
    row = period.row
    (own,) = period.store_rows if len(period.store_rows) == 1 else (None,)
    return BudgetPeriod(
        period=row["period"], period_start=row["period_start"], period_end=row["period_end"],
        composition=row["composition"] or "sequential", epsilon_cap=row["epsilon_cap"],
        epsilon_spent=row["epsilon_spent"], epsilon_left=max(row["epsilon_cap"] - row["epsilon_spent"], 0.0),
        epsilon_rdp=row.get("epsilon_rdp"), delta=row["delta"], releases=row["releases"],
        release_ids=[str(r) for r in row["release_ids"] or []], store_behind=period.store_behind,
        store_epsilon_spent=None if own is None else own["epsilon_spent"],
    )


def chart_points(view: BudgetView) -> list[dict[str, object]]:
    """Spent, cap and left per period, oldest first."""
    return [{"period": p.period, "spent": p.epsilon_spent, "cap": p.epsilon_cap, "left": p.epsilon_left}
            for p in reversed(view.periods)]
