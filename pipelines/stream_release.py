"""One release run for every stream window closable at one moment.

The driver (pipelines/stream_driver.py `_release_groups`) hands over one plan per release: at event level a run of
contiguous due windows is one release of their interval, at entity level each window is its own. A plan is a
disjoint interval with its own release id, envelopes, noise, budget charge and signature, exactly as if it were
released alone (`fusion batch` over its windows' spools). What the run shares is the work around them: the
plans' institution and aggregator steps (contribute, aggregate, unmask, aggregate) run side by side,
`WINDOW_WORKERS` plans at a time, each plan's in order, so that one plan's waits on the disk (every sealed
envelope, record and unmask answer is synced before it is published) overlap with another's work; they reuse one
loaded public HE context and pooled scan connections, each institution's spooled files of every plan are scanned
first in one DuckDB pass (pipelines.contribute.scan_together: a query's fixed costs outweigh a window's rows),
each plan's contribution taking its own rows from it, and what they record in the store is written afterwards, in
the plans' order. Then the key holder loads the secret context once, charges every plan of a privacy period in one
ledger commit (each its own entry; pipelines.release.prepare_releases), and estimates the quantiles of all their
cells in one call; and the decoded cells of every plan are committed together (one `audit`, one `rejects` and one
`releases` commit), so all of them become queryable at the same moment, and a burst of windows (a stream
catching up, `--drain`) costs one run, not one per window.

A release refused (budget spent, below the quorum, an overlapping interval) is recorded with its reason and the
others go on. Re-running a run after a crash is safe for the same reasons a batch release is: sealed envelopes
are reused, the ledger charges a release once, and the commits are keyed. Each run logs (debug level, with
`extra={"phases": ...}`) the wall seconds of its phases and its window steps' CPU seconds by step, which
`bench/stream.py --burst` reports.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from fusion.config.federation import InstitutionConfig
from fusion.errors import ReleaseRefused
from fusion.release.exchange import exists, list_files, read_bytes
from fusion.release.plan import ReleasePlan
from fusion.store.delta import Store
from fusion.store.ledger import BudgetExceeded, BudgetLedger
from fusion.store.mode import bind_store_mode
from pipelines.batch import audit_feeds
from pipelines.contribute import Prescan, dead_letter_dir, prescanned, scan_together
from pipelines.release import (
    PreparedRelease,
    ReleaseOutcome,
    audit_event,
    charge_record,
    prepare_releases,
    publish_releases,
)
from pipelines.retention import prune_after_release
from pipelines.run import report_path, run_aggregate, run_contributions, run_unmask
from pipelines.stream import SPOOL_WINDOW_FORMAT
from privacy.accountant import ReleaseCharge
from schemas.readings import DEAD_LETTER_REASON, DEAD_LETTER_SOURCE


@dataclass(frozen=True)
class WindowOutcome:
    """What the run did with one window's release."""

    release_id: str
    status: str  # released | already_released | refused
    reason: str | None = None  # why it was refused


#: Windows whose institution and aggregator steps run side by side (threads of this process).
WINDOW_WORKERS = 4

_log = logging.getLogger(__name__)


@contextmanager
def _timed(
    seconds: defaultdict[str, float], step: str, clock: Callable[[], float] = time.monotonic
) -> Iterator[None]:
    """Add the seconds the block takes on `clock` to `seconds[step]`."""
    start = clock()
    try:
        yield
    finally:
        seconds[step] += clock() - start


def _scan_together(
    plans: Sequence[ReleasePlan], institution: InstitutionConfig, cpu: list[float]
) -> dict[str, Prescan]:
    """`scan_together` for one institution of the federation, its CPU seconds added to `cpu`."""
    start = time.thread_time()
    try:
        return scan_together(plans, institution)
    finally:
        cpu.append(time.thread_time() - start)


@dataclass(frozen=True)
class _WindowSteps:
    """What the institution and aggregator steps of one window came to: `reports` None when an institution
    refused to contribute (`refused` says why); otherwise each institution's run report, and `refused` set when
    the aggregation did not complete."""

    plan: ReleasePlan
    reports: dict[str, dict[str, Any]] | None
    refused: ReleaseRefused | None = None
    cpu_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))  # by step


