"""`fusion demo`'s later steps: release the rest of the demo's history, one day a release, then backtest and
forecast the next day from the store, and draw one series; last, a dispatch recommended on the forecast day's
peak hour and ratified by the demo's authority (`dispatch_step`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.markup import escape

from fusion.cli.mechanisms import show_recommendation
from fusion.cli.output import console, print_arrow
from fusion.config.federation import load_config
from fusion.demo.federation import DEMO_START
from fusion.errors import FusionError

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


def dispatch_step(config_path: Path, released: int) -> None:
    """`fusion demo`'s last step: a dispatch recommendation on case5 for the peak hour of the forecast day (loads
    from the forecasts of gridco's feeder load, else its releases), its LMPs, and one ratification by the demo's
    authority."""
    from fusion.api import open_store, unverified_releases
    from fusion.config.mechanisms import LoadStatistic
    from fusion.demo.federation import DEMO_AUTHORITY, DEMO_BUSES, DEMO_START
    from mechanisms.decisions import DecideRequest, decide
    from mechanisms.loads import forecast_means
    from mechanisms.recommend import Request, recommend
    from mechanisms.records import Action, Kind

    config = load_config(str(config_path), check_release=False)  # the mechanisms read the store: no calibration
    day = DEMO_START + timedelta(days=released)
    scale = " + ".join(f"{s:g} * (region = '{r}')::INT" for r, s in DEMO_BUSES.values())
    scales = dict(DEMO_BUSES.values())
    with open_store(config) as store:
        # The forecasts `fusion recommend` takes loads from: each region's latest, those that replay where releases
        # are verified.
        means = forecast_means(store, "electric_load", LoadStatistic.MEAN, since=day,
                               unverified=unverified_releases(config))
        totals = {start: sum(scales.get(r, 0.0) * m for r, m in by_region.items())
                  for start, by_region in means.items()}
        peak: list[dict[str, Any]] = [{"window_start": start, "mw": mw}
                                      for start, mw in sorted(totals.items(), key=lambda t: (-t[1], t[0]))[:1]]
        if not peak:  # no forecast: the last released day's peak, from its releases
            peak = store.sql(
                f"SELECT window_start, sum(ratio_mean * ({scale})) AS mw FROM releases WHERE metric = "
                "'electric_load' GROUP BY window_start ORDER BY window_start DESC LIMIT 24"
            ).to_pylist()
            peak = sorted(peak, key=lambda r: -(r["mw"] or 0))[:1]
    if not peak:
        console.print("[yellow]no dispatch[/yellow]: no forecast or release of electric_load to take loads from")
        return
    at = peak[0]["window_start"].astimezone(UTC)
    buses = ", ".join(f"{bus} <- {region} (x{s:g})" for bus, (region, s) in DEMO_BUSES.items())
    console.print(f"\n[bold]Dispatch[/bold] (mechanisms/, advisory) on MATPOWER case5 for {at:%Y-%m-%d %H:%M}Z, "
                  f"the forecast day's peak hour; buses fed by regions' mean feeder MW: {buses}")
    try:
        outcome = recommend(config, Request(Kind.DISPATCH, at=at))
    except FusionError as exc:  # an advisory step: the demo's releases stand, and it says why there is no dispatch
        console.print(f"[yellow]no dispatch recommended[/yellow]: {escape(str(exc))}", highlight=False)
        return
    show_recommendation(outcome)
    rid = outcome.recommendation.recommendation_id
    authority, signer = DEMO_AUTHORITY
    decided = decide(config, DecideRequest(Action.RATIFY, rid, authority, signer, reason="demo: as recommended"))
    console.print(f"ratified by {authority} ({signer}, {decided.signatures} of {decided.threshold} signature): "
                  f"decision {decided.decision.decision_id}; nothing is executed by Fusion either way")
    from fusion.cli.demo import _fusion_command

    fusion, fusion_config = _fusion_command(), f"--config {config_path}"
    console.print(
        f"Try: {fusion} decide override {fusion_config} --recommendation {rid} --authority {authority} --signer "
        f"{signer} --set Sundance=50 --reason-code reliability\n"
        f"     {fusion} decisions {fusion_config}\n"
        f"     {fusion} recommend {fusion_config} --replay {rid}\n"
        f"     {fusion} recommend pareto {fusion_config} --at {at:%Y-%m-%dT%H:%M}",
        soft_wrap=True,
    )
