"""Scheduled batch releases on an accelerated clock: due intervals, catch-up, retries, crashes, concurrent
schedulers and backfill. Real Beam, real TenSEAL, real Delta tables; only the clock is injected."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from fusion.cli.core import main
from fusion.config.federation import load_config
from fusion.release.plan import plan_release
from fusion.runtime.faults import CRASH_ENV, CRASH_EXIT_CODE
from fusion.runtime.schedule import Action, Interval, RunStatus
from fusion.store.delta import Store
from fusion.store.runs import Claim, RunLog
from pipelines.scheduler import Heartbeat, RunResult, Scheduler, run_interval, utc_now
from tests.conftest import START, Federation

pytestmark = pytest.mark.e2e

H = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
SCHEDULE = (
    '[[schedules]]\nname = "hourly"\ncron = "5 * * * *"\ninterval = "1h"\nstart = 2026-01-01T00:00:00\n'
    'backoff = "1m"\nlease = "10m"\n'
)


class Clock:
    """An accelerated clock: `sleep` moves time forward at once."""

    def __init__(self, at: datetime) -> None:
        self.at = at
        self.slept: list[float] = []

    def now(self) -> datetime:
        return self.at

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.at += timedelta(seconds=seconds)


def scheduled(
    make_federation: Callable[..., Federation], *, epsilon_cap: float | None = 20.0, noise: bool = False
) -> Federation:
    """The test federation with an hourly schedule; a cap that fits many releases unless None (then the cap is one
    release a day, which binds only with noise on: test-mode releases without noise cost nothing)."""
    fed = make_federation(noise=noise, seed=3)
    text = fed.config_path.read_text()
    if epsilon_cap is not None:
        text = text.replace("[privacy]\n", f"[privacy]\nepsilon_cap = {epsilon_cap}\n")
    fed.config_path.write_text(text + SCHEDULE)
    return fed


def runs(fed: Federation) -> list[dict[str, object]]:
    rows = Store(fed.config.store_path).read("runs").to_pylist()
    return sorted(rows, key=lambda r: (r["interval_start"], r["attempt"], r["run_id"]))


def assert_released_once(fed: Federation, hours: int) -> None:
    """Every one of the first `hours` intervals is in the store exactly once, charged exactly once, and exactly
    one attempt in `runs` says it released it."""
    store = Store(fed.config.store_path)
    ids = {plan_release(fed.config, START + h * H, START + (h + 1) * H).key.release_id: h for h in range(hours)}
    cells = plan_release(fed.config, START, START + H).layout.cells
    releases = Counter(store.read("releases").column("release_id").to_pylist())
    assert releases == dict.fromkeys(ids, cells)
    (budget,) = store.read("budget").to_pylist()
    assert sorted(budget["release_ids"]) == sorted(ids) and budget["releases"] == hours
    released = [r for r in runs(fed) if r["status"] == "released"]
    assert sorted(r["release_id"] for r in released) == sorted(ids)
    assert all(r["cells"] == cells and r["rows"] > 0 and r["epsilon"] > 0 for r in released)
    counts: Counter[str] = Counter()  # each run's rows: its release's noisy reading count, read for its interval
    for row in store.read("releases").to_pylist():
        counts[row["release_id"]] += row["count"] or 0.0
    assert {r["release_id"]: r["rows"] for r in released} == {i: round(n) for i, n in counts.items()}


def test_a_scheduler_on_an_accelerated_clock_runs_each_interval_at_its_fire_and_catches_up(
    make_federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = scheduled(make_federation)
    clock = Clock(START)
    first = Scheduler(fed.config, runner="first", now=clock.now, sleep=clock.sleep)
    first.run(until=START + H + 30 * MINUTE)  # fires at 01:05: [00:00, 01:00)
    clock.at = START + 3 * H + 10 * MINUTE  # down through the fires of 02:05 and 03:05
    second = Scheduler(fed.config, runner="second", now=clock.now, sleep=clock.sleep)
    second.run(until=START + 3 * H + 30 * MINUTE)

    assert_released_once(fed, 3)
    assert [(r["interval_start"], r["attempt"], r["runner"], r["started"]) for r in runs(fed)] == [
        (START, 1, "first", START + H + 5 * MINUTE),
        (START + H, 1, "second", START + 3 * H + 10 * MINUTE),
        (START + 2 * H, 1, "second", START + 3 * H + 10 * MINUTE),
    ]
    assert clock.at == START + 3 * H + 30 * MINUTE
    # A pass with nothing due reads the runs table once, not once per interval of the history.
    reads: list[str] = []
    original = RunLog.attempts
    monkeypatch.setattr(RunLog, "attempts", lambda self, name: reads.append(name) or original(self, name))
    assert second.run_due()[0] == []
    assert reads == ["hourly"]


def test_a_failed_attempt_is_recorded_and_retried_after_its_backoff(
    make_federation: Callable[..., Federation],
) -> None:
    fed = scheduled(make_federation)
    keys = Path(fed.config.institution_keys_path(fed.config.institution("alpha")))
    shutil.move(keys, keys.with_name("away"))  # alpha cannot sign: the first attempt fails before any work

    def on_result(result: RunResult) -> None:
        if result.status is not None and result.status.value == "failed":
            shutil.move(keys.with_name("away"), keys)

    clock = Clock(START + H + 5 * MINUTE)
    Scheduler(fed.config, runner="r", now=clock.now, sleep=clock.sleep, on_result=on_result).run(
        until=START + H + 20 * MINUTE
    )
    assert [(r["attempt"], r["status"]) for r in runs(fed)] == [(1, "failed"), (2, "released")]
    failed, retried = runs(fed)
    assert "signing key" in str(failed["error"])
    assert retried["started"] == failed["finished"] + MINUTE  # the backoff, on the injected clock
    assert_released_once(fed, 1)


def test_schedule_once_exits_non_zero_while_an_interval_is_failing_or_given_up(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = scheduled(make_federation)
    text = fed.config_path.read_text()
    fed.config_path.write_text(text.replace('backoff = "1m"', 'backoff = "1m"\nmax_attempts = 1'))
    keys = Path(fed.config.institution_keys_path(fed.config.institution("alpha")))
    shutil.move(keys, keys.with_name("away"))  # every attempt fails
    once = ["schedule", "--config", str(fed.config_path), "--once", "--runner-id", "r", "--now"]
    assert main([*once, (START + H + 5 * MINUTE).isoformat()]) == 1  # the attempt failed
    assert "1 interval(s) acted on by r: 1 failed" in capsys.readouterr().out
    assert main([*once, (START + H + 30 * MINUTE).isoformat()]) == 1  # given up: still reported
    assert [r["status"] for r in runs(fed)] == ["failed"]


def test_schedule_once_exits_non_zero_while_a_failed_interval_waits_out_its_backoff(
    make_federation: Callable[..., Federation],
) -> None:
    """A pass that finds the interval's last attempt failed and its retry not due yet only waits: the interval is
    still failing, and cron monitoring must keep seeing it."""
    fed = scheduled(make_federation)
    keys = Path(fed.config.institution_keys_path(fed.config.institution("alpha")))
    shutil.move(keys, keys.with_name("away"))
    once = ["schedule", "--config", str(fed.config_path), "--once", "--runner-id", "r", "--now"]
    assert main([*once, (START + H + 5 * MINUTE).isoformat()]) == 1  # the attempt failed
    assert main([*once, (START + H + 5 * MINUTE + timedelta(seconds=20)).isoformat()]) == 1  # backing off
    assert [r["status"] for r in runs(fed)] == ["failed"]  # the wait records nothing


def schedule_once(config: Path, now: datetime, runner: str, crash_at: str | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    command = ["schedule", "--config", str(config), "--once", "--now", now.isoformat(), "--runner-id", runner]
    return subprocess.Popen([sys.executable, "-m", "fusion.cli", *command], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_crash_mid_run_is_taken_over_at_once_by_a_runner_on_its_host_and_releases_once(
    make_federation: Callable[..., Federation],
) -> None:
    """`--now` chose the interval; the claim carries the real clock and the crashed runner's process, which is
    provably gone: a runner on this host takes the interval over within its lease (after the retry backoff).
    A claim whose runner cannot be proven gone holds until its lease ends (tests/pipelines/test_dead_claims.py)."""
    fed = scheduled(make_federation)
    before = utc_now()
    crashed = schedule_once(fed.config_path, START + H + 5 * MINUTE, "crashed", crash_at="after_ledger")
    output, _ = crashed.communicate(timeout=300)
    assert crashed.returncode == CRASH_EXIT_CODE, output
    (claim,) = runs(fed)
    assert (claim["status"], claim["runner"], claim["pid"]) == ("running", "crashed", crashed.pid)
    assert before <= claim["started"] <= utc_now() and claim["lease_until"] == claim["started"] + 10 * MINUTE

    clock = Clock(claim["started"] + MINUTE)  # well within the lease
    survivor = Scheduler(fed.config, runner="survivor", now=clock.now, sleep=clock.sleep,
                         as_of=START + H + 10 * MINUTE)
    (waiting,), _ = survivor.run_due()
    assert waiting.action is Action.WAIT and waiting.at == clock.at + MINUTE  # the retry's backoff, from now
    clock.at += 2 * MINUTE
    survivor.run_due()

    assert_released_once(fed, 1)
    assert [(r["attempt"], r["runner"], r["status"]) for r in runs(fed)] == [
        (1, "crashed", "failed"),
        (2, "survivor", "released"),
    ]
    assert "its process is gone" in str(runs(fed)[0]["error"])


def test_a_release_committed_by_an_attempt_killed_before_it_said_so_is_recorded_released_by_the_next(
    make_federation: Callable[..., Federation],
) -> None:
    """A runner killed after its release's rows were committed and before `runs` said so (`after_commit`): the
    attempt that took the interval over found the release in the store and recorded `already_released`, so no row
    of `runs` said `released` (nor its rows, cells and epsilon) and the forecast refresh a released interval
    triggers never ran. The takeover records `released` with the release's counts, read from the store."""
    from pipelines.batch import run_batch

    fed = scheduled(make_federation)
    clock = Clock(START + H + 5 * MINUTE)
    log = RunLog(Store(fed.config.store_path))
    log.store.ensure_tables()
    # What the killed runner left: its claim, still running, and the release it committed.
    assert log.claim(Claim("hourly", Interval(START, START + H), 1, "killed", clock.at, clock.at + 10 * MINUTE)) is None
    plan = plan_release(fed.config, START, START + H)
    run_batch(plan)
    clock.at += 11 * MINUTE  # its lease has run out: the next runner expires the claim and takes the interval over
    (taken,), _ = Scheduler(fed.config, runner="survivor", now=clock.now, sleep=clock.sleep).run_due()
    assert (taken.action, taken.status, taken.cells) == (Action.RUN, RunStatus.RELEASED, plan.layout.cells)
    assert_released_once(fed, 1)  # one `released` row, with the release's rows, cells and epsilon
    assert [(r["attempt"], r["runner"], r["status"]) for r in runs(fed)] == [
        (1, "killed", "failed"),
        (2, "survivor", "released"),
    ]


