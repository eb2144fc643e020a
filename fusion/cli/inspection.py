"""The commands that read the config and the store and change nothing: `fusion plan` (predicted noise and
budget), `budget` (spent and left), `verify` (releases against the key holder's signature) and `sql`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from fusion.cli.options import non_negative, with_config
from fusion.cli.output import console, err_console, print_arrow
from fusion.config.federation import Config, load_config
from fusion.errors import FusionError, NoReleaseSigningKey
from schemas.tables import TABLE_SCHEMAS

if TYPE_CHECKING:  # the accountant loads only where a budget is read
    from fusion.store.ledger import PeriodBudget


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = with_config(sub.add_parser("plan", help="predicted noise and budget of a release; spends nothing"))
    plan.add_argument("--contributors", type=int, default=None, help="institutions assumed to contribute")
    plan.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")

    budget = with_config(
        sub.add_parser(
            "budget",
            help="privacy budget spent and left per period (where the key holder's record of its charges is "
            "readable, as its cap checks count it)",
        )
    )
    budget.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")

    check = with_config(
        sub.add_parser("verify", help="check every release in the store against the key holder's signature")
    )
    check.add_argument("--release", help="check this release only")
    check.add_argument(
        "--seen",
        type=non_negative(int),
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
    from fusion.release.planning import RELEASES_COUNTED, privacy_plan

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
        f"  contributors: {plan.fewest_contributors}\n"
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
            else f"{plan.releases_per_period}{' or more' if plan.releases_per_period >= RELEASES_COUNTED else ''} "
            "release(s) fit (sequential composition, entity level)\n"
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


#: What `fusion budget` prints per period.
BUDGET_COLUMNS = pa.schema(
    [
        ("period", pa.string()),
        ("period_start", pa.timestamp("us", tz="UTC")),
        ("period_end", pa.timestamp("us", tz="UTC")),
        ("epsilon_cap", pa.float64()),
        ("epsilon_spent", pa.float64()),
        ("epsilon_left", pa.float64()),
        ("delta", pa.float64()),
        ("releases", pa.int64()),
        ("composition", pa.string()),
        # True: the store's row is behind the key holder's record, and the figures are the record's; None: not
        # compared (no record of the period, or none readable here).
        ("store_behind", pa.bool_()),
    ]
)


def cmd_budget(args: argparse.Namespace) -> int:
    """Where the key holder's record of its charges is readable (its keys directory), each period as its ledger
    counts it, the store's row checked against that record; elsewhere the store's rows as published."""
    from fusion.api import open_store
    from fusion.store.charge_record import key_holder_record

    config = load_config(args.config, check_release=False)  # reads the store and the key holder's record only
    record = key_holder_record(config)
    recorded = None if record is None else record.rows()  # first: a charge made meanwhile finds the store ahead
    with open_store(config) as store:
        rows = store.sql("SELECT * FROM budget ORDER BY period").to_pylist()
    shown: list[tuple[dict[str, Any], bool | None]] = [(r, None) for r in rows]
    behind: list[PeriodBudget] = []
    if recorded is not None:
        from fusion.store.ledger import reconciled_periods

        periods = reconciled_periods(rows, recorded)
        shown = [(p.row, p.store_behind) for p in periods]
        behind = [p for p in periods if p.store_behind]
    notes = [_budget_source(config, reconciled=recorded is not None), *map(_behind, behind)]
    out = console if args.format == "table" else err_console  # CSV and JSON stay data alone
    if not shown:
        console.print("no budget spent yet")
        out.print(notes[0], highlight=False)
        return 0
    table = pa.Table.from_pylist(
        [
            {
                **{name: row[name] for name in BUDGET_COLUMNS.names if name in row},
                "epsilon_left": max(row["epsilon_cap"] - row["epsilon_spent"], 0.0),
                "composition": row.get("composition") or "sequential (RDP, older row)",
                "store_behind": store_behind,
            }
            for row, store_behind in shown
        ],
        schema=BUDGET_COLUMNS,
    )
    print_arrow(table, args.format, title="privacy budget per period")
    if args.format == "table":
        console.print(
            "composition: parallel = event level, each reading is in one interval: releases of disjoint intervals "
            "do not add up, and the period spends what its worst instant's releases compose to (PLD); sequential = "
            "entity level: all of the period's releases compose (PLD)"
        )
    for note in notes:
        out.print(note, highlight=False)
    return 0


def _budget_source(config: Config, *, reconciled: bool) -> str:
    from fusion.store.charge_record import CHARGE_RECORD_DIR

    if reconciled:
        return (
            "spent as the key holder's ledger counts it: the store's budget rows checked against the key holder's own "
            f"record of its charges ({config.keys_path}/{CHARGE_RECORD_DIR}), as its cap checks do"
        )
    return (
        "spent as the store's budget table publishes it, which anyone who can write to the store can change: only the "
        "key holder's `fusion budget` (its keys directory in the config) checks it against the key holder's own "
        "record of its charges, as the cap checks of releases and training rounds do"
    )


def _behind(period: PeriodBudget) -> str:
    """The line that says a period's store row is behind the key holder's record, and what each holds."""
    if not period.store_rows:
        store = "no row"
    elif len(period.store_rows) > 1:
        store = f"{len(period.store_rows)} rows"
    else:
        (held,) = period.store_rows
        store = f"epsilon {held['epsilon_spent']:.4f}, {held['releases']} release(s)"
    return (
        f"period {period.row['period']}: STORE ROW BEHIND the key holder's record (store: {store}; record: epsilon "
        f"{period.row['epsilon_spent']:.4f}, {period.row['releases']} release(s)); the row was deleted, rolled back or "
        "rewritten, or a charge crashed (or is under way) between the two writes: shown as the record counts it, and "
        "the key holder's next charge in the period rebuilds the row"
    )


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every release checked is verified (or legacy: registered as published before signing)."""
    import pyarrow as pa

    from fusion.store.verification import GOOD, ReleaseCheck
    from fusion.trust import verify

    config = load_config(args.config, check_release=False)  # reads the store and registry only
    from fusion.cli.mechanisms import verify_mechanisms_tables

    try:
        checks: list[ReleaseCheck] | None = verify(config, release_id=args.release, seen=args.seen)
    except NoReleaseSigningKey:
        checks = None
    # What the recommendations read is checked against these same checks (every release's rows are read once).
    unverified = None if checks is None else {c.release_id: c.status for c in checks if c.status not in GOOD}
    mechanisms_ok = args.release is not None or verify_mechanisms_tables(config, args.format,
                                                                         unverified=lambda: unverified)
    if checks is None:
        console.print(f"no key holder signing key is registered in {config.registry_path}: nothing can be verified")
        return 1
    if not checks:
        console.print("no releases in the store yet")
        return 0 if mechanisms_ok else 1
    table = pa.Table.from_pylist([vars(c) for c in checks])
    print_arrow(table, args.format, title="releases checked against the key holder's signature")
    return 0 if all(c.status in GOOD for c in checks) and mechanisms_ok else 1
