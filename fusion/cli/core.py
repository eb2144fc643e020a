"""The `fusion` command line: demo, keys, batch, contribute, aggregate, release, plan, budget, sql, schedule,
backfill."""

from __future__ import annotations

import logging

logging.getLogger().setLevel(logging.ERROR)  # before Beam is imported: its import-time warnings are noise here

import argparse
import contextlib
import re
import shutil
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pyarrow as pa
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fusion.config.federation import Config, load_config
from fusion.errors import FusionError, ReleaseNotReady
from fusion.runtime.shutdown import exit_now
from schemas.tables import TABLE_SCHEMAS

if TYPE_CHECKING:  # fusion.release.plan imports Beam and the accountants: commands that run no pipeline never load it
    from fusion.release.plan import ReleasePlan

UNMASK_POLL_SECONDS = 2.0  # how often `fusion contribute --unmask --wait` looks for acknowledgements

_WIDTH = None if sys.stdout.isatty() else max(120, shutil.get_terminal_size((120, 24)).columns)
console = Console(width=_WIDTH, log_path=False)  # log lines stay whole in a cron or systemd log
err_console = Console(stderr=True, width=_WIDTH, log_path=False)


def _non_negative(kind: Callable[[str], float]) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` that is zero or more (a usage error otherwise)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"{text} is negative; give 0 or more")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion",
        description="Privacy-preserving sensor fusion. Commands that run pipelines also take Apache Beam options "
        "(e.g. --runner=FlinkRunner).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", required=True, help="federation config (TOML)")
        return p

    def with_interval(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--start", required=True, help="interval start, ISO 8601 (UTC if no offset)")
        p.add_argument("--end", required=True, help="interval end (exclusive)")
        return p

    demo = sub.add_parser("demo", help="build the demo federation and run a batch release on it")
    demo.add_argument(
        "--dir", default="demo", help="where to build it: a new or empty directory, or an earlier demo (replaced)"
    )
    demo.add_argument(
        "--days", type=int, default=15,
        help="days of feed data to generate; all but the last are released (two weeks of history to forecast from)",
    )

    keys = with_config(sub.add_parser("keys", help="key holder: create the HE keys; an institution: --institution ID"))
    keys.add_argument("--institution", help="create this institution's signing key and register it")
    keys.add_argument("--aggregator", action="store_true", help="create the aggregator's signing key, register it")
    keys.add_argument(
        "--release-signing",
        action="store_true",
        help="key holder: create (or with --overwrite rotate) only the release-signing key, and register it",
    )
    keys.add_argument("--overwrite", action="store_true", help="replace existing keys")

    batch = with_interval(with_config(sub.add_parser("batch", help="run every role for an interval on this machine")))
    batch.add_argument(
        "--accept-rejects",
        action="store_true",
        help="contribute even if more of the interval's rows were rejected than the institution's max_reject_rate "
        "(by default it then seals nothing)",
    )
    batch.add_argument(
        "--in-process",
        action="store_true",
        help="run every role step in this process without building a Beam pipeline (the same steps; faster for "
        "one machine; not with Beam options)",
    )
    stream = with_config(sub.add_parser("stream", help="stream the feeds: release each window as it closes"))
    stream.add_argument("--stdin", metavar="INSTITUTION", help="also read this institution's JSON lines on stdin")
    stream.add_argument(
        "--drain", action="store_true",
        help="stop once the inputs are exhausted, releasing every window of the grid up to --until (or up to now)",
    )
    stream.add_argument(
        "--until", metavar="TIME",
        help="release no window ending after this time (ISO 8601, UTC if no offset); stop once all up to it are",
    )
    stream.add_argument(
        "--status-every", type=_non_negative(float), default=60.0, metavar="SECONDS",
        help="when the output is not a terminal (systemd, a container), log the status line this often",
    )
    stream.add_argument(
        "--source-job", action="store_true", help="run the streaming Beam job over Kafka/Pub/Sub (stream.source)"
    )
    stream.add_argument(
        "--releases-only", action="store_true", help="release windows a streaming job has spooled (pane markers)"
    )
    contribute = with_interval(with_config(sub.add_parser(
        "contribute",
        help="institution: seal a contribution",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status:\n"
        "  0  the contribution is sealed and in the exchange; with --unmask, the answer to the roster is written\n"
        "  3  with --unmask: the roster is acknowledged, but the answer must wait for more acknowledgements (or,\n"
        "     until the time printed, for those that let it also remove this institution's excess noise): run\n"
        "     it again later, or wait with --wait SECONDS. Nothing is wrong; nothing is answered yet\n"
        "  1  refused or failed (the message says why and what to do): e.g. declared absent, the interval\n"
        "     already sealed under other parameters, no roster yet, a roster whose contributions are not in\n"
        "     their places\n"
        "  2  bad arguments (usage)\n"
        "  130  interrupted (Ctrl-C)",
    )))
    contribute.add_argument("--institution", required=True, help="the institution id from the config")
    contribute.add_argument(
        "--accept-rejects",
        action="store_true",
        help="contribute even if more of the interval's rows were rejected than the institution's max_reject_rate "
        "(by default it then seals nothing)",
    )
    contribute.add_argument(
        "--unmask",
        action="store_true",
        help="unmask round: acknowledge the aggregator's roster, and answer it (shares of the seeds, and of the mask "
        "keys held with the absent) once more than half of the federation has acknowledged the same roster",
    )
    contribute.add_argument(
        "--wait",
        type=_non_negative(float),
        default=0.0,
        metavar="SECONDS",
        help="with --unmask: wait up to this long for the other institutions' acknowledgements (default 0)",
    )
    aggregate = with_interval(with_config(sub.add_parser(
        "aggregate",
        help="aggregator: sum the contributions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status:\n"
        "  0  aggregated: the aggregate envelope is in the exchange, ready for `fusion release`\n"
        "  3  not finished, nothing wrong: waiting for missing institutions until the deadline (or --now), or the\n"
        "     roster is closed and the unmask round is open: the institutions named run `fusion contribute\n"
        "     --unmask`, then run `fusion aggregate` again. Refused envelopes (each with its reason) are printed\n"
        "     either way\n"
        "  1  refused (quorum not met, contributions of the roster lost, masks that cannot be removed: the\n"
        "     reason is printed and left for the key holder, who audits it) or failed\n"
        "  2  bad arguments (usage)\n"
        "  130  interrupted (Ctrl-C)",
    )))
    aggregate.add_argument(
        "--now", action="store_true", help="declare missing institutions absent without waiting for the deadline"
    )
    with_interval(with_config(sub.add_parser(
        "release",
        help="key holder: decrypt and publish to the store",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status:\n"
        "  0  released, or already released (nothing done)\n"
        "  3  no aggregate yet (the aggregator has not finished, or its unmask round is open): run it again once\n"
        "     `fusion aggregate` has aggregated. A poll: nothing is audited or charged\n"
        "  1  refused: the aggregator refused the release, or the privacy budget is spent (both recorded in\n"
        "     `audit`), or the aggregate fails a check (not signed by the registered aggregator...); or failed\n"
        "  2  bad arguments (usage)\n"
        "  130  interrupted (Ctrl-C)",
    )))

    plan = with_config(sub.add_parser("plan", help="predicted noise and budget of a release; spends nothing"))
    plan.add_argument("--contributors", type=int, default=None, help="institutions assumed to contribute")
    plan.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")

    budget = with_config(sub.add_parser("budget", help="privacy budget spent and left per period"))
    budget.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")

    check = with_config(
        sub.add_parser("verify", help="check every release in the store against the key holder's signature")
    )
    check.add_argument("--release", help="check this release only")
    check.add_argument(
        "--seen",
        type=_non_negative(int),
        default=0,
        metavar="SEQUENCE",
        help="the highest sequence number you saw in an earlier check: releases up to it must still be there",
    )
    check.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")

    sql = with_config(sub.add_parser("sql", help="query the store (read-only SQL)"))
    sql.add_argument(
        "query",
        help="one query (SELECT, WITH, FROM, VALUES, PIVOT, SUMMARIZE, ...) over the store's tables: "
        + ", ".join(TABLE_SCHEMAS),
    )
    from fusion.config.sql_limits import SqlLimits

    defaults = SqlLimits()
    sql.add_argument(
        "--timeout", type=_sql_limit("timeout"), metavar="DURATION",
        help="stop the query once it has run this long, its output written included, e.g. 30s or 5m (default: "
        f"timeout in the config's [sql] block, else {defaults.timeout})",
    )
    sql.add_argument(
        "--max-rows", type=_sql_limit("max_rows"), metavar="N",
        help=f"refuse a result of more rows (default: max_rows in [sql], else {defaults.max_rows})",
    )
    sql.add_argument(
        "--max-size", type=_sql_limit("max_size"), metavar="SIZE",
        help="refuse a result larger than this in Arrow form, e.g. 512MB or 2GiB (default: max_size in [sql], "
        f"else {defaults.max_size})",
    )
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")

    from fusion.cli.schedule import add_parsers

    add_parsers(sub)
    from fusion.cli.mechanisms import add_parsers as add_mechanism_parsers

    add_mechanism_parsers(sub)
    from fusion.cli.forecast import add_parsers as add_forecast_parsers

    add_forecast_parsers(sub)
    from fusion.cli.serve import add_parsers as add_serve_parsers

    add_serve_parsers(sub)
    from fusion.cli.train import add_parsers as add_train_parsers

    add_train_parsers(sub)
    for command in sub.choices.values():
        command.formatter_class = _HelpFormatter
    return parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs as written (the exit statuses), and every option's default where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _plan(args: argparse.Namespace) -> ReleasePlan:
    from fusion.release.plan import parse_time, plan_release

    config = load_config(args.config)
    return plan_release(config, parse_time(args.start), parse_time(args.end))


