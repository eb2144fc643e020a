"""The privacy-budget ledger: one row per privacy period in the store's `budget` table.

A spend is a compare-and-swap on that row (a Delta merge whose predicate includes the number of releases the
writer read), retried on conflict. So two releases racing for the last of a period's budget cannot both
succeed, and a release that was already charged (a re-run after a crash) is never charged twice. Releases in
a period compose in Renyi DP (their curves add); `epsilon_spent` is the conversion of the composed curve.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
from deltalake.exceptions import CommitFailedError

from fusion.errors import FusionError, InternalError, ReleaseRefused
from fusion.plan import Period
from fusion.store import Store
from privacy.accountant import ORDERS, epsilon_from_rdp
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


class BudgetLedger:
    def __init__(self, store: Store) -> None:
        self.store = store

    def rows(self) -> pa.Table:
        return self.store.read("budget")

    def _row(self, period: str) -> dict[str, object] | None:
        rows = [r for r in self.rows().to_pylist() if r["period"] == period]
        if len(rows) > 1:
            raise InternalError(f"the budget table holds {len(rows)} rows for period {period}")
        return rows[0] if rows else None

    def spent(self, period: str) -> float:
        row = self._row(period)
        return float(row["epsilon_spent"]) if row else 0.0  # type: ignore[arg-type]

    def check(self, *, period: Period, release_id: str, rdp: np.ndarray, cap: float, delta: float) -> None:
        """Raise BudgetExceeded now if the release could not be charged (a preview; `spend` decides)."""
        row = self._row(period.name)
        if row and release_id in row["release_ids"]:  # type: ignore[operator]
            return
        before_rdp = np.asarray(row["rdp"], dtype=float) if row else np.zeros(ORDERS.size)
        self._refuse_if_over(period, release_id, before_rdp, np.asarray(rdp, dtype=float), cap, delta)

    @staticmethod
    def _refuse_if_over(
        period: Period, release_id: str, before_rdp: np.ndarray, rdp: np.ndarray, cap: float, delta: float
    ) -> tuple[float, float]:
        before = epsilon_from_rdp(before_rdp, delta=delta)
        after = epsilon_from_rdp(before_rdp + rdp, delta=delta)
        if after > cap:
            raise BudgetExceeded(
                f"release {release_id} needs epsilon {after - before:.4f} in period {period.name}, which "
                f"would reach {after:.4f}; the cap is {cap:.4f} and {max(cap - before, 0.0):.4f} is left"
            )
        return before, after

    def spend(self, *, period: Period, release_id: str, rdp: np.ndarray, cap: float, delta: float) -> Spend:
        """Charge one release's RDP curve to its period, or raise BudgetExceeded. Idempotent per release."""
        rdp = np.asarray(rdp, dtype=float)
        for _ in range(_ATTEMPTS):
            row = self._row(period.name)
            before_rdp = np.asarray(row["rdp"], dtype=float) if row else np.zeros(ORDERS.size)
            if row and release_id in row["release_ids"]:  # type: ignore[operator]
                spent = epsilon_from_rdp(before_rdp, delta=delta)
                return Spend(period.name, False, spent, spent, cap)
            before, after = self._refuse_if_over(period, release_id, before_rdp, rdp, cap, delta)
            releases = int(row["releases"]) if row else 0  # type: ignore[call-overload]
            ids = [*row["release_ids"], release_id] if row else [release_id]  # type: ignore[misc]
            new = pa.Table.from_pylist(
                [
                    {
                        "period": period.name,
                        "period_start": period.start,
                        "period_end": period.end,
                        "epsilon_cap": cap,
                        "epsilon_spent": after,
                        "delta": delta,
                        "releases": releases + 1,
                        "release_ids": ids,
                        "rdp": (before_rdp + rdp).tolist(),
                        "updated_at": datetime.now(UTC),
                    }
                ],
                schema=BUDGET_SCHEMA,
            )
            try:
                if self._swap(new, period.name, releases, exists=row is not None):
                    return Spend(period.name, True, before, after, cap)
            except CommitFailedError:
                pass  # another writer committed first: read again
            time.sleep(random.uniform(0.01, 0.1))
        raise FusionError(f"could not update the budget of period {period.name}: too much contention; retry")

    def _swap(self, new: pa.Table, period: str, releases: int, *, exists: bool) -> bool:
        """Write `new` only if the period's row still holds `releases` releases (or is still absent)."""
        table = self.store.delta_table("budget")
        if exists:
            metrics = (
                table.merge(
                    new,
                    predicate=f"t.period = s.period AND t.releases = {releases}",
                    source_alias="s",
                    target_alias="t",
                )
                .when_matched_update_all()
                .execute()
            )
            return int(metrics["num_target_rows_updated"]) == 1
        metrics = (
            table.merge(new, predicate="t.period = s.period", source_alias="s", target_alias="t")
            .when_not_matched_insert_all()
            .execute()
        )
        del period
        return int(metrics["num_target_rows_inserted"]) == 1
