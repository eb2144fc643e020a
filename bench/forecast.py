"""Forecasting benchmark: the models of forecasting/ on real hourly series with DP-like noise of known SD added.

Series (real, shipped offline in pvlib's data directory): dry-bulb temperature and relative humidity of the TMY3
records for Greensboro NC (723170) and Sand Point AK (703165), and of the TMY2 record for Miami FL (12839).
Releases are the true series plus Gaussian noise of SD k x the series' own SD (k = 0.1, 0.3, 1.0); each cell's
noise variance is known to the models, as a release's `mean_sd` is. Rolling origins a week apart, 672 h of
history, 48 h ahead: the first half of the origins only calibrates; the later half is scored against the truth and
against the releases, each origin's intervals calibrated (against releases, as live) on all the origins before it,
as `fusion backtest` calibrates them.

    .venv/bin/python -m bench.forecast              # prints the table, writes bench/results/forecast.json
    .venv/bin/python -m bench.forecast --origins 8 --levels 0.3   # a quicker run

Reported per noise level (over series): MAE against the truth relative to seasonal naive's (geometric mean over
series), coverage of the truth by the calibrated 80% and 95% intervals, coverage of the next release by the
calibrated 95% release interval, and the median time of one fit + forecast. The row `chosen` is what `fusion
forecast` does: per series, the first model (profile) unless another's MAE against the releases of the earlier
origins is more than 10% lower (`[forecasting] selection_margin`) and its squared errors are lower origin by origin
(paired t at most -2, `selection_t`: forecasting.backtest.preferred).

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
from pathlib import Path

import numpy as np

from forecasting.backtest import backtest, calibrated, calibration_split, origin_errors, preferred
from fusion.config.forecasting import ForecastingConfig, ModelName

HISTORY = 672
HORIZON = 48
STEP = 168
LEVELS = (0.1, 0.3, 1.0)
FIRST_ORIGIN = 24 * 45  # mid-February: leaves the year's end for later origins
MARGIN = ForecastingConfig().selection_margin
SELECTION_T = ForecastingConfig().selection_t
#: The latest earlier origins an origin's intervals are calibrated on, as a forecast's are (`backtest_origins`).
CALIBRATION_ORIGINS = ForecastingConfig().backtest_origins
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


def run_series(truth: np.ndarray, level: float, *, origins: int, seed: int, models: list[ModelName]) -> dict:
    rng = np.random.default_rng(seed)
    sd = level * float(truth.std())
    released = truth + rng.normal(0.0, sd, truth.size)
    variances = np.full(truth.size, sd**2)
    starts = [FIRST_ORIGIN + HISTORY + k * STEP for k in range(origins)]
    began = time.perf_counter()
    forecasts = backtest(released, variances, 24, models=models, origins=starts, horizon=HORIZON, history=HISTORY)
    elapsed = time.perf_counter() - began
    out: dict = {"fit_s": elapsed / max(len(forecasts), 1)}
    naive_errors = {}
    for model in models:
        mine = [f for f in forecasts if f.model is model]
        mine.sort(key=lambda f: f.origin)
        # As `fusion backtest` and `fusion forecast` do: each origin's intervals calibrated on the latest
        # `backtest_origins` (8) earlier origins whose windows had been released by then (`calibrated`); the
        # earlier half only calibrates, the later half is scored.
        scored = calibrated(mine, released, variances, latest=CALIBRATION_ORIGINS)[len(mine) // 2 :]
        calibration = scored[-1][0]  # the latest, learned on all but the last origin
        errors, hits80, hits95, release95 = [], [], [], []
        for f, (_, bands) in zip(mine[len(mine) // 2 :], scored, strict=True):
            window = slice(f.origin, f.origin + HORIZON)
            true, noisy = truth[window], released[window]
            errors.append(np.abs(true - f.prediction.mean))
            hits80.append((true >= bands.ci80[0]) & (true <= bands.ci80[1]))
            hits95.append((true >= bands.ci95[0]) & (true <= bands.ci95[1]))
            release95.append((noisy >= bands.release_ci95[0]) & (noisy <= bands.release_ci95[1]))
        naive_errors[model] = float(np.concatenate(errors).mean())
        out[str(model)] = {
            "mae": naive_errors[model],
            "coverage80": float(np.concatenate(hits80).mean()),
            "coverage95": float(np.concatenate(hits95).mean()),
            "release_coverage95": float(np.concatenate(release95).mean()),
            "factor": calibration.factor,
            "calibration": calibration.as_dict(),
        }
    for model in models:
        out[str(model)]["mae_ratio"] = naive_errors[model] / naive_errors[ModelName.SEASONAL_NAIVE]

    # What a forecast would use: the model `preferred` picks from the errors against the releases on the earlier
    # origins (the first listed unless another is clearly and consistently better).
    earlier = [f for m in models for f in calibration_split([f for f in forecasts if f.model is m])[0]]
    chosen = preferred(origin_errors(earlier, released), default=models[0], margin=MARGIN, t_min=SELECTION_T)
    out["chosen"] = {**out[str(chosen)], "model": str(chosen)}
    return out


def oracle_ratio(truth: np.ndarray, level: float, *, origins: int, seed: int) -> float:
    """The oracle's MAE against the truth over seasonal naive's (on the releases of `seed`), on the scored origins:
    see the module's docstring."""
    rng = np.random.default_rng(seed)
    released = truth + rng.normal(0.0, level * float(truth.std()), truth.size)
    days = 24
    shifted = np.array([np.roll(truth, k * days) for k in range(-ORACLE_HALF_DAYS, ORACLE_HALF_DAYS + 1)])
    profile = shifted.mean(axis=0)
    edge = ORACLE_HALF_DAYS * days
    profile[:edge], profile[-edge:] = np.nan, np.nan
    anomaly = truth - profile
    day_mean = np.convolve(anomaly, np.ones(days) / days, "full")[: truth.size]  # mean of the last 24 cells
    fitted_on = np.arange(edge + days, truth.size - edge - HORIZON)
    starts = np.array([FIRST_ORIGIN + HISTORY + k * STEP for k in range(origins)][origins // 2 :])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--origins", type=int, default=16, help="rolling origins per series (half calibrate)")
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS), help="noise SD / series SD")
    parser.add_argument("--models", nargs="+", default=[str(m) for m in ModelName], choices=[str(m) for m in ModelName])
    parser.add_argument("--out", default="bench/results/forecast.json")
    args = parser.parse_args()
    models = [ModelName(m) for m in args.models]
    if ModelName.SEASONAL_NAIVE not in models:
        models.append(ModelName.SEASONAL_NAIVE)
    series = load_series()
    results: dict = {"series": list(series), "origins": args.origins, "levels": {}}
    print(
        f"{len(series)} series x {args.origins} origins ({args.origins // 2} calibrate, the rest scored), "
        f"{HISTORY} h history, {HORIZON} h ahead"
    )
    header = (
        f"{'k':>4} {'model':>15} {'MAE/snaive':>10} {'cov80 true':>10} {'cov95 true':>10} {'cov95 rel':>9} "
        f"{'factor':>6}"
    )
    print(header)
    for level in args.levels:
        per_series = {
            name: run_series(truth, level, origins=args.origins, seed=i, models=models)
            for i, (name, truth) in enumerate(series.items())
        }
        summary = {}
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
        oracle = {
            name: oracle_ratio(truth, level, origins=args.origins, seed=i)
            for i, (name, truth) in enumerate(series.items())
        }
        summary["oracle"] = {"mae_ratio": float(np.exp(np.mean(np.log(list(oracle.values())))))}
        print(f"{level:>4} {'oracle':>15} {summary['oracle']['mae_ratio']:>10.3f}")
        results["levels"][str(level)] = {"summary": summary, "series": per_series, "oracle": oracle}
    for model in (ModelName.PROFILE, ModelName.UC):
        if model in models:
            seconds = time_fit(model, next(iter(series.values())))
            results[f"{model}_fit_forecast_s"] = seconds
            print(f"{model} fit + 48 h forecast on 672 h: {seconds:.3f} s (median of 5)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
