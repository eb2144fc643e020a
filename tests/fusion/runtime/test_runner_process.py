"""Claims record their runner's process; a runner provably gone (same host, process ended) loses its claim at once,
anything short of proof leaves the lease to decide (issue 18, point 10)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from fusion.runtime.runner_process import RunnerProcess
from fusion.runtime.schedule import Action, Attempt, Interval, RunStatus, ScheduleConfig, decide
from fusion.store.delta import Store
from fusion.store.runs import Claim, RunLog
from schemas.tables import RUNS_SCHEMA

T0 = datetime(2026, 1, 1, tzinfo=UTC)
H = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
linux = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times need /proc")


def child() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_this_process_is_not_gone() -> None:
    me = RunnerProcess.current()
    assert me.pid == os.getpid() and not me.gone()


@linux
def test_a_process_that_ended_or_is_a_zombie_is_gone() -> None:
    process = child()
    identity = RunnerProcess.of(process.pid)
    assert identity is not None and identity.started is not None and not identity.gone()
    process.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while RunnerProcess.of(process.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert identity.gone()  # killed, not reaped yet: a zombie runs no code
    process.wait()
    assert identity.gone()


@linux
def test_a_later_process_under_the_same_pid_is_not_the_runner() -> None:
    me = RunnerProcess.current()
    assert me.started is not None
    machine = me.started.rpartition("/")[0]
    assert RunnerProcess(me.host, me.pid, f"{machine}/1").gone()  # started at tick 1: another process


def test_without_proof_a_runner_is_not_gone() -> None:
    process = child()
    try:
        identity = RunnerProcess.of(process.pid)
        assert identity is not None
    finally:
        process.kill()
        process.wait()
    assert identity.gone()
    assert not RunnerProcess("another-host", identity.pid, identity.started).gone()
    if identity.started is not None:  # another boot of this host (or a machine of the same name)
        other_boot = "00000000-0000-0000-0000-000000000000/" + identity.started.split("/", 1)[1]
        assert not RunnerProcess(identity.host, identity.pid, other_boot).gone()
        # Recorded where /proc could not be read, checked where it can: no proof either.
        assert not RunnerProcess(identity.host, identity.pid, None).gone()


def hourly() -> ScheduleConfig:
    return ScheduleConfig(name="hourly", cron="5 * * * *", backoff="1m")


def running(process: RunnerProcess | None) -> Attempt:
    return Attempt(1, "r1", RunStatus.RUNNING, T0, None, T0 + H, process)


def test_a_claim_whose_runner_is_gone_is_taken_over_before_its_lease_ends() -> None:
    claim = running(RunnerProcess("h", 1, None))
    now = T0 + 10 * MINUTE  # the lease runs until T0 + 1h
    assert decide(hourly(), [claim], now).action is Action.BUSY
    assert decide(hourly(), [claim], now, runner_gone=lambda a: False).action is Action.BUSY
    backfill = decide(hourly(), [claim], now, manual=True, runner_gone=lambda a: a is claim)
    assert (backfill.action, backfill.attempt, backfill.expired) == (Action.RUN, 2, claim)
    scheduled = decide(hourly(), [claim], now, runner_gone=lambda a: a is claim)
    # A failure like any other: the retry waits for its backoff, counted from now (not from the lease's end).
    assert (scheduled.action, scheduled.at, scheduled.expired) == (Action.WAIT, now + MINUTE, claim)


def test_claims_record_their_process_and_an_older_runs_table_gains_the_columns(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    older = pa.schema([f for f in RUNS_SCHEMA if f.name not in ("host", "pid", "process_started")])
    write_deltalake(store.table_path("runs"), older.empty_table())  # as written before processes were recorded
    log = RunLog(store)
    me = RunnerProcess.current()
    interval = Interval(T0, T0 + H)
    assert log.claim(Claim("hourly", interval, 1, "a", T0, T0 + H, me)) is None
    (attempt,) = log.attempts("hourly")[interval]
    assert attempt.process == me
    assert log.expire(Claim("hourly", interval, 1, "a", T0, T0 + H, attempt.process), T0 + MINUTE, gone=True)
    (row,) = store.read("runs").to_pylist()
    assert (row["status"], row["host"], row["pid"], row["process_started"]) == ("failed", me.host, me.pid, me.started)
    assert f"pid {me.pid} on {me.host}" in row["error"] and "its process is gone" in row["error"]
