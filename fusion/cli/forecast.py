"""`fusion forecast` and `fusion backtest`: forecasts of the released series, written back to the store (forecasting/,
statsmodels and matplotlib imported only when they run)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow as pa

from fusion.cli.output import console, err_console, print_arrow
from fusion.config.federation import load_config
from fusion.config.forecasting import MAX_HORIZON_WINDOWS, Statistic
from fusion.errors import FusionError


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    forecast = sub.add_parser(
        "forecast", help="forecast the released series (spends no budget) and write them to the store"
    )
    backtest = sub.add_parser(
        "backtest", help="rolling-origin backtest of the forecasting models; records the choice per series"
    )
    for command in (forecast, backtest):
        command.add_argument("--config", required=True, help="federation config (TOML)")
        command.add_argument("--metric", action="append", help="only this metric (repeat for more; default: all)")
        command.add_argument("--region", action="append", help="only this region (repeat for more; default: all)")
        command.add_argument(
            "--statistic", action="append", choices=["mean", "sum", "count"],
            help="only this statistic (repeat for more; default: [forecasting] statistics, else mean)",
        )
        command.add_argument(
            "--horizon",
            help=f"how far ahead, e.g. 24h or 2d: at most [forecasting] history and {MAX_HORIZON_WINDOWS:,} windows "
            "(default: [forecasting] horizon, 48h)",
        )
        command.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    forecast.add_argument(
        "--plot", metavar="PNG",
        help="also draw the releases and the forecast of the one series named by --metric and --region to this PNG",
    )
    backtest.add_argument("--origins", type=int, help="rolling origins (default: [forecasting] backtest_origins, 16)")


def cmd_forecast(args: argparse.Namespace) -> int:
    from forecasting.run import horizon_windows, run_forecasts

    config = load_config(args.config, check_release=False)  # reads the store only
    horizon_windows(config, args.horizon, "--horizon")
    if args.plot and (len(set(args.metric or [])) != 1 or len(set(args.region or [])) != 1):
        raise FusionError("--plot draws one series: name one --metric and one --region")
    started = time.monotonic()
    run = run_forecasts(config, metrics=args.metric, regions=args.region, statistics=_statistics(args),
                        horizon=args.horizon)
    rows: list[dict[str, object]] = []
    for outcome in run.outcomes:
        forecast = outcome.forecast
        row: dict[str, object] = {
            "metric": outcome.key.metric, "statistic": str(outcome.key.statistic), "region": outcome.key.region,
            "model": str(forecast.model) if forecast else "-", "origin": None, "next_mean": None, "next_ci95": None,
            "next_release_ci95": None, "note": outcome.note,
        }
        if forecast is not None:
            bands = forecast.bands
            row |= {"origin": forecast.series.window(forecast.origin), "next_mean": round(float(bands.mean[0]), 4),
                    "next_ci95": f"[{bands.ci95[0][0]:.4g}, {bands.ci95[1][0]:.4g}]",
                    "next_release_ci95": f"[{bands.release_ci95[0][0]:.4g}, {bands.release_ci95[1][0]:.4g}]"}
        rows.append(row)
    print_arrow(pa.Table.from_pylist(rows), args.format, title=f"forecasts, {run.horizon} windows ahead")
    _report_skipped(run.skipped_releases, args.format)
    if args.format == "table":
        console.print(
            f"{run.forecast_rows} forecast row(s) written to `forecasts`, {run.score_rows} earlier forecast "
            f"window(s) scored in `forecast_scores` (releases version {run.releases_version}; no budget spent) | "
            f"{time.monotonic() - started:.1f}s"
        )
    if args.plot:
        from forecasting.plot import plot_series

        statistic = (args.statistic or ["mean"])[0]
        path = plot_series(config, args.metric[0], args.region[0], Path(args.plot), statistic=statistic)
        (console if args.format == "table" else err_console).print(f"plot: {path}")  # keep CSV/JSON clean
    return 0


def _report_skipped(skipped: dict[str, str], output: str) -> None:
    """Name the releases left out as not verified (on stderr beside CSV or JSON, which stay clean)."""
    if skipped:
        from forecasting.trust import left_out
        from fusion.cli.formats import visible

        # The ids are the store's text: shown as written (no markup), escape codes written out
        (console if output == "table" else err_console).print(visible(left_out(skipped)), markup=False)


def _statistics(args: argparse.Namespace) -> list[Statistic] | None:
    return [Statistic(name) for name in args.statistic] if args.statistic else None


def cmd_backtest(args: argparse.Namespace) -> int:
    from forecasting.run import horizon_windows, run_backtests

    config = load_config(args.config, check_release=False)
    horizon_windows(config, args.horizon, "--horizon")
    if args.origins is not None and args.origins < 2:
        raise FusionError(f"--origins {args.origins}: a backtest needs at least 2 (the earlier half calibrates)")
    started = time.monotonic()
    run = run_backtests(config, metrics=args.metric, regions=args.region, statistics=_statistics(args),
                        horizon=args.horizon, origins=args.origins)
    rows: list[dict[str, object]] = []
    for outcome in run.outcomes:
        if not outcome.scores:
            rows.append({"metric": outcome.key.metric, "statistic": str(outcome.key.statistic),
                         "region": outcome.key.region, "model": "-", "note": outcome.note})
        for s in outcome.scores:
            rows.append({
                "metric": outcome.key.metric, "statistic": str(outcome.key.statistic), "region": outcome.key.region,
                "model": str(s.model), "mae": round(s.mae, 4), "mase": round(s.mase, 3),
                "mae_vs_snaive": round(s.mae_ratio, 3), "cov80": round(s.coverage80, 3),
                "cov95": round(s.coverage95, 3), "width95": round(s.width95, 4), "factor": round(s.factor, 3),
                "windows": s.windows, "note": "chosen" if s.model is outcome.chosen else "",
            })
    print_arrow(pa.Table.from_pylist(rows), args.format,
                title=f"backtest, {run.horizon} windows ahead, against later releases")
    _report_skipped(run.skipped_releases, args.format)
    if args.format == "table":
        console.print(
            "mae, mase (errors / in-sample seasonal naive MAE), mae_vs_snaive: over all origins; cov80/cov95 (of the "
            "next release) and width95: later half of the origins, each calibrated on the origins before it; factor: "
            "learned on all origins, used by `fusion forecast`\n"
            f"{run.forecast_rows} backtest forecast row(s) and {run.score_rows} score(s) written | "
            f"{time.monotonic() - started:.1f}s"
        )
    return 0


__all__ = ["add_parsers", "cmd_backtest", "cmd_forecast"]
