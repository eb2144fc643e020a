"""The choices a forecast's run made before it fitted, made again from checked inputs: forecasting.replay's check of
a forecast's model and calibration, and of the length and origin of its history.

`fusion forecast` takes its model and calibration from the scored backtests the store holds
(forecasting.selection), and neither `forecasts` nor `forecast_scores` rows are signed: a backtest row or a score
appended by anyone able to write to the store steered the choice of every later forecast of its series. So a
forecast replays only where its choice is the one its backtests give when they are checked too
(`BacktestChoices`): of the series' scored backtest forecasts issued by the forecast's `issued_at` (the store does
not record the `forecasts` version a run read, and a genuine run reads only backtests issued before it), each
window's latest that replays (forecasting.replay), from the latest `backtest_origins` origins that have one; each
score computed again from the verified releases at the backtest's `releases_version` (a `forecast_scores` row counts
only as saying that its window was scored); the model and calibration chosen from them as a run chooses
(selection.choices_from), under the config's `[forecasting]` models, backtest_origins, selection_margin and
selection_t. Every choice a forecast's params record (`CHOICE_KEYS`) must be that one.

`history_gap` checks the rest of what a run decides: a forecast's origin is its series' latest verified window at
its `releases_version`, and a history shorter than `[forecasting] history` starts where the series' releases did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from forecasting.reads import read
from forecasting.selection import Choice, choices_from, default_choice
from forecasting.series import COLUMNS, LATEST, SeriesKey, latest_release_end, quoted
from fusion.config.forecasting import ForecastingConfig
from fusion.store.access import FusedStore

#: What a forecast's params record of its run's choice (forecasting.selection.Choice.basis).
CHOICE_KEYS = ("selected_by", "backtest_origins", "backtest_mae", "calibrated", "calibration")


@dataclass(frozen=True)
class _Issue:
    """One issue of a scored backtest forecast: its id, when it was issued, its model and origin."""

    forecast_id: str
    issued_at: datetime
    model: str
    origin: datetime


class BacktestChoices:
    """The choice each forecast of `store` should have made, from the backtests that replay (`replays`: None where
    an issue replays, else why not) and scores computed again from the releases `fusion verify` calls verified or
    legacy (`unverified` names the others) at each backtest's releases_version (`releases_at`: the store reading
    `releases` at a version, or why it cannot). The backtests of a series are read once."""

    def __init__(self, store: FusedStore, settings: ForecastingConfig, *, unverified: Mapping[str, str],
                 replays: Callable[[str, datetime], str | None],
                 releases_at: Callable[[int], FusedStore | str]) -> None:
        self._store = store
        self._settings = settings
        self._unverified = unverified
        self._replays = replays
        self._releases_at = releases_at
        self._issues: dict[SeriesKey, list[_Issue]] = {}
        self._made: dict[tuple[SeriesKey, datetime], Choice | str] = {}

    def why_not(self, key: SeriesKey, model: str, params: Mapping[str, Any], issued_at: datetime) -> str | None:
        """None where a forecast of `key` by `model` whose params are `params`, issued at `issued_at`, made the
        choice its checked backtests give; else how it differs."""
        made = (key, issued_at)
        if made not in self._made:
            self._made[made] = self._choice(key, issued_at)
        choice = self._made[made]
        if isinstance(choice, str):
            return choice
        if model != str(choice.model):
            return (f"its model is {model}, but its backtests that replay choose {choice.model} "
                    f"({_mae(choice.basis)}): a forecast uses the model its backtests choose")
        for name in CHOICE_KEYS:
            if not _same(params.get(name), choice.basis.get(name)):
                return (f"its {name} is {_shown(params.get(name))}, but its backtests that replay give "
                        f"{_shown(choice.basis.get(name))}: a forecast takes its choice and calibration from them")
        return None

    def _choice(self, key: SeriesKey, issued_at: datetime) -> Choice | str:
        settings = self._settings
        rows = []
        origins: list[datetime] = []
        issues = [i for i in self._backtests(key) if i.issued_at <= issued_at]
        for origin in sorted({i.origin for i in issues}, reverse=True):
            at = [i for i in issues if i.origin == origin and self._replays(i.forecast_id, i.issued_at) is None]
            if at:
                rows.append(self._latest_rows(at))
                origins.append(origin)
            if len(origins) == settings.backtest_origins:
                break
        if not rows:
            return default_choice(settings.models)
        scored = self._scored(key, pa.concat_tables(rows))
        if isinstance(scored, str):
            return scored
        found = choices_from(scored, [key], models=settings.models, margin=settings.selection_margin,
                             t_min=settings.selection_t)
        return found.get(key, default_choice(settings.models))

    def _backtests(self, key: SeriesKey) -> list[_Issue]:
        """The series' issues of scored backtest forecasts of the configured models, latest first."""
        if key not in self._issues:
            if self._store.versions.get("forecast_scores") is None:
                self._issues[key] = []
            else:
                models = ", ".join(quoted(str(m)) for m in self._settings.models)
                table = read(
                    self._store,
                    "SELECT DISTINCT forecast_id, issued_at, model, origin FROM forecasts f SEMI JOIN forecast_scores "
                    f"s USING (forecast_id, window_start) WHERE f.purpose = 'backtest' AND {_series(key)} "
                    f"AND f.model IN ({models}) ORDER BY issued_at DESC, forecast_id",
                    what=f"the backtests of {key}",
                    settings="backtests (run `fusion backtest` less often, or with fewer origins)",
                )
                self._issues[key] = [_Issue(**row) for row in table.to_pylist()]
        return self._issues[key]

    def _latest_rows(self, issues: list[_Issue]) -> pa.Table:
        """Of `issues` (one origin's, latest first, each replaying), each model's and window's scored row from the
        latest issue that has one, as the run reads them (selection._latest_backtests)."""
        ids = ", ".join(quoted(i) for i in sorted({i.forecast_id for i in issues}))
        table = read(
            self._store,
            "SELECT forecast_id, issued_at, metric, statistic, region, model, origin, window_start, mean, sd, "
            "calibration_factor, releases_version FROM forecasts f SEMI JOIN forecast_scores s USING (forecast_id, "
            f"window_start) WHERE forecast_id IN ({ids})",
            what="the backtests a forecast chose by",
            settings="horizon of a backtest",
        )
        wanted = {(i.forecast_id, i.issued_at) for i in issues}
        keep = [(f, t) in wanted for f, t in zip(table.column("forecast_id").to_pylist(),
                                                 table.column("issued_at").to_pylist(), strict=True)]
        table = table.filter(pa.array(keep, pa.bool_()))
        table = table.sort_by([("model", "ascending"), ("window_start", "ascending"), ("issued_at", "descending")])
        models, starts = table.column("model").to_pylist(), table.column("window_start").to_pylist()
        first = [i for i in range(table.num_rows) if i == 0 or (models[i], starts[i]) != (models[i - 1], starts[i - 1])]
        return table.take(pa.array(first, pa.int64()))

    def _scored(self, key: SeriesKey, rows: pa.Table) -> pa.Table | str:
        """`rows` (backtest windows) with their scores computed again: the error of each window's release (its
        latest verified one at the backtest's releases_version; NULL where its value is withheld) and its noise SD.
        A window no verified release holds at that version is left out, as a run scores only released windows."""
        parts = []
        for version in sorted(set(rows.column("releases_version").to_pylist())):
            part = rows.filter(pc.equal(rows.column("releases_version"), version))
            released = self._released(key, version, part)
            if isinstance(released, str):
                return released
            starts = part.column("window_start").to_pylist()
            means = part.column("mean").to_pylist()
            keep, errors, noise = [], [], []
            for start, mean in zip(starts, means, strict=True):
                cell = released.get(start)
                keep.append(cell is not None)
                value, variance = cell if cell is not None else (math.nan, math.nan)
                known = math.isfinite(value) and math.isfinite(variance)
                errors.append(value - mean if known and mean is not None else None)
                noise.append(float(np.sqrt(variance)) if known else None)
            part = part.append_column("error", pa.array(errors, pa.float64()))
            part = part.append_column("noise_sd", pa.array(noise, pa.float64()))
            parts.append(part.filter(pa.array(keep, pa.bool_())))
        return pa.concat_tables(parts)

    def _released(self, key: SeriesKey, version: int, rows: pa.Table) -> dict[datetime, tuple[float, float]] | str:
        """window_start -> (value, noise variance) of the series' latest verified release of each window of `rows`
        at `version` (NaN where withheld), as forecasting.series reads a series."""
        store = self._releases_at(version)
        if isinstance(store, str):
            return f"a backtest it chose by: {store}"
        starts = rows.column("window_start").to_pylist()
        value, sd = COLUMNS[key.statistic]
        trusted = (f" AND release_id NOT IN ({', '.join(map(quoted, sorted(self._unverified)))})"
                   if self._unverified else "")
        table = read(
            store,
            f"SELECT window_start, {value} AS value, {sd} AS sd FROM releases WHERE metric = {quoted(key.metric)} "
            f"AND region = {quoted(key.region)} AND window_start >= {_at(min(starts))} "
            f"AND window_start <= {_at(max(starts))}{trusted} {LATEST}",
            what=f"the releases that score the backtests of {key}",
            settings="horizon of a backtest",
        )
        values = table.column("value").to_numpy(zero_copy_only=False).astype(float)
        sds = table.column("sd").to_numpy(zero_copy_only=False).astype(float)
        return {start: (float(v), float(s) ** 2)
                for start, v, s in zip(table.column("window_start").to_pylist(), values, sds, strict=True)}


