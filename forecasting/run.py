"""`fusion forecast` and `fusion backtest`: read released series through fusion.api, forecast them, write the
forecasts and their scores to the store's `forecasts` and `forecast_scores` tables (and nowhere else).

Forecasts are post-processing of differentially private releases: they read only published rows, so they spend
no privacy budget and need no key, feed or envelope.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pyarrow as pa

from forecasting.backtest import (
    ModelScore,
    backtest,
    calibrated,
    choose,
    origin_errors,
    origin_overlap,
    rolling_origins,
    score,
)
from forecasting.intervals import intervals
from forecasting.issues import Issue, issued_before, recorded_backtests
from forecasting.models import MODELS, SeriesTooShort, fit_forecast, seasonal_naive_scale
from forecasting.reads import read
from forecasting.rows import IssuedForecast, Purpose, forecast_rows, score_rows
from forecasting.selection import Choice, default_choice, recorded_choices
from forecasting.series import Series, SeriesKey, quoted, read_series
from forecasting.trust import listed, skipped_releases, trust_record
from fusion.config.federation import Config
from fusion.config.forecasting import (
    MAX_HORIZON_WINDOWS,
    ForecastingConfig,
    ModelName,
    Statistic,
    horizon_beyond_history,
    too_many_windows,
)
from fusion.errors import FusionError
from fusion.runtime.durations import parse_duration
from fusion.store.access import FusedStore, open_store, write_derived
from fusion.trust import unverified_releases

T = TypeVar("T")


@dataclass(frozen=True)
class SeriesOutcome:
    """What became of one series: its forecast (None if it had none) and why."""

    key: SeriesKey
    forecast: IssuedForecast | None
    note: str
    scores: tuple[ModelScore, ...] = ()  # backtests: every model's
    chosen: ModelName | None = None  # backtests: the model a forecast of the series now uses
    written: bool = True  # forecasts: False where the same forecast is the series' latest in the store already
    issued_before: datetime | None = None  # forecasts: when the same forecast was first issued, if it was


@dataclass(frozen=True)
class ForecastRun:
    """One `fusion forecast` or `fusion backtest`: what each series got, and the rows written."""

    issued_at: datetime
    horizon: int  # windows ahead
    outcomes: list[SeriesOutcome] = field(default_factory=list)
    forecast_rows: int = 0
    score_rows: int = 0
    releases_version: int | None = None
    releases_verified: bool = False  # False: no release-signing key is registered, every release was read
    skipped_releases: dict[str, str] = field(default_factory=dict)  # releases not verified, left out: their status


def settings(config: Config) -> ForecastingConfig:
    return config.forecasting or ForecastingConfig()


def windows(config: Config, text: str, option: str) -> int:
    """A duration as a whole number of the federation's windows."""
    try:
        length = parse_duration(text)
    except ValueError as exc:
        raise FusionError(f"{option}: {exc}") from None
    if length.total_seconds() <= 0 or length % config.window:
        raise FusionError(
            f"{option} {text} is not a positive whole number of federation.window ({config.federation.window})"
        )
    return int(length / config.window)


def horizon_windows(config: Config, text: str | None, option: str = "horizon") -> int:
    """A forecast's horizon (None: the configured one) as windows ahead, at most the configured history and at
    most MAX_HORIZON_WINDOWS; `option` names where it came from in the refusal (`--horizon` on the command line)."""
    chosen = settings(config)
    if text is None:
        text, option = chosen.horizon, "forecasting.horizon"
    steps = windows(config, text, option)
    if parse_duration(text) > parse_duration(chosen.history):
        raise FusionError(horizon_beyond_history(option, text, chosen.history))
    if steps > MAX_HORIZON_WINDOWS:
        raise FusionError(too_many_windows(option, text, config.window))
    return steps


def period(config: Config) -> int | None:
    """Windows per day (the daily cycle's period), or None where windows are a day or longer."""
    cells = timedelta(days=1) / config.window
    return int(cells) if cells >= 2 and cells == int(cells) else None


def _distinct(names: Sequence[T]) -> list[T]:
    """`names` without repeats, in their order: a name given twice (`--metric ghi --metric ghi`) is one series.

    >>> _distinct(["ghi", "temp", "ghi"])
    ['ghi', 'temp']
    """
    return list(dict.fromkeys(names))


