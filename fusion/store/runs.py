"""The store's `runs` table: every attempt of a scheduled or backfilled interval, and the claims that make each
interval run by one runner at a time.

A claim is a conditional insert of the attempt's row (`run_id` = pipeline/interval_start/attempt): Delta's
optimistic concurrency lets exactly one of several racing writers insert it. The holder updates the row with
the outcome; a claim whose `lease_until` has passed (its runner crashed) is marked failed by whoever retries.
While its attempt runs, the holder renews the lease (a heartbeat), so only a runner that stopped loses its claim.
A claim records its runner's process (fusion/runtime/runner_process.py): one whose process is provably gone (same host,
process ended) is marked failed at once, without waiting for its lease.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from deltalake.exceptions import CommitFailedError

from fusion.errors import FusionError
from fusion.runtime.runner_process import RunnerProcess
from fusion.runtime.schedule import Attempt, Interval, RunStatus
from fusion.store.delta import Store
from schemas.tables import RUNS_SCHEMA

_ATTEMPTS = 50


def claim_id(pipeline: str, interval: Interval, attempt: int) -> str:
    return f"{pipeline}/{interval.start.isoformat()}/{attempt}"


@dataclass(frozen=True)
class Claim:
    """An attempt this runner holds."""

    pipeline: str
    interval: Interval
    attempt: int
    runner: str
    started: datetime
    lease_until: datetime
    process: RunnerProcess | None = None  # the runner's process, recorded with the claim

    @property
    def run_id(self) -> str:
        return claim_id(self.pipeline, self.interval, self.attempt)


@dataclass(frozen=True)
class Outcome:
    """What an attempt ended with, as recorded on its row."""

    status: RunStatus
    finished: datetime
    release_id: str | None = None
    rows: int | None = None
    cells: int | None = None
    epsilon: float | None = None
    error: str | None = None


def _row(claim: Claim, *, run_id: str, runner: str, status: RunStatus, outcome: Outcome | None) -> pa.Table:
    o = outcome or Outcome(status=status, finished=claim.started)
    row = {
        "run_id": run_id,
        "pipeline": claim.pipeline,
        "interval_start": claim.interval.start,
        "interval_end": claim.interval.end,
        "attempt": claim.attempt,
        "runner": runner,
        "status": status.value,
        "started": claim.started,
        "finished": o.finished if outcome is not None else None,
        "lease_until": claim.lease_until,
        "release_id": o.release_id,
        "rows": o.rows,
        "cells": o.cells,
        "epsilon": o.epsilon,
        "error": o.error,
        "host": None if claim.process is None else claim.process.host,
        "pid": None if claim.process is None else claim.process.pid,
        "process_started": None if claim.process is None else claim.process.started,
    }
    return pa.Table.from_pylist([row], schema=RUNS_SCHEMA)


class RunLog:
    """Reads attempts from, and records them in, the store's `runs` table."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def attempts(self, pipeline: str) -> dict[Interval, list[Attempt]]:
        """Each interval's claim rows (not the rows of runners that lost a claim), by interval."""
        runs = self.store.read("runs")
        runs = runs.filter(pc.equal(runs.column("pipeline"), pipeline))
        out: dict[Interval, list[Attempt]] = defaultdict(list)
        for r in runs.to_pylist():
            interval = Interval(r["interval_start"], r["interval_end"])
            if r["run_id"] != claim_id(pipeline, interval, r["attempt"]):
                continue
            out[interval].append(
                Attempt(
                    attempt=r["attempt"],
                    runner=r["runner"],
                    status=RunStatus(r["status"]),
                    started=r["started"],
                    finished=r["finished"],
                    lease_until=r["lease_until"],
                    process=None
                    if r["host"] is None or r["pid"] is None
                    else RunnerProcess(r["host"], r["pid"], r["process_started"]),
                )
            )
        return dict(out)

    def claim(self, claim: Claim) -> str | None:
        """Insert the attempt's claim row. Returns None if this runner now holds it, else the holder's id."""
        row = _row(claim, run_id=claim.run_id, runner=claim.runner, status=RunStatus.RUNNING, outcome=None)
        if self.store.insert_new("runs", row) == 1:
            return None
        runs = self.store.read("runs")
        holder = runs.filter(pc.equal(runs.column("run_id"), claim.run_id)).column("runner").to_pylist()
        return holder[0] if holder else "another runner"

    def finish(self, claim: Claim, outcome: Outcome) -> None:
        """Record the outcome on this runner's claim row."""
        row = _row(claim, run_id=claim.run_id, runner=claim.runner, status=outcome.status, outcome=outcome)
        self._update(row, "t.run_id = s.run_id AND t.runner = s.runner")

    def renew(self, claim: Claim, until: datetime) -> Claim | None:
        """Extend this runner's claim to `until` while it still holds it (running, under the lease it last
        set). Returns the renewed claim, or None if the claim was expired by another runner meanwhile."""
        renewed = replace(claim, lease_until=until)
        row = pa.table(
            {"run_id": [claim.run_id], "runner": [claim.runner], "lease_until": [until], "held": [claim.lease_until]},
            schema=pa.schema([RUNS_SCHEMA.field("run_id"), RUNS_SCHEMA.field("runner"),
                              RUNS_SCHEMA.field("lease_until"), RUNS_SCHEMA.field("lease_until").with_name("held")]),
        )
        updated = self._update(
            row,
            "t.run_id = s.run_id",
            when="t.runner = s.runner AND t.status = 'running' AND t.lease_until = s.held",
            updates={"lease_until": "s.lease_until"},
        )
        return renewed if updated else None

    def expire(self, claim: Claim, now: datetime, *, gone: bool = False) -> bool:
        """Mark a claim whose lease ran out (or, `gone`, whose runner's process provably ended) as failed, if it
        is still running under that lease. False if it is not (its holder renewed the lease or finished
        meanwhile): the claim then stands."""
        error = f"lease expired at {claim.lease_until.isoformat()}: runner {claim.runner} stopped without finishing"
        if gone and claim.process is not None:
            error = (
                f"runner {claim.runner} (pid {claim.process.pid} on {claim.process.host}) stopped without finishing: "
                f"its process is gone; taken over before its lease ran out ({claim.lease_until.isoformat()})"
            )
        outcome = Outcome(status=RunStatus.FAILED, finished=now, error=error)
        row = _row(claim, run_id=claim.run_id, runner=claim.runner, status=RunStatus.FAILED, outcome=outcome)
        return self._update(row, "t.run_id = s.run_id AND t.status = 'running' AND t.lease_until = s.lease_until") > 0

    def record_skip(self, claim: Claim, *, reason: str, now: datetime) -> None:
        """This runner's own `skipped` row for an attempt another runner holds (once per runner and attempt)."""
        outcome = Outcome(status=RunStatus.SKIPPED, finished=now, error=reason)
        run_id = f"{claim.run_id}/{claim.runner}"
        row = _row(claim, run_id=run_id, runner=claim.runner, status=RunStatus.SKIPPED, outcome=outcome)
        self.store.insert_new("runs", row)

    def _update(
        self, row: pa.Table, predicate: str, *, when: str | None = None, updates: dict[str, str] | None = None
    ) -> int:
        """Update the matching row (every column, or `updates`, where `when` holds). Returns rows updated."""
        for _ in range(_ATTEMPTS):
            table = self.store.delta_table("runs")
            try:
                merge = table.merge(row, predicate=predicate, source_alias="s", target_alias="t")
                if updates is None:
                    merge = merge.when_matched_update_all(predicate=when)
                else:
                    merge = merge.when_matched_update(updates=updates, predicate=when)
                return int(merge.execute()["num_target_rows_updated"])
            except CommitFailedError:  # another writer committed first: the update is conditional, so retry
                time.sleep(random.uniform(0.01, 0.1))
        raise FusionError("could not update the runs table: too much contention; retry")


__all__ = ["Claim", "Outcome", "RunLog", "claim_id"]
