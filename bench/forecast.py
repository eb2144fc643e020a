"""Forecasting benchmark: the models of forecasting/ on real hourly series with DP-like noise of known SD added.

Two sets of series, each its own table:
- observed weather (shipped offline in pvlib's data directory): dry-bulb temperature and relative humidity of the
  TMY3 records for Greensboro NC (723170) and Sand Point AK (703165), and of the TMY2 record for Miami FL (12839);
- climate normals: NOAA's hourly normals for Seattle and San Francisco (2010), as vega_datasets ships them (the
  series the research note behind issue 19's targets used, with Greensboro's temperature). A normal is a smooth
  average over many years: the daily mean moves by 0.02 of the series' SD from one day to the next, against 0.33-0.68
  for observed weather, so a forecast there is mostly the daily cycle and the season. Read from bench/.deps
  (`make bench-forecast` installs it; the table is skipped without it).
Releases are the true series plus Gaussian noise of SD k x the series' own SD (k = 0.1, 0.3, 1.0); each cell's
noise variance is known to the models, as a release's `mean_sd` is. 672 h of history, 48 h ahead, from 8 scored
origins a week apart (the later half of `--origins`, from mid-March; `--first-day 184` starts the history in early
July, so the scored origins run from late September into November). At each scored origin every model, and the
model chosen, is calibrated and chosen exactly as `fusion forecast` does after `fusion backtest` with the default
`[forecasting]` settings: from a backtest of `backtest_origins` (16) origins `backtest_step` (24 h) apart, the latest
ending at the origin (forecasting.backtest.rolling_origins), the first model (profile) unless another's MAE against
those releases is more than 10% lower (`selection_margin`) and its squared errors lower origin by origin (paired t
at most -2, `selection_t`: forecasting.backtest.preferred), and the calibration learned on those errors
(forecasting.backtest.learned_calibration).

    make bench-forecast                             # both tables, writes bench/results/forecast.json
    .venv/bin/python -m bench.forecast --levels 0.3 --no-normals   # a quicker run
    .venv/bin/python -m bench.forecast --first-day 184 --no-normals --out bench/results/forecast-autumn.json

Reported per noise level (over series): MAE against the truth relative to seasonal naive's (geometric mean over
series), coverage of the truth by the calibrated 80% and 95% intervals, coverage of the next release by the
calibrated 95% release interval, the median calibration SD factor, and the median time of one fit + forecast.
Under the chosen model's row, each coverage's 95% confidence interval (whole origins resampled): 48 scored origins
leave about +-0.04 on a coverage. The year-round table (`--no-year` skips it) scores `profile`, the choice at nearly
every origin, from every day of the year (about 1,900 origins), which narrows that to +-0.01.

The row `oracle` bounds what a profile-and-anomaly model can reach: it is told the true profile (each window's
mean, on the noise-free series, over the 29 days centred on it, so the future included) and forecasts the
anomaly about it linearly from the last true anomaly and the last day's mean true anomaly, with coefficients
fitted per hour ahead on the whole year of the truth (in-sample). Its MAE is over the same scored origins,
relative to the same seasonal naive (on the releases).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from forecasting.backtest import (
    backtest,
    learned_calibration,
    origin_errors,
    origin_overlap,
    preferred,
    rolling_origins,
)
from forecasting.intervals import intervals
from fusion.config.forecasting import ForecastingConfig, ModelName
from fusion.runtime.durations import parse_duration

HISTORY = 672
HORIZON = 48
STEP = 168
LEVELS = (0.1, 0.3, 1.0)
FIRST_ORIGIN = 24 * 45  # mid-February: leaves the year's end for later origins
MARGIN = ForecastingConfig().selection_margin
SELECTION_T = ForecastingConfig().selection_t
#: As a forecast learns its model and calibration: from `backtest_origins` backtest origins `backtest_step` apart.
CALIBRATION_ORIGINS = ForecastingConfig().backtest_origins
BACKTEST_STEP = parse_duration(ForecastingConfig().backtest_step) // timedelta(hours=1)  # hourly cells
OVERLAP = origin_overlap(HORIZON, BACKTEST_STEP)
#: Days either side of a window that the oracle's true profile averages over.
ORACLE_HALF_DAYS = 14


def load_series() -> dict[str, np.ndarray]:
    """The real hourly series, by name (8,760 values each)."""
    import pvlib
    from pvlib.iotools import read_tmy2

    from fusion.demo.data import load_station

    out: dict[str, np.ndarray] = {}
    for station in ("greensboro", "sandpoint"):
        data = load_station(station)
        order = np.argsort(data["hour_of_year"])
        out[f"{station} air_temp"] = data["air_temp"][order]
        out[f"{station} humidity"] = data["humidity"][order]
    miami, _ = read_tmy2(str(Path(pvlib.__path__[0]) / "data" / "12839.tm2"))
    out["miami air_temp"] = miami["DryBulb"].to_numpy(dtype=float) / 10.0
    out["miami humidity"] = miami["RHum"].to_numpy(dtype=float)
    return out


def noisy_releases(truth: np.ndarray, level: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The releases of `truth` (Gaussian noise of SD `level` x its SD, seeded) and each cell's noise variance."""
    sd = level * float(truth.std())
    released = truth + np.random.default_rng(seed).normal(0.0, sd, truth.size)
    return released, np.full(truth.size, sd**2)


