"""The Releases view: one metric in one region over a time range, every released cell with each statistic's
value, noise standard deviation (where one is released) and 95% interval, and the epsilon of each release."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from dashboard import params
from dashboard.formatting import Unbounded, finite
from dashboard.snapshot import Snapshot

#: The statistics a release may hold, in the order shown; the first three carry a released noise sd.
STATISTICS = ("mean", "count", "sum", "stddev", "p10", "median", "p90")
WITH_SD = ("mean", "count", "sum")
#: The most cells one view holds (chart and JSON); a longer range is refused with a message.
MAX_CELLS = 20_000
#: Rows per page of the table beneath the chart.
PAGE_ROWS = 500
#: The range shown when none is given: the series' last DEFAULT_DAYS days.
DEFAULT_DAYS = 7


class Estimate(BaseModel):
    """A released statistic: its noisy value, the noise standard deviation (None where the release has none:
    stddev and quantiles, or rows released before mean_sd existed) and the 95% interval. A stddev's value is None
    with its interval released where its noise dwarfs the spread (fusion/release/estimates.py): the interval is
    then what the release says of it."""

    value: float | None
    sd: float | None
    low: float | None
    high: float | None


class ReleasedCell(BaseModel):
    """One released cell (metric x region x window) of the series."""

    release_id: str
    window_start: datetime
    window_end: datetime
    contributors: int
    estimates: dict[str, Estimate]  # statistic -> estimate, for each of STATISTICS
    epsilon: Unbounded  # "Infinity" in JSON for a test-mode release with noise off
    delta: float
    noise: str
    released_at: datetime


class ReleaseSummary(BaseModel):
    """A release that holds cells of the series in the range shown, and what it spent."""

    release_id: str
    released_at: datetime
    epsilon: Unbounded  # "Infinity" in JSON for a test-mode release with noise off
    delta: float
    noise: str
    cells: int
    first_window: datetime
    last_window: datetime


class ReleasesView(BaseModel):
    metric: str | None
    region: str | None
    statistic: str
    unit: str | None
    metrics: list[str]
    regions: list[str]  # those with cells of the metric
    statistics: list[str]
    series_start: datetime | None  # the whole series' first window start and last window end
    series_end: datetime | None
    start: datetime | None  # the range shown: window starts in [start, end)
    end: datetime | None
    days: int | None  # the range as a number of days back from the series' end (None: given by start/end)
    cells: list[ReleasedCell]  # in time order
    releases: list[ReleaseSummary]
    shown_statistics: list[str]  # statistics with a value or an interval in some cell of the range
    note: str | None = None


_COLUMNS = ["release_id", "window_start", "window_end", "contributors", "epsilon", "delta", "noise", "released_at"] + [
    f"{s}{suffix}" for s in STATISTICS for suffix in ("", "_ci_low", "_ci_high")
] + [f"{s}_sd" for s in WITH_SD]


def _series(snapshot: Snapshot) -> dict[str, dict[str, str]]:
    rows = snapshot.rows("SELECT metric, region, any_value(unit) AS unit FROM releases GROUP BY metric, region "
                         "ORDER BY metric, region")
    choices: dict[str, dict[str, str]] = {}
    for row in rows:
        choices.setdefault(row["metric"], {})[row["region"]] = row["unit"]
    return choices


#: What the dashboard computes ahead, when it starts: (name, tables, compute), as Snapshot.recent takes them.
SERIES = ("series", ("releases",), _series)


def series_choices(snapshot: Snapshot, *, metric: str | None = None, region: str | None = None
                   ) -> dict[str, dict[str, str]]:
    """metric -> region -> unit, of every series in `releases`: computed once per version of the table, and
    while the current version's is computed, the previous version's, unless it lacks `metric` or `region` (a
    series released since)."""
    choices, current = snapshot.recent(*SERIES)
    if not current and ((metric and metric not in choices) or (region and region not in choices.get(metric or "",
                                                                                                     {}))):
        choices = snapshot.cached(*SERIES)
    return choices


def releases_view(
    snapshot: Snapshot,
    *,
    metric: str | None = None,
    region: str | None = None,
    statistic: str | None = None,
    days: str | None = None,
    start: str | None = None,
    end: str | None = None,
) -> ReleasesView:
    """The view of one series; parameters as the page and the API take them (text; None: the default)."""
    choices = series_choices(snapshot, metric=metric, region=region)
    chosen_stat = params.choice("statistic", statistic, STATISTICS, default="mean") or "mean"
    chosen_metric = params.choice("metric", metric, sorted(choices), default=next(iter(sorted(choices)), None))
    regions = sorted(choices.get(chosen_metric or "", {}))
    chosen_region = params.choice("region", region, regions, default=regions[0] if regions else None)
    back = params.days("days", days, default=DEFAULT_DAYS)
    begin, finish = params.time("start", start), params.time("end", end)
    params.time_range(begin, finish)
    empty = ReleasesView(
        metric=chosen_metric, region=chosen_region, statistic=chosen_stat, unit=None, metrics=sorted(choices),
        regions=regions, statistics=list(STATISTICS), series_start=None, series_end=None, start=begin, end=finish,
        days=back, cells=[], releases=[], shown_statistics=[],
        note="nothing released yet: the store's releases table is empty",
    )
    if chosen_metric is None or chosen_region is None:
        return empty
    where = f"metric = {params.sql_text(chosen_metric)} AND region = {params.sql_text(chosen_region)}"
    extent = snapshot.cached(f"extent {where}", ["releases"], lambda shot: shot.rows(
        f"SELECT min(window_start) AS first, max(window_end) AS last FROM releases WHERE {where}")[0])
    if begin is None and finish is None and back is not None:
        finish = extent["last"]
        begin = max(finish - timedelta(days=back), extent["first"])
    elif start is not None or end is not None:
        back = None
    range_sql = "".join([
        f" AND window_start >= {params.sql_time(begin)}" if begin is not None else "",
        f" AND window_start < {params.sql_time(finish)}" if finish is not None else "",
    ])
    table = snapshot.table(
        f"SELECT {', '.join(_COLUMNS)} FROM releases WHERE {where}{range_sql} "
        f"ORDER BY window_start, release_id LIMIT {MAX_CELLS + 1}"
    )
    if table.num_rows > MAX_CELLS:
        raise params.BadParameter(
            "days" if back is not None else "start",
            f"the range holds more than {MAX_CELLS:,} cells of {chosen_metric} in {chosen_region}, more than one "
            "view shows: choose fewer days, or a start and end closer together",
        )
    cells = [_cell(row) for row in table.to_pylist()]
    shown = [s for s in STATISTICS if any(_released(c.estimates[s]) for c in cells)]
    return empty.model_copy(update={
        "unit": choices[chosen_metric][chosen_region], "series_start": extent["first"], "series_end": extent["last"],
        "start": begin, "end": finish, "days": back, "cells": cells, "releases": _summaries(cells),
        "shown_statistics": shown,
        "note": None if cells else "no cells of this series in the range chosen",
    })


def _released(estimate: Estimate) -> bool:
    """Whether a cell says anything of the statistic: a value, or (a withheld stddev) an interval."""
    return estimate.value is not None or (estimate.low is not None and estimate.high is not None)


def _cell(row: dict[str, Any]) -> ReleasedCell:
    estimates = {
        s: Estimate(value=row[s], sd=row.get(f"{s}_sd"), low=row[f"{s}_ci_low"], high=row[f"{s}_ci_high"])
        for s in STATISTICS
    }
    return ReleasedCell(
        release_id=row["release_id"], window_start=row["window_start"], window_end=row["window_end"],
        contributors=row["contributors"], estimates=estimates, epsilon=row["epsilon"], delta=row["delta"],
        noise=row["noise"], released_at=row["released_at"],
    )


def _summaries(cells: list[ReleasedCell]) -> list[ReleaseSummary]:
    by_release: dict[str, list[ReleasedCell]] = {}
    for cell in cells:
        by_release.setdefault(cell.release_id, []).append(cell)
    return sorted(
        (
            ReleaseSummary(
                release_id=rid, released_at=own[0].released_at, epsilon=max(c.epsilon for c in own),
                delta=max(c.delta for c in own), noise=own[0].noise, cells=len(own),
                first_window=own[0].window_start, last_window=own[-1].window_start,
            )
            for rid, own in by_release.items()
        ),
        key=lambda s: (s.first_window, s.release_id),
    )


def chart_points(view: ReleasesView) -> list[dict[str, Any]]:
    """The chart's rows: the chosen statistic of each cell with its band (epoch ms times); a cell whose value is
    withheld but whose interval is released (a stddev where the noise dwarfs the spread) gives its band alone."""
    rows = []
    for cell in view.cells:
        estimate = cell.estimates[view.statistic]
        if not _released(estimate):
            continue
        rows.append({"series": view.statistic, "t": int(cell.window_start.timestamp() * 1000),
                     "value": finite(estimate.value), "sd": finite(estimate.sd), "low": finite(estimate.low),
                     "high": finite(estimate.high)})
    return rows


@dataclass(frozen=True)
class TablePage:
    """The cells one page of the table shows (newest first), and where it is among the pages."""

    cells: list[ReleasedCell]
    page: int
    pages: int


def table_page(view: ReleasesView, page: str | None) -> TablePage:
    number = params.page("page", page)
    pages = max(1, -(-len(view.cells) // PAGE_ROWS))
    if number > pages:
        raise params.BadParameter("page", f"{number} is past the table's last page, {pages}")
    newest = view.cells[::-1]
    return TablePage(newest[(number - 1) * PAGE_ROWS : number * PAGE_ROWS], number, pages)