def _contribute_and_aggregate(plan: ReleasePlan, scans: dict[tuple[str, str], Prescan]) -> _WindowSteps:
    """Every institution's contribution to the window (taking the scans of its files made ahead, `scans`), then
    its aggregation (with the unmask round when the roster asks for it), in process: a window is small. Writes
    nothing to the store."""
    cpu: defaultdict[str, float] = defaultdict(float)  # this thread's CPU seconds by step
    try:
        with _timed(cpu, "contribute", time.thread_time), prescanned(scans):
            reports = run_contributions(plan, plan.config.institutions, in_process=True)
    except ReleaseRefused as exc:
        return _WindowSteps(plan, None, exc, cpu)
    try:
        with _timed(cpu, "aggregate", time.thread_time):
            status = run_aggregate(plan, in_process=True)
        if status["status"] == "awaiting_unmask":  # the roster is closed: every included institution answers
            with _timed(cpu, "unmask", time.thread_time):
                run_unmask(plan, [i for i in plan.config.institutions if i.id in status["unmask_pending"]])
            with _timed(cpu, "aggregate", time.thread_time):
                status = run_aggregate(plan, in_process=True)
        if status["status"] != "aggregated":
            raise ReleaseRefused(f"aggregation did not complete: {status}")
    except ReleaseRefused as exc:  # below the quorum: say why the institutions that did not contribute did not
        withheld = [r["withheld"] for _, r in sorted(reports.items()) if r.get("withheld")]
        return _WindowSteps(
            plan, reports, ReleaseRefused(f"{exc}. Withheld: {' | '.join(withheld)}") if withheld else exc, cpu
        )
    return _WindowSteps(plan, reports, cpu_seconds=cpu)


def release_windows(plans: Sequence[ReleasePlan]) -> list[WindowOutcome]:
    """Release the windows of `plans` (disjoint intervals of one federation) in one run, in process; one outcome
    per plan, in order."""
    if not plans:
        return []
    wall: defaultdict[str, float] = defaultdict(float)  # seconds by phase, logged at the end (bench/stream.py)
    started = time.monotonic()
    config = plans[0].config
    store = Store(config.store_path)
    store.ensure_tables()
    bind_store_mode(store, config.privacy.mode)  # before any work: the release step checks it again
    released = store.present_releases((p.key.release_id, p.key.start, p.key.end) for p in plans)
    outcomes: dict[str, WindowOutcome] = {
        p.key.release_id: WindowOutcome(p.key.release_id, "already_released")
        for p in plans
        if p.key.release_id in released
    }

    def refuse(plan: ReleasePlan, exc: Exception) -> None:
        outcomes[plan.key.release_id] = WindowOutcome(plan.key.release_id, "refused", str(exc))

    ledger = BudgetLedger(store, record=charge_record(config, store))
    pending = []
    burst: dict[str, list[ReleaseCharge]] = defaultdict(list)  # period -> the charges of the burst's windows so far
    for plan in (p for p in plans if p.key.release_id not in outcomes):
        charge = plan.params.charge(plan.key.start, plan.key.end)
        cap = plan.config.privacy.cap
        try:  # refused before any work if the period's budget cannot take it (the release step decides)
            ledger.check(
                period=plan.period, release_id=plan.key.release_id, charge=charge, cap=cap, delta=plan.params.delta
            )
            # With the burst's earlier windows too, in the windows' order: their institutions seal side by side,
            # and at entity level each refuses to seal its period past the cap (pipelines/sealing.py).
            _, after = ledger.preview(
                period=plan.period, charges=[*burst[plan.period.name], charge], cap=cap, delta=plan.params.delta
            )
            if after > cap:
                raise BudgetExceeded(
                    f"release {plan.key.release_id} needs epsilon in period {plan.period.name} beyond the "
                    f"windows released before it: they would reach {after:.4f}; the cap is {cap:.4f}"
                )
            burst[plan.period.name].append(charge)
        except BudgetExceeded as exc:
            audit_event(plan, store, action="budget_refused", reason=str(exc), detail={"period": plan.period.name})
            refuse(plan, exc)
            continue
        pending.append(plan)
    # Every window's institution and aggregator steps (contribute, aggregate, unmask, aggregate), windows side by
    # side: each window's steps are its own (its own exchange folder, envelopes, roster and records), and waiting
    # on the disk (each sealed envelope, record and unmask answer is synced before it is published) overlaps with
    # the other windows' work. What they record in the store is written here, in the windows' order.
    wall["checks"] = time.monotonic() - started
    workers = min(WINDOW_WORKERS, len(pending)) or 1
    scan_cpu: list[float] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="fusion-window") as pool:
        # Each institution's files of every window scanned in one pass, institutions side by side (a query's
        # fixed costs outweigh a window's rows); each window's contribution then takes its own part.
        with _timed(wall, "scan"):
            by_institution = list(pool.map(lambda i: _scan_together(pending, i, scan_cpu), config.institutions))
        scans: dict[str, dict[tuple[str, str], Prescan]] = defaultdict(dict)
        for institution, made in zip(config.institutions, by_institution, strict=True):
            for release_id, prescan in made.items():
                scans[release_id][release_id, institution.id] = prescan
        with _timed(wall, "window_steps"):
            chains = [pool.submit(_contribute_and_aggregate, p, scans.pop(p.key.release_id, {})) for p in pending]
            results = [chain.result() for chain in chains]  # re-raises what is not a refusal, in the windows' order
    aggregated = []
    for result in results:
        plan = result.plan
        if result.reports is None:  # an institution will not seal this interval (it overlaps one it sealed)
            assert result.refused is not None
            audit_event(plan, store, action="contribution_refused", reason=str(result.refused), detail={})
            refuse(plan, result.refused)
            continue
        audit_feeds(plan, store, result.reports)
        if result.refused is not None:
            refuse(plan, result.refused)
            continue
        aggregated.append(plan)
    # The key holder: each window charged, decrypted and signed on its own; all committed together.
    prepared: list[PreparedRelease] = []
    with _timed(wall, "key_holder"):
        releases = prepare_releases(aggregated, store)
    for plan, release in zip(aggregated, releases, strict=True):
        if isinstance(release, ReleaseRefused):
            refuse(plan, release)
        elif isinstance(release, ReleaseOutcome):
            outcomes[plan.key.release_id] = WindowOutcome(release.release_id, release.status)
        else:
            prepared.append(release)
    with _timed(wall, "publish"):
        try:
            published = publish_releases(prepared, store) if prepared else []
        except ReleaseRefused:  # one window's record refuses it (a racing pass signed other rows): the others go on
            published = []
            for one in prepared:
                try:
                    published += publish_releases([one], store)
                except ReleaseRefused as exc:
                    refuse(one.plan, exc)
    for outcome in published:
        outcomes[outcome.release_id] = WindowOutcome(outcome.release_id, outcome.status)
    if published:
        prune_after_release(plans[0].config, store)
    cpu: defaultdict[str, float] = defaultdict(float)
    if scan_cpu:
        cpu["scan"] = sum(scan_cpu)
    for result in results:
        for step, seconds in result.cpu_seconds.items():
            cpu[step] += seconds
    phases = {
        "wall_s": dict(wall),
        "window_steps_cpu_s": dict(cpu),
        "windows": len(plans),
        "workers": workers,
        "scanned_together": sum(len(made) for made in by_institution),  # (window, institution) scans in one pass
    }
    _log.debug("released %d windows in one run: %s", len(plans), phases, extra={"phases": phases})
    return [outcomes[p.key.release_id] for p in plans]