def history_gap(store: FusedStore, key: SeriesKey, *, purpose: str, origin: datetime, history: int, horizon: int,
                longest: int, step: timedelta, unverified: Mapping[str, str]) -> str | None:
    """Why a forecast of `key` (`store` reading `releases` at its releases_version) cannot have been made from
    `origin` on a history of `history` windows, or None. A forecast's origin is its series' latest verified window;
    a backtest's leaves its `horizon` released after it. A history shorter than `longest` (the config's) starts at
    the first window read: no verified release of the series lies before it, after the earliest that a run (of
    every series, the latest window of all of them at that version, less the history and a backtest's horizon)
    reads."""
    where = f"metric = {quoted(key.metric)} AND region = {quoted(key.region)}"
    end = latest_release_end(store, where, unverified)
    if end is None:
        return "its series has no verified release at its releases_version"
    reach = origin if purpose == "forecast" else origin + horizon * step
    if (purpose == "forecast" and origin != end) or reach > end:
        return (f"its origin {_utc(origin)} is not {'the end of' if purpose == 'forecast' else 'within'} its series' "
                f"verified releases at its releases_version (to {_utc(end)}): a forecast is made from its series' "
                "latest window, a backtest's windows are released")
    if history >= longest:
        return None
    latest = latest_release_end(store, "true", unverified) or end
    earliest = latest - (longest + (horizon if purpose != "forecast" else 0)) * step
    start = origin - history * step
    trusted = (f" AND release_id NOT IN ({', '.join(map(quoted, sorted(unverified)))})" if unverified else "")
    before = store.sql(
        f"SELECT min(window_start) AS t FROM releases WHERE {where} AND window_start >= {_at(earliest)} "
        f"AND window_start < {_at(start)}{trusted}"
    ).column("t")[0].as_py()
    if before is not None:
        return (f"its history of {history} windows starts at {_utc(start)}, but its series was released from "
                f"{_utc(before)}: a forecast is fitted on the configured history where the releases hold it")
    return None


def _series(key: SeriesKey) -> str:
    return (f"f.metric = {quoted(key.metric)} AND f.statistic = {quoted(str(key.statistic))} "
            f"AND f.region = {quoted(key.region)}")


def _at(moment: datetime) -> str:
    return f"TIMESTAMPTZ '{moment.astimezone(UTC).isoformat()}'"


def _utc(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%dT%H:%MZ}"


def _same(a: Any, b: Any) -> bool:
    """Whether two choices as params record them (JSON values) are the same, numbers within a relative 1e-6."""
    from forecasting.replay import REPLAY_RTOL

    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=REPLAY_RTOL, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return sorted(a) == sorted(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_shown, value[:3])) + (f", ... {len(value)} in all]" if len(value) > 3 else "]")
    if isinstance(value, float):
        return f"{value:.6g}"
    return "none" if value is None else str(value)


def _mae(basis: Mapping[str, Any]) -> str:
    mae = basis.get("backtest_mae")
    if not isinstance(mae, dict):
        return "no backtest"
    return "MAE " + ", ".join(f"{m} {v:.4g}" for m, v in sorted(mae.items()))

__all__ = ["CHOICE_KEYS", "BacktestChoices", "history_gap"]
