"""`fusion demo`: build the demo federation, release its history, then show SQL, a forecast, a dispatch and the
verification over it, and the commands to try next."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fusion.cli.output import console, print_arrow
from fusion.cli.release import cmd_batch
from fusion.config.federation import Config, load_config


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="build the demo federation and run a batch release on it")
    demo.add_argument(
        "--dir", default="demo", help="where to build it: a new or empty directory, or an earlier demo (replaced)"
    )
    demo.add_argument(
        "--days", type=int, default=15,
        help="days of feed data to generate; all but the last are released (two weeks of history to forecast from)",
    )


#: A first query to try on the demo: few enough columns to read in a terminal.
DEMO_TRY_QUERY = (
    "SELECT window_start, metric, region, mean, mean_ci_low, mean_ci_high, count FROM releases ORDER BY ALL LIMIT 5"
)


def _fusion_command() -> str:
    """How to run `fusion` from any directory: the script beside this interpreter when there is one."""
    script = Path(sys.executable).parent / "fusion"
    return str(script.resolve()) if script.is_file() else "fusion"


def cmd_demo(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
    from fusion.api import open_store
    from fusion.demo.federation import DEMO_QUERY, build_demo, is_demo

    directory = Path(args.dir)
    if is_demo(directory):
        console.print(f"replacing the earlier demo in {directory} (its store, keys and releases are deleted)")
    with console.status("building the demo federation from pvlib's TMY3 weather records"):
        config_path = build_demo(directory, days=args.days).resolve()
    console.print(f"demo federation: {config_path}")
    batch_args = argparse.Namespace(
        config=str(config_path),
        start="2026-01-01T00:00",
        end="2026-01-02T00:00",
        accept_rejects=False,
        in_process=False,
    )
    cmd_batch(batch_args, beam_args)
    from fusion.cli.demo_steps import forecast_step, release_history

    released = max(args.days - 1, 1)  # the last day is left for the user to release (see Try, below)
    release_history(config_path, first=1, last=released, beam_args=beam_args)
    console.print("\n[bold]SQL[/bold] over the fused releases:\n" + DEMO_QUERY + "\n")
    config: Config = load_config(config_path)
    with open_store(config) as store:
        print_arrow(store.sql(DEMO_QUERY), title="releases, 2026-01-01 (noisy, with error bars)")
    from fusion.keys.registry import load_key_holder_public_keys
    from fusion.store.delta import Store
    from fusion.store.verification import verify_releases

    console.print("\n[bold]Forecast[/bold] of the next day from the released history (forecasting/):")
    forecast_step(config_path, directory)
    from fusion.cli.demo_steps import dispatch_step

    dispatch_step(config_path, released)
    checks = verify_releases(Store(config.store_path), load_key_holder_public_keys(config))
    verified = sum(c.status == "verified" for c in checks)
    console.print(f"\nreleases verified against the key holder's registered signature: {verified} of {len(checks)}")
    fusion = _fusion_command()
    from datetime import timedelta

    from fusion.demo.federation import DEMO_START

    one_day = timedelta(days=1)
    next_day = DEMO_START + released * one_day
    console.print(
        f'\nTry: {fusion} sql --config {config_path} "{DEMO_TRY_QUERY}"\n'
        f"     {fusion} batch --config {config_path} --start {next_day:%Y-%m-%dT%H:%M} "
        f"--end {next_day + one_day:%Y-%m-%dT%H:%M}\n"
        f"     {fusion} forecast --config {config_path}        # scores the forecast of the day just released\n"
        f"     {fusion} backtest --config {config_path} --metric humidity\n"
        f"     {fusion} verify --config {config_path}",
        soft_wrap=True,  # each command stays on one line, to copy as printed
    )
    console.print(f"\nDashboard (read-only, this machine only): {fusion} serve --config {config_path}\n"
                  "     then open http://127.0.0.1:8050", soft_wrap=True)
    return 0
