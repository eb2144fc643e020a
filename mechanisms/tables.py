"""The mechanisms' only ways in and out of the store: reads through Fusion's public SQL surface, and appends to
their own two tables, `recommendations` and `decisions` (nothing else: not releases, audit, budget, runs or
forecasts, and never the feeds, envelopes or the federation's keys)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import pyarrow as pa

from fusion.api import FusedStore, open_store, write_derived
from fusion.config.federation import Config
from fusion.config.sql_limits import SqlLimits
from fusion.errors import InternalError
from fusion.runtime.durations import parse_duration
from mechanisms.records import RECORDED, Decision, Recommendation

OWN_TABLES = ("recommendations", "decisions")
#: The most rows of `recommendations` the audit holds at once (`recommendation_pages`): whole recommendations, as
#: many as fit (one with more rows is read alone).
PAGE_ROWS = 5_000
#: The least time each of the audit's reads is given, whatever the config's [sql] timeout.
AUDIT_TIMEOUT = "10m"
#: The audit's reads' bound on rows and bytes: none in effect.
_UNBOUNDED = 2**62


def write_rows(config: Config, table: str, rows: pa.Table) -> int:
    """Append rows whose key is not yet in `table` (one commit); returns how many. Only the mechanisms' tables."""
    if table not in OWN_TABLES:
        raise InternalError(f"the mechanisms write only {OWN_TABLES}, not {table}; this is probably a bug")
    return write_derived(config, table, rows)


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def read_recommendation(store: FusedStore, recommendation_id: str) -> Recommendation | None:
    rows = store.sql(f"SELECT * FROM recommendations WHERE recommendation_id = {_quoted(recommendation_id)}")
    if rows.num_rows == 0:
        return None
    return Recommendation.from_rows(rows.to_pylist())


def verified_recommendations(
    store: FusedStore, where: str, operator_keys: Iterable[bytes]
) -> dict[str, Recommendation]:
    """The recommendations with a row matching the SQL condition `where`, read whole, that verify: their rows hold
    what their digest names and a registered operator key signed them (id -> recommendation). Rows anyone with
    write access to the store could have added are left out, so they supersede nothing and are no one's head."""
    rows = store.sql(
        "SELECT * FROM recommendations WHERE recommendation_id IN "
        f"(SELECT recommendation_id FROM recommendations WHERE {where})"
    )
    found = {}
    for rid, group in _grouped(rows.to_pylist()).items():
        try:
            recommendation = Recommendation.from_rows(group)
        except ValueError:
            continue
        if recommendation.recorded_id == rid and recommendation.tampered(operator_keys) is None:
            found[rid] = recommendation
    return found


def read_superseding(store: FusedStore, recommendation_id: str, operator_keys: Iterable[bytes]) -> dict[str, datetime]:
    """The recorded recommendations that supersede this one and verify under `operator_keys`: id -> when each was
    created (its signature covers both)."""
    found = verified_recommendations(
        store, f"outcome = 'recorded' AND supersedes = {_quoted(recommendation_id)}", operator_keys
    )
    return superseding_of(found.values()).get(recommendation_id, {})


def superseding_of(recommendations: Iterable[Recommendation]) -> dict[str, dict[str, datetime]]:
    """Superseded id -> (the recorded recommendations among `recommendations`, verified ones only, that supersede
    it: id -> when each was created)."""
    found: dict[str, dict[str, datetime]] = {}
    for rec in recommendations:
        if rec.outcome == RECORDED and rec.supersedes and rec.created_at:
            found.setdefault(rec.supersedes, {})[rec.recommendation_id] = rec.created_at
    return found


def system_limits(limits: SqlLimits) -> SqlLimits:
    """`limits` as the mechanisms' own reads take them: DuckDB's memory and threads as they are, each read given at
    least AUDIT_TIMEOUT, and no bound on a read's rows or bytes. The config's [sql] bounds are for the queries people
    run (`fusion sql`, the Python API); the mechanisms' reads are bounded by what they ask for (a window's loads, one
    recommendation's rows and its decisions, a page of recommendations), and a store past those bounds, however
    large, must still be recommended on, decided on and audited."""
    timeout = limits.timeout if limits.timeout_s >= parse_duration(AUDIT_TIMEOUT).total_seconds() else AUDIT_TIMEOUT
    return limits.replace(timeout=timeout, max_rows=_UNBOUNDED, max_size=str(_UNBOUNDED))


def system_store(config: Config, *, versions: Mapping[str, int | None] | None = None) -> FusedStore:
    """The store as `fusion recommend` and `fusion decide` read it (pinned at `versions` where given): under
    `system_limits` of the config's [sql] block. Close it after use."""
    return open_store(config, versions=versions, limits=system_limits(config.sql))


def audit_store(store: FusedStore) -> FusedStore:
    """The snapshot `store` reads of the mechanisms' two tables, for the audit (`fusion verify`, `fusion decisions`,
    the dashboard), and the releases and forecasts as they are now (what a recommendation read is checked there,
    `mechanisms.inputs`: never an older version than it read), under `system_limits` of `store`'s: the audit must
    read every row, and bounds what it holds itself (`recommendation_pages`). Close it after use."""
    return open_store(store.config, versions={t: store.versions.get(t) for t in OWN_TABLES},
                      limits=system_limits(store.limits))


def recommendation_pages(store: FusedStore) -> Iterator[dict[str, list[dict[str, Any]]]]:
    """Every recommendation's rows, by id, a page at a time in order of id: whole recommendations of together at most
    PAGE_ROWS rows (one with more alone), so that only one page is held. `store` is the audit's (`audit_store`): a
    page, or the count of each recommendation's rows that places them, may pass the config's [sql] bounds."""
    pages: list[list[str]] = []  # the first and last id of each page
    held = 0
    with store.sql_batches(
        "SELECT recommendation_id, count(*) AS n FROM recommendations GROUP BY recommendation_id "
        "ORDER BY recommendation_id"
    ) as reader:
        for batch in reader:
            for rid, n in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                if pages and held + n <= PAGE_ROWS:
                    pages[-1][1] = rid
                    held += n
                else:
                    pages.append([rid, rid])
                    held = n
    for first, last in pages:
        yield _grouped(store.sql(
            f"SELECT * FROM recommendations WHERE recommendation_id BETWEEN {_quoted(first)} AND {_quoted(last)}"
        ).to_pylist())


def _grouped(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["recommendation_id"], []).append(row)
    return groups


def read_decisions(store: FusedStore, *, recommendation_id: str | None = None) -> list[Decision]:
    """The decision rows (of one recommendation, or all), in the order the table holds them, read batch by batch."""
    where = f" WHERE recommendation_id = {_quoted(recommendation_id)}" if recommendation_id else ""
    with store.sql_batches(f"SELECT * FROM decisions{where}") as reader:
        return [Decision.from_row(row) for batch in reader for row in batch.to_pylist()]


__all__ = [
    "AUDIT_TIMEOUT",
    "OWN_TABLES",
    "PAGE_ROWS",
    "audit_store",
    "read_decisions",
    "read_recommendation",
    "read_superseding",
    "recommendation_pages",
    "superseding_of",
    "system_limits",
    "system_store",
    "verified_recommendations",
    "write_rows",
]
