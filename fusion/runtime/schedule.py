"""Batch schedules: which intervals are due at a given time, and when a failed one may be retried.

Pure functions over an injected time (no clock, no store), so the scheduler loop and its tests can run an
accelerated clock. The timing rule: a schedule's intervals lie on a grid of `interval` length counted from the
Unix epoch (UTC). At each cron fire time f, every grid interval that ended at or before floor(f) is due, where
floor(f) is f truncated to the grid; hourly at :05 with `interval = "1h"` releases [09:00, 10:00) at 10:05.
Intervals missed while no scheduler ran are due at the next fire (catch-up), oldest first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Self

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fusion.runtime.durations import floor_to_grid, parse_duration
from fusion.runtime.runner_process import RunnerProcess

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class ScheduleConfig(BaseModel):
    """One scheduled batch pipeline: `[[schedules]]` in the federation config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=_NAME)]
    cron: str  # five fields (minute hour day month weekday), or six with seconds; UTC
    interval: str = "1h"  # each run covers one grid interval of this length
    start: datetime | None = None  # earliest interval to catch up from (default: the first one ever run)
    end: datetime | None = None  # no interval ending after this is run (a campaign, or a demo's data)
    max_attempts: int = Field(default=3, ge=1, le=100)
    backoff: str = "1m"  # wait before the first retry; doubles after every further failure
    max_backoff: str | None = None  # the longest wait between retries, at least backoff (unset: 1h, or backoff)
    lease: str = "1h"  # how long a stopped runner's claim holds; a running runner renews it every lease/3

    @field_validator("cron")
    @classmethod
    def _cron(cls, cron: str) -> str:
        if len(cron.split()) not in (5, 6) or not croniter.is_valid(cron):
            raise ValueError(
                f"'{cron}' is not a cron expression; write five fields (minute hour day month weekday), "
                "e.g. '5 * * * *' for hourly at :05"
            )
        return cron

    @field_validator("interval", "backoff", "max_backoff", "lease")
    @classmethod
    def _positive_duration(cls, text: str | None) -> str | None:
        if text is None:
            return None
        if parse_duration(text) <= timedelta(0):
            raise ValueError(f"'{text}' must be a positive duration")
        return text

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, moment: datetime | None) -> datetime | None:
        if moment is None:
            return None
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

    @model_validator(mode="after")
    def _on_grid(self) -> Self:
        for name, moment in (("start", self.start), ("end", self.end)):
            if moment is not None and floor_to_grid(moment, self.length) != moment:
                raise ValueError(
                    f"{name} {moment.isoformat()} is not on the {self.interval} interval grid (counted from "
                    f"1970-01-01T00:00Z); use {floor_to_grid(moment, self.length).isoformat()}"
                )
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"end {self.end.isoformat()} is not after start {self.start.isoformat()}")
        return self

    @model_validator(mode="after")
    def _backoff_order(self) -> Self:
        # The wait before a retry starts at `backoff` and doubles up to `max_backoff`: a cap below the first wait
        # would shorten every wait to the cap, so the first one would not be the one configured.
        if self.backoff_cap < self.first_backoff:
            raise ValueError(
                f"max_backoff {self.max_backoff} is below backoff {self.backoff}; the retry wait starts at backoff "
                "and doubles up to max_backoff: raise max_backoff or lower backoff"
            )
        return self

    @property
    def length(self) -> timedelta:
        return parse_duration(self.interval)

    @property
    def first_backoff(self) -> timedelta:
        return parse_duration(self.backoff)

    @property
    def backoff_cap(self) -> timedelta:
        """`max_backoff`; unset, an hour, or `backoff` when that is longer (a daily schedule's 2h backoff)."""
        if self.max_backoff is None:
            return max(timedelta(hours=1), self.first_backoff)
        return parse_duration(self.max_backoff)

    @property
    def lease_length(self) -> timedelta:
        return parse_duration(self.lease)


def check_schedules(schedules: Sequence[ScheduleConfig], *, window: timedelta, period: timedelta) -> None:
    """Cross-field checks against the federation: whole windows, never straddling a privacy period."""
    names = [s.name for s in schedules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"schedules: duplicate names {duplicates}")
    for i, schedule in enumerate(schedules):
        if schedule.length % window:
            raise ValueError(
                f"schedules[{i}].interval {schedule.interval} is not a whole number of {window} windows"
            )
        if period % schedule.length:
            raise ValueError(
                f"schedules[{i}].interval {schedule.interval} does not divide the privacy period ({period}); "
                "an interval may not straddle two periods"
            )


@dataclass(frozen=True, order=True)
class Interval:
    """One release interval [start, end), UTC."""

    start: datetime
    end: datetime

    def __str__(self) -> str:
        return f"{self.start.isoformat()} .. {self.end.isoformat()}"


def latest_fire(schedule: ScheduleConfig, now: datetime) -> datetime:
    """The last cron fire time at or before `now`."""
    now = now.astimezone(UTC)
    if croniter.match(schedule.cron, now):
        return now
    fire: datetime = croniter(schedule.cron, now).get_prev(datetime)
    return fire.astimezone(UTC)


