"""Released series read from the store through its public SQL surface (fusion.api), on a regular grid of windows.

A series is one (metric, statistic, region): the mean follows `ratio_mean` with `mean_sd` (the unclipped ratio
and its delta-method SD), the sum `sum` with `sum_sd`, the count `count` with `count_sd`. A window that was not
released, or whose mean was withheld (its count's interval includes 0), is missing (NaN), never zero. Where a
window was released more than once, the latest release counts. Releases `fusion verify` does not call verified or
legacy are left out (`unverified`, where a release-signing key is registered): a window released only by them is
missing, and each series records those it left out. What is drawn beside a forecast (`fusion forecast --plot`, the
dashboard's Forecasts page) is read the same way (`released_points`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from forecasting.intervals import Z95
from forecasting.models import History
from forecasting.reads import in_groups, read, read_budget
from fusion.config.forecasting import SERIES_COLUMNS, Statistic
from fusion.errors import FusionError
from fusion.store.access import FusedStore

#: The release columns each statistic follows: (value, noise SD).
COLUMNS = SERIES_COLUMNS


@dataclass(frozen=True, order=True)
class SeriesKey:
    metric: str
    statistic: Statistic
    region: str

    def __str__(self) -> str:
        return f"{self.metric} {self.statistic} {self.region}"


@dataclass(frozen=True)
class Series:
    """One series on the grid `start + i * step`, i = 0..n-1, through its latest released window: values and
    noise variances (NaN where missing), the release each window came from (None where none), and the Delta
    version of `releases` it was read at."""

    key: SeriesKey
    unit: str
    start: datetime
    step: timedelta
    values: np.ndarray
    variances: np.ndarray
    release_ids: list[str | None]
    releases_version: int
    skipped: tuple[str, ...] = ()  # releases of its span left out, not verified (fusion.api.unverified_releases)

    @property
    def end(self) -> datetime:
        """The end of the latest window: a forecast's origin."""
        return self.start + self.values.size * self.step

    def window(self, index: int) -> datetime:
        return self.start + index * self.step

    def index(self, moment: datetime) -> int:
        return int((moment - self.start) // self.step)

    def history(self, origin: int, length: int, period: int | None) -> History:
        """The cells before `origin` (an index), at most `length` of them."""
        begin = max(0, origin - length)
        return History(self.values[begin:origin], self.variances[begin:origin], period)

    def releases_before(self, origin: int, length: int) -> list[str]:
        """The distinct releases of the cells a history ending at `origin` read, in order."""
        begin = max(0, origin - length)
        return list(dict.fromkeys(r for r in self.release_ids[begin:origin] if r is not None))


def quoted(text: str) -> str:
    """A SQL string literal (the sandbox takes one query string, without parameters)."""
    return "'" + text.replace("'", "''") + "'"


def read_series(
    store: FusedStore,
    *,
    step: timedelta,
    metrics: Sequence[str],
    regions: Sequence[str],
    statistics: Sequence[Statistic],
    span: timedelta,
    unverified: Collection[str] = (),
) -> list[Series]:
    """Every (metric, statistic, region) asked for that has released windows, over the last `span` before the
    store's latest released window (pinned to the version of `releases` the store reads), leaving out the releases
    named in `unverified`."""
    version = store.versions.get("releases")
    if version is None:
        return []
    trusted = _trusted(unverified)
    where = (f"metric IN ({', '.join(map(quoted, metrics))}) AND region IN ({', '.join(map(quoted, regions))})")
    latest = latest_release_end(store, where, unverified)
    if latest is None:
        return []
    since = latest - span
    skipped = _skipped(store, where, since, unverified) if unverified else {}
    # A series holds at most one row per window of the span (the latest release of each): read a metric's regions
    # a group at a time, so that a federation of many series at short windows is read in bounded parts.
    out = []
    for metric in metrics:
        for group in in_groups(regions, rows_each=int(span / step) + 1, budget=read_budget(store)):
            names = ", ".join(map(quoted, group))
            table = read(
                store,
                "SELECT metric, unit, region, window_start, release_id, ratio_mean, mean_sd, sum, sum_sd, count, "
                f"count_sd FROM releases WHERE metric = {quoted(metric)} AND region IN ({names}) "
                f"AND window_start >= TIMESTAMPTZ '{since.isoformat()}'{trusted} {LATEST} "
                "ORDER BY metric, region, window_start",
                what=f"the released series of {metric}",
                settings="history (a backtest: also backtest_origins x backtest_step and the horizon)",
            )
            for (name, region), rows in _groups(table):
                for statistic in statistics:
                    series = on_grid(SeriesKey(name, statistic, region), rows, step, version)
                    out.append(replace(series, skipped=skipped.get((name, region), ())))
    return sorted(out, key=lambda s: s.key)


#: Which release of a window a series holds: its latest (by release time, then id).
LATEST = ("QUALIFY row_number() OVER (PARTITION BY metric, region, window_start ORDER BY released_at DESC, "
           "release_id DESC) = 1")


def _trusted(unverified: Collection[str]) -> str:
    """The condition, after a WHERE on `releases`, that leaves out the releases named in `unverified`."""
    return f" AND release_id NOT IN ({', '.join(map(quoted, sorted(unverified)))})" if unverified else ""


def latest_release_end(store: FusedStore, where: str, unverified: Collection[str] = ()) -> datetime | None:
    """The end of the latest window released under `where` (a condition on `releases`), releases of `unverified`
    left out; None where there is none."""
    found = store.sql(f"SELECT max(window_end) AS t FROM releases WHERE {where}{_trusted(unverified)}")
    latest: datetime | None = found.column("t")[0].as_py()
    return latest


def released_points(
    store: FusedStore,
    key: SeriesKey,
    *,
    since: datetime,
    until: datetime | None = None,
    unverified: Collection[str] = (),
) -> tuple[pa.Table, tuple[str, ...]]:
    """One series' releases from `since` (to `until`) as its forecasts read them, for drawing beside them: the
    same releases left out (`unverified`), the same release of each window (the latest), its column (COLUMNS):
    window_start, value and sd, low and high (value -+ Z95 sd), a window whose release withheld the value left out.
    And the releases of `unverified` left out there, as `Series.skipped` names them."""
    value, sd = COLUMNS[key.statistic]
    where = f"metric = {quoted(key.metric)} AND region = {quoted(key.region)}"
    where += f" AND window_start < TIMESTAMPTZ '{until.isoformat()}'" if until is not None else ""
    points = store.sql(
        f"SELECT window_start, value, sd, value - {Z95!r} * sd AS low, value + {Z95!r} * sd AS high FROM ("
        f"SELECT window_start, {value} AS value, {sd} AS sd FROM releases WHERE {where} "
        f"AND window_start >= TIMESTAMPTZ '{since.isoformat()}'{_trusted(unverified)} {LATEST}) "
        "WHERE value IS NOT NULL ORDER BY window_start"
    )
    skipped = _skipped(store, where, since, unverified) if unverified else {}
    return points, skipped.get((key.metric, key.region), ())


def _skipped(store: FusedStore, where: str, since: datetime, unverified: Collection[str]) -> dict[Any, tuple[str, ...]]:
    """(metric, region) -> the releases of `unverified` holding cells of it since `since`."""
    rows = store.sql(
        f"SELECT metric, region, list(DISTINCT release_id ORDER BY release_id) AS ids FROM releases WHERE {where} "
        f"AND window_start >= TIMESTAMPTZ '{since.isoformat()}' "
        f"AND release_id IN ({', '.join(map(quoted, sorted(unverified)))}) GROUP BY metric, region"
    ).to_pylist()
    return {(row["metric"], row["region"]): tuple(row["ids"]) for row in rows}


def _groups(table: pa.Table) -> list[tuple[tuple[str, str], pa.Table]]:
    keys = table.select(["metric", "region"]).group_by(["metric", "region"]).aggregate([]).to_pylist()
    import pyarrow.compute as pc

    return [
        ((k["metric"], k["region"]),
         table.filter(pc.and_(pc.equal(table["metric"], k["metric"]), pc.equal(table["region"], k["region"]))))
        for k in keys
    ]


def on_grid(key: SeriesKey, rows: pa.Table, step: timedelta, version: int, *, start: datetime | None = None,
            windows: int | None = None) -> Series:
    """The series of `rows` (one series' releases, a row per window, in order of window): from its first row to its
    last, or over the `windows` windows from `start` where given (rows outside them are refused)."""
    starts = rows.column("window_start").to_pylist()
    first = starts[0] if start is None else start
    n = int((starts[-1] - first) // step) + 1 if windows is None else windows
    values, variances = np.full(n, np.nan), np.full(n, np.nan)
    release_ids: list[str | None] = [None] * n
    value_column, sd_column = COLUMNS[key.statistic]
    value = rows.column(value_column).to_numpy(zero_copy_only=False).astype(float)
    sd = rows.column(sd_column).to_numpy(zero_copy_only=False).astype(float)
    for row, moment in enumerate(starts):
        offset = moment - first
        if offset % step:
            raise FusionError(
                f"release {rows.column('release_id')[row]} has a window at {moment.isoformat()}, off the "
                f"{step} grid of federation.window: forecasts need windows of the federation's length"
            )
        i = int(offset // step)
        if not 0 <= i < n:
            raise FusionError(f"release {rows.column('release_id')[row]} has a window at {moment.isoformat()}, "
                              f"outside the {n} windows from {first.isoformat()} read")
        values[i], variances[i] = value[row], sd[row] ** 2
        release_ids[i] = str(rows.column("release_id")[row])
    known = np.isfinite(values) & np.isfinite(variances)
    values[~known], variances[~known] = np.nan, np.nan  # withheld: NULL mean and sd
    unit = str(rows.column("unit")[0])
    if key.statistic is Statistic.COUNT:
        unit = "readings"
    return Series(key, unit, first, step, values, variances, release_ids, version)


__all__ = ["COLUMNS", "LATEST", "Series", "SeriesKey", "latest_release_end", "on_grid", "quoted", "read_series",
           "released_points"]
