"""The budget ledger: RDP composition per period, idempotent spends, refusals, and races for the last budget."""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from fusion.config import parse_config
from fusion.errors import FusionError, ReleaseRefused
from fusion.ledger import BudgetExceeded, BudgetLedger
from fusion.plan import Period, period_of
from fusion.store import Store
from privacy.accountant import ORDERS, epsilon_from_rdp, skellam_rdp
from tests.conftest import config_text

DAY = Period("2026-01-01", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC))
RDP = skellam_rdp(variance=4e4, l1=200.0, l2=150.0)  # one release's curve
DELTA = 1e-6
ONE = epsilon_from_rdp(RDP, delta=DELTA)


def sha(release_id: str) -> str:
    """A stand-in aggregate digest per release."""
    return hashlib.sha256(release_id.encode()).hexdigest()


def test_one_release_epsilon_is_the_single_release_conversion(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    spend = ledger.spend(period=DAY, release_id="r1", aggregate_sha256=sha("r1"), rdp=RDP, cap=10.0, delta=DELTA)
    assert spend.charged and spend.epsilon_before == 0.0 and spend.epsilon_after == pytest.approx(ONE, rel=1e-12)
    row = ledger.rows().to_pylist()[0]
    assert (row["period"], row["releases"], row["release_ids"]) == ("2026-01-01", 1, ["r1"])
    assert row["epsilon_cap"] == 10.0 and row["delta"] == DELTA
    np.testing.assert_allclose(row["rdp"], RDP)


def test_releases_compose_in_rdp_and_never_below_the_sum_of_one(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    for k in range(1, 6):
        spend = ledger.spend(
            period=DAY, release_id=f"r{k}", aggregate_sha256=sha(f"r{k}"), rdp=RDP, cap=100.0, delta=DELTA
        )
        # Independent check: k compositions is the conversion of k times the curve.
        assert spend.epsilon_after == pytest.approx(epsilon_from_rdp(k * RDP, delta=DELTA), rel=1e-12)
        assert ONE <= spend.epsilon_after <= k * ONE + 1e-12  # RDP composition is tighter than adding epsilons
    assert ledger.rows().column("releases").to_pylist() == [5]


def test_charging_the_same_release_twice_spends_once(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    first = ledger.spend(period=DAY, release_id="r1", aggregate_sha256=sha("r1"), rdp=RDP, cap=10.0, delta=DELTA)
    again = ledger.spend(period=DAY, release_id="r1", aggregate_sha256=sha("r1"), rdp=RDP, cap=10.0, delta=DELTA)
    assert first.charged and not again.charged
    assert again.epsilon_after == first.epsilon_after
    assert ledger.rows().column("releases").to_pylist() == [1]


def test_a_second_aggregate_for_a_charged_release_is_refused(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    ledger.spend(period=DAY, release_id="r1", aggregate_sha256=sha("r1"), rdp=RDP, cap=10.0, delta=DELTA)
    with pytest.raises(ReleaseRefused, match="second noisy view"):
        ledger.spend(period=DAY, release_id="r1", aggregate_sha256=sha("other"), rdp=RDP, cap=10.0, delta=DELTA)
    row = ledger.rows().to_pylist()[0]
    assert row["releases"] == 1 and row["aggregates"] == [sha("r1")]


def test_a_release_over_the_cap_is_refused_saying_what_it_needs_and_what_is_left(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    cap = epsilon_from_rdp(2 * RDP, delta=DELTA) + 1e-9  # exactly two releases fit
    ledger.spend(period=DAY, release_id="r1", aggregate_sha256=sha("r1"), rdp=RDP, cap=cap, delta=DELTA)
    ledger.spend(period=DAY, release_id="r2", aggregate_sha256=sha("r2"), rdp=RDP, cap=cap, delta=DELTA)
    with pytest.raises(BudgetExceeded) as refused:
        ledger.spend(period=DAY, release_id="r3", aggregate_sha256=sha("r3"), rdp=RDP, cap=cap, delta=DELTA)
    needed = epsilon_from_rdp(3 * RDP, delta=DELTA) - epsilon_from_rdp(2 * RDP, delta=DELTA)
    message = str(refused.value)
    assert f"needs epsilon {needed:.4f}" in message and "is left" in message and f"cap is {cap:.4f}" in message
    with pytest.raises(BudgetExceeded):
        ledger.check(period=DAY, release_id="r3", rdp=RDP, cap=cap, delta=DELTA)
    ledger.check(period=DAY, release_id="r2", rdp=RDP, cap=cap, delta=DELTA)  # already charged: fine
    assert ledger.rows().column("releases").to_pylist() == [2]
    # Another period has its own budget.
    other = Period("2026-01-02", DAY.end, DAY.end + timedelta(days=1))
    assert ledger.spend(
        period=other, release_id="r3", aggregate_sha256=sha("r3"), rdp=RDP, cap=cap, delta=DELTA
    ).charged


def test_periods_follow_the_configured_grid_and_intervals_may_not_straddle_them() -> None:
    config = parse_config(
        __import__("tomllib").loads(
            config_text(institutions=[("a", "csv")], quorum=1).replace('mode = "test"', 'period = "12h"\nmode = "test"')
        )
    )
    start = datetime(2026, 1, 1, 13, tzinfo=UTC)
    period = period_of(config, start, start + timedelta(hours=2))
    assert (period.name, period.start, period.end) == (
        "2026-01-01T12:00Z",
        datetime(2026, 1, 1, 12, tzinfo=UTC),
        datetime(2026, 1, 2, tzinfo=UTC),
    )
    with pytest.raises(FusionError, match="crosses the privacy period boundary"):
        period_of(config, start, start + timedelta(hours=12))


def _spend_in_process(path: str, release_id: str, cap: float, barrier: object, results: object) -> None:
    ledger = BudgetLedger(Store(path))
    barrier.wait()  # type: ignore[attr-defined]
    try:
        ledger.spend(period=DAY, release_id=release_id, aggregate_sha256=sha(release_id), rdp=RDP, cap=cap, delta=DELTA)
        results.put((release_id, "spent"))  # type: ignore[attr-defined]
    except BudgetExceeded:
        results.put((release_id, "refused"))  # type: ignore[attr-defined]


@pytest.mark.parametrize("rounds", [3])
def test_two_processes_racing_for_the_last_budget_cannot_both_succeed(tmp_path: Path, rounds: int) -> None:
    context = multiprocessing.get_context("spawn")
    for attempt in range(rounds):
        path = str(tmp_path / f"store-{attempt}")
        ledger = BudgetLedger(Store(path))
        cap = epsilon_from_rdp(2 * RDP, delta=DELTA) + 1e-9
        ledger.spend(
            period=DAY, release_id="first", aggregate_sha256=sha("first"), rdp=RDP, cap=cap, delta=DELTA
        )  # one release left
        barrier, results = context.Barrier(2), context.Queue()
        workers = [
            context.Process(target=_spend_in_process, args=(path, rid, cap, barrier, results))
            for rid in ("left", "right")
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        outcomes = sorted(results.get(timeout=5)[1] for _ in workers)
        assert outcomes == ["refused", "spent"], outcomes
        row = ledger.rows().to_pylist()[0]
        assert row["releases"] == 2 and row["epsilon_spent"] <= cap


def test_threads_racing_for_many_releases_never_overspend(tmp_path: Path) -> None:
    ledger_path = tmp_path / "store"
    cap = epsilon_from_rdp(3 * RDP, delta=DELTA) + 1e-9  # three of the six fit
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def spend(release_id: str) -> None:
        barrier.wait()
        try:
            BudgetLedger(Store(ledger_path)).spend(
                period=DAY, release_id=release_id, aggregate_sha256=sha(release_id), rdp=RDP, cap=cap, delta=DELTA
            )
            outcomes.append("spent")
        except BudgetExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=spend, args=(f"r{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 3 + ["spent"] * 3
    row = BudgetLedger(Store(ledger_path)).rows().to_pylist()[0]
    assert row["releases"] == 3 and len(set(row["release_ids"])) == 3
    assert row["epsilon_spent"] == pytest.approx(epsilon_from_rdp(3 * RDP, delta=DELTA), rel=1e-12)
    assert len(ORDERS) == len(row["rdp"])


def test_a_changed_period_grid_or_cap_cannot_charge_the_same_data_again(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    ledger.spend(period=DAY, release_id="r1", aggregate_sha256=sha("r1"), rdp=RDP, cap=ONE + 1e-9, delta=DELTA)
    half_day = Period("2026-01-01T00:00Z", DAY.start, DAY.start + timedelta(hours=12))
    with pytest.raises(FusionError, match="privacy period changed"):
        ledger.spend(period=half_day, release_id="r2", aggregate_sha256=sha("r2"), rdp=RDP, cap=10.0, delta=DELTA)
    two_days = Period("2026-01-01", DAY.start, DAY.start + timedelta(days=2))  # same name, other bounds
    with pytest.raises(FusionError, match="privacy period changed"):
        ledger.spend(period=two_days, release_id="r2", aggregate_sha256=sha("r2"), rdp=RDP, cap=10.0, delta=DELTA)
    with pytest.raises(FusionError, match="cap cannot change"):
        ledger.spend(period=DAY, release_id="r2", aggregate_sha256=sha("r2"), rdp=RDP, cap=10.0, delta=DELTA)
    assert ledger.rows().column("releases").to_pylist() == [1]


def test_a_loosened_delta_cannot_stretch_a_period_s_cap(tmp_path: Path) -> None:
    # At the delta it was opened with, the cap fits two releases; a looser delta would convert the same RDP
    # curve to a smaller epsilon and let the period take more releases than the cap allowed.
    ledger = BudgetLedger(Store(tmp_path))
    cap = epsilon_from_rdp(2 * RDP, delta=DELTA) + 1e-9
    for release in ("r1", "r2"):
        ledger.spend(period=DAY, release_id=release, aggregate_sha256=sha(release), rdp=RDP, cap=cap, delta=DELTA)
    assert epsilon_from_rdp(3 * RDP, delta=1e-3) < cap  # what a looser delta would have let through
    for check in (ledger.check, ledger.spend):
        kwargs = {"aggregate_sha256": sha("r3")} if check == ledger.spend else {}
        with pytest.raises(FusionError, match="delta cannot change"):
            check(period=DAY, release_id="r3", rdp=RDP, cap=cap, delta=1e-3, **kwargs)
    with pytest.raises(BudgetExceeded):
        ledger.spend(period=DAY, release_id="r3", aggregate_sha256=sha("r3"), rdp=RDP, cap=cap, delta=DELTA)
    assert ledger.rows().column("releases").to_pylist() == [2]
