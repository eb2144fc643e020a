"""The privacy-budget ledger: one row per privacy period in the store's `budget` table.

A spend is a compare-and-swap on that row (a Delta merge whose predicate includes the number of releases the
writer read), retried on conflict. So two releases racing for the last of a period's budget cannot both
succeed, and a release that was already charged (a re-run after a crash) is never charged twice. Each charge
is bound to the SHA-256 of the aggregate envelope it pays for: the key holder decrypts only what was paid
for, and a second, different aggregate for the same release (a second noisy view) is refused.
Releases in a period compose in Renyi DP (their curves add); `epsilon_spent` is the conversion of the sum.
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


@dataclass(frozen=True)
class _PeriodRow:
    releases: int
    release_ids: tuple[str, ...]
    aggregates: tuple[str, ...]  # SHA-256 of the aggregate envelope each release was charged for
    rdp: np.ndarray

    @classmethod
    def empty(cls) -> _PeriodRow:
        return cls(0, (), (), np.zeros(ORDERS.size))


class BudgetLedger:
    def __init__(self, store: Store) -> None:
        self.store = store

    def rows(self) -> pa.Table:
        return self.store.read("budget")

    def _row(self, period: Period, cap: float, delta: float) -> _PeriodRow | None:
        """The period's row, after checking the ledger's periods are the config's (no overlaps, same cap and
        delta: a cap only bounds a period at the delta its spending was converted with, so a looser delta
        mid-period would let the period take more releases than its cap allowed when it was opened)."""
        all_rows = self.rows().to_pylist()
        for r in all_rows:
            same = (r["period"], r["period_start"], r["period_end"]) == (period.name, period.start, period.end)
            overlaps = r["period_start"] < period.end and period.start < r["period_end"]
            if overlaps and not same:
                raise FusionError(
                    f"the budget ledger holds period {r['period']} ({r['period_start']} .. {r['period_end']}), "
                    f"which overlaps {period.name} but differs from it: the privacy period changed since budget "
                    "was spent; restore the previous `period` (a ledger keeps one period grid)"
                )
            if same and r["epsilon_cap"] != cap:
                raise FusionError(
                    f"period {period.name} was opened with epsilon_cap {r['epsilon_cap']}, the config now says "
                    f"{cap}; a period's cap cannot change once budget is spent in it"
                )
            if same and r["delta"] != delta:
                raise FusionError(
                    f"period {period.name} was opened with delta {r['delta']}, the config now says {delta}; "
                    "a period's delta cannot change once budget is spent in it (restore privacy.delta until "
                    f"{r['period_end']})"
                )
        rows = [r for r in all_rows if r["period"] == period.name]
        if len(rows) > 1:
            raise InternalError(f"the budget table holds {len(rows)} rows for period {period.name}")
        if not rows:
            return None
        r = rows[0]
        return _PeriodRow(r["releases"], tuple(r["release_ids"]), tuple(r["aggregates"]), np.asarray(r["rdp"]))

    def check(self, *, period: Period, release_id: str, rdp: np.ndarray, cap: float, delta: float) -> None:
        """Raise BudgetExceeded now if the release could not be charged (a preview; `spend` decides)."""
        row = self._row(period, cap, delta) or _PeriodRow.empty()
        if release_id not in row.release_ids:
            _refuse_if_over(period, release_id, row.rdp, np.asarray(rdp, dtype=float), cap, delta)

    def spend(
        self, *, period: Period, release_id: str, aggregate_sha256: str, rdp: np.ndarray, cap: float, delta: float
    ) -> Spend:
        """Charge one release's RDP curve to its period, or raise BudgetExceeded. Idempotent per release."""
        rdp = np.asarray(rdp, dtype=float)
        for _ in range(_ATTEMPTS):
            current = self._row(period, cap, delta)
            row = current or _PeriodRow.empty()
            if release_id in row.release_ids:
                charged_for = row.aggregates[row.release_ids.index(release_id)]
                if charged_for != aggregate_sha256:
                    raise ReleaseRefused(
                        f"release {release_id} was already charged for another aggregate ({charged_for[:12]}...); "
                        "decrypting a different one would publish a second noisy view of the same data"
                    )
                spent = epsilon_from_rdp(row.rdp, delta=delta)
                return Spend(period.name, False, spent, spent, cap)
            before, after = _refuse_if_over(period, release_id, row.rdp, rdp, cap, delta)
            new = pa.Table.from_pylist(
                [
                    {
                        "period": period.name,
                        "period_start": period.start,
                        "period_end": period.end,
                        "epsilon_cap": cap,
                        "epsilon_spent": after,
                        "delta": delta,
                        "releases": row.releases + 1,
                        "release_ids": [*row.release_ids, release_id],
                        "aggregates": [*row.aggregates, aggregate_sha256],
                        "rdp": (row.rdp + rdp).tolist(),
                        "updated_at": datetime.now(UTC),
                    }
                ],
                schema=BUDGET_SCHEMA,
            )
            try:
                if self._swap(new, row.releases, exists=current is not None):
                    return Spend(period.name, True, before, after, cap)
            except CommitFailedError:
                pass  # another writer committed first: read again
            time.sleep(random.uniform(0.01, 0.1))
        raise FusionError(f"could not update the budget of period {period.name}: too much contention; retry")

    def _swap(self, new: pa.Table, releases: int, *, exists: bool) -> bool:
        """Write `new` only if the period's row still holds `releases` releases (or is still absent)."""
        table = self.store.delta_table("budget")
        if exists:
            predicate = f"t.period = s.period AND t.releases = {int(releases)}"
            merge = table.merge(new, predicate=predicate, source_alias="s", target_alias="t")
            return int(merge.when_matched_update_all().execute()["num_target_rows_updated"]) == 1
        merge = table.merge(new, predicate="t.period = s.period", source_alias="s", target_alias="t")
        return int(merge.when_not_matched_insert_all().execute()["num_target_rows_inserted"]) == 1


def _refuse_if_over(
    period: Period, release_id: str, before_rdp: np.ndarray, rdp: np.ndarray, cap: float, delta: float
) -> tuple[float, float]:
    """(epsilon before, epsilon after) of charging `rdp`; raises BudgetExceeded if after > cap."""
    before = epsilon_from_rdp(before_rdp, delta=delta)
    after = epsilon_from_rdp(before_rdp + rdp, delta=delta)
    if after > cap:
        raise BudgetExceeded(
            f"release {release_id} needs epsilon {after - before:.4f} in period {period.name}, which "
            f"would reach {after:.4f}; the cap is {cap:.4f} and {max(cap - before, 0.0):.4f} is left"
        )
    return before, after
