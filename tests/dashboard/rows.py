"""Rows for the dashboard's tests, in the store's own schemas, inserted as Fusion's writers insert them
(Store.insert_new): hostile text in every kind of field a page shows, forecasts with scores, and a Pareto
recommendation with a decision on it."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pyarrow as pa

from fusion.store.delta import Store
from schemas.tables import TABLE_SCHEMAS
from tests.fusion.store.test_store import release_rows

#: Markup, script, an event handler, entities and quotes: shown as text it is harmless; interpreted, it would
#: run script (the title changes) or add elements (an img with src "x", a stray table cell).
HOSTILE = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script> & \"q\" 'q' </td>"


def table(name: str, rows: list[dict[str, Any]], *, at: datetime) -> pa.Table:
    """`rows` in table `name`'s schema, each column not given filled with a plain value."""
    schema = TABLE_SCHEMAS[name]
    return pa.Table.from_pylist([{f.name: row.get(f.name, _plain(f.type, at)) for f in schema} for row in rows],
                                schema=schema)


def _plain(kind: pa.DataType, at: datetime) -> Any:
    if pa.types.is_timestamp(kind):
        return at
    if pa.types.is_floating(kind):
        return 1.0
    if pa.types.is_integer(kind):
        return 1
    if pa.types.is_list(kind):
        return []
    if pa.types.is_boolean(kind):
        return False
    return "x"


def add_hostile(store: Store, *, metric: str, at: datetime) -> None:
    """A release of `metric` in a region named HOSTILE (unsigned: `verify` calls it tampered), an audit event and
    a budget refusal whose actor, reason and detail are HOSTILE."""
    rows = release_rows("r-hostile", range(3), metric=metric, region=HOSTILE)
    rows = rows.set_column(rows.schema.get_field_index("window_start"), "window_start",
                           pa.array([at + timedelta(hours=h) for h in range(3)], pa.timestamp("us", tz="UTC")))
    rows = rows.set_column(rows.schema.get_field_index("window_end"), "window_end",
                           pa.array([at + timedelta(hours=h + 1) for h in range(3)], pa.timestamp("us", tz="UTC")))
    store.insert_new("releases", rows)
    store.insert_new("audit", table("audit", [
        {"event_id": "hostile-1", "at": at, "actor_role": "key_holder", "actor": HOSTILE, "action": "budget_refused",
         "release_id": "r-refused", "interval_start": at, "interval_end": at + timedelta(hours=1), "reason": HOSTILE,
         "detail": HOSTILE},
        {"event_id": "hostile-2", "at": at, "actor_role": "aggregator", "actor": "agg", "action": "note",
         "release_id": None, "interval_start": None, "interval_end": None, "reason": None, "detail": HOSTILE},
    ], at=at))


def add_forecast(store: Store, *, metric: str, region: str, origin: datetime, unit: str = "degC",
                 windows: int = 6) -> None:
    """The latest forecast of `metric`'s mean in `region` from `origin`, hourly, and backtest scores."""
    rows, scores = [], []
    for h in range(windows):
        start = origin + timedelta(hours=h)
        mean = 10.0 + h
        rows.append({
            "forecast_id": "fc-latest", "purpose": "forecast", "model": "seasonal_naive", "model_version": "1",
            "params": "{}", "metric": metric, "statistic": "mean", "unit": unit, "region": region,
            "issued_at": origin, "origin": origin, "window_start": start, "window_end": start + timedelta(hours=1),
            "horizon": h + 1, "mean": mean, "sd": 0.5, "ci80_low": mean - 0.64, "ci80_high": mean + 0.64,
            "ci95_low": mean - 0.98, "ci95_high": mean + 0.98, "noise_sd": 0.3, "release_sd": 0.58,
            "release_ci80_low": mean - 0.75, "release_ci80_high": mean + 0.75, "release_ci95_low": mean - 1.14,
            "release_ci95_high": mean + 1.14, "calibration_factor": 1.0, "mase_scale": 1.0, "releases_version": 1,
            "input_release_ids": ["r1"],
        })
        scores.append({
            "forecast_id": "bt-1", "window_start": start - timedelta(days=1), "purpose": "backtest",
            "model": "seasonal_naive", "metric": metric, "statistic": "mean", "region": region,
            "origin": origin - timedelta(days=1), "horizon": h + 1, "release_id": "r1", "value": mean,
            "noise_sd": 0.3, "error": 0.5 - 0.2 * h, "scaled_error": 0.4, "z": 0.1, "covered80": True,
            "covered95": True, "scored_at": origin, "releases_version": 1,
        })
    store.insert_new("forecasts", table("forecasts", rows, at=origin))
    store.insert_new("forecast_scores", table("forecast_scores", scores, at=origin))


#: The recommendation's LMPs ($/MWh): bus -> (energy, congestion).
LMPS = {"B": (20.0, 1.5), "C": (20.0, -0.5), "D": (20.0, 4.25)}
FRONTIER = [(1000.0, 9.0), (1040.0, 7.5), (1100.0, 6.4), (1190.0, 5.9)]  # (cost $/h, CO2 t/h)
PROPOSED = 2


def add_recommendation(store: Store, *, at: datetime) -> str:
    """A Pareto recommendation (LMPs per bus, a frontier with its proposed point) whose summary is HOSTILE, and an
    override decision on it whose authority and reason are HOSTILE; returns the recommendation's id."""
    rid = "rec-0123456789abcdef"
    header = {"recommendation_id": rid, "digest": "d" * 64, "kind": "pareto", "mechanism": "dc-opf",
              "mechanism_version": "1", "created_at": at, "valid_from": at, "valid_to": at + timedelta(hours=1),
              "regions": ["north", "south"], "inputs": "{}", "parameters": "{}", "summary": HOSTILE,
              "outcome": "recorded", "refusal": None, "supersedes": None, "binding": False, "signer": "operator",
              "signature": "00"}
    items: list[tuple[str, str, float, str | None]] = []
    for bus, (energy, congestion) in LMPS.items():
        items += [("lmp", bus, energy + congestion, "$/MWh"), ("lmp_energy", bus, energy, "$/MWh"),
                  ("lmp_congestion", bus, congestion, "$/MWh")]
    for i, (cost, co2) in enumerate(FRONTIER):
        items += [("frontier_cost", f"{i:03d}", cost, "$/h"), ("frontier_co2", f"{i:03d}", co2, "t/h")]
    items.append(("proposed_point", "index", float(PROPOSED), None))
    store.insert_new("recommendations", table("recommendations", [
        {**header, "item_type": t, "item_key": k, "value": v, "unit": u} for t, k, v, u in items], at=at))
    store.insert_new("decisions", table("decisions", [{
        "decision_id": "dec-1", "recommendation_id": rid, "recommendation_sha256": "d" * 64, "action": "override",
        "authority": HOSTILE, "signer": "signer-1", "signer_key": "00", "decided_at": at + timedelta(minutes=5),
        "effective_from": at, "effective_to": at + timedelta(hours=1), "reason_code": "reliability",
        "reason": HOSTILE, "adopted": [{"item_key": "G1", "value": 120.0, "unit": "MW"}], "deviation_mw": 12.5,
        "cost_impact": 321.75, "previous_decision_id": None, "outcome": "recorded", "refusal": None,
        "signature": "00"}], at=at))
    return rid
