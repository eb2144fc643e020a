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
from mechanisms.records import RECORDED, Decision, Recommendation

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


def recommendation_groups(store: FusedStore) -> dict[str, list[dict[str, Any]]]:
    """Every recommendation's rows, by id."""
    return _grouped(store.sql("SELECT * FROM recommendations").to_pylist())


def _grouped(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
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
    "verified_recommendations",
    "write_rows",
]
