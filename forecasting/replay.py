"""Replay of a stored forecast from what its rows record: the check a `forecasts` row gets in place of a signature.

Rows of `forecasts` are not signed, and anyone able to write to the store can append one. A forecast is
post-processing of releases, though, so it is checked by computing it again, with no key. `ForecastReplay` takes one
issue of a forecast (its rows of one `issued_at`) and
- checks that they are one forecast: horizons 1 to h, each once, at most MAX_HORIZON_WINDOWS;
- refuses a model or model version this Fusion does not have, a calibration outside the bounds every calibration is
  kept in (FACTOR_BOUNDS), a history past MAX_HISTORY_WINDOWS (or the configured one where longer), and input
  releases that `fusion verify` does not call verified or legacy;
- recomputes `forecast_id` from what the rows record (purpose, model and version, series, origin, horizon,
  `input_release_ids`, calibration factor and `params`): an id made up, or a row's record changed under a genuine
  id, does not match;
- reads the history the rows name, through the sandboxed SQL as forecasting reads it: the series' releases at
  `releases_version`, the `history_windows` windows before the origin, each window's latest release among
  `input_release_ids`; the releases that history reads must be exactly those;
- fits the recorded model to it again, applies the recorded calibration (`params`) and compares every value column
  (mean, sd, the 80/95% bounds, noise_sd, the release_* columns, calibration_factor, mase_scale) within REPLAY_RTOL,
  every other column exactly. For the closed-form models (`profile`, `seasonal_naive`, `same_hour_mean`) the values
  and fitted parameters are the refit's: `params` does not hold all of a fit (`profile`'s daily shape is not
  recorded), and a refit is deterministic. `uc` and `ets` take their parameters from statsmodels' optimiser, which
  stops elsewhere within its tolerance on another machine's BLAS; their values are computed at the recorded
  parameters, and those must be the refit's optimum: within OPTIMUM_RTOL of its parameters, the history's
  log-likelihood at them short of the refit's by at most OPTIMUM_LOGLIKE.

What replay does not check are the choices a run makes before it fits, which the rows record and `forecast_id`
covers: the model (chosen by backtest), the calibration (learned from backtests, themselves forecasts), the
history's length (at most MAX_HISTORY_WINDOWS, or the configured one) and the origin. A forecast that replays is
one Fusion computes from verified releases under those choices. Each forecast is computed again once per
`ForecastReplay` (per forecast_id and releases_version), however many of its issues are checked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from forecasting.intervals import FACTOR_BOUNDS, Calibration, intervals
from forecasting.models import MODELS, Prediction, SeriesTooShort, fit_forecast, seasonal_naive_scale
from forecasting.reads import read
from forecasting.rows import IssuedForecast, forecast_id_of, forecast_rows
from forecasting.run import period, settings, windows
from forecasting.series import COLUMNS, SeriesKey, on_grid, quoted
from fusion.config.forecasting import MAX_HORIZON_WINDOWS, ModelName, Statistic
from fusion.errors import FusionError
from fusion.store.access import FusedStore, open_store
from schemas.tables import FORECASTS_SCHEMA

#: How far a recomputed value may be from the stored one, relative to it (or to the forecast's scale, for a value
#: near 0): rounding on another machine's floating point, not a change anyone could use (0.1 W of a 100 MW load).
REPLAY_RTOL = 1e-6
#: The longest history (in windows) replay fits again, or the configured `[forecasting] history` where that is longer:
#: a bound on what one forged row can make replay cost, not a check of the config (which may have changed since).
MAX_HISTORY_WINDOWS = 10_000
#: The columns compared within REPLAY_RTOL; every other column of FORECASTS_SCHEMA but `issued_at` exactly.
VALUE_COLUMNS = (
    "mean", "sd", "ci80_low", "ci80_high", "ci95_low", "ci95_high", "noise_sd", "release_sd", "release_ci80_low",
    "release_ci80_high", "release_ci95_low", "release_ci95_high", "calibration_factor", "mase_scale",
)
#: For `uc` and `ets`, whose parameters an optimiser finds: how far the recorded parameters may be from those fitted
#: again, relative to the larger (or to OPTIMUM_FLOOR, for one near 0; both models fit the series standardised to
#: mean 0 and variance 1, so their parameters are of order 1 or less), and how far the log-likelihood of the history at
#: the recorded parameters may fall short of that at the parameters fitted again. Another machine's BLAS kernels
#: stop the optimiser elsewhere within its convergence tolerance: on the demo's store, parameters up to 2.4e-4 apart
#: (2.1e-3 of the floor), log-likelihoods within 1e-6.
OPTIMUM_RTOL = 1e-2
OPTIMUM_FLOOR = 1e-2
OPTIMUM_LOGLIKE = 0.05
_EXACT_COLUMNS = tuple(n for n in FORECASTS_SCHEMA.names if n not in VALUE_COLUMNS and n != "issued_at")
#: A calibration's scales may sit at FACTOR_BOUNDS after exp(log(bound)): this much past them is rounding.
_BOUND_SLACK = 1e-9


@dataclass(frozen=True)
class _Recorded:
    """What an issue's rows record that determines its forecast."""

    forecast_id: str
    purpose: str
    model: ModelName
    key: SeriesKey
    origin: datetime
    horizon: int
    history: int
    releases_version: int
    inputs: list[str]
    params: dict[str, Any]
    calibration: Calibration