def print_arrow(table: pa.Table, fmt: str = "table", *, title: str | None = None) -> None:
    """Print an Arrow table as a readable table, CSV or JSON lines (any column type: fusion/cli/formats.py)."""
    from rich.text import Text

    from fusion.cli.formats import cell_text, write_csv, write_json_lines

    if fmt == "csv":
        write_csv(table.schema, table.to_batches(), sys.stdout)
        return
    if fmt == "json":
        write_json_lines(table.to_batches(), sys.stdout)
        return
    out = Table(title=title, show_lines=False)
    for name in table.column_names:
        out.add_column(Text(name), overflow="fold")  # Text: a name or value is never read as rich markup
    for batch in table.to_batches():
        for values in zip(*(column.to_pylist() for column in batch.columns), strict=True):
            out.add_row(*(Text(cell_text(value)) for value in values))
    console.print(out)
    console.print(f"[dim]{table.num_rows} row(s)[/dim]")


def _print_counts(row_counts: dict[str, dict[str, Any]], *, withheld: bool = True) -> None:
    table = Table(title="Rows per institution")
    # `bounded`: accepted readings entity-level contribution bounding left out (shown when there are any).
    bounded = any(counts.get("bounded") for counts in row_counts.values())
    numeric = ("read", "accepted", "rejected", *(("bounded",) if bounded else ()))
    for col in ("institution", *numeric, "reasons"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for inst, counts in sorted(row_counts.items()):
        if not counts:
            table.add_row(inst, *("-" for _ in numeric), "contributed elsewhere (no local report)")
            continue
        rejected = counts.get("rejected", {})
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())) or "-"
        cells = [str(counts["read"]), str(counts["accepted"]), str(sum(rejected.values()))]
        cells += [str(counts.get("bounded", 0))] if bounded else []
        table.add_row(inst, *cells, reasons)
    console.print(table)
    for inst, counts in sorted(row_counts.items()):  # what was wrong with the feeds, per institution and file
        notes = [f"no file matches {escape(path)} (missing_file)" for path in counts.get("missing", [])]
        notes += [
            f"{escape(path)}: {file['reason']}: {escape(file['fault'])}"
            for path, file in counts.get("files", {}).items()
        ]
        notes += [f"[yellow]warning[/yellow]: {escape(counts['warning'])}"] if counts.get("warning") else []
        if withheld and counts.get("withheld"):
            notes.append(f"[red]withheld[/red]: {escape(counts['withheld'])}")
        for note in notes:
            console.print(f"  {inst}: {note}", highlight=False)


