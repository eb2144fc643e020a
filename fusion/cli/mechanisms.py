"""`fusion recommend`, `fusion decide`, `fusion decisions`, `fusion mechanism-keys` and `fusion bid`: the
mechanisms (mechanisms/), which only recommend, and the decisions of the authorities who decide.

This module imports nothing heavy: the mechanisms (scipy) are imported by their commands only."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from fusion.cli.output import console, err_console, print_arrow
from fusion.config.federation import Config, load_config
from fusion.errors import FusionError

if TYPE_CHECKING:
    from mechanisms.recommend import Outcome

COMMANDS = frozenset({"recommend", "decide", "decisions", "mechanism-keys", "bid"})
KINDS = ("dispatch", "pareto", "auction")
ACTIONS = ("ratify", "override", "reject")
REASON_CODES = ("reliability", "data_error", "policy", "emergency", "test", "other")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    recommend = sub.add_parser(
        "recommend",
        help="run a mechanism on the store's data and record its (advisory) recommendation, signed",
        description="Mechanisms only recommend: nothing is executed unless an authority ratifies or overrides the "
        "recommendation (`fusion decide`).",
    )
    recommend.add_argument("kind", nargs="?", choices=KINDS,
                           help="dispatch (DC OPF with LMPs), pareto (cost vs CO2 frontier) or auction (VCG)")
    recommend.add_argument("--config", required=True, help="federation config (TOML) with a [mechanisms] block")
    recommend.add_argument("--at", help="the window to recommend for, ISO 8601 (UTC if no offset); default: the "
                           "first forecast window after the load metric's last release, else its last release")
    recommend.add_argument("--points", type=int, default=41, help="pareto: frontier points per loading cap")
    recommend.add_argument("--carbon-price", type=float, metavar="USD_PER_T",
                           help="pareto: propose the point with the least cost + this price (>= 0) x CO2 (default: the "
                           "knee)")
    recommend.add_argument("--loading-caps", default="1.0", metavar="F,F,...",
                           help="pareto: fractions of the rated lines' limits, one sweep each (a reliability axis)")
    recommend.add_argument("--bids", type=Path, metavar="FILE", help="auction: the signed bids (`fusion bid`)")
    recommend.add_argument("--voll", type=float, metavar="USD_PER_MWH",
                           help="value of lost load (> 0): unserved load allowed at this price (default: "
                           "[mechanisms] voll, else the network's, else none)")
    recommend.add_argument("--replay", metavar="ID",
                           help="recompute recommendation ID from the store versions it recorded; exit 1 unless "
                           "its digest is reproduced")
    recommend.add_argument("--format", choices=["table", "csv", "json"], default="table",
                           help="output format of the recommendation's items")

    decide = sub.add_parser("decide", help="an authority's signer ratifies, overrides or rejects a recommendation",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="exit status:\n  0  recorded (in effect once the authority's threshold of signers "
                            "signed)\n  1  refused (recorded as a refusal in `decisions`) or failed\n"
                            "  2  bad arguments (usage)")
    decide.add_argument("action", choices=ACTIONS, help="ratify, override (with --set or --point) or reject")
    decide.add_argument("--config", required=True, help="federation config (TOML)")
    decide.add_argument("--recommendation", required=True, metavar="ID", help="the recommendation decided on")
    decide.add_argument("--authority", required=True, help="the deciding authority (registered in the registry)")
    decide.add_argument("--signer", required=True, help="who signs for it (one of the authority's signers)")
    decide.add_argument("--key", type=Path, help="the signer's key file (default "
                        "authority-keys/<authority>/<signer>.key beside the config)")
    decide.add_argument("--reason-code", choices=REASON_CODES, help="why: needed by override and reject")
    decide.add_argument("--reason", help="the reason in words")
    decide.add_argument("--set", dest="set_mw", action="append", default=[], metavar="UNIT=MW",
                        help="override: fix a unit's MW (repeatable); the cost impact is found by re-solving")
    decide.add_argument("--point", type=int, help="pareto: the frontier point adopted")
    decide.add_argument("--effective-from", help="start of the decision's effect (default: the recommendation's "
                        "valid_from)")
    decide.add_argument("--effective-to", help="end of its effect (default: the recommendation's valid_to)")
    decide.add_argument("--join", metavar="DECISION_ID",
                        help="co-sign a decision another signer of the same authority made (k-of-n)")

    report = sub.add_parser("decisions", help="report the authorities' decisions: overrides, reasons, MW and cost")
    report.add_argument("--config", required=True, help="federation config (TOML)")
    report.add_argument("--period", choices=["month", "week", "day"], default="month", help="reporting period")
    report.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")

    keys = sub.add_parser("mechanism-keys", help="create and register a signing key of the mechanisms' operator, "
                          "an authority's signer or a bidder")
    keys.add_argument("--config", required=True, help="federation config (TOML)")
    keys.add_argument("--operator", action="store_true", help="the mechanisms operator's key (signs recommendations)")
    keys.add_argument("--authority", help="an authority's id: create a key for its --signer")
    keys.add_argument("--signer", help="with --authority: the signer's name")
    keys.add_argument("--regions", help="with --authority: the regions it decides for, comma-separated (* for all)")
    keys.add_argument("--kinds", help="with --authority: the kinds it decides on, comma-separated "
                      f"({', '.join(KINDS)})")
    keys.add_argument("--threshold", type=int, help="with --authority: signatures a decision needs (k of n)")
    keys.add_argument("--bidder", help="a bidder's id: create its key")
    keys.add_argument("--keys", metavar="DIR", help="where to keep an authority's or bidder's private key (default "
                      "authority-keys/ or bidder-keys/ beside the config)")
    keys.add_argument("--overwrite", action="store_true", help="replace an existing key (an operator's or signer's "
                      "old key stays registered as retired: what it signed before still verifies)")

    bid = sub.add_parser("bid", help="a bidder signs a bid and appends it to a bids file")
    bid.add_argument("--config", required=True, help="federation config (TOML)")
    bid.add_argument("--bidder", required=True, help="the bidder (registered under [[bidders]])")
    bid.add_argument("--bus", required=True, help="the network bus of the offer")
    bid.add_argument("--mw", type=float, required=True, help="MW offered (>= 0)")
    bid.add_argument("--price", type=float, required=True, help="$/MWh asked")
    bid.add_argument("--co2", type=float, default=0.0, help="t/MWh emitted (>= 0)")
    bid.add_argument("--at", required=True, help="the auction's window, ISO 8601 (the bid is signed for it)")
    bid.add_argument("--bids", type=Path, required=True, metavar="FILE", help="the bids file to append to")
    bid.add_argument("--key", type=Path, help="the bidder's key file (default bidder-keys/<bidder>.key)")


def run_command(args: argparse.Namespace) -> int:
    handlers = {"recommend": cmd_recommend, "decide": cmd_decide, "decisions": cmd_decisions,
                "mechanism-keys": cmd_mechanism_keys, "bid": cmd_bid}
    return handlers[args.command](args)


def _config(path: str) -> Config:
    return load_config(path, check_release=False)  # the mechanisms read the store: no noise calibration needed


def parse_time(text: str, option: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise FusionError(f"{option} {text!r} is not an ISO 8601 time (e.g. 2026-01-02T18:00)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def cmd_recommend(args: argparse.Namespace) -> int:
    from mechanisms.recommend import Request, recommend, replay
    from mechanisms.records import Kind

    config = _config(args.config)
    if args.replay:
        if args.kind:
            raise FusionError("--replay recomputes a recorded recommendation; give no kind with it")
        original, again = replay(config, args.replay)
        if again.digest == original.recorded_digest:
            console.print(f"replay of {original.recorded_id} ({original.kind}, "
                          f"{original.valid_from:%Y-%m-%d %H:%M}Z) reproduces its digest {original.recorded_digest}")
            return 0
        differ = sorted({(i.item_type, i.item_key) for i in set(original.items) ^ set(again.items)})[:10]
        console.print(f"[red]replay of {original.recorded_id} does not reproduce its digest[/red]: recorded "
                      f"{original.recorded_digest}, recomputed {again.digest}"
                      + (f"; items that differ: {', '.join(f'{t}/{k}' for t, k in differ)}" if differ else ""),
                      highlight=False)
        return 1
    if not args.kind:
        raise FusionError("name a mechanism (dispatch, pareto or auction), or --replay ID")
    try:
        caps = tuple(float(c) for c in args.loading_caps.split(","))
    except ValueError:
        raise FusionError(f"--loading-caps {args.loading_caps!r}: comma-separated fractions, e.g. 1.0,0.9") from None
    request = Request(Kind(args.kind), at=parse_time(args.at, "--at") if args.at else None, points=args.points,
                      carbon_price=args.carbon_price, loading_caps=caps, bids=args.bids, voll=args.voll)
    outcome = recommend(config, request)
    show_recommendation(outcome, args.format)
    return 0


def show_recommendation(outcome: Outcome, fmt: str = "table") -> None:
    import pyarrow as pa

    rec = outcome.recommendation
    left_out = outcome.extra.get("left_out")
    if left_out:  # on stderr beside CSV or JSON, which stay clean
        from fusion.cli.formats import visible

        names = escape(visible(", ".join(f"{name} ({status})" for name, status in sorted(left_out.items()))))
        forecasts = rec.inputs.get("forecasts_skipped", [])
        (console if fmt == "table" else err_console).print(
            f"left out {len(left_out)} release(s) that `fusion verify` does not call verified or legacy: {names}"
            + (f", and {len(forecasts)} forecast(s) that read them" if forecasts else ""), highlight=False)
    not_replayed = outcome.extra.get("not_replayed")
    if not_replayed:  # forecasts rows anyone could have written: named, with why, beside the releases left out
        from fusion.cli.formats import visible

        names = escape(visible("; ".join(f"{name} {why}" for name, why in sorted(not_replayed.items()))))
        (console if fmt == "table" else err_console).print(
            f"left out {len(not_replayed)} forecast(s) that do not replay from the releases they name: {names}",
            highlight=False)
    if outcome.kept:  # nothing new to decide on: only what does not verify, or the tables' versions, changed
        (console if fmt == "table" else err_console).print(
            f"recommendation {rec.recommendation_id} kept in force: this run read the same verified releases and "
            "forecasts and gives the same answer; only what does not verify, or the store's versions, changed since "
            "it was made (`fusion verify` reports what does not verify)", highlight=False)
    if fmt != "table":
        print_arrow(rec.rows().select(["recommendation_id", "item_type", "item_key", "value", "unit"]), fmt)
        return
    d = outcome.dispatch
    if d is not None:
        values = rec.items_of
        lmp, energy, congestion, loads = (values(t) for t in ("lmp", "lmp_energy", "lmp_congestion", "load_mw"))
        def shown(values: dict[str, float | None]) -> list[float | None]:
            return [None if values[b] is None else round(values[b] or 0.0, 2) for b in d.bus_ids]

        print_arrow(pa.table({"bus": list(d.bus_ids), "load_mw": shown(loads), "lmp": shown(lmp),
                              "energy": shown(energy), "congestion": shown(congestion)}),
                    title=f"LMPs ($/MWh) on {d.grid}, {rec.valid_from:%Y-%m-%d %H:%M}Z")
        mw = values("dispatch_mw")
        held = values("reserve_mw")
        units = {"unit": list(d.supply_ids), "dispatch_mw": [round(mw[u] or 0.0, 2) for u in d.supply_ids]}
        if held:
            units["reserve_mw"] = [round(held.get(u) or 0.0, 2) for u in d.supply_ids]
        print_arrow(pa.table(units), title="dispatch (MW)")
        binding = list(d.binding)
        if binding:
            print_arrow(pa.table({"constraint": [b.constraint for b in binding],
                                  "shadow_price": [round(b.shadow_price, 2) for b in binding],
                                  "unit": [b.unit for b in binding], "detail": [b.detail for b in binding]}),
                        title="binding constraints")
    frontier = outcome.extra.get("frontier")
    if frontier is not None:
        print_arrow(pa.table({
            "point": [p.index for p in frontier.points],
            "proposed": ["<-" if p.index == frontier.proposed else "" for p in frontier.points],
            "loading_cap": [p.loading_cap for p in frontier.points],
            "cost_usd_h": [round(p.cost, 2) for p in frontier.points],
            "co2_t_h": [round(p.co2, 3) for p in frontier.points],
            "carbon_price_usd_t": [round(p.carbon_price, 2) for p in frontier.points],
            "max_loading": [round(p.dispatch.max_loading, 3) for p in frontier.points],
        }), title="Pareto frontier (epsilon-constraint)")
    auction = outcome.extra.get("auction")
    if auction is not None:
        print_arrow(pa.table({
            "bidder": [o.bidder for o in auction.outcomes],
            "allocation_mw": [round(o.allocation_mw, 3) for o in auction.outcomes],
            "bid_cost": [round(o.bid_cost, 2) for o in auction.outcomes],
            "vcg_payment": [round(o.vcg_payment, 2) for o in auction.outcomes],
            "lmp_payment": [round(o.lmp_payment, 2) for o in auction.outcomes],
            "pivotal": [o.pivotal for o in auction.outcomes],
        }), title="VCG payments beside LMP settlement ($/h)")
    state = "recorded" if outcome.written else "already in the store (same inputs, same answer)"
    state = "kept in force (above)" if outcome.kept else state
    console.print(f"\n{escape(rec.summary)}", highlight=False)
    console.print(f"recommendation [bold]{rec.recommendation_id}[/bold] ({rec.kind}, valid "
                  f"{rec.valid_from:%Y-%m-%d %H:%M}Z to {rec.valid_to:%H:%M}Z): {state}"
                  + (f"; supersedes {rec.supersedes}" if rec.supersedes else ""), highlight=False)


def _set_mw(pairs: list[str]) -> tuple[tuple[str, float], ...]:
    out = []
    for pair in pairs:
        unit, sep, mw = pair.rpartition("=")
        try:
            if not sep or not unit:
                raise ValueError
            out.append((unit, float(mw)))
        except ValueError:
            raise FusionError(f"--set {pair!r}: write UNIT=MW, e.g. --set Sundance=50") from None
    return tuple(out)


def cmd_decide(args: argparse.Namespace) -> int:
    from mechanisms.decisions import DecideRequest, decide
    from mechanisms.records import Action, ReasonCode

    config = _config(args.config)
    request = DecideRequest(
        action=Action(args.action), recommendation_id=args.recommendation, authority=args.authority,
        signer=args.signer, key_file=args.key, reason_code=ReasonCode(args.reason_code) if args.reason_code else None,
        reason=args.reason, set_mw=_set_mw(args.set_mw), point=args.point,
        effective_from=parse_time(args.effective_from, "--effective-from") if args.effective_from else None,
        effective_to=parse_time(args.effective_to, "--effective-to") if args.effective_to else None,
        join=args.join,
    )
    outcome = decide(config, request)
    d = outcome.decision
    impact = (f"; moves {d.deviation_mw:,.2f} MW, cost impact {d.cost_impact:+,.2f} $/h"
              if d.cost_impact is not None and d.deviation_mw is not None else "")
    done = {"ratify": "ratifies", "override": "overrides", "reject": "rejects"}[d.action]
    state = ("in effect" if outcome.effective else f"pending: {outcome.signatures} of {outcome.threshold} "
             f"signatures (others sign with --join {d.decision_id})")
    again = "" if outcome.written else " (this signer had signed it already)"
    console.print(f"decision [bold]{d.decision_id}[/bold]: {d.authority} {done} recommendation "
                  f"{d.recommendation_id}{impact}; signed by {d.signer}{again}; {state}", highlight=False)
    if outcome.unverified_input is not None:  # an override's: a ratification of it is refused
        from fusion.cli.formats import visible

        read = escape(visible(outcome.unverified_input.why(f"recommendation {d.recommendation_id}")))
        console.print(f"note: {read} "
                      "(`fusion verify` flags it and the decisions on it `unverified_input`)", highlight=False)
    return 0


def cmd_decisions(args: argparse.Namespace) -> int:
    from fusion.api import open_store
    from mechanisms.audit import audit_mechanisms, overrides_report, unverified_input_decisions

    config = _config(args.config)
    with open_store(config) as store:
        audit = audit_mechanisms(config, store)
        summary, listing = overrides_report(config, store, period=args.period, audit=audit)
    flagged = unverified_input_decisions(audit)
    if summary.num_rows == 0:
        console.print("no decisions yet")
        return 0
    print_arrow(summary, args.format, title=f"decisions per {args.period}, authority, action, reason and status "
                "(cost impact in $/h, re-solved)")
    if listing.num_rows:
        print_arrow(listing, args.format, title="overrides and rejections in effect")
    if flagged.num_rows:
        print_arrow(flagged, args.format, title="decisions on recommendations that read releases `fusion verify` "
                    "does not call verified or legacy (it fails on them)")
    return 0


def cmd_mechanism_keys(args: argparse.Namespace) -> int:
    from mechanisms import authorities

    config = _config(args.config)
    chosen = sum(bool(x) for x in (args.operator, args.authority, args.bidder))
    if chosen != 1:
        raise FusionError("choose one: --operator, --authority ID --signer NAME, or --bidder ID")
    if args.operator:
        path = authorities.create_operator_key(config, overwrite=args.overwrite)
        console.print(f"the mechanisms operator's signing key (mode 0600): {path}\nregistered in "
                      f"{config.registry_path} as [mechanism_operator]")
        return 0
    if args.authority:
        if not args.signer:
            raise FusionError("--authority needs --signer NAME (each of an authority's signers has a key)")
        path = authorities.create_signer_key(
            config, args.authority, args.signer, regions=_list(args.regions), kinds=_list(args.kinds),
            threshold=args.threshold, directory=args.keys, overwrite=args.overwrite,
        )
        authority = authorities.load_parties(config).authorities[args.authority]
        scope = "all regions" if authority.regions is None else ", ".join(sorted(authority.regions))
        console.print(f"signer {args.signer} of authority {args.authority} (mode 0600): {path}\nregistered in "
                      f"{config.registry_path}: {len(authority.signers)} signer(s), {authority.threshold} needed; "
                      f"scope {scope}; kinds {', '.join(sorted(authority.kinds))}")
        return 0
    path = authorities.create_bidder_key(config, args.bidder, directory=args.keys, overwrite=args.overwrite)
    console.print(f"bidder {args.bidder}'s signing key (mode 0600): {path}\nregistered in {config.registry_path}")
    return 0


def _list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def cmd_bid(args: argparse.Namespace) -> int:
    from mechanisms.authorities import bidder_key_file, load_parties, load_private
    from mechanisms.bids import append_bid, bid_entry, out_of_range
    from mechanisms.vcg import Bid

    bid = Bid(args.bidder, args.bus, args.mw, args.price, args.co2)
    bad = out_of_range(bid)
    if bad:
        raise FusionError(f"--{bad[0]} {getattr(bid, bad[0]):g}: {bad[1]}")
    config = _config(args.config)
    private, public = load_private(args.key or bidder_key_file(config, args.bidder), f"bidder {args.bidder}'s key")
    if load_parties(config).bidders.get(args.bidder) != public:
        raise FusionError(f"the key is not the one registered for bidder {args.bidder} (`fusion mechanism-keys "
                          f"--bidder {args.bidder}` registers one)")
    entry: dict[str, Any] = bid_entry(bid, parse_time(args.at, "--at"), private)
    append_bid(args.bids, entry)
    console.print(f"bid of {args.bidder} ({args.mw:g} MW at bus {args.bus}, {args.price:g} $/MWh) signed and "
                  f"appended to {args.bids}")
    return 0


def verify_mechanisms_tables(
    config: Config, fmt: str, *, unverified: Callable[[], Mapping[str, str] | None] | None = None
) -> bool:
    """`fusion verify`'s second part: the recommendations and decisions, when the store has any. True when none
    fails (tampered, a decision `fusion decide` would have refused, or a recommendation that read a release `fusion
    verify` does not call verified or legacy and the decisions on it: `mechanisms.audit.FAILING`). `unverified`:
    those releases, where the caller has checked them (default: `fusion.api.unverified_releases`). Imports the
    mechanisms' audit (no solver) only when there is something to check."""
    from fusion.store.delta import Store

    store = Store(config.store_path)
    if store.version("recommendations") is None and store.version("decisions") is None:
        return True
    import pyarrow as pa

    from fusion.api import open_store
    from mechanisms.audit import FAILING, verify_mechanisms

    with open_store(config) as fused:
        checks = verify_mechanisms(config, fused, unverified=unverified)
    if not checks:
        return True
    print_arrow(pa.Table.from_pylist([vars(c) for c in checks]), fmt,
                title="recommendations and decisions checked against the registry's keys")
    return not any(c.status in FAILING for c in checks)


__all__ = ["COMMANDS", "add_parsers", "run_command", "show_recommendation", "verify_mechanisms_tables"]
