"""`fusion stream`: release each window of the feeds as it closes, with a live status line (a timestamped log line
when the output is no terminal) and the refusals counted by reason at the end."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

from fusion.cli.options import non_negative, with_config
from fusion.cli.output import console
from fusion.config.federation import load_config


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stream = with_config(sub.add_parser("stream", help="stream the feeds: release each window as it closes"))
    stream.add_argument("--stdin", metavar="INSTITUTION", help="also read this institution's JSON lines on stdin")
    stream.add_argument(
        "--drain", action="store_true",
        help="stop once the inputs are exhausted, releasing every window of the grid up to --until (a time the clock "
        "has passed) or up to now",
    )
    stream.add_argument(
        "--until", metavar="TIME",
        help="release no window ending after this time (ISO 8601, UTC if no offset); stop once all up to it are",
    )
    stream.add_argument(
        "--status-every", type=non_negative(float), default=60.0, metavar="SECONDS",
        help="when the output is not a terminal (systemd, a container), log the status line this often",
    )
    stream.add_argument(
        "--source-job", action="store_true", help="run the streaming Beam job over Kafka/Pub/Sub (stream.source)"
    )
    stream.add_argument(
        "--releases-only", action="store_true", help="release windows a streaming job has spooled (pane markers)"
    )


def cmd_stream(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
    import signal

    from fusion.release.plan import parse_time
    from pipelines.stream_driver import StreamDriver, StreamStatus

    config = load_config(args.config)
    if args.stdin:
        config.institution(args.stdin)  # refuses an unknown institution now
    until = parse_time(args.until) if args.until else None
    if args.source_job:
        from pipelines.run import beam_options
        from pipelines.stream_sources import run_unbounded

        options = beam_options([*beam_args, "--streaming"])
        console.print(f"streaming job: {config.stream.source.value} -> {config.stream_spool_path}")
        run_unbounded(config, options)
        return 0

    def line(status: StreamStatus) -> str:
        last = "none yet"
        if status.last_release:
            last = status.last_release
            if status.last_latency_s is not None:
                last += f" ({status.last_latency_s:.1f}s after close)"
        lag = _duration(status.lag_s) if status.lag_s is not None else "-"
        changed = f" | changed inputs not read again: {len(status.changed_inputs)}" if status.changed_inputs else ""
        refused = f" | [yellow]refused: {len(status.refused)}[/yellow]" if status.refused else ""
        down = [s for s in status.sources if not s.endswith(": connected")]  # broker sources: say only trouble
        changed += f" | [yellow]{'; '.join(down)}[/yellow]" if down else ""
        changed += " | [yellow]an input cannot be read now: retrying[/yellow]" if status.unavailable else ""
        held = f"due windows wait for {len(status.held)} broker source(s) to catch up"
        changed += f" | [yellow]{held}[/yellow]" if status.held else ""
        return (
            f"windows open: {status.windows_open} | released: {status.released}{refused} | last release: {last} | "
            f"lag: {lag} | {status.rows_per_s:,.0f} rows/s | readings: {status.readings:,} | "
            f"rejects: {status.rejected:,}{changed}"
        )

    logged_at = [float("-inf")]

    def show(status: StreamStatus) -> None:
        """On a terminal, a live status line; elsewhere (systemd, a container, a pipe) a timestamped line every
        --status-every seconds, so the log shows the stream is alive."""
        if console.is_terminal:
            shown.update(line(status))
        elif time.monotonic() - logged_at[0] >= args.status_every:
            logged_at[0] = time.monotonic()
            console.print(f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} {line(status)}", highlight=False)

    with console.status("stream: starting") as shown:
        driver = StreamDriver(
            config,
            beam_args=beam_args,
            stdin=(args.stdin, sys.stdin) if args.stdin else None,
            releases_only=args.releases_only,
            until=until,
            on_status=show,
            on_notice=lambda text: console.print(text, markup=False, highlight=False),
        )

        def stop(signum: int, _frame: object) -> None:
            driver.stop_requested = True
            shown.update(f"stream: stopping after this step ({signal.Signals(signum).name})")

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        final = driver.run(drain=args.drain)
    console.print(line(final))
    if final.refused:  # each distinct reason once, with how many windows it refused
        console.print(f"[yellow]{len(final.refused)} window(s) refused[/yellow], by reason:")
        for reason, count in Counter(_reason_kind(r) for r in final.refused).most_common():
            console.print(f"  {count} x {reason}", markup=False, highlight=False)
    return 0


def _reason_kind(reason: str) -> str:
    """A refusal's reason with its release id and intervals left out, so windows refused alike count together."""
    reason = re.sub(r"\br-[0-9a-f]{8,}\b", "<release>", reason)
    return re.sub(r"\b\d{8}T\d{4}Z-\d{8}T\d{4}Z\b", "<interval>", reason)


def _duration(seconds: float) -> str:
    """A lag as people read it: 45s, 12m 5s, 3h 20m, 336d 19h (negative for readings ahead of the clock)."""
    if seconds < 0:
        return "-" + _duration(-seconds)
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{seconds:.0f}s"
