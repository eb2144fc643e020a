"""The Recommendations and decisions view: the mechanisms' recommendations (mechanisms/, advisory only), one in
detail (its LMPs per bus with their energy and congestion parts, its Pareto frontier with the proposed point, every
item), and the authorities' decisions on them, each with its reason and cost impact. Decisions are made with
`fusion decide` (signed); the dashboard only shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from dashboard import params
from dashboard.formatting import finite
from dashboard.provenance import decision_checks, record_checks
from dashboard.snapshot import Snapshot
from fusion.api import FusedStore

#: The most recommendations and decisions listed (newest first).
MAX_LISTED = 500


class RecommendationSummary(BaseModel):
    recommendation_id: str
    kind: str
    mechanism: str
    created_at: datetime
    valid_from: datetime
    valid_to: datetime
    regions: list[str]
    outcome: str  # recorded | refused
    refusal: str | None
    summary: str
    supersedes: str | None
    signer: str
    decisions: int  # decision rows (one per signer) on it


class Item(BaseModel):
    item_type: str
    item_key: str
    value: float | None
    unit: str | None


class Lmp(BaseModel):
    bus: str
    lmp: float | None  # $/MWh
    energy: float | None
    congestion: float | None


class FrontierPoint(BaseModel):
    key: str
    cost: float | None  # $/h
    co2: float | None  # t/h
    carbon_price: float | None  # $/t
    proposed: bool


class Decision(BaseModel):
    decision_id: str
    recommendation_id: str
    action: str
    authority: str
    signer: str
    decided_at: datetime
    effective_from: datetime | None
    effective_to: datetime | None
    reason_code: str | None
    reason: str | None
    adopted: list[Item]
    deviation_mw: float | None
    cost_impact: float | None  # $/h, found by re-solving with the adopted items fixed
    outcome: str  # recorded | refused
    refusal: str | None
    # `fusion verify`'s status: verified | refusal | unattested | unverified_input | invalid | tampered (None: none)
    verified: str | None
    effect: str | None  # e.g. its signatures against its authority's threshold


class RecommendationsView(BaseModel):
    recommendations: list[RecommendationSummary]  # newest first
    chosen: RecommendationSummary | None
    chosen_status: str | None  # what `fusion verify` says of the chosen one
    items: list[Item]  # every item of the chosen one
    lmps: list[Lmp]
    frontier: list[FrontierPoint]
    decisions: list[Decision]  # on every recommendation, newest first
    note: str | None = None


def recommendations_view(snapshot: Snapshot, *, recommendation: str | None = None) -> RecommendationsView:
    """The page's view. Its reads of the mechanisms' tables are the mechanisms' own (`mechanisms.tables.audit_store`,
    at the snapshot's versions): a recommendation's every item is read whatever the config's [sql] bounds on the
    queries people run, as `fusion decide` reads it."""
    from mechanisms.tables import audit_store  # reads only; imports no solver

    with audit_store(snapshot.store) as store:
        return _view(snapshot, store, recommendation)


def _view(snapshot: Snapshot, store: FusedStore, recommendation: str | None) -> RecommendationsView:
    listed = [RecommendationSummary(**row) for row in store.sql(
        "WITH r AS (SELECT recommendation_id, any_value(kind) AS kind, any_value(mechanism) AS mechanism, "
        "any_value(created_at) AS created_at, any_value(valid_from) AS valid_from, any_value(valid_to) AS valid_to, "
        "any_value(regions) AS regions, any_value(outcome) AS outcome, any_value(refusal) AS refusal, "
        "any_value(summary) AS summary, any_value(supersedes) AS supersedes, any_value(signer) AS signer "
        "FROM recommendations GROUP BY recommendation_id), "
        "d AS (SELECT recommendation_id, count(*) AS decisions FROM decisions GROUP BY recommendation_id) "
        "SELECT r.*, coalesce(d.decisions, 0) AS decisions FROM r LEFT JOIN d USING (recommendation_id) "
        f"ORDER BY created_at DESC, recommendation_id LIMIT {MAX_LISTED}"
    ).to_pylist()]
    ids = [r.recommendation_id for r in listed]
    chosen_id = params.choice("recommendation", recommendation, ids, default=ids[0] if ids else None)
    statuses = _statuses(snapshot)
    decisions = _decisions(snapshot, store)
    empty = RecommendationsView(
        recommendations=listed, chosen=None, chosen_status=None, items=[], lmps=[], frontier=[], decisions=decisions,
        note=None if listed else "no recommendations yet: the mechanisms operator's `fusion recommend` writes them "
        "(advisory only), and authorities decide on them with `fusion decide`",
    )
    if chosen_id is None:
        return empty
    items = [Item(**row) for row in store.sql(
        "SELECT item_type, item_key, value, unit FROM recommendations "
        f"WHERE recommendation_id = {params.sql_text(chosen_id)} ORDER BY item_type, item_key"
    ).to_pylist()]
    return empty.model_copy(update={
        "chosen": next(r for r in listed if r.recommendation_id == chosen_id),
        "chosen_status": statuses.get(("recommendations", chosen_id), (None, None))[0],
        "items": items, "lmps": _lmps(items), "frontier": _frontier(items),
    })


def _statuses(snapshot: Snapshot) -> dict[tuple[str, str], tuple[str, str]]:
    """(table, record id) -> (status, effect), as `fusion verify` checks them (a recommendation's id names all its
    rows; a decision's record id, its id and signer, is shared by any copy of its row: see `_decisions`)."""
    return {(c.table, c.record_id): (c.status, c.effect) for c in record_checks(snapshot)[1]}


def _decisions(snapshot: Snapshot, store: FusedStore) -> list[Decision]:
    from mechanisms.audit import row_identity  # reads only; imports no solver
    from mechanisms.records import Decision as StoredDecision

    rows = store.sql(
        f"SELECT * FROM decisions ORDER BY decided_at DESC, decision_id, signer LIMIT {MAX_LISTED}"
    ).to_pylist()
    checks = decision_checks(snapshot)
    decisions = []
    for row in rows:
        # Each row's own check, by all it holds: a copy of a row, changed (a forged reason, say) or not, keeps the
        # id it carries and its signer, and must not take the check of the row it copies, nor give it its own.
        status, effect = checks.get(row_identity(StoredDecision.from_row(row)), (None, None))
        adopted = [Item(item_type="adopted", item_key=a["item_key"], value=a["value"], unit=a["unit"])
                   for a in row["adopted"] or []]
        shown = {name: row[name] for name in Decision.model_fields if name not in ("adopted", "verified", "effect")}
        decisions.append(Decision(**shown, adopted=adopted, verified=status, effect=effect))
    return decisions


def _lmps(items: list[Item]) -> list[Lmp]:
    parts: dict[str, dict[str, float | None]] = {}
    for item in items:
        if item.item_type in ("lmp", "lmp_energy", "lmp_congestion"):
            parts.setdefault(item.item_key, {})[item.item_type] = item.value
    return [Lmp(bus=bus, lmp=p.get("lmp"), energy=p.get("lmp_energy"), congestion=p.get("lmp_congestion"))
            for bus, p in sorted(parts.items())]


def _frontier(items: list[Item]) -> list[FrontierPoint]:
    proposed = next((i.value for i in items if i.item_type == "proposed_point"), None)
    points: dict[str, dict[str, float | None]] = {}
    for item in items:
        if item.item_type in ("frontier_cost", "frontier_co2", "frontier_carbon_price"):
            points.setdefault(item.item_key, {})[item.item_type] = item.value
    return [
        FrontierPoint(key=key, cost=p.get("frontier_cost"), co2=p.get("frontier_co2"),
                      carbon_price=p.get("frontier_carbon_price"),
                      proposed=proposed is not None and key.isdigit() and int(key) == int(proposed))
        for key, p in sorted(points.items())
    ]


def lmp_points(view: RecommendationsView) -> list[dict[str, Any]]:
    """Bars per bus: the energy and congestion parts stacked (the LMP alone where the parts are not given)."""
    points = []
    for lmp in view.lmps:
        if lmp.energy is not None and lmp.congestion is not None:
            points += [{"key": lmp.bus, "part": "energy", "value": finite(lmp.energy)},
                       {"key": lmp.bus, "part": "congestion", "value": finite(lmp.congestion)}]
        else:
            points.append({"key": lmp.bus, "part": "LMP", "value": finite(lmp.lmp)})
    return points


def frontier_points(view: RecommendationsView) -> list[dict[str, Any]]:
    return [{"key": p.key, "x": finite(p.cost), "y": finite(p.co2), "order": i,
             "kind": "proposed" if p.proposed else "frontier"}
            for i, p in enumerate(view.frontier)]
