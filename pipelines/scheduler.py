"""Scheduled and backfilled batch releases: claim an interval in the `runs` table, run it, record the outcome.

The clock (`now`) and `sleep` are injected, so tests can run a scheduler on an accelerated clock; every runner
stamps claims, leases and outcomes with that one clock. `as_of` (`fusion schedule --once --now`) only chooses
which intervals are due, as if it were that time: a past moment written into `runs` would make a live claim look
expired to every other runner. Exactly once:
each attempt is a conditional claim in `runs` (one runner wins it; the others record why they skipped), and
underneath, a release is idempotent in the store (keyed commits, a compare-and-swap budget ledger), so even a
runner that outlives its lease cannot release an interval twice. While an attempt runs, a heartbeat renews its
lease every third of the lease's length: a long run keeps its claim, and a stopped runner's claim expires within
one lease, or at once when its process is provably gone (same host, process ended: fusion/runtime/runner_process.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyarrow.compute as pc

from fusion.config.federation import Config
from fusion.errors import FusionError, ReleaseNotReady, ReleaseRefused, shared_message
from fusion.release.plan import plan_release
from fusion.runtime.durations import floor_to_grid
from fusion.runtime.runner_process import RunnerProcess
from fusion.runtime.schedule import (
    Action,
    Attempt,
    Interval,
    RunStatus,
    ScheduleConfig,
    decide,
    due_intervals,
    grid,
    latest_fire,
    next_fire,
)
from fusion.store.delta import Store
from fusion.store.failures import check_writable, store_failures
from fusion.store.mode import bind_store_mode
from fusion.store.runs import Claim, Outcome, RunLog
from pipelines.batch import run_batch

Clock = Callable[[], datetime]
_log = logging.getLogger(__name__)


def default_runner_id() -> str:
    """host:pid:random, so two schedulers on one host (or a restarted one) never share an id."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def utc_now() -> datetime:
    return datetime.now(UTC)


def runner_gone(attempt: Attempt) -> bool:
    """Whether the runner of a claim provably stopped (its process ended on this host)."""
    return attempt.process is not None and attempt.process.gone()


@dataclass(frozen=True)
class RunResult:
    """What happened to one interval on this pass. `recorded` is False when nothing was written to `runs`."""

    pipeline: str
    interval: Interval
    action: Action
    status: RunStatus | None = None
    attempt: int = 0
    detail: str = ""
    cells: int = 0
    epsilon: float = 0.0
    recorded: bool = True
    at: datetime | None = None  # WAIT / BUSY: when to look again
    failing: bool = False  # WAIT: its last attempt failed (or its runner stopped), retried after the backoff


def _noisy_rows(store: Store, release_id: str, interval: Interval) -> int:
    """The release's noisy total reading count: the sum of its cells' noisy counts (post-processing)."""
    table = store.releases_within([release_id], (interval.start, interval.end), ["count"])
    return round(pc.sum(table.column("count")).as_py() or 0.0)


