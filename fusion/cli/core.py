"""The `fusion` command line: its parser (each command group's module adds its commands), `main`, which refuses
the arguments neither the command nor Beam takes and runs the command, and `run`, the console entry point."""

from __future__ import annotations

import logging

logging.getLogger().setLevel(logging.ERROR)  # before Beam is imported: its import-time warnings are noise here

import argparse
import contextlib
import re
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from rich.markup import escape

from fusion.cli import demo, inspection, keys, release
from fusion.cli.demo import cmd_demo
from fusion.cli.inspection import cmd_budget, cmd_plan, cmd_sql, cmd_verify
from fusion.cli.keys import cmd_keys
from fusion.cli.output import err_console
from fusion.cli.release import cmd_aggregate, cmd_batch, cmd_contribute, cmd_prune_exchange, cmd_release
from fusion.cli.stream import cmd_stream
from fusion.errors import FusionError
from fusion.runtime.shutdown import exit_now, own_process


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion",
        description="Privacy-preserving sensor fusion. Commands that run pipelines also take Apache Beam options "
        "(e.g. --runner=FlinkRunner).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo.add_parsers(sub)
    keys.add_parsers(sub)
    release.add_parsers(sub)  # batch, stream, contribute, aggregate, release
    inspection.add_parsers(sub)  # plan, budget, verify, sql
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
        if args.command == "prune-exchange":
            return cmd_prune_exchange(args)
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
        from fusion.cli.formats import visible  # the text it quotes (a release id, a query) moves no cursor

        err_console.print(f"[red]error:[/red] {escape(visible(_user_message(exc)))}", highlight=False)
        return 1


def _user_message(exc: FusionError) -> str:
    """The error's text without what Beam appends when it re-raises an error from inside a pipeline step
    (` [while running 'Contribute[...]/ContributeShards/...']`, once per nesting)."""
    return re.sub(r"(?:\s*\[while running '[^']*'\])+\s*$", "", str(exc))


def run() -> NoReturn:
    """The console entry point: run `main`, then leave without interpreter finalization (see `exit_now`),
    whichever way it ends: a return, `--help` or a usage error (SystemExit), Ctrl-C, or an unexpected error
    (its traceback printed, as Python would, and exit status 1)."""
    own_process()
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