def next_fire(schedule: ScheduleConfig, now: datetime) -> datetime:
    """The first cron fire time strictly after `now`."""
    fire: datetime = croniter(schedule.cron, now.astimezone(UTC)).get_next(datetime)
    return fire.astimezone(UTC)


def grid(schedule: ScheduleConfig, start: datetime, end: datetime) -> list[Interval]:
    """The schedule's grid intervals that lie inside [start, end), oldest first."""
    length = schedule.length
    first = floor_to_grid(start, length)
    if first < start:
        first += length
    out = []
    while first + length <= end:
        out.append(Interval(first, first + length))
        first += length
    return out


def due_intervals(schedule: ScheduleConfig, now: datetime, *, first_run: datetime | None) -> list[Interval]:
    """Every interval due at `now`, oldest first: from `start` (else the first interval ever run, else only the
    interval the latest fire closed) up to the latest fire time truncated to the grid, and no further than `end`."""
    closed = floor_to_grid(latest_fire(schedule, now), schedule.length)
    if schedule.end is not None:
        closed = min(closed, schedule.end)
    origin = schedule.start or first_run or closed - schedule.length
    return grid(schedule, origin, closed)


class RunStatus(StrEnum):
    RUNNING = "running"  # a claim: this runner is working on the attempt until `lease_until`
    RELEASED = "released"
    ALREADY_RELEASED = "already_released"  # the store held the release already; nothing spent
    SKIPPED = "skipped"  # refused (budget, quorum) or, on a runner's own row, claimed by another runner
    FAILED = "failed"  # an error, or a claim whose lease ran out (the runner crashed); retried with backoff


@dataclass(frozen=True)
class Attempt:
    """The claim row of one attempt at an interval, as recorded in the `runs` table."""

    attempt: int
    runner: str
    status: RunStatus
    started: datetime
    finished: datetime | None
    lease_until: datetime
    process: RunnerProcess | None = None  # the runner's process (None in rows from before it was recorded)


class Action(StrEnum):
    RUN = "run"  # claim `attempt` and run it
    DONE = "done"  # released (or, for the scheduler, refused for good)
    BUSY = "busy"  # another runner holds a live claim until `at`
    WAIT = "wait"  # the retry is due at `at`
    GIVE_UP = "give_up"  # max_attempts failed


@dataclass(frozen=True)
class Decision:
    action: Action
    attempt: int = 0
    at: datetime | None = None
    holder: str | None = None
    expired: Attempt | None = None  # a claim whose lease ran out: mark it failed, then retry


def backoff_delay(schedule: ScheduleConfig, failures: int) -> timedelta:
    """Wait after `failures` failed attempts: backoff * 2^(failures - 1), at most max_backoff."""
    if failures < 1:
        return timedelta(0)
    return min(schedule.first_backoff * 2 ** min(failures - 1, 40), schedule.backoff_cap)


def decide(
    schedule: ScheduleConfig,
    attempts: Sequence[Attempt],
    now: datetime,
    *,
    manual: bool = False,
    runner_gone: Callable[[Attempt], bool] = lambda attempt: False,
) -> Decision:
    """What to do with one interval given its attempts. `manual` (a backfill) ignores backoff and max_attempts
    and retries refused intervals: the budget ledger decides again what can be released. A running claim ends
    when its lease runs out, or at once when `runner_gone` says its runner provably stopped (a failure like
    any other: the backoff counts from now)."""
    final = {RunStatus.RELEASED, RunStatus.ALREADY_RELEASED} | (set() if manual else {RunStatus.SKIPPED})
    if any(a.status in final for a in attempts):
        return Decision(Action.DONE)
    if not attempts:
        return Decision(Action.RUN, attempt=1)
    last = max(attempts, key=lambda a: a.attempt)
    expired = None
    ended = last.finished
    if last.status is RunStatus.RUNNING:
        if last.lease_until > now and not runner_gone(last):
            return Decision(Action.BUSY, attempt=last.attempt, at=last.lease_until, holder=last.runner)
        expired = last
        ended = min(last.lease_until, now)
    failures = sum(1 for a in attempts if a.status in (RunStatus.FAILED, RunStatus.RUNNING))
    if not manual:
        if failures >= schedule.max_attempts:
            return Decision(Action.GIVE_UP, attempt=last.attempt, expired=expired)
        retry_at = (ended or last.lease_until) + backoff_delay(schedule, failures)
        if retry_at > now:
            return Decision(Action.WAIT, attempt=last.attempt + 1, at=retry_at, expired=expired)
    return Decision(Action.RUN, attempt=last.attempt + 1, expired=expired)


__all__ = [
    "Action",
    "Attempt",
    "Decision",
    "Interval",
    "RunStatus",
    "ScheduleConfig",
    "backoff_delay",
    "check_schedules",
    "decide",
    "due_intervals",
    "grid",
    "latest_fire",
    "next_fire",
]