def run_interval(
    config: Config,
    schedule: ScheduleConfig,
    interval: Interval,
    *,
    runner: str,
    now: Clock = utc_now,
    manual: bool = False,
    beam_args: Sequence[str] = (),
) -> RunResult:
    """Decide what to do with one interval and do it: claim and run it, or record why not."""
    store = Store(config.store_path)
    log = RunLog(store)
    name = schedule.name
    decided_at = now()
    history = log.attempts(name).get(interval, [])
    decision = decide(schedule, history, decided_at, manual=manual, runner_gone=runner_gone)
    tries = 0
    while decision.expired is not None:
        e = decision.expired
        held = Claim(name, interval, e.attempt, e.runner, e.started, e.lease_until, e.process)
        if log.expire(held, now(), gone=e.lease_until > decided_at):
            break
        # Its holder renewed the lease (or finished) since the runs table was read: look again.
        tries += 1
        if tries == 3:
            return RunResult(name, interval, Action.WAIT, None, e.attempt, "contended claim", recorded=False,
                             at=now() + timedelta(seconds=1))
        decided_at = now()
        history = log.attempts(name).get(interval, [])
        decision = decide(schedule, history, decided_at, manual=manual, runner_gone=runner_gone)
    process = RunnerProcess.current()
    if decision.action is Action.BUSY:
        started = now()
        claim = Claim(name, interval, decision.attempt, runner, started, started, process)
        reason = f"claimed by {decision.holder} until {decision.at.isoformat() if decision.at else '?'}"
        log.record_skip(claim, reason=reason, now=started)
        return RunResult(name, interval, Action.BUSY, RunStatus.SKIPPED, decision.attempt, reason, at=decision.at)
    if decision.action is not Action.RUN:
        failing = decision.action is Action.WAIT  # a wait is a backoff: only after a failure or a runner gone
        return RunResult(name, interval, decision.action, None, decision.attempt, recorded=False, at=decision.at,
                         failing=failing)

    started = now()
    claim = Claim(name, interval, decision.attempt, runner, started, started + schedule.lease_length, process)
    holder = log.claim(claim)
    if holder is not None:
        reason = f"claimed by {holder}"
        log.record_skip(claim, reason=reason, now=started)
        return RunResult(name, interval, Action.BUSY, RunStatus.SKIPPED, claim.attempt, reason)
    with Heartbeat(log, claim, schedule.lease_length, now=now) as heartbeat:
        outcome = _attempt(config, store, interval, now=now, beam_args=beam_args)
    # An earlier attempt failed, or ran until its claim was expired above: it may have committed the release.
    if outcome.status is RunStatus.ALREADY_RELEASED and any(
        a.status in (RunStatus.FAILED, RunStatus.RUNNING) for a in history
    ):
        outcome = _taken_over(config, store, interval, outcome)
    log.finish(heartbeat.claim, outcome)
    detail = outcome.error or ""
    if outcome.status is RunStatus.RELEASED and outcome.release_id:  # [forecasting] refresh (off without the block)
        from forecasting.refresh import refresh_forecasts

        detail = refresh_forecasts(config, [outcome.release_id]) or detail
    return RunResult(
        name,
        interval,
        Action.RUN,
        outcome.status,
        claim.attempt,
        detail,
        cells=outcome.cells or 0,
        epsilon=outcome.epsilon or 0.0,
    )