def _names(config: Config, metrics: Sequence[str] | None, regions: Sequence[str] | None) -> tuple[list[str], list[str]]:
    known_metrics = [m.name for m in config.metrics]
    for metric in metrics or ():
        if metric not in known_metrics:
            raise FusionError(f"unknown metric '{metric}'; the config declares: {', '.join(known_metrics)}")
    for region in regions or ():
        if region not in config.regions:
            raise FusionError(f"unknown region '{region}'; the config declares: {', '.join(config.regions)}")
    return _distinct(metrics or known_metrics), _distinct(regions or config.regions)


def _series(
    config: Config,
    store: FusedStore,
    metrics: Sequence[str] | None,
    regions: Sequence[str] | None,
    statistics: Sequence[Statistic] | None,
    span: timedelta,
) -> tuple[list[Series], dict[str, str] | None]:
    """(the series read, the releases left out as unverified with their status; None: no release-signing key is
    registered, every release read). Verified after `store` was opened: every release of its snapshot is checked."""
    metric_names, region_names = _names(config, metrics, regions)
    unverified = unverified_releases(config)
    found = read_series(
        store,
        step=config.window,
        metrics=metric_names,
        regions=region_names,
        statistics=_distinct(statistics or settings(config).statistics),
        span=span,
        unverified=unverified or (),
    )
    if not found:
        left_out = f" (releases not verified, left out: {listed(unverified)})" if unverified else ""
        raise FusionError(
            f"no released windows of {', '.join(metric_names)} in {', '.join(region_names)}{left_out}: release some "
            "first (`fusion batch`, `fusion schedule`, `fusion stream`); forecasts read only the store's releases"
        )
    return found, unverified


#: The columns of `forecasts` that scoring a forecast's window reads (forecasting.rows.score_rows).
SCORED_COLUMNS = (
    "forecast_id", "window_start", "purpose", "model", "metric", "statistic", "region", "origin", "horizon", "mean",
    "mase_scale", "release_sd", "release_ci80_low", "release_ci80_high", "release_ci95_low", "release_ci95_high",
)


def _pending(store: FusedStore, found: Sequence[Series]) -> pa.Table:
    """Live forecasts of these series not scored yet, of windows released by now: within the series read, up to
    the latest released window (a forecast's later windows wait for their releases), and only the columns scoring
    reads (a row's list of the releases its forecast read can be long)."""
    if store.versions.get("forecasts") is None:
        return pa.table({})
    metrics = ", ".join(quoted(m) for m in sorted({s.key.metric for s in found}))
    since = min(s.start for s in found)
    until = max(s.end for s in found)
    columns = ", ".join(f"f.{name}" for name in SCORED_COLUMNS)
    return read(
        store,
        f"SELECT {columns} FROM forecasts f ANTI JOIN forecast_scores s USING (forecast_id, window_start) "
        f"WHERE f.purpose = 'forecast' AND f.metric IN ({metrics}) "
        f"AND f.window_start >= TIMESTAMPTZ '{since.isoformat()}' "
        f"AND f.window_start < TIMESTAMPTZ '{until.isoformat()}' "
        # A forecast issued more than once (forecasting.issues) is scored once.
        "QUALIFY row_number() OVER (PARTITION BY f.forecast_id, f.window_start ORDER BY f.issued_at) = 1",
        what="the forecasts to score",
        settings="horizon",
    )


def _for(table: pa.Table, key: SeriesKey) -> pa.Table:
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    mask = pc.and_(
        pc.and_(pc.equal(table["metric"], key.metric), pc.equal(table["region"], key.region)),
        pc.equal(table["statistic"], str(key.statistic)),
    )
    return table.filter(mask)