def test_schedule_once_on_a_store_it_cannot_write_fails_in_one_line_and_claims_nothing(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    """A file where the `runs` table's directory should be (a write refused as root too): Delta's error and a
    traceback became one line naming the store, before any interval is claimed; once the store is writable again
    the next pass releases the interval."""
    fed = scheduled(make_federation)
    Store(fed.config.store_path).ensure_tables()
    table = Path(fed.config.store_path) / "runs"
    table.rename(table.with_name("runs-away"))
    table.write_text("")
    once = ["schedule", "--config", str(fed.config_path), "--once", "--runner-id", "r", "--now",
            (START + H + 5 * MINUTE).isoformat()]
    assert main(once) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert said.startswith(f"error: the store {fed.config.store_path} cannot be used now: Not a directory"), said
    table.unlink()
    table.with_name("runs-away").rename(table)
    assert runs(fed) == []
    assert main(once) == 0
    assert_released_once(fed, 1)


def test_a_store_failing_as_an_attempt_is_recorded_stops_the_pass_in_one_line_and_the_next_takes_it_over(
    make_federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills between an attempt's release and the row that records it: the pass stops with one line
    naming the store, not Delta's error; the claim left running is taken over once its lease ends, and the
    interval is recorded released, released and charged once."""
    from deltalake.exceptions import DeltaError

    from fusion.store.failures import StoreUnavailable

    fed = scheduled(make_federation)
    store = fed.config.store_path

    def full(*args: object, **kwargs: object) -> None:
        raise DeltaError(f"Generic LocalFileSystem error: Unable to write {store}/runs/x: No space left on device "
                         "(os error 28)")

    clock = Clock(START + H + 5 * MINUTE)
    scheduler = Scheduler(fed.config, runner="r", now=clock.now, sleep=clock.sleep)
    monkeypatch.setattr(RunLog, "finish", full)
    with pytest.raises(StoreUnavailable, match=rf"^the store {store} cannot be used now: No space left on device"):
        scheduler.run_due()
    monkeypatch.undo()
    assert [r["status"] for r in runs(fed)] == ["running"]
    clock.at += 11 * MINUTE  # past the claim's lease
    scheduler.run_due()
    assert_released_once(fed, 1)
    assert [(r["attempt"], r["status"]) for r in runs(fed)] == [(1, "failed"), (2, "released")]


def test_concurrent_schedulers_never_release_an_interval_twice(make_federation: Callable[..., Federation]) -> None:
    fed = scheduled(make_federation)
    now = START + 2 * H + 5 * MINUTE  # [00:00, 01:00) and [01:00, 02:00) are due
    racers = [schedule_once(fed.config_path, now, runner) for runner in ("a", "b")]
    for racer in racers:
        output, _ = racer.communicate(timeout=300)
        assert racer.returncode == 0, output

    assert_released_once(fed, 2)
    for row in runs(fed):
        assert row["status"] == "released" or (row["status"] == "skipped" and "claimed by" in str(row["error"]))


def test_backfill_runs_missing_intervals_in_order_and_the_ledger_decides(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = scheduled(make_federation, epsilon_cap=None, noise=True)  # the cap is one release a day ...
    entity = '[privacy]\nunit = "entity"\nmax_partitions = 3\nmax_readings_per_partition = 2\n'
    fed.config_path.write_text(fed.config_path.read_text().replace("[privacy]\n", entity))  # ... composed in sequence
    args = ["backfill", "--config", str(fed.config_path), "--from", START.isoformat(), "--to",
            (START + 3 * H).isoformat(), "--runner-id", "manual"]
    assert main(args) == 0
    assert "1 released, 2 skipped" in capsys.readouterr().out
    assert_released_once(fed, 1)
    assert [(r["interval_start"], r["status"]) for r in runs(fed)] == [
        (START, "released"),
        (START + H, "skipped"),
        (START + 2 * H, "skipped"),
    ]
    assert all("the cap is 1.0000" in str(r["error"]) for r in runs(fed)[1:])

    assert main(args) == 0  # the released interval is skipped; the ledger refuses the others again
    assert "1 already released, 2 skipped" in capsys.readouterr().out
    assert [(r["interval_start"], r["attempt"]) for r in runs(fed)] == [
        (START, 1), (START + H, 1), (START + H, 2), (START + 2 * H, 1), (START + 2 * H, 2),
    ]
    assert main([*args[:4], "2026-01-01T00:30", *args[5:]]) == 1
    assert "--from 2026-01-01T00:30 is not on schedule hourly's 1h grid" in capsys.readouterr().err
    # Intervals not closed yet would be released without their late readings, and sealed once, ever:
    assert main([*args[:6], "2099-01-01T00:00", *args[7:]]) == 1
    refused = capsys.readouterr()
    assert "reaches intervals schedule 'hourly' has not closed yet" in refused.err
    assert "backfill hourly" not in refused.out  # refused before any progress bar is drawn
    assert len(runs(fed)) == 5  # nothing was attempted


def test_sigterm_stops_a_waiting_scheduler_cleanly(make_federation: Callable[..., Federation]) -> None:
    fed = make_federation()
    text = fed.config_path.read_text() + SCHEDULE.replace("2026-01-01T00:00:00", "2099-01-01T00:00:00")
    fed.config_path.write_text(text)  # nothing is due before 2099: the scheduler only waits
    command = [sys.executable, "-m", "fusion.cli", "schedule", "--config", str(fed.config_path)]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("Scheduler"):
            break
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, "".join(seen) + output
    assert "SIGTERM: stopping after the current attempt" in output and "scheduler stopped" in output
    assert Store(fed.config.store_path).read("runs").num_rows == 0


class Killed(BaseException):
    """What SIGTERM's default action does to a process, in process: nothing catches it, nothing after it runs."""


def test_sigterm_lets_schedule_once_finish_its_attempt_then_start_no_other(
    make_federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fusion schedule --once` had no signal handler: a SIGTERM (cron's timeout, a deploy) killed it mid-attempt,
    leaving its claim `running` until the lease ran out. It stops as the long-running scheduler does: the attempt
    under way finishes and records its outcome, no other interval starts, and it exits 0."""
    import pipelines.scheduler as scheduler_module

    fed = scheduled(make_federation)
    release = scheduler_module.run_batch

    def signalled_meanwhile(*args: object, **kwargs: object) -> object:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the attempt runs
        return release(*args, **kwargs)  # type: ignore[arg-type]

    def killed(signum: int, frame: object) -> None:
        raise Killed("SIGTERM was left to its default action")

    monkeypatch.setattr(scheduler_module, "run_batch", signalled_meanwhile)
    before = signal.signal(signal.SIGTERM, killed)
    try:
        now = START + 2 * H + 5 * MINUTE  # [00:00, 01:00) and [01:00, 02:00) are due
        code = main(["schedule", "--config", str(fed.config_path), "--once", "--now", now.isoformat(), "--runner-id",
                     "r"])
        assert signal.getsignal(signal.SIGTERM) is killed  # the handler before is put back
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 0
    assert [(r["interval_start"], r["attempt"], r["status"]) for r in runs(fed)] == [(START, 1, "released")]
    assert_released_once(fed, 1)


def test_a_run_longer_than_its_lease_keeps_its_claim_while_its_heartbeat_renews_it(
    make_federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real clock, lease 1 s, a real batch release held back (its contribution step waits) until a second runner
    has looked, after the first lease ran out: the holder's heartbeat renewed the lease, so the second runner
    finds the interval busy instead of expiring the claim and running the interval again."""
    import pipelines.batch

    fed = make_federation(noise=False, seed=3)
    fed.config_path.write_text(fed.config_path.read_text() + SCHEDULE.replace('lease = "10m"', 'lease = "1s"'))
    config = load_config(fed.config_path)
    schedule, interval = config.schedules[0], Interval(START, START + H)
    looked = threading.Event()
    contribute = pipelines.batch.run_contributions
    monkeypatch.setattr(pipelines.batch, "run_contributions",
                        lambda *args, **kwargs: looked.wait(60) and contribute(*args, **kwargs))
    holder: list[RunResult] = []
    running = threading.Thread(target=lambda: holder.append(run_interval(config, schedule, interval, runner="a")))
    running.start()
    try:
        while not (rows := Store(config.store_path).read("runs").to_pylist()):
            time.sleep(0.05)
        time.sleep(max(0.0, (rows[0]["started"] + timedelta(seconds=1.5) - utc_now()).total_seconds()))
        second = run_interval(config, schedule, interval, runner="b")
    finally:
        looked.set()
        running.join()

    assert second.action is Action.BUSY and "claimed by a" in second.detail
    assert holder[0].status is RunStatus.RELEASED
    assert [(r["attempt"], r["runner"], r["status"]) for r in runs(fed)] == [(1, "a", "released"), (1, "b", "skipped")]
    claim = runs(fed)[0]
    assert claim["lease_until"] > claim["started"] + timedelta(seconds=1.5)  # renewed at least once after 1 s


def _waited_for(condition: Callable[[], bool], *, seconds: float = 20.0) -> bool:
    """Whether `condition` held within `seconds` (checked every 20 ms)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_heartbeat_renews_every_third_of_the_lease_and_stops_once_another_runner_expired_it(
    tmp_path: Path,
) -> None:
    log = RunLog(Store(tmp_path / "store"))
    started = utc_now()
    claim = Claim("hourly", Interval(START, START + H), 1, "a", started, started + timedelta(seconds=1))
    assert log.claim(claim) is None
    with Heartbeat(log, claim, timedelta(seconds=1), now=utc_now) as heartbeat:
        # Polled rather than slept for a fixed time: on a loaded machine a renewal's commit can take a while.
        assert _waited_for(lambda: heartbeat.renewals >= 3 or heartbeat.lost)
        assert heartbeat.renewals >= 3 and not heartbeat.lost
        # E.g. this runner stalled and another took over. A renewal can land between reading the lease and
        # expiring it (expire then refuses: the lease changed), so the other runner retries with the lease it reads.
        assert any(log.expire(heartbeat.claim, utc_now()) for _ in range(5))
        assert _waited_for(lambda: heartbeat.lost)
    (row,) = log.store.read("runs").to_pylist()
    assert row["status"] == "failed"
    assert row["lease_until"] == heartbeat.claim.lease_until > started + timedelta(seconds=1)


def test_a_catch_up_compacts_runs_as_it_goes(make_federation: Callable[..., Federation],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attempt adds files to `runs`, which the next attempt reads: a pass compacts before each interval it
    runs, so a long catch-up does not slow down as it goes (README, Scheduling: 337 intervals in 111 s, not 269)."""
    fed = scheduled(make_federation)
    text = fed.config_path.read_text()
    fed.config_path.write_text(text.replace('backoff = "1m"', 'backoff = "1m"\nmax_attempts = 1'))
    keys = Path(fed.config.institution_keys_path(fed.config.institution("alpha")))
    shutil.move(keys, keys.with_name("away"))  # every attempt fails, quickly
    monkeypatch.setattr(Store.compact, "__kwdefaults__", {"min_files": 4})
    clock = Clock(START + 10 * H + 5 * MINUTE)
    results, _ = Scheduler(load_config(fed.config_path), runner="r", now=clock.now, sleep=clock.sleep).run_due()
    assert [r.status for r in results] == [RunStatus.FAILED] * 10
    files = len(Store(fed.config.store_path).delta_table("runs").file_uris())
    assert files <= 6, f"{files} files in runs after a catch-up of 10 attempts"  # at most 4, plus the last attempt's


def test_an_interval_not_aggregated_yet_is_retried_not_skipped(make_federation: Callable[..., Federation],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """No aggregate and no refusal in the exchange (a slow exchange): the attempt fails and is retried with
    backoff; only a refusal (budget, quorum) is final."""
    import pipelines.scheduler as scheduler_module
    from fusion.errors import ReleaseNotReady

    fed = scheduled(make_federation)

    def not_ready(*args: object, **kwargs: object) -> None:
        raise ReleaseNotReady("no aggregate yet")

    monkeypatch.setattr(scheduler_module, "run_batch", not_ready)
    clock = Clock(START + H + 5 * MINUTE)
    (result,), _ = Scheduler(fed.config, runner="r", now=clock.now, sleep=clock.sleep).run_due()
    assert result.status is RunStatus.FAILED and "no aggregate yet" in result.detail