@dataclass(frozen=True)
class _Computed:
    """A forecast computed again: its rows (issued_at aside; for a model fitted by an optimiser, at the recorded
    parameters), the parameters fitted again, and for such a model the log-likelihood of the history at those and at
    the recorded parameters."""

    rows: pa.Table
    fitted: dict[str, float]
    loglike: float | None = None
    recorded_loglike: float | None = None


class ForecastReplay:
    """Checks forecasts in `store` by computing them again from the releases they name; `unverified`: the releases
    `fusion verify` does not call verified or legacy, with their status (a forecast that read one does not replay).
    Close it after use (it opens the store again at each other releases_version it reads)."""

    def __init__(self, store: FusedStore, *, unverified: Mapping[str, str] | None = None) -> None:
        self._store = store
        self._unverified = dict(unverified or {})
        self._checked: dict[tuple[str, datetime], str | None] = {}
        self._computed: dict[tuple[str, int], _Computed | str] = {}
        self._snapshots: dict[int, FusedStore] = {}

    def why_not(self, forecast_id: str, issued_at: datetime) -> str | None:
        """None where the issue of `forecast_id` at `issued_at` replays; else why not, a clause ('its mean at
        2026-01-02T01:00Z is 9, 10.02 computed again')."""
        key = (forecast_id, issued_at)
        if key not in self._checked:
            self._checked[key] = self._check(forecast_id, self._rows(forecast_id, issued_at))
        return self._checked[key]

    def window(self, forecast_id: str, window_start: datetime) -> tuple[float, float] | str:
        """(mean, sd) of `forecast_id` for the window at `window_start`, from its latest issue that replays; where none
        does, why its latest issue does not (or that the store holds no such window of it)."""
        issues = read(
            self._store,
            f"SELECT issued_at, mean, sd FROM forecasts WHERE forecast_id = {quoted(forecast_id)} AND window_start = "
            f"TIMESTAMPTZ '{window_start.astimezone(UTC).isoformat()}' ORDER BY issued_at DESC",
            what=f"the issues of forecast {forecast_id}",
            settings="horizon",
        ).to_pylist()
        latest: str | None = None  # why the latest issue does not replay
        for issue in issues:
            why = self.why_not(forecast_id, issue["issued_at"])
            if why is None:
                return float(issue["mean"]), float(issue["sd"])
            latest = latest or why
        return latest or f"the store holds no row of it for {window_start.astimezone(UTC):%Y-%m-%dT%H:%MZ}"

    def close(self) -> None:
        for snapshot in self._snapshots.values():
            snapshot.close()
        self._snapshots.clear()

    def __enter__(self) -> ForecastReplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, forecast_id: str, issued_at: datetime) -> pa.Table:
        return read(
            self._store,
            f"SELECT * FROM forecasts WHERE forecast_id = {quoted(forecast_id)} AND issued_at = "
            f"TIMESTAMPTZ '{issued_at.astimezone(UTC).isoformat()}' ORDER BY horizon, window_start",
            what=f"the rows of forecast {forecast_id}",
            settings="horizon",
        )

    def _check(self, forecast_id: str, rows: pa.Table) -> str | None:
        recorded = self._recorded(forecast_id, rows)
        if isinstance(recorded, str):
            return recorded
        bad = sorted(r for r in recorded.inputs if r in self._unverified)
        if bad:
            named = ", ".join(f"{r} ({self._unverified[r]})" for r in bad)
            return f"it read release(s) that `fusion verify` does not call verified or legacy: {named}"
        key = (forecast_id, recorded.releases_version)
        if key not in self._computed:
            self._computed[key] = self._compute(recorded)
        computed = self._computed[key]
        if isinstance(computed, str):
            return computed
        return _difference(rows, computed, recorded)

    def _recorded(self, forecast_id: str, rows: pa.Table) -> _Recorded | str:
        """What the rows record, or why they cannot be a forecast Fusion issued."""
        if rows.num_rows == 0:
            return "the store holds no rows of it"
        first = rows.slice(0, 1).to_pylist()[0]
        horizons = rows.column("horizon").to_pylist()
        if horizons != list(range(1, len(horizons) + 1)) or len(horizons) > MAX_HORIZON_WINDOWS:
            return (f"its {len(horizons)} rows are not one forecast's windows (horizons {_span(horizons)}; a forecast "
                    f"has horizons 1 to h, each once, h at most {MAX_HORIZON_WINDOWS})")
        try:
            model = ModelName(first["model"])
            statistic = Statistic(first["statistic"])
        except ValueError:
            return f"model {first['model']!r} or statistic {first['statistic']!r} is not one of Fusion's"
        if first["model_version"] != MODELS[model].version:
            return (f"it was made by {model} version {first['model_version']!r}, which this Fusion does not have "
                    f"({MODELS[model].version!r}): it cannot be computed again here")
        try:
            params = json.loads(first["params"])
        except ValueError:
            params = None
        history = params.get("history_windows") if isinstance(params, dict) else None
        if not isinstance(params, dict) or not isinstance(params.get("fitted"), dict) or type(history) is not int:
            return "its params do not record the fitted parameters and the history's length as a forecast's do"
        # Not the configured history: a forecast fitted before `[forecasting] history` was shortened is still what
        # Fusion computed from the releases it names. The bound is on replay's cost.
        longest = max(MAX_HISTORY_WINDOWS, windows(self._store.config, settings(self._store.config).history,
                                                   "forecasting.history"))
        if not 0 < history <= longest:
            return (f"its history of {history} windows is not within the 1 to {longest} windows a forecast is "
                    "computed again from")
        calibration = _calibration(params)
        if isinstance(calibration, str):
            return calibration
        recorded = _Recorded(
            forecast_id, first["purpose"], model, SeriesKey(first["metric"], statistic, first["region"]),
            first["origin"], len(horizons), history, int(first["releases_version"]),
            list(first["input_release_ids"] or ()), params, calibration,
        )
        named = forecast_id_of(recorded.purpose, str(model), first["model_version"], recorded.key, recorded.origin,
                               recorded.horizon, recorded.inputs, calibration.factor, params)
        if named != forecast_id:
            return (f"its forecast_id is not the one its model, series, origin, horizon, input releases, calibration "
                    f"and params name ({named})")
        return recorded

    def _compute(self, recorded: _Recorded) -> _Computed | str:
        """The forecast computed again from the releases it names, or why it cannot be."""
        store = self._releases_at(recorded.releases_version)
        if isinstance(store, str):
            return store
        config = self._store.config
        step = config.window
        begin = recorded.origin - recorded.history * step
        value, sd = COLUMNS[recorded.key.statistic]
        table = read(
            store,
            f"SELECT metric, unit, region, window_start, released_at, release_id, {value}, {sd} FROM releases "
            f"WHERE metric = {quoted(recorded.key.metric)} AND region = {quoted(recorded.key.region)} "
            f"AND window_start >= TIMESTAMPTZ '{begin.astimezone(UTC).isoformat()}' "
            f"AND window_start < TIMESTAMPTZ '{recorded.origin.astimezone(UTC).isoformat()}'",
            what=f"the history of forecast {recorded.forecast_id}",
            settings="history",
        )
        table = _latest_of(table, recorded.inputs)
        if table.num_rows == 0:
            return (f"none of the releases it names holds a window of its history at releases_version "
                    f"{recorded.releases_version}")
        try:
            series = on_grid(recorded.key, table, step, recorded.releases_version, start=begin,
                             windows=recorded.history)
        except FusionError as exc:
            return f"its history cannot be read again: {exc}"
        found = series.releases_before(recorded.history, recorded.history)
        if found != recorded.inputs:
            return _other_inputs(found, recorded.inputs, recorded.releases_version)
        past = series.history(recorded.history, recorded.history, period(config))
        try:
            refit: Prediction = fit_forecast(recorded.model, past, recorded.horizon)
        except SeriesTooShort as exc:
            return f"its history is too short to fit: {exc}"
        prediction = refit
        if MODELS[recorded.model].optimised:
            given = recorded.params["fitted"]
            if sorted(given) != sorted(refit.params) or not all(_number(v) for v in given.values()):
                return f"its fitted parameters are {_shown_fit(given)}, {sorted(refit.params)} fitted again"
            with np.errstate(all="ignore"):
                prediction = fit_forecast(recorded.model, past, recorded.horizon, at=given)
        issued = IssuedForecast(
            series=series,
            purpose=recorded.purpose,
            model=recorded.model,
            model_version=MODELS[recorded.model].version,
            params=recorded.params,
            origin=recorded.history,
            bands=intervals(prediction.mean, prediction.signal_var, noise_var=past.noise_ahead(recorded.horizon),
                            factor=recorded.calibration),
            factor=recorded.calibration.factor,
            mase_scale=seasonal_naive_scale(past),
            input_release_ids=found,
        )
        rows = forecast_rows(issued, issued_at=recorded.origin)  # issued_at: not compared
        return _Computed(rows, refit.params, refit.loglike, prediction.loglike if prediction is not refit else None)

    def _releases_at(self, version: int) -> FusedStore | str:
        """The store reading `releases` at `version` (this one where it reads that version already)."""
        current = self._store.versions.get("releases")
        if current is None or not 0 <= version <= current:
            return (f"its releases_version {version} is not one this store holds (it reads releases at version "
                    f"{current})")
        if version == current:
            return self._store
        if version not in self._snapshots:
            self._snapshots[version] = open_store(self._store.config, versions={"releases": version},
                                                  limits=self._store.limits)
        return self._snapshots[version]


