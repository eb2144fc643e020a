"""The budget ledger: PLD composition per period (parallel at event level, sequential at entity level), older
RDP-only rows, idempotent spends, refusals, races for the last budget, and `fusion budget`."""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from fusion.config.federation import parse_config
from fusion.errors import FusionError, ReleaseRefused
from fusion.release.plan import Period, period_of
from fusion.store.charge_record import ChargeRecord
from fusion.store.delta import Store
from fusion.store.ledger import BudgetExceeded, BudgetLedger, reconciled_periods
from privacy.accountant import (
    ORDERS,
    Composition,
    ReleaseCharge,
    epsilon_for,
    epsilon_from_rdp,
    mechanism_rdp,
    skellam_epsilon,
)
from privacy.pld import SkellamMechanism
from schemas.tables import BUDGET_SCHEMA
from tests.conftest import config_text

DAY = Period("2026-01-01", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC))
#: One release: the demo's noise level (variance calibrated to epsilon 1 at delta 1e-7), four slots per reading.
MECHANISM = SkellamMechanism(variance=3.16e7, coordinates=4, shift=600)
DELTA = 1e-7
ONE = skellam_epsilon([MECHANISM], delta=DELTA)
SEQUENTIAL, PARALLEL = Composition.SEQUENTIAL, Composition.PARALLEL


def sha(release_id: str) -> str:
    """A stand-in aggregate digest per release."""
    return hashlib.sha256(release_id.encode()).hexdigest()


def charge(hours: tuple[int, int] = (0, 24), composition: Composition = SEQUENTIAL) -> ReleaseCharge:
    """One release of MECHANISM covering [DAY + hours[0], DAY + hours[1])."""
    start, end = (DAY.start + timedelta(hours=h) for h in hours)
    return ReleaseCharge(mechanism=MECHANISM, start=start, end=end, composition=composition)


def spend(ledger: BudgetLedger, release_id: str, cap: float, what: ReleaseCharge | None = None, **kwargs: object):
    return ledger.spend(
        period=DAY, release_id=release_id, aggregate_sha256=sha(release_id), charge=what or charge(), cap=cap,
        delta=kwargs.pop("delta", DELTA), **kwargs,  # type: ignore[arg-type]
    )


