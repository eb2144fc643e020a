"""The mechanisms' only ways in and out of the store: reads through Fusion's public SQL surface, and appends to
their own two tables, `recommendations` and `decisions` (nothing else: not releases, audit, budget, runs or
forecasts, and never the feeds, envelopes or the federation's keys)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pyarrow as pa

from fusion.api import FusedStore, write_derived
from fusion.config.federation import Config
from fusion.errors import InternalError
from mechanisms.records import Decision, Recommendation

OWN_TABLES = ("recommendations", "decisions")


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


def read_superseding(store: FusedStore, recommendation_id: str) -> dict[str, datetime]:
    """The recorded recommendations that supersede this one: id -> when each was created."""
    rows = store.sql(
        "SELECT DISTINCT recommendation_id, created_at FROM recommendations WHERE outcome = 'recorded' "
        f"AND supersedes = {_quoted(recommendation_id)}"
    ).to_pylist()
    return _earliest((r["recommendation_id"], r["created_at"]) for r in rows)


def superseding_of(groups: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, datetime]]:
    """`read_superseding` for every recommendation at once, from `recommendation_groups`: superseded id -> (the
    recorded recommendations that supersede it: id -> when each was created)."""
    pairs: dict[str, list[tuple[str, datetime]]] = {}
    for rid, rows in groups.items():
        for row in rows:
            if row["outcome"] == "recorded" and row["supersedes"]:
                pairs.setdefault(row["supersedes"], []).append((rid, row["created_at"]))
    return {old: _earliest(found) for old, found in pairs.items()}


def _earliest(pairs: Iterable[tuple[str, datetime]]) -> dict[str, datetime]:
    """id -> its earliest time (rows of one recommendation that disagree, a tampered one, count from the first)."""
    earliest: dict[str, datetime] = {}
    for rid, moment in pairs:
        earliest[rid] = min(earliest.get(rid, moment), moment)
    return earliest


def recommendation_groups(store: FusedStore) -> dict[str, list[dict[str, Any]]]:
    """Every recommendation's rows, by id."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in store.sql("SELECT * FROM recommendations").to_pylist():
        groups.setdefault(row["recommendation_id"], []).append(row)
    return groups


def read_decisions(store: FusedStore, *, recommendation_id: str | None = None) -> list[Decision]:
    where = f" WHERE recommendation_id = {_quoted(recommendation_id)}" if recommendation_id else ""
    return [Decision.from_row(r) for r in store.sql(f"SELECT * FROM decisions{where}").to_pylist()]


__all__ = [
    "OWN_TABLES",
    "read_decisions",
    "read_recommendation",
    "read_superseding",
    "recommendation_groups",
    "superseding_of",
    "write_rows",
]
