"""Schedules: config validation naming the field, due intervals at injected times, retries with backoff."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fusion.config.federation import load_config
from fusion.errors import ConfigError
from fusion.runtime.schedule import (
    Action,
    Attempt,
    Decision,
    Interval,
    RunStatus,
    ScheduleConfig,
    backoff_delay,
    decide,
    due_intervals,
    grid,
    latest_fire,
    next_fire,
)
from tests.conftest import config_text

H = timedelta(hours=1)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def hourly(**fields: object) -> ScheduleConfig:
    return ScheduleConfig.model_validate({"name": "hourly", "cron": "5 * * * *", "interval": "1h", **fields})


def write_config(tmp_path: Path, schedules: str, *, privacy: str = "") -> Path:
    text = config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2, noise=False)
    path = tmp_path / "federation.toml"
    path.write_text(text.replace("[privacy]\n", "[privacy]\n" + privacy) + schedules)
    return path


def test_schedules_load_from_the_federation_config(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[[schedules]]\nname = "hourly"\ncron = "5 * * * *"\ninterval = "1h"\nstart = 2026-01-01T00:00:00\n'
        '[[schedules]]\nname = "daily"\ncron = "30 0 * * *"\ninterval = "1d"\nmax_attempts = 5\n',
    )
    config = load_config(path)
    assert [s.name for s in config.schedules] == ["hourly", "daily"]
    assert config.schedule("hourly").start == T0  # a naive TOML datetime is UTC
    assert config.schedule("daily").max_attempts == 5 and config.schedule("daily").length == 24 * H


@pytest.mark.parametrize(
    ("schedule", "field"),
    [
        ('cron = "61 * * * *"', "schedules[0].cron"),
        ('cron = "every hour"', "schedules[0].cron"),
        ('cron = "5 * * * *"\ninterval = "soon"', "schedules[0].interval"),
        ('cron = "5 * * * *"\nmax_attempts = 0', "schedules[0].max_attempts"),
        ('cron = "5 * * * *"\nbackoff = "0s"', "schedules[0].backoff"),
        ('cron = "5 * * * *"\nstart = 2026-01-01T00:30:00', "schedules[0]: Value error, start 2026-01-01T00:30"),
        ('cron = "5 * * * *"\ninterval = "90m"', "schedules[0].interval 90m is not a whole number"),
        ('cron = "5 * * * *"\ninterval = "2d"', "schedules[0].interval 2d does not divide the privacy period"),
        ('cron = "5 * * * *"\nwhen = "now"', "schedules[0].when"),
    ],
)
def test_a_bad_schedule_fails_at_load_naming_the_field(tmp_path: Path, schedule: str, field: str) -> None:
    path = write_config(tmp_path, f'[[schedules]]\nname = "hourly"\n{schedule}\n')
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(path)


def test_duplicate_schedule_names_are_refused(tmp_path: Path) -> None:
    one = '[[schedules]]\nname = "s"\ncron = "5 * * * *"\n'
    with pytest.raises(ConfigError, match=r"schedules: duplicate names \['s'\]"):
        load_config(write_config(tmp_path, one + one))


def test_fire_times_are_inclusive_of_now() -> None:
    schedule = hourly()
    assert latest_fire(schedule, T0 + 2 * H + timedelta(minutes=5)) == T0 + 2 * H + timedelta(minutes=5)
    assert latest_fire(schedule, T0 + 2 * H + timedelta(minutes=4)) == T0 + H + timedelta(minutes=5)
    assert next_fire(schedule, T0 + 2 * H + timedelta(minutes=5)) == T0 + 3 * H + timedelta(minutes=5)


def test_each_fire_covers_the_interval_that_just_closed() -> None:
    schedule = hourly()
    at_0205 = T0 + 2 * H + timedelta(minutes=5)
    assert due_intervals(schedule, at_0205, first_run=None) == [Interval(T0 + H, T0 + 2 * H)]
    assert due_intervals(schedule, at_0205 - timedelta(seconds=1), first_run=None) == [Interval(T0, T0 + H)]


def test_catch_up_runs_every_interval_since_start_or_the_first_run_oldest_first() -> None:
    at_0310 = T0 + 3 * H + timedelta(minutes=10)
    expected = [Interval(T0 + i * H, T0 + (i + 1) * H) for i in range(3)]
    assert due_intervals(hourly(start=T0), at_0310, first_run=None) == expected
    assert due_intervals(hourly(), at_0310, first_run=T0) == expected
    assert due_intervals(hourly(start=T0 + H), at_0310, first_run=T0) == expected[1:]  # start wins


def test_a_daily_cron_over_hourly_intervals_releases_the_whole_day() -> None:
    schedule = ScheduleConfig(name="d", cron="30 0 * * *", interval="1h", start=T0)
    due = due_intervals(schedule, T0 + 24 * H + timedelta(minutes=45), first_run=None)
    assert len(due) == 24 and due[-1].end == T0 + 24 * H


def test_grid_keeps_only_whole_intervals() -> None:
    schedule = hourly()
    assert grid(schedule, T0 + timedelta(minutes=30), T0 + 3 * H) == [
        Interval(T0 + H, T0 + 2 * H),
        Interval(T0 + 2 * H, T0 + 3 * H),
    ]


def test_backoff_doubles_up_to_its_cap() -> None:
    schedule = hourly(backoff="1m", max_backoff="5m")
    assert [backoff_delay(schedule, n) for n in range(5)] == [
        timedelta(0),
        timedelta(minutes=1),
        timedelta(minutes=2),
        timedelta(minutes=4),
        timedelta(minutes=5),
    ]


def attempt(n: int, status: RunStatus, *, finished: datetime | None = T0, lease: datetime = T0 + H) -> Attempt:
    return Attempt(attempt=n, runner=f"r{n}", status=status, started=T0, finished=finished, lease_until=lease)


def test_decide_runs_new_intervals_and_leaves_finished_ones() -> None:
    schedule = hourly()
    assert decide(schedule, [], T0).action is Action.RUN
    assert decide(schedule, [attempt(1, RunStatus.RELEASED)], T0).action is Action.DONE
    assert decide(schedule, [attempt(1, RunStatus.ALREADY_RELEASED)], T0).action is Action.DONE
    refused = [attempt(1, RunStatus.SKIPPED)]  # e.g. the budget refused it: the scheduler leaves it
    assert decide(schedule, refused, T0).action is Action.DONE
    assert decide(schedule, refused, T0, manual=True) == Decision(Action.RUN, attempt=2)  # ...a backfill asks again


def test_decide_retries_failures_after_backoff_then_gives_up() -> None:
    schedule = hourly(backoff="1m", max_attempts=2)
    failed = [attempt(1, RunStatus.FAILED)]
    wait = decide(schedule, failed, T0 + timedelta(seconds=30))
    assert (wait.action, wait.attempt, wait.at) == (Action.WAIT, 2, T0 + timedelta(minutes=1))
    assert decide(schedule, failed, T0 + timedelta(minutes=1)).action is Action.RUN
    both = [*failed, attempt(2, RunStatus.FAILED)]
    assert decide(schedule, both, T0 + H).action is Action.GIVE_UP
    assert decide(schedule, both, T0, manual=True).action is Action.RUN  # a backfill tries again at once


def test_a_live_claim_is_busy_and_an_expired_one_is_retried() -> None:
    schedule = hourly(backoff="1m")
    running = [attempt(1, RunStatus.RUNNING, finished=None, lease=T0 + H)]
    busy = decide(schedule, running, T0 + 30 * timedelta(minutes=1))
    assert (busy.action, busy.holder, busy.at) == (Action.BUSY, "r1", T0 + H)
    retry = decide(schedule, running, T0 + H + timedelta(minutes=1))
    assert (retry.action, retry.attempt, retry.expired) == (Action.RUN, 2, running[0])


def test_end_bounds_the_catch_up_and_must_be_on_the_grid_after_start() -> None:
    from fusion.runtime.schedule import ScheduleConfig, due_intervals

    daily = ScheduleConfig(name="d", cron="5 0 * * *", interval="1d", start=datetime(2026, 1, 1, tzinfo=UTC),
                           end=datetime(2026, 1, 3, tzinfo=UTC))
    due = due_intervals(daily, datetime(2026, 12, 6, 10, tzinfo=UTC), first_run=None)
    assert [(i.start.day, i.end.day) for i in due] == [(1, 2), (2, 3)]
    assert due_intervals(daily, datetime(2026, 1, 2, 0, 5, tzinfo=UTC), first_run=None)[-1].end.day == 2
    with pytest.raises(ValueError, match="end 2026-01-02T12:00:00\\+00:00 is not on the 1d interval grid"):
        ScheduleConfig(name="d", cron="5 0 * * *", interval="1d", end=datetime(2026, 1, 2, 12, tzinfo=UTC))
    with pytest.raises(ValueError, match="is not after start"):
        ScheduleConfig(name="d", cron="5 0 * * *", interval="1d", start=datetime(2026, 1, 2, tzinfo=UTC),
                       end=datetime(2026, 1, 1, tzinfo=UTC))
