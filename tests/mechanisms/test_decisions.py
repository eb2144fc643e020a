"""Decisions by registered authorities: ratify, override (cost impact re-solved), reject; k-of-n; every refusal of
the issue's list recorded as a refusal and nothing else written; `fusion verify` over both tables; the overrides
report; signed bids for auctions."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from fusion.errors import FusionError
from mechanisms.audit import overrides_report, verify_mechanisms
from mechanisms.authorities import create_bidder_key, create_signer_key, load_private, signer_key_file
from mechanisms.bids import append_bid, bid_entry
from mechanisms.decisions import DecideRequest, DecisionRefused, decide
from mechanisms.recommend import Request, recommend, replay
from mechanisms.records import Action, Decision, Kind, ReasonCode
from mechanisms.vcg import Bid
from tests.mechanisms.conftest import HOUR, MechFederation, forecast_rows, versions

Build = Callable[..., MechFederation]


def _dispatch(fed: MechFederation) -> str:
    return recommend(fed.config, Request(Kind.DISPATCH, at=HOUR)).recommendation.recommendation_id


def _checks(fed: MechFederation) -> dict[str, str]:
    from fusion.api import open_store

    with open_store(fed.config) as store:
        return {c.record_id: c.status for c in verify_mechanisms(fed.config, store)}


def test_ratify_and_an_override_with_its_cost_impact_re_solved(mech_federation: Build) -> None:
    fed = mech_federation()
    rid = _dispatch(fed)
    lmp_d = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR)).recommendation.items_of("lmp")["D"] or 0.0
    ratified = decide(fed.config, DecideRequest(Action.RATIFY, rid, "grid-ops", "alice"))
    assert ratified.effective and ratified.decision.recommendation_sha256.startswith(rid)
    override = decide(fed.config, DecideRequest(Action.OVERRIDE, rid, "grid-ops", "alice",
                                                reason_code=ReasonCode.RELIABILITY, reason="voltage at D",
                                                set_mw=(("Sundance", 50.0),)))
    d = override.decision
    # Sundance (40 $/MWh) forced to 50 MW at bus D, whose LMP is 39.94: +50 x 0.057 $/h, no breakpoint crossed.
    assert d.cost_impact == pytest.approx(50 * (40.0 - lmp_d), abs=1e-4)  # LMPs kept to 1e-6
    assert d.deviation_mw == 50.0 and d.previous_decision_id == ratified.decision.decision_id
    assert [(a.item_key, a.value, a.unit) for a in d.adopted] == [("Sundance", 50.0, "MW")]
    rejected = decide(fed.config, DecideRequest(Action.REJECT, rid, "grid-ops", "alice",
                                                reason_code=ReasonCode.DATA_ERROR))
    assert rejected.effective
    assert set(_checks(fed).values()) == {"verified"}


def test_a_pareto_override_adopts_another_point_and_its_cost_difference(mech_federation: Build) -> None:
    fed = mech_federation()
    rec = recommend(fed.config, Request(Kind.PARETO, at=HOUR, points=5)).recommendation
    proposed = int(rec.items_of("proposed_point")["index"] or 0)
    ratified = decide(fed.config, DecideRequest(Action.RATIFY, rec.recommendation_id, "grid-ops", "alice"))
    assert [(a.item_key, a.value) for a in ratified.decision.adopted] == [("point", proposed)]
    other = 4 if proposed != 4 else 0
    d = decide(fed.config, DecideRequest(Action.OVERRIDE, rec.recommendation_id, "grid-ops", "alice",
                                         reason_code=ReasonCode.POLICY, point=other)).decision
    costs = rec.items_of("frontier_cost")
    assert d.cost_impact == pytest.approx((costs[f"{other:03d}"] or 0) - (costs[f"{proposed:03d}"] or 0), abs=1e-6)
    with pytest.raises(FusionError, match="ratify adopts the proposed point"):
        decide(fed.config, DecideRequest(Action.RATIFY, rec.recommendation_id, "grid-ops", "alice", point=other))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_reason_code", "an override needs a reason code"),
        ("unregistered_key", "is not registered for authority grid-ops's signer alice"),
        ("unknown_authority", "authority city-hall is not registered"),
        ("out_of_scope_kind", "authority grid-ops decides on pareto recommendations, not dispatch"),
        ("out_of_scope_region", "scope does not cover region(s) east, south"),
        ("tampered", "is tampered: its rows no longer match the digest"),
        ("superseded", "is superseded by"),
        ("infeasible_override", "the override cannot be re-solved: Sundance cannot be fixed at 500 MW"),
        ("effect_ends_before_it_starts", "its effect would end (2026-01-01T01:00:00.000000Z, --effective-to) no later "
         "than it starts (2026-01-01T01:00:00.000000Z, --effective-from)"),
    ],
)
def test_each_refusal_is_recorded_and_nothing_else_is_written(mech_federation: Build, tmp_path: Path, case: str,
                                                              message: str) -> None:
    kinds = "pareto" if case == "out_of_scope_kind" else None
    regions = ["north"] if case == "out_of_scope_region" else None
    fed = mech_federation(authority_kinds=kinds, regions=regions)
    rid = _dispatch(fed)
    request = DecideRequest(Action.OVERRIDE, rid, "grid-ops", "alice", reason_code=ReasonCode.RELIABILITY,
                            set_mw=(("Sundance", 50.0),))
    if case == "no_reason_code":
        request = DecideRequest(Action.OVERRIDE, rid, "grid-ops", "alice", set_mw=(("Sundance", 50.0),))
    if case == "unregistered_key":  # a key of the right shape that the registry does not list
        from fusion.keys.registry import write_private
        from privacy.signing import generate_signing_key

        write_private(tmp_path / "stray.key", generate_signing_key()[0])
        request = DecideRequest(Action.RATIFY, rid, "grid-ops", "alice", key_file=tmp_path / "stray.key")
    if case == "unknown_authority":
        request = DecideRequest(Action.RATIFY, rid, "city-hall", "alice",
                                key_file=signer_key_file(fed.config, "grid-ops", "alice"))
    if case == "tampered":  # a row added to the recommendation: its digest no longer holds
        rows = fed.store.read("recommendations").slice(0, 1)
        rows = rows.set_column(rows.schema.get_field_index("item_key"), "item_key", pa.array(["Z"]))
        fed.store.insert_new("recommendations", rows)
    if case == "superseded":
        fed.store.insert_new("forecasts", forecast_rows({"north": (9.0, 0.5), "south": (11.0, 0.5),
                                                         "east": (10.0, 1.0)}))
        _dispatch(fed)
    if case == "effect_ends_before_it_starts":  # an empty window: --effective-to defaults to valid_to
        request = DecideRequest(Action.REJECT, rid, "grid-ops", "alice", reason_code=ReasonCode.TEST,
                                effective_to=HOUR)
    if case == "infeasible_override":
        request = DecideRequest(Action.OVERRIDE, rid, "grid-ops", "alice", reason_code=ReasonCode.EMERGENCY,
                                set_mw=(("Sundance", 500.0),))
    before = versions(fed.store)
    decisions_before = fed.store.read("decisions").num_rows if before["decisions"] is not None else 0
    with pytest.raises(DecisionRefused, match="decision refused") as caught:
        decide(fed.config, request)
    assert message in str(caught.value)
    after = versions(fed.store)
    assert {n for n in after if after[n] != before[n]} == {"decisions"}
    table = fed.store.read("decisions")
    assert table.num_rows == decisions_before + 1
    assert table.column("outcome").to_pylist()[-1:] == ["refused"]
    assert message in table.column("refusal").to_pylist()[-1]
    statuses = _checks(fed)
    # A refusal signed by a key the registry lists for its signer is that signer's; one signed by any other key is
    # unattested (anyone could have written it).
    attested = "unattested" if case in ("unregistered_key", "unknown_authority") else "refusal"
    assert attested in statuses.values() and not any(
        s == "verified" for k, s in statuses.items() if "/" in k), statuses  # no decision took effect


def test_k_of_n_takes_effect_at_the_threshold(mech_federation: Build) -> None:
    fed = mech_federation(signers=("alice", "bob", "carol"), threshold=2)
    rid = _dispatch(fed)
    first = decide(fed.config, DecideRequest(Action.OVERRIDE, rid, "grid-ops", "alice", set_mw=(("Sundance", 20.0),),
                                             reason_code=ReasonCode.EMERGENCY, reason="storm"))
    assert (first.signatures, first.threshold, first.effective) == (1, 2, False)
    assert any("1 of 2 signature(s), pending" in c.effect for c in _verify(fed))
    second = decide(fed.config, DecideRequest(Action.OVERRIDE, rid, "grid-ops", "bob",
                                              join=first.decision.decision_id))
    assert second.decision.decision_id == first.decision.decision_id
    assert (second.signatures, second.effective) == (2, True)
    again = decide(fed.config, DecideRequest(Action.OVERRIDE, rid, "grid-ops", "bob",
                                             join=first.decision.decision_id))
    assert not again.written and again.signatures == 2
    summary, listing = _report(fed)
    assert summary.to_pylist() == [{"period": f"{_now():%Y-%m}", "authority": "grid-ops", "action": "override",
                                    "reason_code": "emergency", "status": "in effect", "decisions": 1,
                                    "deviation_mw": 20.0, "cost_impact": pytest.approx(first.decision.cost_impact)}]
    assert listing.column("signers").to_pylist() == ["alice, bob"]


def _verify(fed: MechFederation) -> list:  # type: ignore[type-arg]
    from fusion.api import open_store

    with open_store(fed.config) as store:
        return verify_mechanisms(fed.config, store)


def _report(fed: MechFederation) -> tuple[pa.Table, pa.Table]:
    from fusion.api import open_store

    with open_store(fed.config) as store:
        return overrides_report(fed.config, store)


def _now():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.now(UTC)


def test_verify_finds_a_forged_decision_and_a_changed_recommendation(mech_federation: Build, tmp_path: Path) -> None:
    fed = mech_federation()
    rid = _dispatch(fed)
    real = decide(fed.config, DecideRequest(Action.RATIFY, rid, "grid-ops", "alice")).decision
    from privacy.signing import generate_signing_key

    private, public = generate_signing_key()
    forged = Decision(rid, real.recommendation_sha256, "override", "grid-ops", None, None, "policy", "forged",
                      ).signed(private, public, signer="alice", decided_at=_now())
    fed.store.insert_new("decisions", forged.rows())
    statuses = _checks(fed)
    assert statuses[f"{forged.decision_id}/alice"] == "tampered"
    assert statuses[f"{real.decision_id}/alice"] == "verified"
    # A verified signer whose signature is copied onto changed content: the id no longer hashes.
    altered = real.rows().set_column(real.rows().schema.get_field_index("reason"), "reason", pa.array(["changed"]))
    altered = altered.set_column(altered.schema.get_field_index("signer"), "signer", pa.array(["mallory"]))
    fed.store.insert_new("decisions", altered)
    assert _checks(fed)[f"{real.decision_id}/mallory"] == "tampered"


def test_signed_bids_run_a_vcg_auction_and_bad_bids_are_refused(mech_federation: Build) -> None:
    from mechanisms.network import load_network, network_path

    fed = mech_federation(authority_kinds="auction")
    config = fed.config
    bids = fed.directory / "bids.toml"
    for gen in load_network(network_path("case5")).generators:
        key = create_bidder_key(config, gen.id.replace(" ", "-"))
        private, _ = load_private(key, "bidder key")
        append_bid(bids, bid_entry(Bid(gen.id.replace(" ", "-"), gen.bus, gen.capacity_mw, gen.cost), HOUR, private))
    outcome = recommend(config, Request(Kind.AUCTION, at=HOUR, bids=bids, voll=1000.0))
    rec = outcome.recommendation
    assert rec.items_of("objective")["vcg_total"] == pytest.approx(112_610.27, abs=0.01)
    assert rec.items_of("pivotal") == {"Alta": 0.0, "Park-City": 0.0, "Solitude": 1.0, "Sundance": 0.0,
                                       "Brighton": 1.0}
    assert "settle on LMPs" in rec.summary
    original, again = replay(config, rec.recommendation_id)  # the signed bids travel in its inputs
    assert again.digest == original.recorded_digest
    d = decide(config, DecideRequest(Action.OVERRIDE, rec.recommendation_id, "grid-ops", "alice",
                                     reason_code=ReasonCode.TEST, set_mw=(("Sundance#1", 10.0),))).decision
    assert d.cost_impact == pytest.approx(10 * (40.0 - (rec.items_of("lmp")["D"] or 0.0)), abs=1e-4)
    text = bids.read_text()
    for bad, message in [
        (text.replace("price = 10.0", "price = 9.0"), "the signature is not bidder Brighton's"),
        (text + '\n[[bids]]\nbidder = "ghost"\nbus = "A"\nmw = 1.0\nprice = 1.0\nwindow = "'
         + text.split('window = "')[1].split('"')[0] + '"\nsignature = "00"\n', "bidder ghost is not registered"),
        (text.replace("mw = 40.0", "mw = nan"), r"bids\[0\]\.mw = nan \(Alta\): MW offered, a finite number"),
        # One signed bid copied: Ed25519 is deterministic, so the copy carries the same signature.
        (text + "\n[[bids]]" + text.split("[[bids]]")[-1],
         r"bids\[5\] repeats bids\[4\], bidder Brighton's signed bid"),
    ]:
        bids.write_text(bad)
        with pytest.raises(FusionError, match=message):
            recommend(config, Request(Kind.AUCTION, at=HOUR, bids=bids, voll=1000.0))
    bids.write_text(text)
    with pytest.raises(FusionError, match=r"is for the window 2026-01-01T01:00:00\.000000Z, not this auction's"):
        recommend(config, Request(Kind.AUCTION, at=HOUR + timedelta(hours=1), bids=bids, voll=1000.0))


def test_an_authority_signer_key_is_private_and_registered(mech_federation: Build) -> None:
    fed = mech_federation()
    path = create_signer_key(fed.config, "city-hall", "mayor", regions=["north"], kinds=["dispatch"])
    assert path.stat().st_mode & 0o077 == 0
    text = Path(fed.config.registry_path).read_text()
    assert "[[authorities.signers]]" in text and 'id = "city-hall"' in text and "[mechanism_operator]" in text
    with pytest.raises(FusionError, match="not regions of this federation"):
        create_signer_key(fed.config, "city-hall", "clerk", regions=["mars"])
    from fusion.keys.registry import create_institution_keys
    from mechanisms.authorities import load_parties

    create_institution_keys(fed.config, "alpha")  # the federation's own keys rewrite the registry: ours stay
    parties = load_parties(fed.config)
    assert set(parties.authorities) == {"grid-ops", "city-hall"} and len(parties.operator_keys) == 1
    assert parties.authorities["city-hall"].regions == {"north"}


def test_a_rotated_signer_key_verifies_what_it_signed_before_and_signs_nothing_after(mech_federation: Build,
                                                                                    tmp_path: Path) -> None:
    from fusion.keys.registry import write_private
    from mechanisms.authorities import load_parties

    fed = mech_federation()
    rid = _dispatch(fed)
    before = decide(fed.config, DecideRequest(Action.RATIFY, rid, "grid-ops", "alice")).decision
    old, old_public = load_private(signer_key_file(fed.config, "grid-ops", "alice"), "alice's key")
    write_private(tmp_path / "old.key", old)
    create_signer_key(fed.config, "grid-ops", "alice", overwrite=True)  # `fusion mechanism-keys ... --overwrite`
    assert _checks(fed)[f"{before.decision_id}/alice"] == "verified"
    assert [r["status"] for r in _report(fed)[0].to_pylist()] == ["in effect"]
    authority = load_parties(fed.config).authorities["grid-ops"]
    assert [s.key for s in authority.signers] != [old_public] and [s.key for s in authority.retired] == [old_public]
    with pytest.raises(DecisionRefused, match="is not registered for authority grid-ops's signer alice"):
        decide(fed.config, DecideRequest(Action.REJECT, rid, "grid-ops", "alice", key_file=tmp_path / "old.key",
                                         reason_code=ReasonCode.TEST))
    # Signed with the retired key and dated after the rotation, written into the store directly: not alice's.
    late = Decision(rid, before.recommendation_sha256, "reject", "grid-ops", None, None, "test", None).signed(
        old, old_public, signer="alice", decided_at=_now())
    fed.store.insert_new("decisions", late.rows())
    assert _checks(fed)[f"{late.decision_id}/alice"] == "tampered"
    after = decide(fed.config, DecideRequest(Action.REJECT, rid, "grid-ops", "alice", reason_code=ReasonCode.TEST))
    assert after.effective and _checks(fed)[f"{after.decision.decision_id}/alice"] == "verified"


def test_recommend_decide_and_the_dashboard_read_past_the_config_s_sql_limits(
    mech_federation: Build, capsys: pytest.CaptureFixture[str]
) -> None:
    """The config's [sql] max_rows and max_size bound the queries people run, not the mechanisms' own reads. Under
    bounds below one recommendation's rows, `fusion decide` recorded a signed refusal calling the recommendation
    tampered (the limit's error taken for rows that do not form one), `fusion recommend` run again could not read
    the recommendation in force, and the dashboard's Recommendations page answered 503. Each now reads as the audit
    does (mechanisms.tables.system_limits)."""
    from dashboard.recommendations import recommendations_view
    from dashboard.snapshot import Snapshot, VersionCache
    from fusion.api import open_store
    from fusion.cli.core import main
    from fusion.errors import SqlLimitExceeded

    fed = mech_federation()
    rec = recommend(fed.config, Request(Kind.PARETO, at=HOUR, points=5)).recommendation
    assert len(rec.items) > 40
    with fed.config_path.open("a") as config:
        config.write('[sql]\nmax_rows = 10\nmax_size = "4KB"\n')
    with open_store(fed.config) as store, pytest.raises(SqlLimitExceeded):
        store.sql(f"SELECT * FROM recommendations WHERE recommendation_id = '{rec.recommendation_id}'")
    code = main(["decide", "ratify", "--config", str(fed.config_path), "--recommendation", rec.recommendation_id,
                 "--authority", "grid-ops", "--signer", "alice"])
    said = " ".join(capsys.readouterr().out.split())
    assert code == 0 and f"grid-ops ratifies recommendation {rec.recommendation_id}" in said and "in effect" in said
    decisions = fed.store.read("decisions")
    assert decisions.column("outcome").to_pylist() == ["recorded"]  # and no refusal
    again = recommend(fed.config, Request(Kind.PARETO, at=HOUR, points=5))
    assert not again.written and again.recommendation.recommendation_id == rec.recommendation_id
    with Snapshot(fed.config, VersionCache()) as snapshot:
        view = recommendations_view(snapshot)
    assert view.chosen is not None and view.chosen.recommendation_id == rec.recommendation_id
    assert len(view.items) == len(rec.items) and len(view.frontier) == 5
    assert [(d.decision_id, d.verified) for d in view.decisions] == [
        (decisions.column("decision_id")[0].as_py(), "verified")]


def test_a_recommendation_the_store_cannot_read_is_no_decision_and_not_called_tampered(mech_federation: Build) -> None:
    """A read of the store that fails (a damaged data file; a limit, before decisions read past them) was taken for
    rows that no longer form one recommendation: `fusion decide` recorded a signed refusal calling it tampered. Now
    the store's error is raised as it is, and nothing is recorded."""
    from fusion.errors import StoreUnreadable

    fed = mech_federation()
    rid = _dispatch(fed)
    for data in Path(fed.config.store_path, "recommendations").glob("*.parquet"):
        data.write_bytes(b"not parquet")
    with pytest.raises(StoreUnreadable, match="the store's table recommendations cannot be read"):
        decide(fed.config, DecideRequest(Action.RATIFY, rid, "grid-ops", "alice"))
    assert fed.store.version("decisions") is None  # no refusal recorded