def run_forecasts(
    config: Config,
    *,
    metrics: Sequence[str] | None = None,
    regions: Sequence[str] | None = None,
    statistics: Sequence[Statistic] | None = None,
    horizon: str | None = None,
    now: datetime | None = None,
) -> ForecastRun:
    """Score the live forecasts whose windows have been released since, then forecast each series from its latest
    window with the model and calibration its recorded backtest chose (`forecasting.selection`)."""
    chosen = settings(config)
    steps = horizon_windows(config, horizon)
    length = windows(config, chosen.history, "forecasting.history")
    days = period(config)
    issued_at = now or datetime.now(UTC)
    with open_store(config) as store:
        found, unverified = _series(config, store, metrics, regions, statistics, span=length * config.window)
        keys = [s.key for s in found]
        pending = _pending(store, found)
        choices = recorded_choices(
            store,
            keys,
            models=chosen.models,
            origins=chosen.backtest_origins,
            margin=chosen.selection_margin,
            t_min=chosen.selection_t,
        )
    outcomes: list[SeriesOutcome] = []
    scores = []
    for series in found:
        if pending.num_rows:
            scores.append(score_rows(_for(pending, series.key), series, issued_at))
        choice = choices.get(series.key, default_choice(chosen.models))
        origin = series.values.size
        past = series.history(origin, length, days)
        try:
            prediction = fit_forecast(choice.model, past, steps)
        except SeriesTooShort as exc:
            outcomes.append(SeriesOutcome(series.key, None, f"too short: {exc}"))
            continue
        issued = IssuedForecast(
            series=series,
            purpose=Purpose.FORECAST,
            model=choice.model,
            model_version=MODELS[choice.model].version,
            params={"fitted": prediction.params, "history_windows": int(past.values.size), **choice.basis,
                    **trust_record(series, unverified)},
            origin=origin,
            bands=intervals(
                prediction.mean, prediction.signal_var, noise_var=past.noise_ahead(steps), factor=choice.calibration
            ),
            factor=choice.factor,
            mase_scale=seasonal_naive_scale(past),
            input_release_ids=series.releases_before(origin, length),
        )
        outcomes.append(SeriesOutcome(series.key, issued, _describe(choice)))
    made = [o.forecast for o in outcomes if o.forecast is not None]
    if not made:
        reasons = "; ".join(f"{o.key}: {o.note}" for o in outcomes)
        raise FusionError(f"no series could be forecast ({reasons}); release more windows first")
    with open_store(config) as store:
        before = issued_before(store, made)
    outcomes = [_as_issued(o, before) for o in outcomes]
    tables = [forecast_rows(o.forecast, issued_at) for o in outcomes if o.forecast is not None and o.written]
    written = write_derived(config, "forecasts", pa.concat_tables(tables)) if tables else 0
    scored = write_derived(config, "forecast_scores", pa.concat_tables(scores)) if scores else 0
    return ForecastRun(issued_at, steps, outcomes, written, scored, found[0].releases_version,
                       unverified is not None, skipped_releases(found, unverified))


def _as_issued(outcome: SeriesOutcome, before: dict[str, Issue]) -> SeriesOutcome:
    """The outcome of a forecast issued before: not written where it is its series' latest forecast already, else
    issued again (forecasting.issues)."""
    issue = None if outcome.forecast is None else before.get(outcome.forecast.forecast_id)
    if outcome.forecast is None or issue is None:
        return outcome
    if issue.latest:
        return replace(outcome, written=False, issued_before=issue.first,
                       note=f"{outcome.note}; already issued at {_utc(issue.last)}, the series' latest: not written "
                       "again")
    return replace(outcome, issued_before=issue.first,
                   note=f"{outcome.note}; issued again (first at {_utc(issue.first)}): the series' latest again")