def run_series(
    truth: np.ndarray, level: float, *, origins: int, seed: int, models: list[ModelName], first: int = FIRST_ORIGIN
) -> dict:
    """Every model's forecasts from the scored origins (the later half of `origins` weekly ones after `first`),
    each calibrated, and the model chosen, as `fusion forecast` would at that origin with the default `[forecasting]`
    settings: from a backtest of `backtest_origins` origins `backtest_step` apart, the latest ending at the origin."""
    released, variances = noisy_releases(truth, level, seed)
    scored = [first + HISTORY + k * STEP for k in range(origins)][origins // 2 :]
    live = {
        o: rolling_origins(o, horizon=HORIZON, step=BACKTEST_STEP, count=CALIBRATION_ORIGINS, min_history=HISTORY)
        for o in scored
    }
    wanted = sorted({*scored, *(b for starts in live.values() for b in starts)})
    began = time.perf_counter()
    made = backtest(released, variances, 24, models=models, origins=wanted, horizon=HORIZON, history=HISTORY)
    elapsed = time.perf_counter() - began
    at = {(f.model, f.origin): f for f in made}
    out: dict = {"fit_s": elapsed / max(len(made), 1)}
    totals: dict[str, dict[str, list]] = {}
    chosen_models = []
    for o in scored:
        past = [at[m, b] for m in models for b in live[o] if (m, b) in at]
        pick = preferred(
            origin_errors(past, released), default=models[0], margin=MARGIN, t_min=SELECTION_T, overlap=OVERLAP
        )
        chosen_models.append(str(pick))
        window = slice(o, o + HORIZON)
        true, noisy = truth[window], released[window]
        for name, model in [*((str(m), m) for m in models), ("chosen", pick)]:
            f = at[model, o]
            calibration = learned_calibration([p for p in past if p.model is model], released, variances)
            bands = intervals(f.prediction.mean, f.prediction.signal_var, noise_var=f.noise_var, factor=calibration)
            row = totals.setdefault(
                name, {"errors": [], "80": [], "95": [], "release95": [], "factor": [], "per_origin": []}
            )
            row["errors"].append(np.abs(true - f.prediction.mean))
            row["80"].append((true >= bands.ci80[0]) & (true <= bands.ci80[1]))
            row["95"].append((true >= bands.ci95[0]) & (true <= bands.ci95[1]))
            row["release95"].append((noisy >= bands.release_ci95[0]) & (noisy <= bands.release_ci95[1]))
            row["factor"].append(calibration.factor)
            row["per_origin"].append([float(row[k][-1].mean()) for k in ("80", "95", "release95")])
    naive = float(np.concatenate(totals[str(ModelName.SEASONAL_NAIVE)]["errors"]).mean())
    for name, row in totals.items():
        mae = float(np.concatenate(row["errors"]).mean())
        out[name] = {
            "mae": mae,
            "mae_ratio": mae / naive,
            "coverage80": float(np.concatenate(row["80"]).mean()),
            "coverage95": float(np.concatenate(row["95"]).mean()),
            "release_coverage95": float(np.concatenate(row["release95"]).mean()),
            "factor": float(np.median(row["factor"])),
            "per_origin": row["per_origin"],  # each scored origin's coverage80, coverage95, release_coverage95
        }
    out["chosen"]["models"] = chosen_models
    return out


def resampled_interval(per_origin: np.ndarray, resamples: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """The 95% confidence interval of each column's mean (rows: scored origins), resampling whole origins: a 48 h
    forecast's errors move together, so its windows are not independent draws."""
    rng = np.random.default_rng(0)
    draws = np.array(
        [per_origin[rng.integers(0, len(per_origin), len(per_origin))].mean(axis=0) for _ in range(resamples)]
    )
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    return low, high


def oracle_ratio(truth: np.ndarray, level: float, *, origins: int, seed: int, first: int = FIRST_ORIGIN) -> float:
    """The oracle's MAE against the truth over seasonal naive's (on the releases of `seed`), on the scored origins:
    see the module's docstring."""
    released, _ = noisy_releases(truth, level, seed)
    days = 24
    shifted = np.array([np.roll(truth, k * days) for k in range(-ORACLE_HALF_DAYS, ORACLE_HALF_DAYS + 1)])
    profile = shifted.mean(axis=0)
    edge = ORACLE_HALF_DAYS * days
    profile[:edge], profile[-edge:] = np.nan, np.nan
    anomaly = truth - profile
    day_mean = np.convolve(anomaly, np.ones(days) / days, "full")[: truth.size]  # mean of the last 24 cells
    fitted_on = np.arange(edge + days, truth.size - edge - HORIZON)
    starts = np.array([first + HISTORY + k * STEP for k in range(origins)][origins // 2 :])
    ahead = np.arange(1, HORIZON + 1)
    naive = released[starts[:, None] - 1 + ahead - np.ceil(ahead / days).astype(int) * days]
    forecast = np.empty((starts.size, HORIZON))
    inputs = np.column_stack([anomaly[fitted_on - 1], day_mean[fitted_on - 1]])
    latest = np.column_stack([anomaly[starts - 1], day_mean[starts - 1]])
    for h in ahead:
        beta, *_ = np.linalg.lstsq(inputs, anomaly[fitted_on + h - 1], rcond=None)
        forecast[:, h - 1] = profile[starts + h - 1] + latest @ beta
    true = truth[starts[:, None] + ahead - 1]
    return float(np.abs(true - forecast).mean() / np.abs(true - naive).mean())


def year_round(
    series: dict[str, np.ndarray], levels: list[float], *, step: int = 24, title: str = "profile"
) -> dict[str, dict[str, Any]]:
    """The intervals of `profile` (the default model, and the choice at nearly every origin of the tables above)
    from every `step`-th window of the year, each calibrated as `fusion forecast` calibrates (on the backtest
    origins ending at it), with 95% confidence intervals of each coverage by resampling whole origins (a 48 h
    forecast's errors move together, so its windows are not independent). The weekly tables score 48 origins per
    level: their coverages carry a sampling error of about +-0.04, which this table (some 1,950 origins) narrows to
    +-0.01. Also by hour of the day (the window's hour, over every origin): the lowest and highest coverage of the
    24 hours, which a coverage over all hours can hide."""
    out: dict[str, dict[str, Any]] = {}
    first = HISTORY + CALIBRATION_ORIGINS * BACKTEST_STEP + HORIZON
    print(
        f"\n{title}: profile from every {step}th window of the year (from window {first}), calibrated as above; "
        "coverage with its 95% confidence interval (origins resampled), and its range over the hours of the day:"
    )
    print(
        f"{'k':>4} {'origins':>7} {'cov80 true':>20} {'cov95 true':>20} {'cov95 rel':>20} {'factor':>6} "
        f"{'80% by hour':>12} {'95% by hour':>12}"
    )
    for level in levels:
        rows = []
        hourly = np.zeros((2, 24))
        counted = np.zeros(24)
        for i, truth in enumerate(series.values()):
            released, variances = noisy_releases(truth, level, i)
            starts = list(range(HISTORY, truth.size - HORIZON + 1, BACKTEST_STEP))
            made = backtest(
                released, variances, 24, models=[ModelName.PROFILE], origins=starts, horizon=HORIZON, history=HISTORY
            )
            at = {f.origin: f for f in made}
            for o in range(first, truth.size - HORIZON + 1, step):
                live = rolling_origins(
                    o, horizon=HORIZON, step=BACKTEST_STEP, count=CALIBRATION_ORIGINS, min_history=HISTORY
                )
                calibration = learned_calibration([at[b] for b in live if b in at], released, variances)
                f = at[o]
                bands = intervals(f.prediction.mean, f.prediction.signal_var, noise_var=f.noise_var, factor=calibration)
                true, noisy = truth[o : o + HORIZON], released[o : o + HORIZON]
                inside80 = (true >= bands.ci80[0]) & (true <= bands.ci80[1])
                inside95 = (true >= bands.ci95[0]) & (true <= bands.ci95[1])
                hours = (o + np.arange(HORIZON)) % 24
                np.add.at(hourly[0], hours, inside80)
                np.add.at(hourly[1], hours, inside95)
                np.add.at(counted, hours, 1)
                rows.append(
                    (
                        np.mean(inside80),
                        np.mean(inside95),
                        np.mean((noisy >= bands.release_ci95[0]) & (noisy <= bands.release_ci95[1])),
                        calibration.factor,
                    )
                )
        table = np.array(rows)
        low, high = resampled_interval(table[:, :3])
        mean = table[:, :3].mean(axis=0)
        names = ("coverage80", "coverage95", "release_coverage95")
        out[str(level)] = {
            "origins": float(len(table)),
            **{n: float(m) for n, m in zip(names, mean, strict=True)},
            **{f"{n}_ci": [float(a), float(b)] for n, a, b in zip(names, low, high, strict=True)},
            "factor": float(np.median(table[:, 3])),
            "coverage80_by_hour": [float(c) for c in hourly[0] / counted],
            "coverage95_by_hour": [float(c) for c in hourly[1] / counted],
        }
        by_hour = hourly / counted
        cells = " ".join(f"{m:>8.3f} [{a:.3f}, {b:.3f}]" for m, a, b in zip(mean, low, high, strict=True))
        spans = " ".join(f"{f'{h.min():.2f}-{h.max():.2f}':>12}" for h in by_hour)
        print(f"{level:>4} {len(table):>7} {cells} {np.median(table[:, 3]):>6.2f} {spans}")
    return out


def time_fit(model: ModelName, truth: np.ndarray, repeats: int = 5) -> float:
    """Median seconds of one fit + 48 h forecast of `model` on four weeks (672 h) of hourly cells."""
    from forecasting.models import History, fit_forecast

    rng = np.random.default_rng(0)
    sd = 0.3 * float(truth.std())
    values = truth[FIRST_ORIGIN : FIRST_ORIGIN + HISTORY] + rng.normal(0, sd, HISTORY)
    history = History(values, np.full(HISTORY, sd**2), 24)
    fit_forecast(model, history, HORIZON)  # imports statsmodels where the model needs it
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fit_forecast(model, history, HORIZON)
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def irradiance() -> dict[str, np.ndarray]:
    """Global horizontal irradiance of the Greensboro and Sand Point TMY3 records (W/m2): zero every night, its
    spread all in the daytime. Only in the year-round table, where its coverage by hour of the day shows what one
    variance for every hour does there."""
    from fusion.demo.data import load_station

    out = {}
    for station in ("greensboro", "sandpoint"):
        data = load_station(station)
        out[f"{station} ghi"] = data["ghi"][np.argsort(data["hour_of_year"])]
    return out


def load_normals() -> dict[str, np.ndarray] | None:
    """NOAA's hourly climate normals for Seattle and San Francisco (2010, degrees F), as vega_datasets ships them;
    None where that package is neither in bench/.deps (`make bench` installs it there) nor on the path. The CSVs
    are read without importing the package (it is not in the main venv)."""
    import csv
    import importlib.util

    data = Path(__file__).parent / ".deps" / "vega_datasets" / "_data"
    if not data.is_dir():
        spec = importlib.util.find_spec("vega_datasets")
        if spec is None or spec.origin is None:
            return None
        data = Path(spec.origin).parent / "_data"
    out: dict[str, np.ndarray] = {}
    for city in ("seattle", "sf"):
        with open(data / f"{city}-temps.csv", newline="") as f:
            out[f"{city} normals"] = np.array([float(row["temp"]) for row in csv.DictReader(f)])
    return out


def day_to_day(truth: np.ndarray) -> float:
    """The SD of the change of the daily mean from one day to the next, over the series' SD: how much weather (as
    against the seasons and the daily cycle) the series holds."""
    days = truth[: truth.size // 24 * 24].reshape(-1, 24).mean(axis=1)
    return float(np.diff(days).std() / truth.std())


def run_set(
    series: dict[str, np.ndarray], levels: list[float], origins: int, models: list[ModelName], first: int = FIRST_ORIGIN
) -> dict:
    """Every model on every series at every noise level; prints a table and returns the results."""
    results: dict = {
        "series": list(series),
        "day_to_day": {name: day_to_day(truth) for name, truth in series.items()},
        "levels": {},
    }
    print(
        f"{len(series)} series x {origins - origins // 2} scored origins a week apart, each chosen and calibrated "
        f"on {CALIBRATION_ORIGINS} backtest origins {BACKTEST_STEP} h apart, "
        f"{HISTORY} h history, {HORIZON} h ahead; day-to-day change of the daily mean over the series' SD: "
        + ", ".join(f"{name} {value:.3f}" for name, value in results["day_to_day"].items())
    )
    header = (
        f"{'k':>4} {'model':>15} {'MAE/snaive':>10} {'cov80 true':>10} {'cov95 true':>10} {'cov95 rel':>9} "
        f"{'factor':>6}"
    )
    print(header)
    for level in levels:
        per_series = {
            name: run_series(truth, level, origins=origins, seed=i, models=models, first=first)
            for i, (name, truth) in enumerate(series.items())
        }
        summary: dict[str, dict[str, Any]] = {}
        for model in [*models, "chosen"]:
            rows = [per_series[name][str(model)] for name in series]
            summary[str(model)] = {
                "mae_ratio": float(np.exp(np.mean(np.log([r["mae_ratio"] for r in rows])))),
                "coverage80": float(np.mean([r["coverage80"] for r in rows])),
                "coverage95": float(np.mean([r["coverage95"] for r in rows])),
                "release_coverage95": float(np.mean([r["release_coverage95"] for r in rows])),
                "factor": float(np.median([r["factor"] for r in rows])),
            }
            s = summary[str(model)]
            print(
                f"{level:>4} {model!s:>15} {s['mae_ratio']:>10.3f} {s['coverage80']:>10.3f} "
                f"{s['coverage95']:>10.3f} {s['release_coverage95']:>9.3f} {s['factor']:>6.2f}"
            )
        pooled = np.array([o for name in series for o in per_series[name]["chosen"]["per_origin"]])
        low, high = resampled_interval(pooled)
        names = ("coverage80", "coverage95", "release_coverage95")
        summary["chosen"] |= {f"{n}_ci": [float(a), float(b)] for n, a, b in zip(names, low, high, strict=True)}
        print(
            f"{'':>4} {'(95% CI)':>15} {'':>10} "
            + " ".join(f"{f'{a:.2f}-{b:.2f}':>{w}}" for a, b, w in zip(low, high, (10, 10, 9), strict=True))
        )
        oracle = {
            name: oracle_ratio(truth, level, origins=origins, seed=i, first=first)
            for i, (name, truth) in enumerate(series.items())
        }
        summary["oracle"] = {"mae_ratio": float(np.exp(np.mean(np.log(list(oracle.values())))))}
        print(f"{level:>4} {'oracle':>15} {summary['oracle']['mae_ratio']:>10.3f}")
        results["levels"][str(level)] = {"summary": summary, "series": per_series, "oracle": oracle}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--origins", type=int, default=16, help="weekly origins after --first-day; the later half is scored"
    )
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS), help="noise SD / series SD")
    parser.add_argument("--models", nargs="+", default=[str(m) for m in ModelName], choices=[str(m) for m in ModelName])
    parser.add_argument(
        "--no-normals", action="store_true", help="skip the second table (climate normals, the research note's series)"
    )
    parser.add_argument(
        "--first-day",
        type=int,
        default=FIRST_ORIGIN // 24,
        help="day of the year where the first origin's history begins (45: mid-February; 184: early July)",
    )
    parser.add_argument(
        "--no-year", action="store_true", help="skip the year-round table of profile's intervals (daily origins)"
    )
    parser.add_argument("--out", default="bench/results/forecast.json")
    args = parser.parse_args()
    models = [ModelName(m) for m in args.models]
    if ModelName.SEASONAL_NAIVE not in models:
        models.append(ModelName.SEASONAL_NAIVE)
    series = load_series()
    print("Observed weather (TMY3 / TMY2 records):")
    first = 24 * args.first_day
    results: dict = {
        "origins": args.origins,
        "first_day": args.first_day,
        **run_set(series, args.levels, args.origins, models, first),
    }
    if not args.no_year:
        results["year_round"] = year_round(series, args.levels, title="Observed weather")
        results["year_round_irradiance"] = year_round(irradiance(), args.levels, title="Irradiance (GHI)")
    normals = None if args.no_normals else load_normals()
    if normals is not None:
        print("\nClimate normals (NOAA hourly normals for Seattle and San Francisco, vega_datasets):")
        results["normals"] = run_set(normals, args.levels, args.origins, models, first)
    elif not args.no_normals:
        print(
            "\n(climate normals skipped: vega_datasets is neither in bench/.deps nor on the path; `make bench` "
            "installs it there)"
        )
    for model in (ModelName.PROFILE, ModelName.UC):
        if model in models:
            seconds = time_fit(model, next(iter(series.values())))
            results[f"{model}_fit_forecast_s"] = seconds
            print(f"{model} fit + 48 h forecast on 672 h: {seconds:.3f} s (median of 5)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
