"""Scheduling clocks and dead claims (issue 18, point 10): `--now` chooses intervals only, the runs table carries
the real clock; a claim whose runner is provably gone is taken over at once, one that cannot be proven gone holds
until its lease ends. Real Beam, real TenSEAL, real Delta tables, real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fusion.cli.core import main
from fusion.config.federation import load_config
from fusion.runtime.faults import CRASH_ENV, CRASH_EXIT_CODE
from fusion.runtime.runner_process import RunnerProcess
from fusion.runtime.schedule import Action, Interval, RunStatus
from fusion.store.delta import Store
from fusion.store.runs import Claim, RunLog
from pipelines.scheduler import RunResult, Scheduler, run_interval, utc_now
from tests.conftest import START, Federation
from tests.pipelines import test_scheduler
from tests.pipelines.test_scheduler import MINUTE, H, assert_released_once, scheduled

pytestmark = pytest.mark.e2e


def runs(fed: Federation) -> list[dict[str, Any]]:
    return test_scheduler.runs(fed)


def without_alphas_keys(fed: Federation) -> None:
    """alpha cannot sign: every attempt fails at once, before any work (an attempt still claims and records)."""
    keys = Path(fed.config.institution_keys_path(fed.config.institution("alpha")))
    shutil.move(keys, keys.with_name("away"))


def test_schedule_once_now_stamps_the_runs_table_with_the_real_clock(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = scheduled(make_federation)
    without_alphas_keys(fed)
    before = utc_now()
    args = ["schedule", "--config", str(fed.config_path), "--once", "--runner-id", "r"]
    assert main([*args, "--now", (START + H + 5 * MINUTE).isoformat()]) == 1  # [00:00, 01:00) ran, and failed
    after = utc_now()
    (row,) = runs(fed)
    assert (row["interval_start"], row["status"]) == (START, "failed")
    assert before <= row["started"] <= row["finished"] <= after  # not 01:05 on 2026-01-01
    assert row["lease_until"] == row["started"] + 10 * MINUTE
    assert (row["host"], row["pid"]) == (RunnerProcess.current().host, os.getpid())
    assert "1 interval(s) acted on by r: 1 failed" in capsys.readouterr().out


def test_a_claim_made_as_of_a_past_time_is_live_for_a_runner_on_the_real_clock(
    make_federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass choosing intervals as of 01:05 holds [00:00, 01:00); a runner on the real clock finds it busy (with
    the claim's times on the simulated clock, it found the lease long expired and took the interval over)."""
    import pipelines.batch

    fed = scheduled(make_federation)
    without_alphas_keys(fed)
    config = load_config(fed.config_path)
    looked = threading.Event()
    contribute = pipelines.batch.run_contributions
    monkeypatch.setattr(pipelines.batch, "run_contributions",
                        lambda *args, **kwargs: looked.wait(60) and contribute(*args, **kwargs))
    past = Scheduler(config, runner="past", as_of=START + H + 5 * MINUTE)
    held: list[list[RunResult]] = []
    running = threading.Thread(target=lambda: held.append(past.run_due()[0]))
    running.start()
    try:
        while not Store(config.store_path).read("runs").num_rows:
            time.sleep(0.05)
        live = run_interval(config, config.schedules[0], Interval(START, START + H), runner="live")
    finally:
        looked.set()
        running.join()
    assert live.action is Action.BUSY and "claimed by past" in live.detail
    assert [r.status for r in held[0]] == [RunStatus.FAILED]  # the holder's own attempt (alpha cannot sign)
    assert [(r["runner"], r["status"]) for r in runs(fed)] == [("past", "failed"), ("live", "skipped")]


def test_a_killed_backfill_is_taken_over_at_once_and_then_everything_verifies(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = scheduled(make_federation)
    args = ["backfill", "--config", str(fed.config_path), "--from", START.isoformat(), "--to",
            (START + H).isoformat()]
    env = {**os.environ, CRASH_ENV: "after_ledger"}  # killed once the budget is charged, before the release
    killed = subprocess.run([sys.executable, "-m", "fusion.cli", *args, "--runner-id", "killed"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == CRASH_EXIT_CODE, killed.stdout + killed.stderr
    (claim,) = runs(fed)
    assert claim["status"] == "running" and claim["lease_until"] > utc_now()  # its lease still holds
    verify = ["verify", "--config", str(fed.config_path), "--format", "json"]
    assert main(verify) == 1 and '"missing"' in capsys.readouterr().out  # charged, not published

    assert main([*args, "--runner-id", "again"]) == 0  # at once, not an hour later
    assert "1 released" in capsys.readouterr().out
    assert_released_once(fed, 1)
    assert [(r["attempt"], r["runner"], r["status"]) for r in runs(fed)] == [
        (1, "killed", "failed"),
        (2, "again", "released"),
    ]
    assert "its process is gone" in str(runs(fed)[0]["error"])
    assert main(verify) == 0


def test_a_claim_whose_runner_cannot_be_proven_gone_holds_until_its_lease_ends(
    make_federation: Callable[..., Federation],
) -> None:
    fed = scheduled(make_federation)
    without_alphas_keys(fed)
    config = load_config(fed.config_path)
    schedule = config.schedules[0]
    log = RunLog(Store(config.store_path))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = RunnerProcess.of(ended.pid) or RunnerProcess(RunnerProcess.current().host, ended.pid)
    ended.wait()
    assert identity.gone()
    holders = {  # hour -> the process that holds its claim
        0: RunnerProcess("another-host", identity.pid, identity.started),  # gone there? nobody here can tell
        1: RunnerProcess.current(),  # alive
    }
    now = utc_now()
    for hour, process in holders.items():
        interval = Interval(START + hour * H, START + (hour + 1) * H)
        assert log.claim(Claim("hourly", interval, 1, f"holder-{hour}", now, now + 10 * MINUTE, process)) is None
        busy = run_interval(config, schedule, interval, runner="other", manual=True)
        assert busy.action is Action.BUSY and f"claimed by holder-{hour}" in busy.detail

    after_lease = now + 11 * MINUTE  # the lease decides: once it has run out, the claim is taken over
    result = run_interval(config, schedule, Interval(START, START + H), runner="other", manual=True,
                          now=lambda: after_lease)
    assert (result.action, result.attempt, result.status) == (Action.RUN, 2, RunStatus.FAILED)  # alpha cannot sign
    first = next(r for r in runs(fed) if r["run_id"].endswith("/1") and r["interval_start"] == START)
    assert first["status"] == "failed" and "lease expired" in str(first["error"])