def _utc(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z"


def _span(length: timedelta) -> str:
    """A duration as people say it: '4 days', '30 hours', '45 minutes'."""
    for unit, size in (("day", timedelta(days=1)), ("hour", timedelta(hours=1))):
        if length >= size and not length % size:
            count = length // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{length // timedelta(minutes=1)} minutes"


def _describe(choice: Choice) -> str:
    if not choice.basis.get("calibrated"):
        return f"{choice.model}: no backtest recorded yet (`fusion backtest`), intervals uncalibrated"
    return f"{choice.model}: chosen by backtest, intervals x{choice.factor:.2f}"


def run_backtests(
    config: Config,
    *,
    metrics: Sequence[str] | None = None,
    regions: Sequence[str] | None = None,
    statistics: Sequence[Statistic] | None = None,
    horizon: str | None = None,
    origins: int | None = None,
    now: datetime | None = None,
) -> ForecastRun:
    """A rolling-origin backtest of every configured model on each series; every origin's forecasts and their
    scores are written (purpose 'backtest'; those a backtest recorded already are not written again), and the
    model a forecast would now choose is reported."""
    chosen = settings(config)
    plan = _BacktestPlan(
        steps=horizon_windows(config, horizon),
        length=windows(config, chosen.history, "forecasting.history"),
        step=windows(config, chosen.backtest_step, "forecasting.backtest_step"),
        least=windows(config, chosen.min_history, "forecasting.min_history"),
        count=origins or chosen.backtest_origins,
        issued_at=now or datetime.now(UTC),
    )
    span = (plan.length + (plan.count - 1) * plan.step + plan.steps) * config.window
    outcomes: list[SeriesOutcome] = []
    written = scored = 0
    with open_store(config) as store:
        found, unverified = _series(config, store, metrics, regions, statistics, span=span)
        for series in found:
            outcome, rows, scores = _backtest_series(config, store, series, plan, unverified)
            outcomes.append(outcome)
            written += rows
            scored += scores
    if not any(o.scores for o in outcomes):
        reasons = "; ".join(f"{o.key}: {o.note}" for o in outcomes)
        raise FusionError(f"no series could be backtested ({reasons})")
    return ForecastRun(plan.issued_at, plan.steps, outcomes, written, scored, found[0].releases_version,
                       unverified is not None, skipped_releases(found, unverified))


@dataclass(frozen=True)
class _BacktestPlan:
    """A backtest's settings, in windows: horizon, history, step between origins, least history, origins."""

    steps: int
    length: int
    step: int
    least: int
    count: int
    issued_at: datetime


def _backtest_series(
    config: Config, store: FusedStore, series: Series, plan: _BacktestPlan, unverified: dict[str, str] | None
) -> tuple[SeriesOutcome, int, int]:
    """One series' backtest, written: (its outcome, forecast rows written, scores written)."""
    chosen = settings(config)
    starts = rolling_origins(series.values.size, horizon=plan.steps, step=plan.step, count=plan.count,
                             min_history=plan.least)
    if len(starts) < 2:
        needed = _span((plan.least + plan.steps + plan.step) * config.window)
        return SeriesOutcome(
            series.key,
            None,
            f"too short: a backtest needs {needed} of released windows (min_history + horizon + one step); it has "
            f"{_span(series.values.size * config.window)}",
        ), 0, 0
    made = backtest(series.values, series.variances, period(config), models=chosen.models, origins=starts,
                    horizon=plan.steps, history=plan.length)
    issues: list[IssuedForecast] = []
    for model in chosen.models:
        mine = [f for f in made if f.model is model]
        for forecast, (calibration, bands) in zip(mine, calibrated(mine, series.values, series.variances), strict=True):
            issues.append(IssuedForecast(
                series=series,
                purpose=Purpose.BACKTEST,
                model=model,
                model_version=MODELS[model].version,
                params={
                    "fitted": forecast.prediction.params,
                    "history_windows": min(forecast.origin, plan.length),
                    "calibration": calibration.as_dict(),
                    **trust_record(series, unverified),
                },
                origin=forecast.origin,
                bands=bands,
                factor=calibration.factor,
                mase_scale=forecast.mase_scale,
                input_release_ids=series.releases_before(forecast.origin, plan.length),
            ))
    recorded = recorded_backtests(store, issues)  # a backtest run again with nothing new released
    tables = [forecast_rows(issued, plan.issued_at) for issued in issues if issued.forecast_id not in recorded]
    scores = [score_rows(rows, series, plan.issued_at) for rows in tables]
    # Written series by series: each row carries the releases its forecast read (hundreds, for a stream's hourly
    # releases), so a whole federation's backtest is not held at once.
    written = write_derived(config, "forecasts", pa.concat_tables(tables)) if tables else 0
    scored = write_derived(config, "forecast_scores", pa.concat_tables(scores)) if scores else 0
    results = score(made, series.values, series.variances)
    try:
        best = choose(
            results,
            origin_errors(made, series.values),
            default=chosen.models[0],
            margin=chosen.selection_margin,
            t_min=chosen.selection_t,
            overlap=origin_overlap(plan.steps, plan.step),
        )
    except SeriesTooShort as exc:
        return SeriesOutcome(series.key, None, str(exc), tuple(results)), written, scored
    note = f"chooses {best.model} (intervals x{best.factor:.2f})"
    return SeriesOutcome(series.key, None, note, tuple(results), best.model), written, scored


__all__ = [
    "ForecastRun",
    "SeriesOutcome",
    "horizon_windows",
    "period",
    "run_backtests",
    "run_forecasts",
    "settings",
    "windows",
]
