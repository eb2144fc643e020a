"""The mechanisms' only ways in and out of the store: reads through Fusion's public SQL surface, and appends to
their own two tables, `recommendations` and `decisions` (nothing else: not releases, audit, budget, runs or
forecasts, and never the feeds, envelopes or the federation's keys)."""

from __future__ import annotations

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


def recommendation_groups(store: FusedStore) -> dict[str, list[dict[str, Any]]]:
    """Every recommendation's rows, by id."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in store.sql("SELECT * FROM recommendations").to_pylist():
        groups.setdefault(row["recommendation_id"], []).append(row)
    return groups


def read_decisions(store: FusedStore, *, recommendation_id: str | None = None) -> list[Decision]:
    where = f" WHERE recommendation_id = {_quoted(recommendation_id)}" if recommendation_id else ""
    return [Decision.from_row(r) for r in store.sql(f"SELECT * FROM decisions{where}").to_pylist()]


__all__ = ["OWN_TABLES", "read_decisions", "read_recommendation", "recommendation_groups", "write_rows"]
