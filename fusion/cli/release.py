"""The release commands, one interval's roles: `fusion batch` (every role on this machine), `contribute` (an
institution), `aggregate` (the aggregator) and `release` (the key holder); `fusion stream` (fusion/cli/stream.py)
releases window after window."""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from fusion.cli.options import non_negative, with_config, with_interval
from fusion.cli.output import console, err_console
from fusion.cli.stream import add_parsers as add_stream_parsers
from fusion.config.federation import load_config
from fusion.errors import FusionError, ReleaseNotReady
from fusion.runtime.shutdown import process_owned

if TYPE_CHECKING:  # fusion.release.plan imports Beam and the accountants: commands that run no pipeline never load it
    from fusion.release.plan import ReleasePlan

UNMASK_POLL_SECONDS = 2.0  # how often `fusion contribute --unmask --wait` looks for acknowledgements


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        help="run every role step in this process without building a Beam pipeline (the same steps; the default "
        "without Beam options; any Beam option, such as --runner=DirectRunner, runs the Beam pipelines)",
    )
    add_stream_parsers(sub)
    prune = with_config(sub.add_parser(
        "prune-exchange",
        help="aggregator: remove released intervals' folders from the shared exchange once their release is older "
        "than federation.exchange_retention (or --older-than)",
    ))
    prune.add_argument(
        "--older-than",
        metavar="DURATION",
        help="remove the folders of intervals released longer ago than this (e.g. 30d, 12h, 0s); default: the "
        "config's federation.exchange_retention",
    )
    prune.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
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
        type=non_negative(float),
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


def _plan(args: argparse.Namespace) -> ReleasePlan:
    from fusion.release.plan import parse_time, plan_release

    config = load_config(args.config)
    return plan_release(config, parse_time(args.start), parse_time(args.end))


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

    if process_owned():
        # The ~200,000 objects Beam, SciPy and pandas leave at import live as long as the process: kept out of
        # the collector's full passes, each of which would otherwise walk them all (about 0.1 s of a release's CPU).
        gc.freeze()
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
            in_process=True if args.in_process else None,
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


def cmd_prune_exchange(args: argparse.Namespace) -> int:
    """Exit 0 when the prune ran (whatever it removed); 1 when no retention is given or the config is bad."""
    from fusion.config.stream import duration_or_zero
    from pipelines.retention import prune_exchange

    config = load_config(args.config)
    retention = None
    if args.older_than is not None:
        try:
            retention = duration_or_zero(args.older_than)
        except ValueError as exc:
            raise FusionError(f"--older-than: {exc}") from None
    elif config.exchange_retention is None:
        raise FusionError(
            "no retention: set federation.exchange_retention in the config (e.g. \"30d\"), or pass --older-than"
        )
    report = prune_exchange(config, retention=retention, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    size = f" ({report.removed_bytes / 1e6:,.1f} MB)" if report.removed_bytes is not None else ""
    console.print(
        f"{verb} {len(report.removed)} released interval folder(s){size} from {config.exchange_path}; kept "
        f"{len(report.kept_recent)} released too recently and {len(report.kept_unreleased)} not released",
        markup=False,
        highlight=False,
    )
    for name in report.removed:
        console.print(f"  {name}", markup=False, highlight=False)
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
