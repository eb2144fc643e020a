"""Which model forecasts a series, and its calibration factor, from the backtests recorded in the store.

`fusion backtest` writes each rolling origin's forecasts of every model, scored against the releases. A forecast
reads them back (through the SQL surface): over the series' latest `backtest_origins` origins, the first of
`[forecasting] models` is kept unless another's MAE is lower by more than `selection_margin` and its squared errors
are lower origin by origin (a paired test, `selection_t`, allowing for origins whose windows overlap:
forecasting.backtest.preferred), and the chosen model's calibration is learned on all of those origins' errors
(forecasting.intervals). Without a backtest, the first of `[forecasting] models` forecasts, uncalibrated (factor 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from forecasting.backtest import origin_overlap, preferred
from forecasting.intervals import Calibration
from forecasting.reads import in_groups, read, read_budget
from forecasting.series import SeriesKey, quoted
from fusion.config.forecasting import ModelName, Statistic
from fusion.store.access import FusedStore


@dataclass(frozen=True)
class Choice:
    """A series' model and calibration, and what they were learned on."""

    model: ModelName
    calibration: Calibration
    basis: dict[str, Any]

    @property
    def factor(self) -> float:
        return self.calibration.factor


def default_choice(models: Sequence[ModelName]) -> Choice:
    return Choice(models[0], Calibration(), {"selected_by": "default (no backtest recorded)", "calibrated": False})


def recorded_choices(
    store: FusedStore,
    keys: Sequence[SeriesKey],
    *,
    models: Sequence[ModelName],
    origins: int,
    margin: float,
    t_min: float = 2.0,
) -> dict[SeriesKey, Choice]:
    """The choice for each series with scored backtest forecasts of one of `models`."""
    if not keys or store.versions.get("forecast_scores") is None:
        return {}
    table = _latest_backtests(store, keys, models=models, origins=origins)
    if table.num_rows == 0:
        return {}
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    rows_of: dict[SeriesKey, list[int]] = {}
    for index, (m, s, r) in enumerate(zip(columns["metric"], columns["statistic"], columns["region"], strict=True)):
        rows_of.setdefault(SeriesKey(m, Statistic(s), r), []).append(index)
    out: dict[SeriesKey, Choice] = {}
    for key in set(keys) & set(rows_of):
        rows = np.zeros(table.num_rows, dtype=bool)
        rows[rows_of[key]] = True
        latest = np.sort(np.unique(columns["origin"][rows]))  # the series' latest `origins` origins, as read
        error = columns["error"].astype(float)
        ahead = (columns["window_start"][rows] - columns["origin"][rows]) // np.timedelta64(1, "s")
        step = int(ahead[ahead > 0].min()) if (ahead > 0).any() else 1  # the series' window, in seconds
        mae, errors = {}, {}
        for model in models:
            scored = rows & (columns["model"] == str(model)) & np.isfinite(error)
            if scored.any():
                mae[str(model)] = float(np.abs(error[scored]).mean())
                errors[model] = _by_origin(columns, scored, error, step)
        if not mae:
            continue
        # Backtest origins closer than a forecast's reach score some of the same windows (`paired_t`'s overlap).
        spacing = int(np.diff(latest).min() // np.timedelta64(step, "s")) if latest.size > 1 else 1
        reach = max((e.size for by_origin in errors.values() for e in by_origin.values()), default=1)
        overlap = origin_overlap(reach, spacing)
        best = preferred(errors, default=models[0], margin=margin, t_min=t_min, overlap=overlap)
        chosen = rows & (columns["model"] == str(best)) & np.isfinite(error)
        raw_sd = columns["sd"][chosen].astype(float) / columns["calibration_factor"][chosen].astype(float)
        calibration = Calibration.fit(error[chosen], raw_sd**2, columns["noise_sd"][chosen].astype(float) ** 2)
        out[key] = Choice(
            best,
            calibration,
            {
                "selected_by": f"backtest: errors against later releases ({models[0]} unless another's MAE is "
                f"over {margin:.0%} lower and its squared errors lower origin by origin, paired t <= -{t_min:g})",
                "backtest_origins": [str(o) for o in latest],
                "backtest_mae": mae,
                "calibrated": True,
                "calibration": calibration.as_dict(),
            },
        )
    return out


def _latest_backtests(
    store: FusedStore, keys: Sequence[SeriesKey], *, models: Sequence[ModelName], origins: int
) -> pa.Table:
    """The scored backtest forecasts of `models` from each series' latest `origins` origins (the latest backtest's
    forecast of each model, origin and window), a few series at a time: a store keeps every backtest ever run, and
    only the latest origins choose and calibrate."""
    names = ", ".join(quoted(str(m)) for m in models)
    statistics = ", ".join(quoted(str(s)) for s in sorted({k.statistic for k in keys}))
    reach = store.sql(  # the longest backtest horizon recorded: a series' rows are at most origins x models x it
        "SELECT coalesce(max(horizon), 1) AS h FROM forecasts WHERE purpose = 'backtest'"
    ).column("h")[0].as_py()
    parts = []
    for metric in sorted({k.metric for k in keys}):
        regions = sorted({k.region for k in keys if k.metric == metric})
        rows_each = origins * len(models) * int(reach) * len({k.statistic for k in keys})
        for group in in_groups(regions, rows_each=rows_each, budget=read_budget(store)):
            parts.append(read(
                store,
                "SELECT * FROM (SELECT f.metric, f.statistic, f.region, f.model, f.origin, f.window_start, f.sd, "
                "f.calibration_factor, s.error, s.noise_sd FROM forecasts f JOIN forecast_scores s "
                f"USING (forecast_id, window_start) WHERE f.purpose = 'backtest' AND f.metric = {quoted(metric)} "
                f"AND f.region IN ({', '.join(map(quoted, group))}) AND f.statistic IN ({statistics}) "
                f"AND f.model IN ({names}) "
                # The latest backtest's forecast of each model, origin and window ...
                "QUALIFY row_number() OVER (PARTITION BY f.metric, f.statistic, f.region, f.model, f.origin, "
                "f.window_start ORDER BY f.issued_at DESC) = 1) "
                # ... from the series' latest `origins` origins.
                "QUALIFY dense_rank() OVER (PARTITION BY metric, statistic, region ORDER BY origin DESC) "
                f"<= {int(origins)}",
                what=f"the backtests of {metric}",
                settings="horizon of a backtest (or backtest_origins)",
            ))
    return pa.concat_tables(parts) if parts else pa.table({})


def _by_origin(columns: dict[str, np.ndarray], rows: np.ndarray, error: np.ndarray, step: int) -> dict[Any, np.ndarray]:
    """The errors of `rows` (one model's) by origin, each over the origin's windows in order, `step` seconds apart
    (NaN where the model has none): so that two models' errors at an origin line up window by window."""
    out = {}
    for origin in np.unique(columns["origin"][rows]):
        at = rows & (columns["origin"] == origin)
        ahead = (columns["window_start"][at] - origin) // np.timedelta64(step, "s")
        line = np.full(int(ahead.max()) + 1, np.nan)
        line[ahead.astype(np.int64)] = error[at]
        out[origin] = line
    return out


__all__ = ["Choice", "default_choice", "recorded_choices"]
