"""BudgetLedger.spend_all: several releases charged to one period in one commit, exactly as charging them one
after another (each its own entry and Spend; one over the cap, or charged for another aggregate, refused alone)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fusion.errors import ReleaseRefused
from fusion.store.delta import Store
from fusion.store.ledger import BudgetExceeded, BudgetLedger, Spend
from privacy.accountant import skellam_epsilon
from tests.fusion.store.test_ledger import DAY, DELTA, MECHANISM, PARALLEL, charge, sha, spend

CAP = skellam_epsilon([MECHANISM] * 2, delta=DELTA) + 1e-9  # two releases over the same instant
# The day, its morning and evening (each instant under two releases), then noon (a third over 11:00-13:00).
RELEASES = [("day", (0, 24)), ("morning", (0, 12)), ("evening", (12, 24)), ("noon", (11, 13)), ("night", (23, 24))]


def spend_all(
    ledger: BudgetLedger, releases: list[tuple[str, tuple[int, int]]], digest: Callable[[str], str] = sha
) -> list[Spend | ReleaseRefused]:
    return ledger.spend_all(
        period=DAY,
        releases=[(rid, digest(rid), charge(hours, PARALLEL)) for rid, hours in releases],
        cap=CAP,
        delta=DELTA,
    )


def test_charging_together_is_charging_one_after_another_in_one_commit(tmp_path: Path) -> None:
    store = Store(tmp_path / "together")
    together = BudgetLedger(store)
    one_by_one = BudgetLedger(Store(tmp_path / "one-by-one"))
    for ledger in (together, one_by_one):  # the period's row exists: the swap updates it
        spend(ledger, "warm", CAP, charge((0, 1), PARALLEL))
    before = store.delta_table("budget").version()
    expected: list[Spend | type[BudgetExceeded]] = []
    for rid, hours in RELEASES:
        try:
            expected.append(spend(one_by_one, rid, CAP, charge(hours, PARALLEL)))
        except BudgetExceeded:
            expected.append(BudgetExceeded)
    outcomes = spend_all(together, RELEASES)
    assert store.delta_table("budget").version() == before + 1  # one commit for all of them
    assert [type(o) if isinstance(o, BudgetExceeded) else o for o in outcomes] == expected
    assert sum(isinstance(o, BudgetExceeded) for o in outcomes) >= 1  # the cap binds: refusals in the middle
    assert "needs epsilon" in str(next(o for o in outcomes if isinstance(o, BudgetExceeded)))
    mine, theirs = together.rows().to_pylist()[0], one_by_one.rows().to_pylist()[0]
    for column in ("releases", "release_ids", "aggregates", "epsilon_spent", "epsilon_rdp", "rdp", "mechanisms"):
        assert mine[column] == theirs[column]


def test_a_second_pass_charges_nothing_and_a_different_aggregate_is_refused_alone(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    first = spend_all(ledger, RELEASES[:3])
    assert all(isinstance(o, Spend) and o.charged for o in first)
    version = ledger.store.delta_table("budget").version()
    again = spend_all(ledger, RELEASES[:3], digest=lambda rid: sha(rid) if rid != "morning" else sha("other"))
    assert ledger.store.delta_table("budget").version() == version  # nothing new: no commit
    assert isinstance(again[1], ReleaseRefused) and "another aggregate" in str(again[1])
    assert [o.charged for o in (again[0], again[2]) if isinstance(o, Spend)] == [False, False]
    last = first[2]
    assert isinstance(last, Spend)
    assert again[0] == Spend(DAY.name, False, last.epsilon_after, last.epsilon_after, CAP)


def test_one_release_spend_still_raises(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    spend_all(ledger, RELEASES[:3])
    with pytest.raises(BudgetExceeded, match="needs epsilon"):
        spend(ledger, "noon", CAP, charge((11, 13), PARALLEL))
