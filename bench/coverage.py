"""Coverage of every released statistic on real data that tests/fusion/release/test_coverage.py does not use.

The same path as that test: balanced_encodings -> PartitionLayout.for_interval (day windows; count, sum, sum of
squares and 16 histogram bins) -> aggregate_readings -> Skellam noise calibrated to (epsilon, 1e-6) at event level ->
decode_release. Each cell is one station, metric and day: 24 hourly readings. The truth is the cell's rounded,
clamped readings (population SD; the ceil(q n)-th reading for a quantile).

Data (shipped offline in pvlib's data directory):
- Miami FL's TMY2 record: dry-bulb temperature, dew point, relative humidity, wind speed, GHI and DNI;
- the Greensboro NC and Sand Point AK TMY3 records' columns the test does not use: dew point, DNI, DHI, pressure
  (Sand Point's pressure is a constant 1012 mbar in the file; it is reported with the rest).

Reported per statistic: 95% coverage, misses above / below the interval, and for the stddev its mean error over
the error's SD (pooled, and the median over station-metric pairs) and the share of cells where it is above the truth
(0.5 for a median-unbiased estimate); for quantiles the median absolute error in bins where the count is clear
(at least 3 count SDs). Issue 17's targets: 93-97% coverage, neither side over 65% of the misses; stddev bias under
0.1 of its SD; quantile errors at most half a bin.

    .venv/bin/python -m bench.coverage                       # epsilon 4, seeds 2026 1 2 (about a minute)
    .venv/bin/python -m bench.coverage --epsilon 1           # the demo's epsilon
    .venv/bin/python -m bench.coverage --baseline            # the test's own data, for comparison
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pvlib
import pyarrow as pa
import pyarrow.csv as pacsv

from fusion.config.parameters import ReleaseParameters
from fusion.demo.data import LIMITS as DEMO_LIMITS
from fusion.demo.data import RESOLUTION as DEMO_RES
from fusion.demo.data import STATIONS as DEMO_STATIONS
from fusion.demo.data import pvlib_data_dir
from fusion.release.contribution import aggregate_readings
from fusion.release.estimates import decode_release
from privacy.accountant import calibrate_variance
from privacy.encoding import balanced_encodings, event_level_sensitivity
from privacy.layout import BASE_COMPONENTS, SUMSQ, PartitionLayout, bin_components
from privacy.skellam import SkellamNoise, seeded_generator

START = datetime(2026, 1, 1, tzinfo=UTC)
DAYS = 365
BINS = 16
STATS = ("count", "sum", "mean", "stddev", "p10", "median", "p90")
# Analogous to the demo's LIMITS/RESOLUTION: wide physical bounds, the metric's recorded resolution.
LIMITS = {
    **DEMO_LIMITS,
    "dew_point": (-80.0, 60.0),
    "dni": (0.0, 1500.0),
    "dhi": (0.0, 1500.0),
    "pressure": (850.0, 1100.0),
}
RES = {**DEMO_RES, "dew_point": 0.1, "dni": 1.0, "dhi": 1.0, "pressure": 1.0}
UNITS = {
    "ghi": "W/m2",
    "dni": "W/m2",
    "dhi": "W/m2",
    "air_temp": "degC",
    "dew_point": "degC",
    "humidity": "%",
    "wind_speed": "m/s",
    "pressure": "mbar",
}


def miami() -> dict[str, dict[str, np.ndarray]]:
    """Miami FL's TMY2 record (pvlib data/12839.tm2)."""
    df, _ = pvlib.iotools.read_tmy2(str(pvlib_data_dir() / "12839.tm2"))
    df = df.sort_values(["month", "day", "hour"])
    cols = {
        "air_temp": ("DryBulb", 10),
        "dew_point": ("DewPoint", 10),
        "humidity": ("RHum", 1),
        "wind_speed": ("Wspd", 10),
        "ghi": ("GHI", 1),
        "dni": ("DNI", 1),
    }
    return {"miami": {m: df[c].to_numpy(float) / k for m, (c, k) in cols.items()}}


def tmy3_extra() -> dict[str, dict[str, np.ndarray]]:
    """The Greensboro and Sand Point TMY3 columns the test does not use."""
    cols = {"dew_point": "Dew-point (C)", "dni": "DNI (W/m^2)", "dhi": "DHI (W/m^2)", "pressure": "Pressure (mbar)"}
    out = {}
    for station, (filename, _) in DEMO_STATIONS.items():
        t = pacsv.read_csv(pvlib_data_dir() / filename, read_options=pacsv.ReadOptions(skip_rows=1))
        dates = t.column("Date (MM/DD/YYYY)").to_pylist()
        hours = np.array([int(x.split(":")[0]) for x in t.column("Time (HH:MM)").to_pylist()])
        doy = np.array([datetime(2026, int(d[:2]), int(d[3:5])).timetuple().tm_yday for d in dates])
        order = np.argsort((doy - 1) * 24 + hours - 1)  # as load_station + the test order it
        out[station] = {m: t.column(c).to_numpy().astype(float)[order] for m, c in cols.items()}
    return out


