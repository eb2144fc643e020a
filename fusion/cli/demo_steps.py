"""`fusion demo`'s later steps: release the rest of the demo's history, one day a release, then backtest and
forecast the next day from the store, and draw one series."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pyarrow as pa

from fusion.cli.core import console, print_arrow
from fusion.config.federation import load_config
from fusion.demo.federation import DEMO_START

#: The series the demo backtests and draws.
DEMO_SERIES = ("air_temp", "nc-triad-east")


def release_history(config_path: Path, *, first: int, last: int, beam_args: Sequence[str] = ()) -> None:
    """Release days `first` to `last` - 1 of the demo (day 0 is DEMO_START), one batch each: the privacy period is a
    day, and releases of disjoint days compose in parallel (event level), so each day spends its own budget."""
    if last <= first:
        return
    from fusion.release.plan import plan_release
    from pipelines.batch import run_batch

    config = load_config(config_path)
    started = time.monotonic()
    cells = 0
    epsilon = 0.0
    with console.status("releasing") as status:
        for day in range(first, last):
            start = DEMO_START + timedelta(days=day)
            status.update(f"releasing {start:%Y-%m-%d} (day {day + 1} of {last})")
            summary = run_batch(plan_release(config, start, start + timedelta(days=1)), beam_args=beam_args)
            cells += summary.cells
            epsilon = max(epsilon, summary.epsilon)
    end = DEMO_START + timedelta(days=last)
    console.print(
        f"released {last - first} more day(s), {DEMO_START + timedelta(days=first):%Y-%m-%d} to "
        f"{end - timedelta(days=1):%Y-%m-%d}, one release a day: {cells:,} cells, epsilon {epsilon:.4f} each, "
        f"charged to its own day's period (cap {config.privacy.cap:g}) | {time.monotonic() - started:.1f}s"
    )


def forecast_step(config_path: Path, directory: Path) -> Path | None:
    """Backtest the demo series, forecast every series' next day, draw the demo series; returns the PNG's path
    (None when too little is released to forecast)."""
    from forecasting.plot import plot_series
    from forecasting.run import run_backtests, run_forecasts
    from fusion.errors import FusionError

    config = load_config(config_path, check_release=False)
    metric, region = DEMO_SERIES
    started = time.monotonic()
    try:
        backtest = run_backtests(config, metrics=[metric], regions=[region])
        run = run_forecasts(config)
    except FusionError as exc:
        console.print(f"[yellow]no forecast[/yellow]: {exc} (`fusion demo --days 15` releases two weeks)")
        return None
    rows = [
        {"model": str(s.model), "mae": round(s.mae, 3), "mae_vs_seasonal_naive": round(s.mae_ratio, 3),
         "cov95_of_release": round(s.coverage95, 3), "calibration": round(s.factor, 2)}
        for outcome in backtest.outcomes for s in outcome.scores
    ]
    print_arrow(pa.Table.from_pylist(rows), title=f"backtest of {metric} in {region}: next day, rolling origins")
    console.print(f"{backtest.outcomes[0].note}")
    shown = []
    for outcome in run.outcomes:
        if outcome.forecast is None:
            continue
        bands = outcome.forecast.bands
        shown.append({
            "metric": outcome.key.metric, "region": outcome.key.region, "model": str(outcome.forecast.model),
            "next_day_mean": round(float(bands.mean.mean()), 2),
            "true_value_95_halfwidth": round(float((bands.ci95[1] - bands.ci95[0]).mean() / 2), 2),
            "next_release_95_halfwidth": round(float((bands.release_ci95[1] - bands.release_ci95[0]).mean() / 2), 2),
        })
    print_arrow(pa.Table.from_pylist(shown), title="forecasts of the next day (averages over its 24 hours)")
    path = plot_series(config, metric, region, directory / f"forecast-{metric}-{region}.png")
    console.print(
        f"{run.forecast_rows} forecast rows written to `forecasts` (no budget spent) | "
        f"{time.monotonic() - started:.1f}s\nplot of {metric} in {region}: {path}"
    )
    return path


__all__ = ["DEMO_SERIES", "forecast_step", "release_history"]