class Heartbeat:
    """Renews a claim's lease every third of its length while the attempt runs (on a thread), so a run longer
    than `lease` keeps its claim and only a stopped runner's claim expires. If another runner expired the claim
    meanwhile (this runner was stalled past its lease), the heartbeat stops and says so; the attempt goes on
    and records its outcome, and the store's keyed commits keep the interval released once."""

    def __init__(self, log: RunLog, claim: Claim, length: timedelta, *, now: Clock) -> None:
        self.log = log
        self.claim = claim
        self.length = length
        self.now = now
        self.lost = False
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {claim.run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        period = self.length.total_seconds() / 3
        while not self._stop.wait(period):
            try:
                renewed = self.log.renew(self.claim, self.now() + self.length)
            except Exception as exc:  # a store hiccup: the next beat tries again, well within the lease
                _log.warning("could not renew the lease of %s: %s", self.claim.run_id, exc)
                continue
            if renewed is None:
                self.lost = True
                _log.warning("the claim %s was expired by another runner; this attempt goes on without it",
                             self.claim.run_id)
                return
            self.claim = renewed
            self.renewals += 1


def _attempt(config: Config, store: Store, interval: Interval, *, now: Clock, beam_args: Sequence[str]) -> Outcome:
    """Run the batch release of one claimed interval; every error becomes the attempt's outcome."""
    try:
        summary = run_batch(plan_release(config, interval.start, interval.end), beam_args=beam_args)
    # `runs` is shared: it records what every reader may see (`shared_message`), the full message goes to the log.
    except ReleaseNotReady as exc:  # no aggregate yet, nor a refusal (a slow exchange): retried with backoff
        return Outcome(RunStatus.FAILED, now(), error=shared_message(exc))
    except ReleaseRefused as exc:  # budget exhausted, quorum not met: retrying would not change the answer
        _log.warning("interval %s refused: %s", interval, exc)
        return Outcome(RunStatus.SKIPPED, now(), error=shared_message(exc))
    except Exception as exc:  # recorded and retried with backoff; the store's commits are idempotent
        _log.error("interval %s failed: %s: %s", interval, type(exc).__name__, exc)
        return Outcome(RunStatus.FAILED, now(), error=shared_message(exc))
    if summary.status != "released":
        return Outcome(RunStatus.ALREADY_RELEASED, now(), release_id=summary.release_id)
    return Outcome(
        RunStatus.RELEASED,
        now(),
        release_id=summary.release_id,
        rows=_noisy_rows(store, summary.release_id, interval),
        cells=summary.cells,
        epsilon=summary.epsilon,
    )


def _taken_over(config: Config, store: Store, interval: Interval, outcome: Outcome) -> Outcome:
    """The outcome of an attempt that found its interval released after an earlier attempt of it failed: that
    attempt committed the release and was killed (or failed) before it recorded `released`, and no row of `runs`
    says so. This one records it, with the release's counts as the store holds them (its cells and noisy reading
    count) and the plan's epsilon, as the attempt that released it would have, so that what a released interval
    triggers (the forecast refresh) runs for it."""
    assert outcome.release_id is not None  # an already released interval names its release
    cells = store.releases_within([outcome.release_id], (interval.start, interval.end), ["release_id"]).num_rows
    if not cells:
        return outcome
    return Outcome(
        RunStatus.RELEASED,
        outcome.finished,
        release_id=outcome.release_id,
        rows=_noisy_rows(store, outcome.release_id, interval),
        cells=cells,
        epsilon=plan_release(config, interval.start, interval.end).params.epsilon,
    )


class Scheduler:
    """Runs every schedule's due intervals, oldest first, then sleeps until the next fire or retry. `as_of`:
    one pass (`run_due`) chooses the intervals due at that time; `now` still stamps what it records."""

    def __init__(
        self,
        config: Config,
        *,
        runner: str | None = None,
        now: Clock = utc_now,
        as_of: datetime | None = None,
        sleep: Callable[[float], object] | None = None,
        beam_args: Sequence[str] = (),
        on_result: Callable[[RunResult], None] = lambda result: None,
    ) -> None:
        self.config = config
        self.runner = runner or default_runner_id()
        self.now = now
        self.as_of = as_of
        self.stop_event = threading.Event()
        self.sleep = sleep or self.stop_event.wait
        self.beam_args = tuple(beam_args)
        self.on_result = on_result
        with store_failures(config.store_path):  # a store that cannot be written: one line naming it
            check_writable(config.store_path)
            self.log = RunLog(Store(config.store_path))
            self.log.store.ensure_tables()
            bind_store_mode(self.log.store, config.privacy.mode)  # refused at start, not attempt by attempt

    def stop(self) -> None:
        """Finish the current attempt, then return from `run` (or `run_due`) without starting another."""
        self.stop_event.set()

    @property
    def stopped(self) -> bool:
        """Whether `stop` was called."""
        return self.stop_event.is_set()

    def run_due(self) -> tuple[list[RunResult], datetime]:
        """One pass: every due interval of every schedule. Returns the results and when to look again. A store
        that cannot be written stops the pass, before it claims anything where it can, with a `StoreUnavailable`
        naming it; an attempt it stopped midway is taken over as a crashed runner's is."""
        with store_failures(self.config.store_path):
            check_writable(self.config.store_path)
            return self._run_due()

    def _run_due(self) -> tuple[list[RunResult], datetime]:
        results: list[RunResult] = []
        self.log.store.compact("runs")  # a few files an attempt: reading it is every pass's first step
        now = self.now()
        due_at = self.as_of or now
        wake = min(next_fire(s, due_at) for s in self.config.schedules)
        for schedule in self.config.schedules:
            # The runs table is read once a schedule and pass: intervals already final (released, or refused)
            # stay final, so only the others go to run_interval, which reads their attempts again to claim one.
            # (Reading the table once per due interval made a pass cost grow with the square of the history.)
            attempts = self.log.attempts(schedule.name)
            first_run = min((i.start for i in attempts), default=None)
            for interval in due_intervals(schedule, due_at, first_run=first_run):
                if self.stop_event.is_set():
                    return results, wake
                if decide(schedule, attempts.get(interval, []), now).action is Action.DONE:
                    continue
                # Each attempt adds files to `runs`, which every attempt reads: a long catch-up compacts as it
                # goes (a no-op below COMPACT_FILES files), or a pass costs the square of its backlog.
                self.log.store.compact("runs")
                result = run_interval(
                    self.config, schedule, interval, runner=self.runner, now=self.now, beam_args=self.beam_args
                )
                if result.action is not Action.DONE:
                    results.append(result)
                    self.on_result(result)
                if result.at is not None:
                    wake = min(wake, result.at)
                if result.action is Action.RUN and result.status is RunStatus.FAILED:
                    wake = self.now()  # look again at once: the retry's backoff decides when it runs
        return results, wake

    def run(self, *, until: datetime | None = None) -> None:
        """Run until stopped (or until `until`, for tests and replays)."""
        if not self.config.schedules:
            raise ReleaseRefused("the config has no [[schedules]]; add one to run `fusion schedule`")
        if self.as_of is not None:
            raise FusionError("a scheduler acting as of a fixed time runs one pass (run_due), not a loop")
        while not self.stop_event.is_set():
            _, wake = self.run_due()
            if until is not None:
                if self.now() >= until:
                    return
                wake = min(wake, until)
            delay = (wake - self.now()).total_seconds()
            if delay > 0 and not self.stop_event.is_set():
                self.sleep(delay)


def check_backfill_end(schedule: ScheduleConfig, end: datetime, now: datetime) -> None:
    """Refuse a backfill that reaches intervals `schedule` has not closed yet (its latest cron fire)."""
    closed = floor_to_grid(latest_fire(schedule, now), schedule.length)
    if end > closed:
        raise FusionError(
            f"backfill to {end.isoformat()} reaches intervals schedule {schedule.name!r} has not closed yet: the "
            f"latest it has closed ends at {closed.isoformat()} (its cron {schedule.cron!r}); backfill up to then"
        )


def backfill(
    config: Config,
    schedule: ScheduleConfig,
    start: datetime,
    end: datetime,
    *,
    runner: str | None = None,
    now: Clock = utc_now,
    beam_args: Sequence[str] = (),
    on_result: Callable[[RunResult], None] = lambda result: None,
) -> list[RunResult]:
    """Run every interval of `schedule`'s grid in [start, end) that is not released yet, oldest first. Only
    intervals the schedule has already closed (its latest cron fire, truncated to the grid): an interval still
    open would be released without its late readings, and an institution seals each interval once, ever."""
    check_backfill_end(schedule, end, now())
    runner = runner or default_runner_id()
    results = []
    with store_failures(config.store_path):  # a store that cannot be written: one line naming it
        check_writable(config.store_path)
        store = Store(config.store_path)
        store.ensure_tables()
        bind_store_mode(store, config.privacy.mode)
        for interval in grid(schedule, start, end):
            store.compact("runs")
            result = run_interval(config, schedule, interval, runner=runner, now=now, manual=True,
                                  beam_args=beam_args)
            results.append(result)
            on_result(result)
    return results


__all__ = [
    "RunResult",
    "Scheduler",
    "backfill",
    "check_backfill_end",
    "default_runner_id",
    "run_interval",
    "runner_gone",
]