def release_rejects(plan: ReleasePlan, starts: Sequence[datetime]) -> dict[str, dict[datetime, dict[str, int]]]:
    """institution -> window start -> {reason: rows}: the spooled readings the release of the windows at `starts`
    rejected (exact duplicates: one reading spooled from two messages or files), from each institution's run
    report. With several windows, the dead letters' sources (spool files, one directory a window) say whose."""
    found: dict[str, dict[datetime, dict[str, int]]] = {}
    for institution in plan.config.institutions:
        path = report_path(plan, institution)
        report = json.loads(read_bytes(path)) if exists(path) else {}
        rejected = {reason: int(n) for reason, n in report.get("rejected", {}).items() if n}
        if not rejected:
            continue
        if len(starts) == 1:
            found[institution.id] = {starts[0]: rejected}
            continue
        placed: Counter[tuple[datetime, str]] = Counter()
        for letters in list_files(dead_letter_dir(plan, institution), ".parquet"):
            with FileSystems.open(letters) as handle:
                table = pq.read_table(handle, columns=[DEAD_LETTER_SOURCE, DEAD_LETTER_REASON])
            for source, reason in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
                window = datetime.strptime(source.rstrip("/").split("/")[-2], SPOOL_WINDOW_FORMAT)
                placed[window.replace(tzinfo=UTC), reason] += 1
        by_window: dict[datetime, dict[str, int]] = defaultdict(dict)
        for (window, reason), n in sorted(placed.items()):
            by_window[window][reason] = n
        found[institution.id] = dict(by_window)
    return found