def test_data() -> dict[str, dict[str, np.ndarray]]:
    """The data tests/fusion/release/test_coverage.py uses (`--baseline`: to compare with the test's figures)."""
    from fusion.demo.data import load_station

    out = {}
    for station in DEMO_STATIONS:
        series = load_station(station)
        order = np.argsort(series["hour_of_year"])
        out[station] = {m: series[m][order] for m in ("ghi", "air_temp", "humidity", "wind_speed")}
    return out


def true_quantile(values: np.ndarray, q: float) -> float:
    ordered = np.sort(values)
    return float(ordered[max(0, math.ceil(q * ordered.size - 1e-9) - 1)])


def run(data: dict[str, dict[str, np.ndarray]], eps: float, seed: int, window_days: int = 1) -> dict[str, np.ndarray]:
    """One release of a year of cells of `window_days` days (24 hourly readings a day) of `data` (region -> metric
    -> hourly values) at `eps`, decoded: each released column and the truth (`true_<statistic>`) per cell."""
    days = DAYS // window_days * window_days
    regions = tuple(data)
    metrics = tuple(next(iter(data.values())))
    encodings = tuple(balanced_encodings([(*LIMITS[m], RES[m]) for m in metrics]))
    components = (*BASE_COMPONENTS, SUMSQ, *bin_components(BINS))
    layout = PartitionLayout.for_interval(
        metrics, regions, START, START + timedelta(days=days), timedelta(days=window_days), components
    )
    sensitivity = event_level_sensitivity(list(encodings), components=4)
    variance = calibrate_variance(epsilon=eps, delta=1e-6, l1=sensitivity.l1, l2=sensitivity.l2)
    params = ReleaseParameters(
        encodings=encodings,
        sensitivity=sensitivity,
        total_variance=variance,
        quorum=1,
        epsilon=eps,
        delta=1e-6,
        noise=True,
    )
    hours = np.datetime64("2026-01-01T00:00", "us") + np.arange(days * 24) * np.timedelta64(3600_000_000, "us")
    pieces, tv = [], {}
    for region in regions:
        for m, metric in enumerate(metrics):
            values = np.round(data[region][metric][: days * 24] / RES[metric]) * RES[metric]
            pieces.append(
                pa.table(
                    {
                        "entity_id": pa.array([region] * values.size),
                        "region": pa.array([region] * values.size),
                        "metric": pa.array([metric] * values.size),
                        "event_time": pa.array(hours, pa.timestamp("us", tz="UTC")),
                        "value": pa.array(values),
                    }
                )
            )
            tv[(m, region)] = np.clip(values, *LIMITS[metric]).reshape(days // window_days, 24 * window_days)
    vector = aggregate_readings(pa.concat_tables(pieces), layout=layout, encodings=encodings)
    noisy = vector + SkellamNoise(variance, generator=seeded_generator(seed)).sample(layout.slots)
    table = decode_release(
        noisy,
        layout=layout,
        params=params,
        units=tuple(UNITS[m] for m in metrics),
        noise_variance=variance,
        contributors=1,
        release_id="coverage",
        released_at=START,
    )
    rows = {
        n: np.array([np.nan if v is None else v for v in table.column(n).to_pylist()], dtype=float)
        for n in table.column_names
        if pa.types.is_floating(table.schema.field(n).type)
    }
    mi, ri, wi = layout.cell_coordinates()
    cells = [tv[(int(m), regions[int(r)])][int(w)] for m, r, w in zip(mi, ri, wi, strict=True)]
    truth = {
        "count": np.array([c.size for c in cells], float),
        "sum": np.array([c.sum() for c in cells]),
        "mean": np.array([c.mean() for c in cells]),
        "stddev": np.array([c.std() for c in cells]),
        **{n: np.array([true_quantile(c, q) for c in cells]) for n, q in (("p10", 0.1), ("median", 0.5), ("p90", 0.9))},
    }
    rows.update({f"true_{k}": v for k, v in truth.items()})
    rows["label"] = np.array([f"{regions[int(r)]}/{metrics[int(m)]}" for m, r in zip(mi, ri, strict=True)])
    rows["lower"] = np.array([LIMITS[metrics[int(m)]][0] for m in mi])
    rows["upper"] = np.array([LIMITS[metrics[int(m)]][1] for m in mi])
    return rows


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summary(r: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per statistic, over the cells that release it: coverage, misses on each side, and the bias figures."""
    out: dict[str, dict[str, float]] = {}
    for n in STATS:
        est, lo, hi, t = r[n], r[f"{n}_ci_low"], r[f"{n}_ci_high"], r[f"true_{n}"]
        rel = ~np.isnan(est)
        row = {
            "released": float(rel.sum()),
            "coverage": float(((lo <= t) & (t <= hi))[rel].mean()) if rel.any() else math.nan,
            "above": float((t > hi)[rel].sum()),
            "below": float((t < lo)[rel].sum()),
        }
        if n == "stddev":  # withheld estimates keep their intervals: how those cover
            only = np.isnan(est) & ~np.isnan(lo)
            row["interval_only"] = float(only.sum())
            row["interval_only_coverage"] = float(((lo <= t) & (t <= hi))[only].mean()) if only.any() else math.nan
            row["released_by_metric"] = {lab: float(np.mean(rel[r["label"] == lab])) for lab in sorted(set(r["label"]))}
        if n == "stddev" and rel.any():
            err = (est - t)[rel]
            labels = r["label"][rel]
            per = [
                e.mean() / e.std() for e in (err[labels == lab] for lab in set(labels)) if e.size > 30 and e.std() > 0
            ]
            row |= {
                "bias_over_error_sd": float(err.mean() / err.std()),
                "bias_over_error_sd_median_by_metric": float(np.median(per)),
                "share_above_truth": float(np.mean(err > 0)),
            }
        if n in ("p10", "median", "p90"):
            width = (r["upper"] - r["lower"]) / BINS
            clear = rel & (r["count"] >= 3 * r["count_sd"])
            row["median_abs_error_bins"] = (
                float(np.median(np.abs(est - t)[clear] / width[clear])) if clear.any() else math.nan
            )
        out[n] = row
    released = ~np.isnan(r["variance"])
    if released.any():  # the signed variance: unbiased over cells, its SD for weighting
        error = (r["variance"] - r["true_stddev"] ** 2)[released]
        z = error / r["variance_sd"][released]
        labels = r["label"][released]
        out["variance"] = {
            "released": float(released.sum()),
            "error_over_sd_mean": float(z.mean()),
            "error_over_sd_sd": float(z.std()),
            "mean_error_over_se_by_metric": {
                lab: float(e.mean() / (e.std() / math.sqrt(e.size)))
                for lab in sorted(set(labels))
                if (e := error[labels == lab]).size > 1 and e.std() > 0
            },
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2026, 1, 2])
    parser.add_argument("--baseline", action="store_true", help="the test's own data instead")
    parser.add_argument("--window-days", type=int, default=1, help="days a cell (24 readings a day)")
    parser.add_argument("--out", default="bench/results/coverage.json")
    args = parser.parse_args()
    sets = {"test": test_data()} if args.baseline else {"miami": miami(), "tmy3": tmy3_extra()}
    pooled = concat([run(data, args.epsilon, seed, args.window_days) for seed in args.seeds for data in sets.values()])
    result = summary(pooled)
    print(
        f"epsilon {args.epsilon:g}, seeds {args.seeds}, {pooled['count'].size} cells of {args.window_days} day(s) "
        f"({', '.join(sets)})"
    )
    for n, row in result.items():
        if n == "variance":
            worst = max(row["mean_error_over_se_by_metric"].values(), key=abs)
            print(
                f"  variance released {row['released']:6.0f}  error / variance_sd: mean "
                f"{row['error_over_sd_mean']:+.3f}, SD {row['error_over_sd_sd']:.3f}; mean error by station and "
                f"metric within {abs(worst):.1f} SE"
            )
            continue
        larger = max(row["above"], row["below"]) / max(row["above"] + row["below"], 1)
        line = (
            f"  {n:7s} released {row['released']:6.0f}  coverage {row['coverage']:6.2%}  misses above / below "
            f"{row['above']:4.0f} / {row['below']:4.0f} (larger side {larger:4.0%})"
        )
        if "bias_over_error_sd" in row:
            line += (
                f"\n          mean error / its SD {row['bias_over_error_sd']:+.3f} (median by station and metric "
                f"{row['bias_over_error_sd_median_by_metric']:+.2f}); above the truth in {row['share_above_truth']:.1%}"
            )
        if "interval_only" in row:
            shares = ", ".join(f"{lab} {share:.0%}" for lab, share in row["released_by_metric"].items())
            line += (
                f"\n          estimate withheld (noise dwarfs the spread) in {row['interval_only']:.0f} cells, whose "
                f"intervals cover {row['interval_only_coverage']:.2%}; released share: {shares}"
            )
        if "median_abs_error_bins" in row:
            line += f"  median |error| {row['median_abs_error_bins']:.3f} bins"
        print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "epsilon": args.epsilon,
                "seeds": args.seeds,
                "window_days": args.window_days,
                "data": list(sets),
                "statistics": result,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
