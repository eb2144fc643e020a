"""The runs table: claims that exactly one of several racing runners wins, outcomes, expired leases."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fusion.runtime.schedule import Interval, RunStatus
from fusion.store.delta import Store
from fusion.store.runs import Claim, Outcome, RunLog, claim_id

T0 = datetime(2026, 1, 1, tzinfo=UTC)
H = timedelta(hours=1)


def claim(runner: str, *, hour: int = 0, attempt: int = 1, lease: timedelta = H) -> Claim:
    interval = Interval(T0 + hour * H, T0 + (hour + 1) * H)
    return Claim("hourly", interval, attempt, runner, T0 + 2 * H, T0 + 2 * H + lease)


def test_racing_claims_have_exactly_one_winner(tmp_path: Path) -> None:
    log = RunLog(Store(tmp_path / "store"))
    log.store.ensure_tables()
    hours, runners = 6, ("a", "b", "c")
    won: dict[int, list[str]] = {h: [] for h in range(hours)}
    barrier = threading.Barrier(len(runners))

    def race(runner: str) -> None:
        for hour in range(hours):
            barrier.wait()
            if log.claim(claim(runner, hour=hour)) is None:
                won[hour].append(runner)

    threads = [threading.Thread(target=race, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(winners) == 1 for winners in won.values()), won
    attempts = log.attempts("hourly")
    assert len(attempts) == hours
    assert all([a.runner for a in rows] == won[i.start.hour] for i, rows in attempts.items())


def test_a_loser_learns_the_holder_and_records_why_it_skipped(tmp_path: Path) -> None:
    log = RunLog(Store(tmp_path / "store"))
    assert log.claim(claim("a")) is None
    assert log.claim(claim("b")) == "a"
    log.record_skip(claim("b"), reason="claimed by a", now=T0 + 2 * H)
    log.record_skip(claim("b"), reason="claimed by a", now=T0 + 2 * H)  # once per runner and attempt
    rows = log.store.read("runs").to_pylist()
    assert sorted((r["runner"], r["status"], r["error"]) for r in rows) == [
        ("a", "running", None),
        ("b", "skipped", "claimed by a"),
    ]
    assert [a.runner for a in log.attempts("hourly")[claim("a").interval]] == ["a"]  # skip rows are not claims


def test_finish_records_the_outcome_on_the_claim_row(tmp_path: Path) -> None:
    log = RunLog(Store(tmp_path / "store"))
    mine = claim("a")
    log.claim(mine)
    log.finish(mine, Outcome(RunStatus.RELEASED, T0 + 3 * H, release_id="r1", rows=123, cells=6, epsilon=1.0))
    (row,) = log.store.read("runs").to_pylist()
    assert row["run_id"] == claim_id("hourly", mine.interval, 1)
    assert (row["status"], row["rows"], row["cells"], row["epsilon"]) == ("released", 123, 6, 1.0)
    assert (row["started"], row["finished"], row["lease_until"]) == (T0 + 2 * H, T0 + 3 * H, T0 + 3 * H)


def test_an_expired_claim_is_marked_failed_but_its_runner_may_still_report(tmp_path: Path) -> None:
    log = RunLog(Store(tmp_path / "store"))
    crashed = claim("a", lease=timedelta(minutes=10))
    log.claim(crashed)
    log.expire(crashed, T0 + 3 * H)
    (row,) = log.store.read("runs").to_pylist()
    assert row["status"] == "failed" and "lease expired" in row["error"]
    log.expire(crashed, T0 + 4 * H)  # only a running claim under the same lease is expired
    assert log.store.read("runs").column("finished").to_pylist() == [T0 + 3 * H]
    log.finish(crashed, Outcome(RunStatus.ALREADY_RELEASED, T0 + 5 * H))  # a slow runner's late word stands
    assert log.store.read("runs").column("status").to_pylist() == ["already_released"]


def test_a_renewed_lease_cannot_be_expired_under_the_lease_it_replaced(tmp_path: Path) -> None:
    log = RunLog(Store(tmp_path / "store"))
    first = claim("a", lease=timedelta(minutes=10))
    assert log.claim(first) is None
    renewed = log.renew(first, T0 + 3 * H)
    assert renewed is not None and renewed.lease_until == T0 + 3 * H
    assert log.store.read("runs").column("lease_until").to_pylist() == [T0 + 3 * H]

    # Another runner read the row before the renewal and saw the first lease run out: its expiry does nothing.
    assert log.expire(first, T0 + 2 * H + timedelta(minutes=11)) is False
    assert log.store.read("runs").column("status").to_pylist() == ["running"]
    assert log.renew(first, T0 + 4 * H) is None  # only the holder's latest lease renews
    assert log.renew(claim("b", lease=timedelta(minutes=10)), T0 + 4 * H) is None  # and only the holder

    assert log.expire(renewed, T0 + 3 * H + timedelta(minutes=1)) is True
    assert log.store.read("runs").column("status").to_pylist() == ["failed"]
    assert log.renew(renewed, T0 + 5 * H) is None  # an expired claim is not revived
    assert log.store.read("runs").column("lease_until").to_pylist() == [T0 + 3 * H]