def cmd_batch(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
    from pipelines.batch import run_batch

    if args.in_process and beam_args:
        raise FusionError(f"--in-process builds no Beam pipeline: drop it or the Beam options ({' '.join(beam_args)})")
    plan = _plan(args)
    started = time.monotonic()
    console.print(
        f"[bold]Batch[/bold] {plan.config.federation.id}: "
        f"{plan.layout.start.isoformat()} .. {plan.layout.end.isoformat()} "
        f"({plan.layout.cells} cells, release {plan.key.release_id})"
    )
    with console.status("starting") as status:
        stages = {
            "contribute": "institutions: validate, aggregate, add noise shares, encrypt",
            "aggregate": "aggregator: verify envelopes, check quorum, homomorphic sum, close the roster",
            "unmask": "institutions: answer the roster (shares of seeds and of mask keys with the absent); "
            "aggregator: remove the masks, sign the aggregate",
            "release": "key holder: decrypt, decode, commit to the store",
        }

        def on_stage(stage: str) -> None:
            console.log(f"[cyan]{stage}[/cyan]: {stages[stage]}")
            status.update(f"{stage}...")

        summary = run_batch(
            plan,
            beam_args=beam_args,
            on_stage=on_stage,
            accept_rejects=args.accept_rejects,
            in_process=args.in_process,
        )
    if summary.status == "already_released":
        console.print(f"Interval already released as {summary.release_id}; nothing done, no budget spent.")
        return 0
    _print_counts(summary.row_counts)
    console.print(
        f"envelopes: {summary.envelopes} accepted, {summary.refused_envelopes} refused | "
        f"cells released: {summary.cells} | epsilon spent: {summary.epsilon:.4f} "
        f"(delta {plan.params.delta:g}; period {summary.period}: {summary.period_epsilon_spent:.4f} of "
        f"{plan.config.privacy.cap:.4f}) | {time.monotonic() - started:.1f}s"
    )
    return 0


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


def cmd_contribute(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
    from pipelines.run import run_contributions

    plan = _plan(args)
    institution = plan.config.institution(args.institution)
    if args.unmask:
        from pipelines.run import run_unmask

        waited_until = time.monotonic() + max(args.wait, 0.0)
        answer = run_unmask(plan, [institution])[0]
        while answer.path is None and time.monotonic() < waited_until:
            time.sleep(min(UNMASK_POLL_SECONDS, max(waited_until - time.monotonic(), 0.0)))
            answer = run_unmask(plan, [institution])[0]
        if answer.path is None and answer.layers_until is not None:
            console.print(
                f"roster acknowledged; {len(answer.acknowledged)} signature(s) ({', '.join(answer.acknowledged)}): "
                f"waiting for {answer.needed}, or until {answer.layers_until}, so that the answer also removes this "
                "institution's excess noise: run `fusion contribute --unmask` again (or wait with --wait SECONDS)"
            )
            return 3
        if answer.path is None:
            console.print(
                f"roster acknowledged; {len(answer.acknowledged)} of the {answer.needed} acknowledgements needed "
                f"({', '.join(answer.acknowledged)}): run `fusion contribute --unmask` again once more "
                "institutions have acknowledged it (or wait with --wait SECONDS)"
            )
            return 3
        console.print(f"answer to the roster written: {answer.path}")
        return 0
    from pipelines.unmask import read_roster

    try:
        roster = read_roster(plan)
    except FusionError as exc:  # an unreadable or unsigned roster decides nothing: contribute, and say so
        err_console.print(f"[yellow]note[/yellow]: {escape(str(exc))}", highlight=False)
        roster = None
    if roster is not None and institution.id in roster.absent:
        raise FusionError(
            f"the aggregator closed release {plan.key.release_id} without {institution.id} (declared absent after "
            "the deadline): a contribution now would be refused, so none is sealed and no noise share is drawn"
        )
    with console.status(f"{institution.id}: contributing"):
        reports = run_contributions(plan, [institution], beam_args, accept_rejects=args.accept_rejects)
    _print_counts(reports, withheld=False)
    if reports[institution.id].get("withheld"):
        raise FusionError(reports[institution.id]["withheld"])
    console.print(f"envelope written for release {plan.key.release_id}")
    return 0


def cmd_aggregate(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
    from pipelines.run import run_aggregate

    plan = _plan(args)
    deadline = plan.layout.end + plan.config.deadline
    may_declare = args.now or datetime.now(UTC) >= deadline
    with console.status("aggregating"):
        result = run_aggregate(plan, beam_args, may_declare_absent=may_declare)
    for refused in result["refused"]:
        console.print(f"[yellow]refused[/yellow] {escape(str(refused['source']))}: {escape(str(refused['reason']))}")
    if result["status"] == "waiting":
        console.print(
            f"waiting for {', '.join(result['absent'])} until the deadline {deadline.isoformat()}; "
            "run `fusion aggregate` again then (or now with --now)"
        )
        return 3
    if result["status"] == "awaiting_unmask":
        absent = f"declared absent: {', '.join(result['absent'])}; " if result["absent"] else ""
        signed = f"signed by {', '.join(result['acknowledged'])}; " if result.get("acknowledged") else ""
        console.print(
            f"roster closed; {absent}{signed}unmask round: {', '.join(result['unmask_pending'])} run "
            "`fusion contribute --unmask` (each until it answers), then `fusion aggregate` again"
        )
        if result.get("reason"):  # answers so far hold a wrong share: more are needed
            console.print(f"[yellow]{escape(str(result['reason']))}[/yellow]")
        return 3
    console.print(f"aggregated {len(result['contributors'])} contribution(s): {', '.join(result['contributors'])}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from fusion.store.delta import Store
    from pipelines.release import release

    plan = _plan(args)
    store = Store(plan.config.store_path)
    store.ensure_tables()
    try:
        outcome = release(plan, store)
    except ReleaseNotReady as exc:
        console.print(str(exc), markup=False, highlight=False)
        return 3
    if outcome.status == "already_released":
        console.print(f"Interval already released as {outcome.release_id}; nothing done.")
    else:
        console.print(
            f"released {outcome.cells} cells as {outcome.release_id}, epsilon {outcome.epsilon:.4f}; "
            f"period {outcome.period} has spent {outcome.period_epsilon_spent:.4f} of {plan.config.privacy.cap:.4f}"
        )
    return 0


#: The most rows `fusion sql` shows as a table: no terminal shows more usefully, and a table is held whole.
TABLE_ROWS_SHOWN = 10_000


def _sql_limit(field: str) -> Callable[[str], Any]:
    """An argparse type: a value of SqlLimits' `field`, checked as the config's [sql] block checks it."""

    def parse(text: str) -> Any:
        from pydantic import ValidationError

        from fusion.config.sql_limits import SqlLimits

        try:
            return getattr(SqlLimits.model_validate({field: text}), field)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    return parse


def cmd_sql(args: argparse.Namespace) -> int:
    """CSV and JSON stream out batch by batch; a table shows the first TABLE_ROWS_SHOWN rows."""
    from fusion.api import open_store
    from fusion.cli.formats import write_csv, write_json_lines

    config = load_config(args.config, check_release=False)  # reads the store only
    limits = config.sql.replace(timeout=args.timeout, max_rows=args.max_rows, max_size=args.max_size)
    with open_store(config, limits=limits) as store, store.sql_batches(args.query) as reader:
        try:
            if args.format == "csv":
                write_csv(reader.schema, reader, sys.stdout)
                return 0
            if args.format == "json":
                write_json_lines(reader, sys.stdout)
                return 0
        except BrokenPipeError:  # the reader of a pipe stopped reading (`| head`): stop quietly, as SIGPIPE would
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
            return 141
        batches: list[pa.RecordBatch] = []
        for batch in reader:
            batches.append(batch)
            if sum(b.num_rows for b in batches) > TABLE_ROWS_SHOWN:  # a batch or two: BATCH_ROWS rows each
                break  # the rest is never read
        table = pa.Table.from_batches(batches, schema=reader.schema)
    print_arrow(table.slice(0, TABLE_ROWS_SHOWN))
    if table.num_rows > TABLE_ROWS_SHOWN:
        console.print(f"[dim]the result has more rows than the {TABLE_ROWS_SHOWN:,} shown: --format csv or json "
                      "writes them all[/dim]")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from fusion.release.planning import privacy_plan

    config = load_config(args.config)
    try:
        plan, metrics = privacy_plan(config, contributors=args.contributors)
    except ValueError as exc:
        raise FusionError(f"--contributors: {exc}") from None
    console.print(
        f"[bold]Privacy plan[/bold] for {config.federation.id} (nothing is spent)\n"
        f"  unit: {plan.unit}; {plan.components_per_reading} vector sums per reading\n"
        f"  sensitivity (integer units): L1 = {plan.l1:.6g}, L2 = {plan.l2:.6g}\n"
        f"  Skellam noise: variance {plan.total_variance:.6g} that no admissible coalition knows; each institution "
        f"seals {plan.share_variance:.6g} and removes its excess once the roster is known\n"
        f"  each release: epsilon {plan.epsilon:.4f} at delta {plan.delta:g}, against {plan.guarantee}\n"
        f"  masking: {plan.masking}\n"
        + "".join(
            f"  noise sd with {c.contributors} contributors: {c.to_central:.3f}x the central analytic Gaussian, "
            f"{c.to_floor:.3f}x the floor sqrt(n/(n-1-c)) for shares each contributor knows\n"
            + (
                "    (above the 1.10x target: at this noise level Skellam needs more variance than a Gaussian for the "
                "same epsilon; a smaller epsilon or a finer resolution narrows the gap)\n"
                if c.to_floor > 1.10
                else ""
            )
            for c in plan.noise
        )
        + f"  budget: cap {plan.epsilon_cap:g} per {plan.period} period -> "
        + (
            "releases of disjoint intervals compose in parallel (event level): composition does not limit them\n"
            if plan.releases_per_period is None
            else f"{plan.releases_per_period} release(s) fit (sequential composition, entity level)\n"
        )
        + f"  error bars below assume {plan.contributors} contributing institutions"
    )
    if config.models:  # training runs spend the same ledger: what each would take its period to
        from training.planning import model_plan_lines

        console.print(
            "[bold]Training[/bold] (fusion train; nothing is spent)\n" + "\n".join(model_plan_lines(config)),
            highlight=False,
        )
    if args.format == "table":  # one row per statistic, one column per metric: "sd (+-95% half-width)"
        from fusion.release.predictions import noise_table

        print_arrow(noise_table(metrics.to_pylist()), "table",
                    title="predicted noise per cell: sd (+-95% half-width), each metric's unit "
                          "(fusion/release/predictions.py)")
    else:
        print_arrow(metrics, args.format, title="predicted noise per cell")
    return 0


def cmd_budget(args: argparse.Namespace) -> int:
    from fusion.api import open_store

    with open_store(args.config) as store:
        table = store.sql(
            "SELECT period, period_start, period_end, epsilon_cap, epsilon_spent, "
            "greatest(epsilon_cap - epsilon_spent, 0) AS epsilon_left, delta, releases, "
            "coalesce(composition, 'sequential (RDP, older row)') AS composition "
            "FROM budget ORDER BY period"
        )
    if table.num_rows == 0:
        console.print("no budget spent yet")
        return 0
    print_arrow(table, args.format, title="privacy budget per period")
    if args.format == "table":
        console.print(
            "composition: parallel = event level, each reading is in one interval: releases of disjoint intervals "
            "do not add up, and the period spends what its worst instant's releases compose to (PLD); sequential = "
            "entity level: all of the period's releases compose (PLD)"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every release checked is verified (or legacy: registered as published before signing)."""
    import pyarrow as pa

    from fusion.keys.registry import load_key_holder_public_keys, load_unsigned_releases
    from fusion.store.delta import Store
    from fusion.store.provenance import GOOD, verify_releases

    config = load_config(args.config, check_release=False)  # reads the store and registry only
    from fusion.cli.mechanisms import verify_mechanisms_tables

    mechanisms_ok = args.release is not None or verify_mechanisms_tables(config, args.format)
    keys = load_key_holder_public_keys(config)
    if not keys:
        console.print(f"no key holder signing key is registered in {config.registry_path}: nothing can be verified")
        return 1
    unsigned = load_unsigned_releases(config)
    checks = verify_releases(
        Store(config.store_path), keys, unsigned=unsigned, release_id=args.release, seen=args.seen
    )
    if not checks:
        console.print("no releases in the store yet")
        return 0 if mechanisms_ok else 1
    table = pa.Table.from_pylist([vars(c) for c in checks])
    print_arrow(table, args.format, title="releases checked against the key holder's signature")
    return 0 if all(c.status in GOOD for c in checks) and mechanisms_ok else 1


def cmd_keys(args: argparse.Namespace) -> int:
    from fusion.keys.registry import create_institution_keys

    config = load_config(args.config, check_release=False)  # creating keys needs no noise calibration
    if args.aggregator:
        from fusion.keys.registry import create_aggregator_key

        key_file = create_aggregator_key(config, overwrite=args.overwrite)
        console.print(f"aggregator's signing key (mode 0600): {key_file}\nregistered in {config.registry_path}")
        return 0
    if args.release_signing:
        from fusion.keys.registry import create_key_holder_key, load_key_holder_public_keys, load_unsigned_releases
        from fusion.store.delta import Store

        published = Store(config.store_path).release_ids()
        replaced = bool(load_key_holder_public_keys(config))
        key_file = create_key_holder_key(config, published=published, overwrite=args.overwrite)
        note = (
            "the replaced key stays registered as retired, so the releases it signed still verify"
            if replaced
            else f"{len(load_unsigned_releases(config))} release(s) published before it registered as unsigned"
        )
        console.print(
            f"key holder's release-signing key (mode 0600): {key_file}\nregistered in {config.registry_path} ({note})"
        )
        return 0
    if args.institution:
        from fusion.keys.registry import AGREEMENT_KEY

        key_file = create_institution_keys(config, args.institution, overwrite=args.overwrite)
        console.print(
            f"signing key of {args.institution} (mode 0600): {key_file}\n"
            f"key-agreement key for pairwise masks (mode 0600): {key_file.parent / AGREEMENT_KEY}\n"
            f"public halves registered in {config.registry_path}"
        )
        return 0
    from fusion.keys.holder import create_keys  # TenSEAL: only the key holder's HE keys need it
    from fusion.keys.registry import key_holder_signing_key_file

    had_signing_key = key_holder_signing_key_file(config).exists()
    secret, public = create_keys(config, overwrite=args.overwrite)
    kept = "kept: releases stay verifiable" if had_signing_key else f"new, registered in {config.registry_path}"
    console.print(
        f"secret context (key holder only, mode 0600): {secret}\npublic context: {public}\n"
        f"release-signing key (mode 0600, {kept}): {key_holder_signing_key_file(config)}"
    )
    return 0


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
    from fusion.store.provenance import verify_releases

    console.print("\n[bold]Forecast[/bold] of the next day from the released history (forecasting/):")
    forecast_step(config_path, directory)
    from fusion.cli.mechanisms import demo_step

    demo_step(config_path, released)
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


#: The commands that build Beam pipelines: only they take Beam's options (--runner=..., ...).
PIPELINE_COMMANDS = frozenset({"demo", "batch", "stream", "contribute", "aggregate", "schedule", "backfill"})


def _extra_args_error(command: str, extra: Sequence[str]) -> str | None:
    """Why the arguments the command's own parser did not take are refused, or None if Beam takes them all."""
    if not extra:
        return None
    if command not in PIPELINE_COMMANDS:
        return f"unknown arguments {' '.join(extra)}: `fusion {command} --help` lists what it takes"
    stray = [a for a in extra if not a.startswith("--")]
    if stray:
        return (
            f"unexpected arguments {' '.join(extra)} (Beam options are written --name=value; `fusion {command} "
            "--help` lists the command's own)"
        )
    from apache_beam.options.pipeline_options import PipelineOptions

    for arg in extra:  # a runner's own options (RenderRunner's, ...) are registered when its module loads
        if arg.startswith("--runner="):
            from apache_beam.runners.runner import create_runner

            with contextlib.suppress(Exception):  # an unknown or uninstallable runner: Beam says so when it runs
                create_runner(arg.split("=", 1)[1])
    options = PipelineOptions(list(extra))
    try:
        unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options()))
    except SystemExit:  # Beam's own parser refused a value (--direct_num_workers=two): it printed why
        return f"invalid Beam option values in {' '.join(extra)} (Beam's message is above)"
    if unknown:
        return (
            f"unknown options {', '.join('--' + u for u in unknown)}: neither `fusion {command}` options (see "
            "--help) nor Apache Beam pipeline options"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger().setLevel(logging.ERROR)
    # Libraries' warnings (Opacus's "optimal order" notice, Beam's deprecations) go to the log, which shows errors
    # only: a user sees Fusion's own messages. Fusion itself never warns through `warnings`.
    logging.captureWarnings(True)
    # Beam logs an error raised inside a pipeline step, traceback and all, before re-raising it: a Fusion error is
    # then printed below in one line, and any other error's traceback by `run`.
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    args, beam_args = _parser().parse_known_args(argv)
    refused = _extra_args_error(args.command, beam_args)
    if refused:
        err_console.print(f"[red]error:[/red] {escape(refused)}", highlight=False)
        return 2
    try:
        if args.command == "demo":
            return cmd_demo(args, beam_args)
        if args.command == "keys":
            return cmd_keys(args)
        if args.command == "batch":
            return cmd_batch(args, beam_args)
        if args.command == "stream":
            return cmd_stream(args, beam_args)
        if args.command == "contribute":
            return cmd_contribute(args, beam_args)
        if args.command == "aggregate":
            return cmd_aggregate(args, beam_args)
        if args.command == "release":
            return cmd_release(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "budget":
            return cmd_budget(args)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command in ("forecast", "backtest"):
            from fusion.cli.forecast import cmd_backtest, cmd_forecast

            return (cmd_forecast if args.command == "forecast" else cmd_backtest)(args)
        if args.command == "serve":
            from fusion.cli.serve import cmd_serve

            return cmd_serve(args)
        if args.command == "train":
            from fusion.cli.train import cmd_train

            return cmd_train(args)
        if args.command in ("schedule", "backfill"):
            from fusion.cli.schedule import cmd_backfill, cmd_schedule

            return (cmd_schedule if args.command == "schedule" else cmd_backfill)(args, beam_args)
        from fusion.cli.mechanisms import COMMANDS as MECHANISM_COMMANDS
        from fusion.cli.mechanisms import run_command

        if args.command in MECHANISM_COMMANDS:
            return run_command(args)
        return cmd_sql(args)
    except FusionError as exc:  # its text is shown as written: `[[schedules]]` is no markup
        err_console.print(f"[red]error:[/red] {escape(_user_message(exc))}", highlight=False)
        return 1


def _user_message(exc: FusionError) -> str:
    """The error's text without what Beam appends when it re-raises an error from inside a pipeline step
    (` [while running 'Contribute[...]/ContributeShards/...']`, once per nesting)."""
    return re.sub(r"(?:\s*\[while running '[^']*'\])+\s*$", "", str(exc))


def run() -> NoReturn:
    """The console entry point: run `main`, then leave without interpreter finalization (see `exit_now`),
    whichever way it ends: a return, `--help` or a usage error (SystemExit), Ctrl-C, or an unexpected error
    (its traceback printed, as Python would, and exit status 1)."""
    try:
        code = main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # reported like Python's own handler, then the same clean exit
        traceback.print_exc()
        code = 1
    exit_now(code)


if __name__ == "__main__":
    run()