def _calibration(params: dict[str, Any]) -> Calibration | str:
    """The calibration `params` records (none: factor 1), or why it is not one a forecast uses."""
    given = params.get("calibration")
    if given is None:
        return Calibration()
    try:
        calibration = Calibration(float(given["weight"]), float(given["low"]), float(given["high"]))
    except (KeyError, TypeError, ValueError):
        return "its params record a calibration without a weight, low and high scale"
    low, high = FACTOR_BOUNDS[0] * (1 - _BOUND_SLACK), FACTOR_BOUNDS[1] * (1 + _BOUND_SLACK)
    if not (0 <= calibration.weight <= 1 and low <= calibration.low <= high and low <= calibration.high <= high):
        return (f"its calibration (weight {calibration.weight:g}, scales {calibration.low:g} and {calibration.high:g}) "
                f"is outside the bounds every calibration is kept in (scales {FACTOR_BOUNDS[0]:g} to "
                f"{FACTOR_BOUNDS[1]:g})")
    return calibration


def _latest_of(table: pa.Table, inputs: list[str]) -> pa.Table:
    """Of `table` (a series' releases), the rows of `inputs`, each window's latest (by release time, then id: as
    forecasting.series.LATEST), in order of window."""
    if table.num_rows == 0 or not inputs:
        return table.slice(0, 0)
    table = table.filter(pc.is_in(table.column("release_id"), value_set=pa.array(sorted(set(inputs)))))
    table = table.sort_by([("window_start", "ascending"), ("released_at", "descending"),
                           ("release_id", "descending")])
    starts = table.column("window_start").to_pylist()
    first = [i for i, start in enumerate(starts) if i == 0 or start != starts[i - 1]]
    return table.take(pa.array(first, pa.int64()))


