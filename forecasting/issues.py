"""Whether a forecast was issued before. `forecasts` is append-only, and a forecast is named by what determines it
(forecasting.rows.IssuedForecast.forecast_id), so a run with nothing new released computes the same forecast again.

A forecast that is its series' latest issue already is not written again. One issued before but followed since by
another of the same series (a forecast of another horizon, say) is issued again: its rows are appended once more
under this run's `issued_at`, so that each series' latest forecast (the latest `issued_at`: FusedStore.forecasts,
the dashboard, the mechanisms) is the one the last run gave, and the table keeps every issue (`forecasts` is keyed
by forecast_id, window_start and issued_at). A backtest's forecasts are recorded once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from forecasting.rows import IssuedForecast
from forecasting.series import quoted
from fusion.store.access import FusedStore


@dataclass(frozen=True)
class Issue:
    """A forecast issued before: when it first was and last was, and whether it is its series' latest issue now."""

    first: datetime
    last: datetime
    latest: bool


def issued_before(store: FusedStore, forecasts: Sequence[IssuedForecast]) -> dict[str, Issue]:
    """Of `forecasts` (purpose 'forecast'), those the store holds already, by forecast_id."""
    ids = sorted({f.forecast_id for f in forecasts})
    if not ids or store.versions.get("forecasts") is None:
        return {}
    found = store.sql(
        "SELECT forecast_id, any_value(metric) AS metric, any_value(statistic) AS statistic, any_value(region) AS "
        "region, min(issued_at) AS first, max(issued_at) AS last FROM forecasts WHERE purpose = 'forecast' "
        f"AND forecast_id IN ({', '.join(map(quoted, ids))}) GROUP BY forecast_id"
    ).to_pylist()
    if not found:
        return {}

    def within(column: str) -> str:
        return f"{column} IN ({', '.join(quoted(v) for v in sorted({row[column] for row in found}))})"

    newest = {
        (row["metric"], row["statistic"], row["region"]): row["at"]
        for row in store.sql(
            "SELECT metric, statistic, region, max(issued_at) AS at FROM forecasts WHERE purpose = 'forecast' AND "
            f"{within('metric')} AND {within('statistic')} AND {within('region')} GROUP BY ALL"
        ).to_pylist()
    }
    return {
        row["forecast_id"]: Issue(row["first"], row["last"],
                                  row["last"] >= newest[(row["metric"], row["statistic"], row["region"])])
        for row in found
    }


def recorded_backtests(store: FusedStore, forecasts: Sequence[IssuedForecast]) -> set[str]:
    """The ids of `forecasts` (one series' backtest) that a backtest recorded already."""
    ids = sorted({f.forecast_id for f in forecasts})
    if not ids or store.versions.get("forecasts") is None:
        return set()
    rows = store.sql(
        "SELECT DISTINCT forecast_id FROM forecasts WHERE purpose = 'backtest' "
        f"AND forecast_id IN ({', '.join(map(quoted, ids))})"
    )
    return set(rows.column("forecast_id").to_pylist())


__all__ = ["Issue", "issued_before", "recorded_backtests"]