def test_one_release_is_charged_its_pld_epsilon(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    spent = spend(ledger, "r1", 10.0)
    assert spent.charged and spent.epsilon_before == 0.0 and spent.epsilon_after == ONE
    row = ledger.rows().to_pylist()[0]
    assert (row["period"], row["releases"], row["release_ids"]) == ("2026-01-01", 1, ["r1"])
    assert row["epsilon_cap"] == 10.0 and row["delta"] == DELTA and row["composition"] == "sequential"
    assert row["mechanisms"] == [
        {"interval_start": DAY.start, "interval_end": DAY.end, "variance": 3.16e7, "coordinates": 4, "shift": 600}
    ]
    np.testing.assert_allclose(row["rdp"], mechanism_rdp(MECHANISM))
    # The RDP cross-check is stored beside it, and is looser.
    rdp = epsilon_for(variance=3.16e7, l1=MECHANISM.l1, l2=MECHANISM.l2, delta=DELTA)
    assert row["epsilon_rdp"] == pytest.approx(rdp, rel=1e-12) and rdp > ONE


def test_three_disjoint_event_level_intervals_are_charged_one_release(tmp_path: Path) -> None:
    """Event level: a reading lies in one interval, so releases of disjoint intervals compose in parallel."""
    ledger = BudgetLedger(Store(tmp_path))
    for i, hours in enumerate([(0, 8), (8, 16), (16, 24)]):
        spent = spend(ledger, f"r{i}", ONE, charge(hours, PARALLEL))  # the cap: one release
        assert spent.charged and spent.epsilon_after == ONE
    row = ledger.rows().to_pylist()[0]
    assert row["releases"] == 3 and row["epsilon_spent"] == ONE and row["composition"] == "parallel"
    assert row["epsilon_spent"] < skellam_epsilon([MECHANISM] * 3, delta=DELTA) < 1.9 * ONE  # what sequential says
    np.testing.assert_allclose(row["rdp"], mechanism_rdp(MECHANISM))  # the RDP curve of the worst instant


def test_overlapping_event_level_intervals_compose_at_the_instants_they_share(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    cap = skellam_epsilon([MECHANISM] * 2, delta=DELTA) + 1e-9
    spend(ledger, "day", cap, charge((0, 24), PARALLEL))
    assert spend(ledger, "morning", cap, charge((0, 12), PARALLEL)).epsilon_after == cap - 1e-9
    assert spend(ledger, "evening", cap, charge((12, 24), PARALLEL)).epsilon_after == cap - 1e-9  # disjoint from it
    with pytest.raises(BudgetExceeded, match="needs epsilon"):  # a third release over the morning hours
        spend(ledger, "noon", cap, charge((11, 13), PARALLEL))
    assert ledger.rows().column("releases").to_pylist() == [3]


def test_entity_level_releases_compose_sequentially(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    for k in range(1, 4):
        spent = spend(ledger, f"r{k}", 100.0, charge((k, k + 1), SEQUENTIAL))  # disjoint, yet they compose
        assert spent.epsilon_after == skellam_epsilon([MECHANISM] * k, delta=DELTA)
        rdp = epsilon_from_rdp(k * mechanism_rdp(MECHANISM), delta=DELTA)
        assert ONE <= spent.epsilon_after <= k * ONE and spent.epsilon_after < rdp  # PLD tighter than RDP
    row = ledger.rows().to_pylist()[0]
    assert row["releases"] == 3 and row["composition"] == "sequential"
    assert row["epsilon_spent"] < row["epsilon_rdp"]


def test_a_release_without_noise_is_charged_nothing(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    off = ReleaseCharge(mechanism=None, start=DAY.start, end=DAY.end, composition=SEQUENTIAL)
    assert spend(ledger, "test-mode", 10.0, off).epsilon_after == 0.0
    assert spend(ledger, "r1", 10.0, charge()).epsilon_after == ONE
    assert ledger.rows().to_pylist()[0]["mechanisms"][0]["variance"] is None


def older_row(releases: int) -> dict[str, object]:
    """A budget row as the ledger wrote it before it kept mechanisms: RDP curves only, composed sequentially."""
    rdp = releases * mechanism_rdp(MECHANISM)
    return {
        "period": DAY.name, "period_start": DAY.start, "period_end": DAY.end, "epsilon_cap": 10.0,
        "epsilon_spent": epsilon_from_rdp(rdp, delta=DELTA), "delta": DELTA, "releases": releases,
        "release_ids": [f"old{i}" for i in range(releases)], "aggregates": [sha(f"old{i}") for i in range(releases)],
        "rdp": rdp.tolist(), "updated_at": datetime(2026, 1, 1, 12, tzinfo=UTC),
    }


def test_an_older_row_without_mechanisms_goes_on_composing_its_rdp_curves(tmp_path: Path) -> None:
    store = Store(tmp_path)
    older = pa.schema([f for f in BUDGET_SCHEMA if f.name not in ("composition", "mechanisms", "epsilon_rdp")])
    write_deltalake(store.table_path("budget"), pa.Table.from_pylist([older_row(2)], schema=older))
    ledger = BudgetLedger(store)
    again = spend(ledger, "old1", 10.0)
    assert not again.charged and again.epsilon_after == epsilon_from_rdp(2 * mechanism_rdp(MECHANISM), delta=DELTA)
    spent = spend(ledger, "new", 10.0, charge((0, 8), PARALLEL))  # whatever the unit: sequential, in RDP
    assert spent.epsilon_after == pytest.approx(epsilon_from_rdp(3 * mechanism_rdp(MECHANISM), delta=DELTA))
    row = ledger.rows().to_pylist()[0]
    assert row["releases"] == 3 and row["composition"] is None and row["mechanisms"] is None
    assert row["epsilon_rdp"] == row["epsilon_spent"]
    # The table gained the new columns with that row: a new period composes as its unit implies.
    tomorrow = Period("2026-01-02", DAY.end, DAY.end + timedelta(days=1))
    for hour in (0, 1):
        start = tomorrow.start + timedelta(hours=hour)
        ledger.spend(period=tomorrow, release_id=f"t{hour}", aggregate_sha256=sha(f"t{hour}"), cap=10.0, delta=DELTA,
                     charge=ReleaseCharge(MECHANISM, start, start + timedelta(hours=1), PARALLEL))
    rows = {r["period"]: r for r in ledger.rows().to_pylist()}
    assert rows["2026-01-02"]["composition"] == "parallel" and rows["2026-01-02"]["epsilon_spent"] == ONE
    assert rows["2026-01-01"]["composition"] is None and rows["2026-01-01"]["releases"] == 3


def test_a_period_s_composition_cannot_change_once_budget_is_spent(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    spend(ledger, "r1", 10.0, charge((0, 8), PARALLEL))
    for preview in (True, False):
        with pytest.raises(FusionError, match="privacy unit cannot change"):
            if preview:
                ledger.check(period=DAY, release_id="r2", charge=charge((8, 16)), cap=10.0, delta=DELTA)
            else:
                spend(ledger, "r2", 10.0, charge((8, 16), SEQUENTIAL))
    assert ledger.rows().column("releases").to_pylist() == [1]


def test_fusion_budget_names_the_composition_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fusion.cli.core import main  # here: the racing processes below import this module, and need no CLI

    config_path = tmp_path / "federation.toml"
    config_path.write_text(config_text(institutions=[("a", "csv")], quorum=1))
    ledger = BudgetLedger(Store(parse_config(tomllib.loads(config_path.read_text()), base=tmp_path).store_path))
    spend(ledger, "r1", 10.0, charge((0, 8), PARALLEL))
    assert main(["budget", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert "composition" in out and "parallel" in out and "sequential = entity level" in out
    assert main(["budget", "--config", str(config_path), "--format", "json"]) == 0
    assert '"composition": "parallel"' in capsys.readouterr().out


def test_charging_the_same_release_twice_spends_once(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    first = spend(ledger, "r1", 10.0)
    again = spend(ledger, "r1", 10.0)
    assert first.charged and not again.charged
    assert again.epsilon_after == first.epsilon_after
    assert ledger.rows().column("releases").to_pylist() == [1]


def test_a_second_aggregate_for_a_charged_release_is_refused(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    spend(ledger, "r1", 10.0)
    with pytest.raises(ReleaseRefused, match="second noisy view"):
        ledger.spend(period=DAY, release_id="r1", aggregate_sha256=sha("other"), charge=charge(), cap=10.0,
                     delta=DELTA)
    row = ledger.rows().to_pylist()[0]
    assert row["releases"] == 1 and row["aggregates"] == [sha("r1")]


def test_a_release_over_the_cap_is_refused_saying_what_it_needs_and_what_is_left(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    two, three = (skellam_epsilon([MECHANISM] * k, delta=DELTA) for k in (2, 3))
    cap = two + 1e-9  # exactly two releases fit
    spend(ledger, "r1", cap)
    spend(ledger, "r2", cap)
    with pytest.raises(BudgetExceeded) as refused:
        spend(ledger, "r3", cap)
    message = str(refused.value)
    assert f"needs epsilon {three - two:.4f}" in message and "is left" in message and f"cap is {cap:.4f}" in message
    with pytest.raises(BudgetExceeded):
        ledger.check(period=DAY, release_id="r3", charge=charge(), cap=cap, delta=DELTA)
    ledger.check(period=DAY, release_id="r2", charge=charge(), cap=cap, delta=DELTA)  # already charged: fine
    assert ledger.rows().column("releases").to_pylist() == [2]
    # Another period has its own budget.
    other = Period("2026-01-02", DAY.end, DAY.end + timedelta(days=1))
    tomorrow = ReleaseCharge(mechanism=MECHANISM, start=other.start, end=other.end, composition=SEQUENTIAL)
    assert ledger.spend(
        period=other, release_id="r3", aggregate_sha256=sha("r3"), charge=tomorrow, cap=cap, delta=DELTA
    ).charged


def test_periods_follow_the_configured_grid_and_intervals_may_not_straddle_them() -> None:
    config = parse_config(
        tomllib.loads(
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


def _spend_in_process(paths: list[str], release_id: str, cap: float, barrier: object, results: object) -> None:
    """One racer for every round: both racers meet at the barrier, then spend on that round's store."""
    for attempt, path in enumerate(paths):
        ledger = BudgetLedger(Store(path))
        barrier.wait()  # type: ignore[attr-defined]
        try:
            spend(ledger, release_id, cap)
            results.put((attempt, release_id, "spent"))  # type: ignore[attr-defined]
        except BudgetExceeded:
            results.put((attempt, release_id, "refused"))  # type: ignore[attr-defined]


@pytest.mark.parametrize("rounds", [3])
def test_two_processes_racing_for_the_last_budget_cannot_both_succeed(tmp_path: Path, rounds: int) -> None:
    context = multiprocessing.get_context("spawn")
    cap = skellam_epsilon([MECHANISM] * 2, delta=DELTA) + 1e-9
    paths = [str(tmp_path / f"store-{attempt}") for attempt in range(rounds)]
    for path in paths:  # a fresh store a round, each with one release left
        spend(BudgetLedger(Store(path)), "first", cap)
    barrier, results = context.Barrier(2), context.Queue()
    workers = [  # two processes started once (spawning is the slow part), racing once a round
        context.Process(target=_spend_in_process, args=(paths, rid, cap, barrier, results)) for rid in ("left", "right")
    ]
    for w in workers:
        w.start()
    outcomes: dict[int, list[str]] = {attempt: [] for attempt in range(rounds)}
    for _ in range(rounds * len(workers)):
        attempt, _, outcome = results.get(timeout=240)
        outcomes[attempt].append(outcome)
    for w in workers:
        w.join(120)
    for attempt, path in enumerate(paths):
        assert sorted(outcomes[attempt]) == ["refused", "spent"], (attempt, outcomes)
        row = BudgetLedger(Store(path)).rows().to_pylist()[0]
        assert row["releases"] == 2 and row["epsilon_spent"] <= cap


def test_threads_racing_for_many_releases_never_overspend(tmp_path: Path) -> None:
    ledger_path = tmp_path / "store"
    cap = skellam_epsilon([MECHANISM] * 3, delta=DELTA) + 1e-9  # three of the six fit
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def race(release_id: str) -> None:
        barrier.wait()
        try:
            spend(BudgetLedger(Store(ledger_path)), release_id, cap)
            outcomes.append("spent")
        except BudgetExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=race, args=(f"r{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 3 + ["spent"] * 3
    row = BudgetLedger(Store(ledger_path)).rows().to_pylist()[0]
    assert row["releases"] == 3 and len(set(row["release_ids"])) == 3
    assert row["epsilon_spent"] == skellam_epsilon([MECHANISM] * 3, delta=DELTA)
    assert len(ORDERS) == len(row["rdp"]) and len(row["mechanisms"]) == 3


def test_a_changed_period_grid_or_cap_cannot_charge_the_same_data_again(tmp_path: Path) -> None:
    ledger = BudgetLedger(Store(tmp_path))
    spend(ledger, "r1", ONE + 1e-9)
    half_day = Period("2026-01-01T00:00Z", DAY.start, DAY.start + timedelta(hours=12))
    with pytest.raises(FusionError, match="privacy period changed"):
        ledger.spend(period=half_day, release_id="r2", aggregate_sha256=sha("r2"), charge=charge((0, 12)), cap=10.0,
                     delta=DELTA)
    two_days = Period("2026-01-01", DAY.start, DAY.start + timedelta(days=2))  # same name, other bounds
    with pytest.raises(FusionError, match="privacy period changed"):
        ledger.spend(period=two_days, release_id="r2", aggregate_sha256=sha("r2"), charge=charge(), cap=10.0,
                     delta=DELTA)
    with pytest.raises(FusionError, match="cap cannot change"):
        spend(ledger, "r2", 10.0)
    assert ledger.rows().column("releases").to_pylist() == [1]


def test_a_loosened_delta_cannot_stretch_a_period_s_cap(tmp_path: Path) -> None:
    # At the delta it was opened with, the cap fits two releases; a looser delta would give the same releases a
    # smaller epsilon and let the period take more releases than the cap allowed.
    ledger = BudgetLedger(Store(tmp_path))
    cap = skellam_epsilon([MECHANISM] * 2, delta=DELTA) + 1e-9
    for release in ("r1", "r2"):
        spend(ledger, release, cap)
    assert skellam_epsilon([MECHANISM] * 3, delta=1e-3) < cap  # what a looser delta would have let through
    for check in (ledger.check, ledger.spend):
        kwargs = {"aggregate_sha256": sha("r3")} if check == ledger.spend else {}
        with pytest.raises(FusionError, match="delta cannot change"):
            check(period=DAY, release_id="r3", charge=charge(), cap=cap, delta=1e-3, **kwargs)
    with pytest.raises(BudgetExceeded):
        spend(ledger, "r3", cap)
    assert ledger.rows().column("releases").to_pylist() == [2]


def test_a_ledger_of_many_periods_stays_in_few_files_and_keeps_every_period(tmp_path: Path) -> None:
    """Each period's row is a file until the ledger is compacted (COMPACT_FILES): a charge reads and merges over
    every file, so with daily periods a year of files made each charge cost ten times a new ledger's."""
    from fusion.store.ledger import COMPACT_FILES

    store = Store(tmp_path)
    ledger = BudgetLedger(store)
    days = 3 * COMPACT_FILES
    for day in range(days):
        start = DAY.start + timedelta(days=day)
        period = Period(f"day-{day:03d}", start, start + timedelta(days=1))
        what = ReleaseCharge(mechanism=MECHANISM, start=start, end=period.end, composition=PARALLEL)
        spent = ledger.spend(period=period, release_id=f"r{day}", aggregate_sha256=sha(f"r{day}"), charge=what,
                             cap=10.0, delta=DELTA)
        assert spent.charged and spent.epsilon_after == ONE
        assert len(store.delta_table("budget").file_uris()) <= COMPACT_FILES
    rows = {r["period"]: r for r in ledger.rows().to_pylist()}
    assert sorted(rows) == [f"day-{day:03d}" for day in range(days)]
    assert all(r["release_ids"] == [f"r{int(p[4:])}"] and r["epsilon_spent"] == ONE for p, r in rows.items())
    again = ledger.spend(period=Period("day-005", DAY.start + timedelta(days=5), DAY.start + timedelta(days=6)),
                         release_id="r5", aggregate_sha256=sha("r5"), charge=ReleaseCharge(
                             mechanism=MECHANISM, start=DAY.start + timedelta(days=5),
                             end=DAY.start + timedelta(days=6), composition=PARALLEL),
                         cap=10.0, delta=DELTA)
    assert not again.charged  # idempotent after compaction: the period's row was found in the compacted file


def _recorded_ledger(tmp_path: Path) -> tuple[BudgetLedger, ChargeRecord]:
    """A key holder's ledger: the store's rows checked against its own record of its charges."""
    record = ChargeRecord(tmp_path / "keys", "store-1")
    return BudgetLedger(Store(tmp_path / "store"), record=record), record


def test_a_deleted_or_rewritten_budget_row_is_rebuilt_from_the_key_holders_record(tmp_path: Path) -> None:
    """A store writer rolls the period back: the row deleted, its releases or its mechanisms rewritten. The key
    holder's record still holds what it charged: the row is rebuilt from it, and the next release is refused."""
    ledger, record = _recorded_ledger(tmp_path)
    cap = ONE * 1.1  # room for one release, not two
    assert spend(ledger, "r1", cap).charged
    assert record.read(DAY.name)["release_ids"] == ["r1"]  # type: ignore[index]
    honest = ledger.rows()

    def rewrite(**columns: object) -> None:
        row = {**honest.to_pylist()[0], **columns}
        write_deltalake(
            ledger.store.table_path("budget"), pa.Table.from_pylist([row], schema=BUDGET_SCHEMA), mode="overwrite"
        )

    weaker = {**honest.to_pylist()[0]["mechanisms"][0], "variance": 3.16e9}
    for attack in (
        lambda: ledger.store.delta_table("budget").delete(f"period = '{DAY.name}'"),
        lambda: rewrite(
            releases=0, release_ids=[], aggregates=[], mechanisms=[], epsilon_spent=0.0, rdp=[0.0] * ORDERS.size
        ),
        lambda: rewrite(mechanisms=[weaker], epsilon_spent=0.01),
    ):
        attack()
        with pytest.raises(BudgetExceeded):
            spend(ledger, "r2", cap)
        (row,) = ledger.rows().to_pylist()
        assert row["release_ids"] == ["r1"] and row["epsilon_spent"] == ONE  # rebuilt from the record
        assert ledger.restored[-1].recorded_release_ids == ("r1",)
        # Without the record, the rolled-back row would have let r2 through (what the record prevents).
    assert len(ledger.restored) == 3
    unrecorded = BudgetLedger(ledger.store)
    ledger.store.delta_table("budget").delete(f"period = '{DAY.name}'")
    assert spend(unrecorded, "r2", cap).charged


@pytest.mark.parametrize("recorded", [True, False], ids=["with-record", "store-only"])
def test_a_pending_release_listed_at_another_price_is_refused_not_taken_as_paid(tmp_path: Path, recorded: bool) -> None:
    """A store writer adds the release about to be decrypted to the period's row, for its own aggregate but with a
    free mechanism: a release already listed used to be taken as paid and published, past the cap. Its listed
    charge must be its own."""
    ledger, _ = _recorded_ledger(tmp_path)
    if not recorded:
        ledger = BudgetLedger(ledger.store)
    cap = ONE * 1.1  # room for one release, not two
    assert spend(ledger, "r1", cap).charged
    (row,) = ledger.rows().to_pylist()
    free = {**row["mechanisms"][0], "variance": None}
    forged = {**row, "releases": 2, "release_ids": ["r1", "r2"], "aggregates": [sha("r1"), sha("r2")],
              "mechanisms": [row["mechanisms"][0], free]}
    write_deltalake(ledger.store.table_path("budget"), pa.Table.from_pylist([forged], schema=BUDGET_SCHEMA),
                    mode="overwrite")
    with pytest.raises(ReleaseRefused, match="listed in period's budget row with another charge"):
        spend(ledger, "r2", cap)
    with pytest.raises(ReleaseRefused, match="another charge"):
        ledger.check(period=DAY, release_id="r2", charge=charge(), cap=cap, delta=DELTA)
    assert not spend(ledger, "r1", cap).charged  # its own listing, at its own price: paid


def test_a_release_another_writer_listed_is_recorded_before_it_is_let_through(tmp_path: Path) -> None:
    """A store writer lists a release about to be decrypted in the period's row, for its own aggregate and charge (both
    public), understating the row's spend. The key holder finds it paid and decrypts: its own record must take the
    charge in first, or the writer deletes the row afterwards, the row matches the record again, and the next
    release is charged from a period that no longer holds the one decrypted."""
    ledger, record = _recorded_ledger(tmp_path)
    cap = ONE * 1.1  # room for one release, not two
    assert spend(BudgetLedger(ledger.store), "r1", cap).charged  # the writer: the store alone
    (row,) = ledger.rows().to_pylist()
    understated = {**row, "epsilon_spent": 0.0, "epsilon_rdp": 0.0, "rdp": [0.0] * ORDERS.size}
    write_deltalake(
        ledger.store.table_path("budget"), pa.Table.from_pylist([understated], schema=BUDGET_SCHEMA), mode="overwrite"
    )
    listed = spend(ledger, "r1", cap)
    assert not listed.charged  # paid, as listed: decrypted now
    held = record.read(DAY.name)
    assert held is not None and held["release_ids"] == ["r1"] and held["aggregates"] == [sha("r1")]
    assert held["epsilon_spent"] == pytest.approx(ONE)  # composed from its charge, not the row's understated spend
    assert ledger.rows().to_pylist()[0]["epsilon_spent"] == pytest.approx(ONE)
    ledger.store.delta_table("budget").delete(f"period = '{DAY.name}'")  # the writer takes the listing back
    with pytest.raises(BudgetExceeded):
        spend(ledger, "r2", cap)
    assert ledger.rows().to_pylist()[0]["release_ids"] == ["r1"]  # rebuilt from the record
    assert ledger.restored[-1].recorded_release_ids == ("r1",)


def test_a_release_listed_in_a_row_behind_the_record_is_recorded_before_it_is_let_through(tmp_path: Path) -> None:
    """The same through a row behind the record: the writer drops a charged release and lists the next one. The row
    is rebuilt (the record's releases, the listed one on top) and the listed release let through as paid: the record
    must then hold it too, or deleting the row again takes it off the key holder's books."""
    ledger, record = _recorded_ledger(tmp_path)
    two, three = (skellam_epsilon([MECHANISM] * k, delta=DELTA) for k in (2, 3))
    cap = (two + three) / 2  # room for two releases, not three
    assert spend(ledger, "r1", cap).charged
    writer = BudgetLedger(Store(tmp_path / "other"))  # the writer's row: r2 alone, at its own price
    assert spend(writer, "r2", cap).charged
    dropped = pa.Table.from_pylist(writer.rows().to_pylist(), schema=BUDGET_SCHEMA)
    write_deltalake(ledger.store.table_path("budget"), dropped, mode="overwrite")
    assert not spend(ledger, "r2", cap).charged  # listed: paid, and decrypted now
    held = record.read(DAY.name)
    assert held is not None and held["release_ids"] == ["r1", "r2"]
    assert held["epsilon_spent"] == pytest.approx(two)
    ledger.store.delta_table("budget").delete(f"period = '{DAY.name}'")
    with pytest.raises(BudgetExceeded):
        spend(ledger, "r3", cap)


def test_reconciled_periods_count_each_period_as_the_next_charge_would(tmp_path: Path) -> None:
    """What `fusion budget` and the dashboard show the key holder: a store row that holds the record's releases
    as it is (more releases included), one behind the record (rolled back, duplicated, under another cap) as the
    record has it; a period the record does not hold as the store publishes it."""
    ledger, record = _recorded_ledger(tmp_path)
    assert spend(ledger, "r1", 10.0).charged
    assert spend(BudgetLedger(ledger.store), "r2", 10.0).charged  # a charge made without the record: ahead of it
    other = Period("2026-01-05", DAY.start + timedelta(days=4), DAY.start + timedelta(days=5))
    unrecorded = BudgetLedger(ledger.store).spend(
        period=other, release_id="o1", aggregate_sha256=sha("o1"), charge=charge(), cap=10.0, delta=DELTA
    )
    rows = {r["period"]: r for r in ledger.rows().to_pylist()}
    two = skellam_epsilon([MECHANISM] * 2, delta=DELTA)

    def shown(*store_rows: dict[str, object]) -> list[tuple[str, float, int, bool | None]]:
        periods = reconciled_periods([*store_rows, rows[other.name]], record.rows())
        return [(p.row["period"], p.row["epsilon_spent"], p.row["releases"], p.store_behind) for p in periods]

    assert shown(rows[DAY.name]) == [(DAY.name, pytest.approx(two), 2, False),
                                     (other.name, unrecorded.epsilon_after, 1, None)]
    rolled = {**rows[DAY.name], "releases": 0, "release_ids": [], "aggregates": [], "mechanisms": [],
              "epsilon_spent": 0.0, "rdp": [0.0] * ORDERS.size}
    raised = {**rows[DAY.name], "epsilon_cap": 100.0}
    for behind in ([], [rolled]):
        (day, _) = shown(*behind)
        assert day == (DAY.name, ONE, 1, True)  # the record's: r1 (no row lists r2 any more)
    for behind in ([rows[DAY.name], rows[DAY.name]], [raised]):
        (day, _) = shown(*behind)
        assert day == (DAY.name, pytest.approx(two), 2, True)  # the record's, and what the rows list beyond it
    (path,) = record.directory.glob("*.json")
    path.rename(path.with_name("0" * 32 + ".json"))  # a period's record under another period's name
    with pytest.raises(FusionError, match="is unreadable"):
        record.rows()


def test_a_crash_between_the_record_and_the_store_charges_once(tmp_path: Path) -> None:
    """The record is written (fsynced) before the store's row; a pass that dies in between leaves the store's row
    behind, and the re-run completes it: the release charged once, never refused for its own charge."""
    ledger, record = _recorded_ledger(tmp_path)
    assert spend(ledger, "r1", 10.0).charged

    class Crash(Exception):
        pass

    def crash(*args: object, **kwargs: object) -> bool:
        raise Crash

    original = BudgetLedger._swap
    BudgetLedger._swap = crash  # type: ignore[method-assign]
    try:
        with pytest.raises(Crash):
            spend(ledger, "r2", 10.0)
    finally:
        BudgetLedger._swap = original  # type: ignore[method-assign]
    assert record.read(DAY.name)["release_ids"] == ["r1", "r2"]  # type: ignore[index]
    assert ledger.rows().to_pylist()[0]["release_ids"] == ["r1"]
    again = spend(ledger, "r2", 10.0)
    assert not again.charged  # charged by the pass that crashed: once
    (row,) = ledger.rows().to_pylist()
    assert row["release_ids"] == ["r1", "r2"] and row["releases"] == 2
    assert not spend(ledger, "r2", 10.0).charged and ledger.rows().to_pylist()[0]["releases"] == 2


def test_a_lost_commit_race_leaves_the_record_as_the_store_is(tmp_path: Path) -> None:
    """A charge whose store commit fails (another writer first) is taken back out of the record before retrying,
    so the record never holds a charge the store refused."""
    ledger, record = _recorded_ledger(tmp_path)
    assert spend(ledger, "r1", 10.0).charged
    original = BudgetLedger._swap
    calls = []

    def lose_once(self: BudgetLedger, new: pa.Table, releases: int, *, exists: bool) -> bool:
        calls.append(record.read(DAY.name)["release_ids"])  # type: ignore[index]
        if len(calls) == 1:
            return False
        return original(self, new, releases, exists=exists)

    BudgetLedger._swap = lose_once  # type: ignore[method-assign]
    try:
        assert spend(ledger, "r2", 10.0).charged
    finally:
        BudgetLedger._swap = original  # type: ignore[method-assign]
    assert calls == [["r1", "r2"], ["r1", "r2"]]
    assert record.read(DAY.name)["release_ids"] == ledger.rows().to_pylist()[0]["release_ids"] == ["r1", "r2"]


def test_a_store_row_ahead_of_the_record_is_trusted_and_another_stores_record_refused(tmp_path: Path) -> None:
    ledger, record = _recorded_ledger(tmp_path)
    assert spend(ledger, "r1", 10.0).charged
    assert spend(BudgetLedger(ledger.store), "r2", 10.0).charged  # a charge made without the record
    assert spend(ledger, "r3", 10.0).charged and not ledger.restored
    assert record.read(DAY.name)["release_ids"] == ["r1", "r2", "r3"]  # type: ignore[index]
    other = BudgetLedger(ledger.store, record=ChargeRecord(tmp_path / "keys", "store-2"))
    with pytest.raises(FusionError, match="belongs to another store"):
        spend(other, "r4", 10.0)


def test_a_copy_a_dead_pass_left_mid_write_is_removed_by_the_next_write(tmp_path: Path) -> None:
    ledger, record = _recorded_ledger(tmp_path)
    assert spend(ledger, "r1", 10.0).charged
    (path,) = record.directory.glob("*.json")
    left = path.with_name(f".{path.name}.999999")  # a pass killed between its write and its rename
    left.write_text("{")
    assert spend(ledger, "r2", 10.0).charged
    assert not left.exists() and record.read(DAY.name)["release_ids"] == ["r1", "r2"]  # type: ignore[index]


def test_a_record_removed_as_it_is_read_reads_as_none_not_as_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unlocked preview reads the record while a charge taken back (a lost commit) removes it: gone between a
    look and a read, it is no record, not 'unreadable: restore it from a backup'."""
    ledger, record = _recorded_ledger(tmp_path)
    assert spend(ledger, "r1", 10.0).charged

    def gone(self: Path, *args: object, **kwargs: object) -> str:
        raise FileNotFoundError(str(self))

    monkeypatch.setattr(Path, "read_text", gone)
    assert record.read(DAY.name) is None
