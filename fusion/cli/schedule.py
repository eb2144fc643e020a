"""`fusion schedule` (a long-running scheduler, or one pass with --once) and `fusion backfill`."""

from __future__ import annotations

import argparse
import signal
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fusion.cli.output import console, err_console
from fusion.config.federation import load_config
from fusion.errors import FusionError
from fusion.runtime.durations import floor_to_grid
from fusion.runtime.schedule import Action, RunStatus, ScheduleConfig

if TYPE_CHECKING:  # the scheduler and fusion.release.plan import Beam: only commands that run pipelines load them
    from fusion.config.federation import Config
    from pipelines.scheduler import RunResult, Scheduler


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    schedule = sub.add_parser("schedule", help="run the config's [[schedules]]: due intervals, catch-up, retries")
    schedule.add_argument("--config", required=True, help="federation config (TOML)")
    schedule.add_argument("--once", action="store_true", help="run what is due now, then exit (for cron)")
    schedule.add_argument(
        "--now",
        help="with --once: run the intervals due at this time (not later than the clock); the runs table still "
        "records the real time",
    )
    schedule.add_argument("--runner-id", help="this scheduler's id in the runs table (default host:pid:random)")

    fill = sub.add_parser("backfill", help="run every interval in a range that is not released yet, in order")
    fill.add_argument("--config", required=True, help="federation config (TOML)")
    fill.add_argument("--from", dest="start", required=True, help="first interval's start, ISO 8601 (UTC)")
    fill.add_argument("--to", dest="end", required=True, help="end of the range (exclusive)")
    fill.add_argument("--schedule", help="whose interval grid to use (default: the config's only schedule)")
    fill.add_argument("--runner-id", help="this run's id in the runs table (default host:pid:random)")


def _describe(result: RunResult) -> str:
    where = f"{result.pipeline} {result.interval}"
    if result.action is Action.WAIT:
        return f"[dim]{where}: attempt {result.attempt} waits for its backoff until {result.at}[/dim]"
    if result.action is Action.GIVE_UP:
        return f"[red]{where}: gave up after {result.attempt} failed attempt(s)[/red]"
    status = result.status.value if result.status else result.action.value
    colour = {"released": "green", "failed": "red", "skipped": "yellow"}.get(status, "cyan")
    text = f"{where}: attempt {result.attempt} [{colour}]{status}[/{colour}]"
    if result.status is RunStatus.RELEASED:
        text += f" ({result.cells} cells, epsilon {result.epsilon:.4f})"
    return text + (f": {escape(result.detail)}" if result.detail else "")


def cmd_schedule(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
    from fusion.release.plan import parse_time
    from pipelines.scheduler import Scheduler, utc_now

    config = load_config(args.config)
    if not config.schedules:
        raise FusionError(f"{args.config} has no [[schedules]] section; add one (see docs/guides/scheduling.md)")
    as_of = None
    if args.now is not None:
        if not args.once:
            raise FusionError("--now works only with --once (a long-running scheduler follows the clock)")
        as_of = parse_time(args.now)
        if as_of > utc_now():
            raise FusionError(f"--now {args.now} is in the future; intervals that have not closed cannot run")
    # --now chooses the intervals only: claims and leases carry the real time, which every runner shares.
    scheduler = Scheduler(
        config, runner=args.runner_id, as_of=as_of, beam_args=beam_args, on_result=lambda r: console.log(_describe(r))
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        err_console.print(f"{signal.Signals(signum).name}: stopping after the current attempt (again to abort)")
        scheduler.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    # One pass or many: a signal lets the attempt under way finish and record its outcome (a kill would leave its
    # claim running until its lease ends), then no other interval starts. The handlers before are put back after.
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return _run_scheduler(scheduler, config, once=args.once)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_scheduler(scheduler: Scheduler, config: Config, *, once: bool) -> int:
    """One pass (`--once`: exit status 1 while an interval is failing or was given up on), or run until stopped."""
    if once:
        results, _ = scheduler.run_due()
        counts = Counter(r.status.value if r.status else r.action.value for r in results)
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing due"
        stopped = "; stopped by a signal, the intervals still due run at the next pass" if scheduler.stopped else ""
        console.print(f"{len(results)} interval(s) acted on by {scheduler.runner}: {summary}{stopped}")
        # Non-zero while an interval is failing or was given up on, so cron monitoring keeps seeing it.
        # A runner that takes over a crashed one's interval records the failure and backs off: failing too.
        failing = any(r.status is RunStatus.FAILED or r.action is Action.GIVE_UP or r.failing for r in results)
        return 1 if failing else 0
    names = ", ".join(f"{s.name} ({s.cron}, {s.interval})" for s in config.schedules)
    console.print(f"[bold]Scheduler[/bold] {scheduler.runner}: {names}")
    scheduler.run()
    console.print("scheduler stopped")
    return 0


def _on_grid(schedule: ScheduleConfig, text: str, option: str) -> datetime:
    from fusion.release.plan import parse_time

    moment = parse_time(text)
    if floor_to_grid(moment, schedule.length) != moment:
        raise FusionError(
            f"{option} {text} is not on schedule {schedule.name}'s {schedule.interval} grid; "
            f"use {floor_to_grid(moment, schedule.length).isoformat()}"
        )
    return moment


def cmd_backfill(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
    from pipelines.scheduler import backfill, check_backfill_end

    config = load_config(args.config)
    schedule = config.schedule(args.schedule)
    start, end = _on_grid(schedule, args.start, "--from"), _on_grid(schedule, args.end, "--to")
    if end <= start:
        raise FusionError(f"--to {args.end} must be after --from {args.start}")
    check_backfill_end(schedule, end, datetime.now(UTC))  # before the progress bar is drawn
    total = (end - start) // schedule.length
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"backfill {schedule.name}", total=total)

        def on_result(result: RunResult) -> None:
            if result.action is not Action.DONE:
                progress.console.log(_describe(result))
            progress.update(task, advance=1, description=f"backfill {schedule.name}: {result.interval.end}")

        results = backfill(config, schedule, start, end, runner=args.runner_id, beam_args=beam_args,
                           on_result=on_result)
    counts = Counter("already released" if r.action is Action.DONE else str(r.status) for r in results)
    console.print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return 1 if counts.get(RunStatus.FAILED.value) else 0


__all__ = ["add_parsers", "cmd_backfill", "cmd_schedule"]
