"""The Budget view: epsilon spent and left per privacy period with the composition rule, and the releases the
ledger refused because they would have taken a period past its cap."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from dashboard.snapshot import Snapshot

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
    note: str | None = None


def budget_view(snapshot: Snapshot) -> BudgetView:
    privacy = snapshot.config.privacy
    periods = [
        BudgetPeriod(**row, release_ids=[str(r) for r in row.pop("ids") or []])
        for row in snapshot.rows(
            "SELECT period, period_start, period_end, coalesce(composition, 'sequential') AS composition, "
            "epsilon_cap, epsilon_spent, greatest(epsilon_cap - epsilon_spent, 0) AS epsilon_left, epsilon_rdp, "
            f"delta, releases, release_ids AS ids FROM budget ORDER BY period_start DESC LIMIT {MAX_PERIODS}"
        )
    ]
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
        refusals=refusals, note=None if periods else "no budget spent yet: nothing has been released",
    )


def chart_points(view: BudgetView) -> list[dict[str, object]]:
    """Spent, cap and left per period, oldest first."""
    return [{"period": p.period, "spent": p.epsilon_spent, "cap": p.epsilon_cap, "left": p.epsilon_left}
            for p in reversed(view.periods)]
