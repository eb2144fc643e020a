"""The SQL behind `FusedStore.forecasts`: forecasts of chosen series, optionally only each series' latest."""

from __future__ import annotations

from fusion.errors import FusionError

PURPOSES = ("forecast", "backtest")
STATISTICS = ("mean", "sum", "count")


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def forecasts_query(
    *, metric: str | None, region: str | None, statistic: str | None, purpose: str, latest: bool
) -> str:
    """One query over `forecasts`.

    >>> forecasts_query(metric="load", region=None, statistic="mean", purpose="forecast", latest=False)[:93]
    "SELECT * FROM forecasts WHERE purpose = 'forecast' AND metric = 'load' AND statistic = 'mean'"
    """
    if purpose not in PURPOSES:
        raise FusionError(f"purpose '{purpose}' is not one of {list(PURPOSES)}")
    if statistic is not None and statistic not in STATISTICS:
        raise FusionError(f"statistic '{statistic}' is not one of {list(STATISTICS)}")
    where = [f"purpose = {_quoted(purpose)}"]
    for column, value in (("metric", metric), ("region", region), ("statistic", statistic)):
        if value is not None:
            where.append(f"{column} = {_quoted(value)}")
    query = f"SELECT * FROM forecasts WHERE {' AND '.join(where)}"
    if latest:  # each series' latest issue; of forecasts issued at once (a backtest's origins), the latest origin
        query += (
            " QUALIFY dense_rank() OVER (PARTITION BY metric, statistic, region"
            + (", model" if purpose == "backtest" else "") + " ORDER BY issued_at DESC, origin DESC) = 1"
        )
    return query + " ORDER BY metric, statistic, region, issued_at, window_start"


__all__ = ["forecasts_query"]
