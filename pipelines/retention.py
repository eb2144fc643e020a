"""Retention of the shared exchange: a released interval's files leave it once their release is old enough.

Every release leaves its interval's folder in the exchange (`<exchange>/<interval name>/`: the institutions'
contribution envelopes, the roster and its acknowledgements, the unmask answers, the aggregate and its status),
about 1.5 MB an institution a release with the demo's layout, and nothing removed them: a year of hourly
releases of 20 institutions is about 260 GB. Once the release is published nothing reads them again: the store
holds the release, its signature and its audit trail (`fusion verify` checks the store alone), a later run of
the interval stops at the store ("already released") before it opens the exchange, and each institution keeps
its own sealed record (pipelines/sealing.py). `federation.exchange_retention` says how long after its release
an interval's folder stays (for whoever wants to look at the envelopes); `prune_exchange` removes the folders
past it.

Only folders named like an interval whose release is published are removed: the store's audit trail records it
(a `release` event for exactly that interval) and its rows are in `releases` (the audit row is committed first: a
pass that crashed in between is re-run from the exchange, which must still hold the interval's roster and answers),
and only once that event is older than the retention. An interval in progress, refused, half committed or never
released keeps its folder, as does everything else in the exchange (the public HE context, files the federation
put there itself).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from fusion.config.federation import Config
from fusion.release.exchange import ReleaseKey, is_local, join, remove_tree
from fusion.store.delta import Store

_log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What a prune found: the interval folders removed (or, in a dry run, that would be), their bytes (local
    exchanges; None elsewhere), and the folders kept because their release is too recent or not recorded."""

    removed: list[str] = field(default_factory=list)
    removed_bytes: int | None = 0
    kept_recent: list[str] = field(default_factory=list)
    kept_unreleased: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Recorded:
    """A `release` audit event: when, and the release it records."""

    at: datetime
    release_id: str | None


def released_at(store: Store) -> dict[tuple[datetime, datetime], Recorded]:
    """By interval (start, end), when its release was recorded (the earliest `release` audit event), and its id.
    The event is committed before the release's rows: `prune_exchange` checks that those are there too."""
    columns = ["action", "interval_start", "interval_end", "at", "release_id"]
    dataset = store.dataset("audit", string_view=None)
    try:  # pushed down: only the release events are read
        audit = dataset.to_table(columns=columns, filter=pc.field("action") == "release")
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):  # string_view files of old stores
        audit = dataset.to_table(columns=columns)
        audit = audit.filter(pc.equal(pc.cast(audit.column("action"), pa.string()), "release"))
    found: dict[tuple[datetime, datetime], Recorded] = {}
    for row in audit.to_pylist():
        if row["interval_start"] is None or row["interval_end"] is None:
            continue
        key = (row["interval_start"].astimezone(UTC), row["interval_end"].astimezone(UTC))
        recorded = Recorded(row["at"].astimezone(UTC), row["release_id"])
        if key not in found or recorded.at < found[key].at:
            found[key] = recorded
    return found


def interval_folders(exchange: str) -> list[str]:
    """The names of the exchange's folders named like an interval (`ReleaseKey.interval_name`), sorted."""
    if is_local(exchange):
        try:
            with os.scandir(exchange) as entries:
                names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []
    else:  # object stores have no folders: the first component of every object's name under the exchange
        from apache_beam.io.filesystems import FileSystems

        base = exchange.rstrip("/") + "/"
        matched = FileSystems.match([join(exchange, "**")])[0].metadata_list
        names = list({m.path[len(base) :].split("/", 1)[0] for m in matched if m.path.startswith(base)})
    return sorted(name for name in names if ReleaseKey.parse_interval_name(name) is not None)


def prune_exchange(
    config: Config,
    *,
    retention: timedelta | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
    store: Store | None = None,
) -> PruneReport:
    """Remove the exchange folders of intervals released more than `retention` ago (the config's
    `exchange_retention` when None; nothing is removed when neither is set)."""
    keep = config.exchange_retention if retention is None else retention
    if keep is None:
        raise ValueError("no retention: set federation.exchange_retention in the config, or pass one")
    if keep < timedelta(0):
        raise ValueError(f"a retention cannot be negative ({keep})")
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    exchange = config.exchange_path
    report = PruneReport(removed_bytes=0 if is_local(exchange) else None)
    folders = interval_folders(exchange)
    if not folders:
        return report
    store = store or Store(config.store_path)
    released = released_at(store)
    intervals = {name: _interval(name) for name in folders}
    recorded = {name: released.get(intervals[name]) for name in folders}
    due = {name: r.release_id for name, r in recorded.items() if r and r.release_id and moment - r.at >= keep}
    # Its rows too: a pass that crashed after committing its audit row publishes them when re-run from the exchange.
    published = store.present_releases([(release_id, *intervals[name]) for name, release_id in due.items()])
    for name in folders:
        record = recorded[name]
        if record is None or not record.release_id:
            report.kept_unreleased.append(name)
        elif name not in due:
            report.kept_recent.append(name)
        elif record.release_id not in published:  # half committed: not released yet
            report.kept_unreleased.append(name)
        else:
            path = join(exchange, name)
            if report.removed_bytes is not None:
                report.removed_bytes += _tree_bytes(path)
            if not dry_run:
                remove_tree(path)
            report.removed.append(name)
    return report


def _interval(name: str) -> tuple[datetime, datetime]:
    interval = ReleaseKey.parse_interval_name(name)
    assert interval is not None, name  # interval_folders lists only names that parse
    return interval


def prune_after_release(config: Config, store: Store) -> PruneReport | None:
    """After a release is published (`fusion batch`, `fusion stream`): prune the exchange when the config sets a
    retention (None when it does not). A prune that fails leaves the release as published and says why (logged
    as an error, which the command line shows): the folders stay for the next prune (or `fusion prune-exchange`)."""
    if config.exchange_retention is None:
        return None
    try:
        report = prune_exchange(config, store=store)
    except (OSError, pa.ArrowException) as exc:  # logged as an error: `fusion` shows its own errors only
        _log.error("the release is published, but the exchange was not pruned: %s: %s", type(exc).__name__, exc)
        return None
    if report.removed:
        _log.info("removed %d released interval folders from the exchange", len(report.removed))
    return report


def _tree_bytes(path: str) -> int:
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


__all__ = ["PruneReport", "Recorded", "interval_folders", "prune_after_release", "prune_exchange", "released_at"]