def _other_inputs(found: list[str], recorded: list[str], version: int) -> str:
    missing = [r for r in recorded if r not in found]
    if missing:
        return (f"release(s) it names hold no window of its history at releases_version {version}: "
                f"{_names(missing)}")
    return f"its history reads its input releases in another order ({_names(found)})"


def _difference(rows: pa.Table, computed: _Computed, recorded: _Recorded) -> str | None:
    """The first way `rows` differ from the forecast computed again, or None."""
    stored_fit = recorded.params["fitted"]
    if sorted(stored_fit) != sorted(computed.fitted):
        return f"its fitted parameters are {sorted(stored_fit)}, {sorted(computed.fitted)} fitted again"
    optimised = computed.recorded_loglike is not None
    for name, value in computed.fitted.items():
        given = stored_fit[name]
        if not _number(given):
            return f"its fitted {name} is {given!r}, {value:.6g} fitted again"
        near = (
            abs(float(given) - value) <= OPTIMUM_RTOL * max(abs(float(given)), abs(value), OPTIMUM_FLOOR)
            if optimised else _close(float(given), value, abs(value))
        )
        if not near:
            return f"its fitted {name} is {given}, {value:.6g} fitted again"
    if optimised:
        assert computed.loglike is not None and computed.recorded_loglike is not None
        short = computed.loglike - computed.recorded_loglike
        if not short <= OPTIMUM_LOGLIKE:  # NaN: not an optimum either
            return (f"its fitted parameters are not an optimum of its history: their log-likelihood is "
                    f"{computed.recorded_loglike:.6g}, {computed.loglike:.6g} fitted again")
    expected = computed.rows
    starts = [f"{s.astimezone(UTC):%Y-%m-%dT%H:%MZ}" for s in expected.column("window_start").to_pylist()]
    for name in _EXACT_COLUMNS:
        got, want = rows.column(name).to_pylist(), expected.column(name).to_pylist()
        for start, a, b in zip(starts, got, want, strict=True):
            if a != b:
                return f"its {name} at {start} is {_shown(a)}, {_shown(b)} computed again"
    scale = float(np.nanmax(np.abs(np.concatenate([expected.column(c).to_numpy() for c in ("mean", "sd")]))))
    for name in VALUE_COLUMNS:
        got, want = rows.column(name).to_pylist(), expected.column(name).to_pylist()
        for start, a, b in zip(starts, got, want, strict=True):
            if (a is None) != (b is None) or (a is not None and b is not None and not _close(a, b, scale)):
                return f"its {name} at {start} is {_shown(a)}, {_shown(b)} computed again"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _shown_fit(fit: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in sorted(fit.items())) + "}"


def _close(a: float, b: float, scale: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= REPLAY_RTOL * max(abs(a), abs(b), scale)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, datetime):
        return f"{value.astimezone(UTC):%Y-%m-%dT%H:%MZ}"
    if isinstance(value, list):
        return _names(value)
    return repr(value)


def _names(names: list[Any], most: int = 5) -> str:
    """'a, b, c and 3 more'."""
    return ", ".join(map(str, names[:most])) + (f" and {len(names) - most} more" if len(names) > most else "")


def _span(horizons: list[int]) -> str:
    return f"{min(horizons)} to {max(horizons)}" if horizons else "none"


__all__ = ["OPTIMUM_LOGLIKE", "OPTIMUM_RTOL", "REPLAY_RTOL", "VALUE_COLUMNS", "ForecastReplay"]
