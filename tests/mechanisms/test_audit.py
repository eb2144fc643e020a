"""`fusion verify` holds a stored decision to the rules `fusion decide` enforces (`mechanisms.rules`): a registered
signer who writes a decision row itself gets `invalid`, never in effect, for one `decide` would refuse; refusals
count as a signer's only when that signer's registered key signed them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import write_deltalake

import fusion.trust as release_check
from dashboard.provenance import record_checks
from dashboard.recommendations import recommendations_view
from dashboard.snapshot import Snapshot, VersionCache
from fusion.api import open_store, unverified_releases
from fusion.cli.core import main as cli_main
from fusion.cli.mechanisms import verify_mechanisms_tables
from fusion.errors import SqlLimitExceeded
from fusion.keys.registry import create_key_holder_key
from fusion.store import verification
from fusion.store.verification import verify_releases
from mechanisms import audit, tables
from mechanisms.audit import FAILING, RecordCheck, audit_mechanisms, overrides_report, verify_mechanisms
from mechanisms.authorities import load_operator_key, load_private, signer_key_file
from mechanisms.decisions import DecideRequest, DecisionRefused, decide
from mechanisms.loads import MissingLoad
from mechanisms.recommend import Request, recommend
from mechanisms.records import Action, Adopted, Decision, Kind, ReasonCode, Recommendation, now
from mechanisms.tables import read_recommendation
from tests.conftest import START, publish_signed
from tests.mechanisms.conftest import (
    FORECAST_AT,
    HOUR,
    MechFederation,
    forecast_federation,
    forecast_rows,
    load_releases,
    reissued,
)

Build = Callable[..., MechFederation]


def _checks(fed: MechFederation) -> dict[str, RecordCheck]:
    with open_store(fed.config) as store:
        return {c.record_id: c for c in verify_mechanisms(fed.config, store)}


def _report(fed: MechFederation) -> list[dict[str, object]]:
    with open_store(fed.config) as store:
        return overrides_report(fed.config, store)[0].to_pylist()


def _recommend(fed: MechFederation, kind: Kind = Kind.DISPATCH) -> Recommendation:
    return recommend(fed.config, Request(kind, at=HOUR, points=3)).recommendation


def _refused(fed: MechFederation) -> Recommendation:
    """A refused attempt (no loads for the window), as recorded."""
    with pytest.raises(MissingLoad):
        _recommend(fed)
    with open_store(fed.config) as store:
        (rid,) = set(store.sql("SELECT recommendation_id FROM recommendations").column(0).to_pylist())
        found = read_recommendation(store, rid)
    assert found is not None and found.outcome == "refused"
    return found


def _supersede(fed: MechFederation) -> Recommendation:
    fed.store.insert_new("forecasts", forecast_rows({"north": (9.0, 0.5), "south": (11.0, 0.5), "east": (10.0, 1.0)}))
    return _recommend(fed)


def _write(fed: MechFederation, decision: Decision, *, at: datetime | None = None) -> Decision:
    """Sign `decision` with alice's registered key and append its row directly, as no `fusion decide` would."""
    private, public = load_private(signer_key_file(fed.config, "grid-ops", "alice"), "alice's key")
    signed = decision.signed(private, public, signer="alice", decided_at=at or now())
    fed.store.insert_new("decisions", signed.rows())
    return signed


def _decision(
    rec: Recommendation, action: Action = Action.RATIFY, code: str | None = None, adopted: tuple[Adopted, ...] = ()
) -> Decision:
    return Decision(rec.recommendation_id, rec.digest, action.value, "grid-ops", HOUR, HOUR + timedelta(hours=1), code,
                    None, adopted)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("out_of_scope_region", "scope does not cover region(s) east, south"),
        ("out_of_scope_kind", "authority grid-ops decides on pareto recommendations, not dispatch"),
        ("reject_without_code", "a reject needs a reason code"),
        ("override_without_code", "an override needs a reason code"),
        ("unknown_code", "unknown reason code 'whim'"),
        ("override_adopting_nothing", "an override names what it changes"),
        ("ratify_adopting_something", "a ratification adopts the recommendation as it is"),
        ("superseded", "is superseded by"),
        ("refused_attempt", "is a refused attempt, not a recommendation"),
        ("effect_ends_before_it_starts", "its effect would end (2026-01-01T01:00:00.000000Z, --effective-to) no later "
         "than it starts (2026-01-01T02:00:00.000000Z, --effective-from)"),
    ],
)
def test_a_decision_decide_would_refuse_is_invalid_and_never_in_effect(
    mech_federation: Build, case: str, message: str
) -> None:
    fed = mech_federation(
        regions=["north"] if case == "out_of_scope_region" else None,
        authority_kinds="pareto" if case == "out_of_scope_kind" else None,
        releases=case != "refused_attempt",
    )
    rec = _refused(fed) if case == "refused_attempt" else _recommend(fed)
    decision = {
        "reject_without_code": _decision(rec, Action.REJECT),
        "override_without_code": _decision(rec, Action.OVERRIDE, adopted=(Adopted("Sundance", 50.0, "MW"),)),
        "unknown_code": _decision(rec, Action.REJECT, "whim"),
        "override_adopting_nothing": _decision(rec, Action.OVERRIDE, ReasonCode.POLICY.value),
        "ratify_adopting_something": _decision(rec, adopted=(Adopted("Sundance", 50.0, "MW"),)),
        "effect_ends_before_it_starts": replace(_decision(rec), effective_from=HOUR + timedelta(hours=1),
                                                effective_to=HOUR),
    }.get(case, _decision(rec))
    if case == "superseded":
        _supersede(fed)
    written = _write(fed, decision)
    check = _checks(fed)[f"{written.decision_id}/alice"]
    assert (check.status, check.effect) == ("invalid", f"{decision.action}: never in effect")
    assert check.reason.startswith("`fusion decide` would have refused it: ") and message in check.reason
    assert check.status in FAILING  # `fusion verify` exits 1
    assert _report(fed) == []  # neither in effect, pending nor refused


def test_decide_and_verify_apply_the_same_rules(mech_federation: Build) -> None:
    """What decide accepts verifies, on each kind and action; what it refuses, written directly, is invalid."""
    fed = mech_federation(regions=["north"])
    rec = _recommend(fed)
    refused = _write(fed, _decision(rec))
    with pytest.raises(DecisionRefused, match="scope does not cover"):
        decide(fed.config, DecideRequest(Action.RATIFY, rec.recommendation_id, "grid-ops", "alice"))
    assert _checks(fed)[f"{refused.decision_id}/alice"].status == "invalid"
    fed = mech_federation(subdir="all")
    pareto = _recommend(fed, Kind.PARETO)
    made = [
        decide(fed.config, DecideRequest(Action.RATIFY, pareto.recommendation_id, "grid-ops", "alice")),
        decide(
            fed.config,
            DecideRequest(
                Action.OVERRIDE,
                pareto.recommendation_id,
                "grid-ops",
                "alice",
                reason_code=ReasonCode.POLICY,
                point=0 if _proposed(pareto) else 2,
            ),
        ),
        decide(
            fed.config,
            DecideRequest(Action.REJECT, pareto.recommendation_id, "grid-ops", "alice", reason_code=ReasonCode.TEST),
        ),
    ]
    checks = _checks(fed)
    assert [checks[f"{m.decision.decision_id}/alice"].status for m in made] == ["verified"] * 3


def _proposed(rec: Recommendation) -> int:
    return int(rec.items_of("proposed_point")["index"] or 0)


def test_supersession_counts_only_before_the_decision(mech_federation: Build) -> None:
    fed = mech_federation()
    old = _recommend(fed)
    before = decide(fed.config, DecideRequest(Action.RATIFY, old.recommendation_id, "grid-ops", "alice")).decision
    new = _supersede(fed)  # created after the decision: the decision stands
    checks = _checks(fed)
    assert checks[f"{before.decision_id}/alice"].status == "verified"
    assert "in effect" in checks[f"{before.decision_id}/alice"].effect
    # Dated after the newer recommendation was created: decided on a superseded one.
    late = _write(
        fed, _decision(old, Action.REJECT, ReasonCode.OTHER.value), at=(new.created_at or now()) + timedelta(seconds=1)
    )
    assert _checks(fed)[f"{late.decision_id}/alice"].status == "invalid"


def test_refusals_count_as_a_signer_s_only_when_its_registered_key_signed_them(mech_federation: Build) -> None:
    fed = mech_federation()
    rec = _recommend(fed)
    real = decide(
        fed.config,
        DecideRequest(Action.REJECT, rec.recommendation_id, "grid-ops", "alice", reason_code=ReasonCode.DATA_ERROR),
    ).decision
    with pytest.raises(DecisionRefused, match="needs a reason code"):  # a real refusal, signed with alice's key
        decide(
            fed.config,
            DecideRequest(Action.OVERRIDE, rec.recommendation_id, "grid-ops", "alice", set_mw=(("Sundance", 50.0),)),
        )
    row = real.rows()
    # The verified rejection rewritten as a refusal (id recomputed, signature cleared), and a refusal made up.
    flipped = replace(Decision.from_row(row.to_pylist()[0]), outcome="refused", refusal="made up", signature="")
    flipped_row = flipped.rows().to_pylist()[0] | {"decision_id": flipped.decision_id}
    fed.store.insert_new("decisions", pa.Table.from_pylist([flipped_row], schema=row.schema))
    invented = Decision(
        rec.recommendation_id,
        rec.digest,
        "override",
        "grid-ops",
        HOUR,
        HOUR,
        "emergency",
        None,
        outcome="refused",
        refusal="invented",
        signer="alice",
        decided_at=now(),
    )
    fed.store.insert_new("decisions", invented.rows())
    checks = _checks(fed)
    for forged in (flipped, invented):
        check = checks[f"{forged.decision_id}/alice"]
        assert check.status == "unattested" and check.status not in FAILING
        assert "not signed by a key registered for authority grid-ops's signer alice" in check.reason
    assert sorted(c.status for c in checks.values() if "/" in c.record_id) == [
        "refusal",
        "unattested",
        "unattested",
        "verified",
    ]
    summary = {(r["action"], r["status"]): r["decisions"] for r in _report(fed)}
    assert summary == {("override", "refused"): 1, ("reject", "in effect"): 1}  # the unattested ones left out


def test_only_a_recommendation_that_verifies_supersedes(mech_federation: Build) -> None:
    """A row written into the store without the operator's key, naming a recommendation as superseded and dated
    before a decision on it, leaves that decision in effect and `fusion decide` open, and is no head that a new
    recommendation replaces."""
    fed = mech_federation()
    rec = _recommend(fed)
    ratified = decide(fed.config, DecideRequest(Action.RATIFY, rec.recommendation_id, "grid-ops", "alice")).decision
    forged = rec.rows().slice(0, 1).to_pylist()[0] | {
        "recommendation_id": "f" * 32, "digest": "f" * 64, "supersedes": rec.recommendation_id, "signer": "",
        "signature": "", "created_at": (rec.created_at or now()) - timedelta(seconds=1),
    }
    fed.store.insert_new("recommendations", pa.Table.from_pylist([forged], schema=rec.rows().schema))
    checks = _checks(fed)
    assert checks["f" * 32].status == "tampered"
    check = checks[f"{ratified.decision_id}/alice"]
    assert (check.status, check.effect) == ("verified", "ratify: 1 of 1 signature(s), in effect")
    assert [(r["action"], r["status"]) for r in _report(fed)] == [("ratify", "in effect")]
    rejected = decide(fed.config, DecideRequest(Action.REJECT, rec.recommendation_id, "grid-ops", "alice",
                                                reason_code=ReasonCode.TEST))
    assert rejected.effective
    assert _supersede(fed).supersedes == rec.recommendation_id  # not the forged row


def test_a_signature_copied_into_the_store_again_counts_once(mech_federation: Build) -> None:
    """2 of 2: alice's signed override, her row appended to `decisions` once more (no key needed, only write access
    to the store), is still one signer of two: pending in `fusion verify` and in the overrides report."""
    fed = mech_federation(signers=("alice", "bob"), threshold=2)
    rec = _recommend(fed)
    made = decide(fed.config, DecideRequest(Action.OVERRIDE, rec.recommendation_id, "grid-ops", "alice",
                                            reason_code=ReasonCode.POLICY, set_mw=(("Sundance", 50.0),)))
    assert not made.effective
    write_deltalake(fed.store.table_path("decisions"), fed.store.read("decisions"), mode="append")
    assert fed.store.read("decisions").num_rows == 2
    with open_store(fed.config) as store:
        effects = {c.effect for c in verify_mechanisms(fed.config, store) if c.table == "decisions"}
        summary, listing = overrides_report(fed.config, store)
    assert effects == {"override: 1 of 2 signature(s), pending"}
    assert [(r["status"], r["decisions"]) for r in summary.to_pylist()] == [("pending", 1)]
    assert listing.num_rows == 0


@pytest.mark.parametrize("forged_first", [True, False])
def test_a_changed_copy_of_a_decision_row_neither_forges_nor_hides_it(
    mech_federation: Build, forged_first: bool
) -> None:
    """A copy of alice's signed override with another reason and cost impact (the same id and signer: only write
    access to the store needed) is tampered, and the override stays what she signed, whichever row the table holds
    first: in the checks, the overrides report and the dashboard. The checks were looked up by id and signer, so the
    row read last gave its status to both: the forged copy in effect in the report, or the override left out."""
    fed = mech_federation()
    rec = _recommend(fed)
    made = decide(fed.config, DecideRequest(Action.OVERRIDE, rec.recommendation_id, "grid-ops", "alice",
                                            reason_code=ReasonCode.RELIABILITY, reason="line 3 out",
                                            set_mw=(("Sundance", 50.0),))).decision
    genuine = fed.store.read("decisions")
    forged = pa.Table.from_pylist(
        [genuine.to_pylist()[0] | {"reason": "FORGED reason", "cost_impact": -99999.0}], schema=genuine.schema
    )
    write_deltalake(fed.store.table_path("decisions"),
                    pa.concat_tables([forged, genuine] if forged_first else [genuine, forged]), mode="overwrite")
    in_effect = "override: 1 of 1 signature(s), in effect"
    expected = {("line 3 out", made.cost_impact, "verified", in_effect),
                ("FORGED reason", -99999.0, "tampered", "override")}
    with open_store(fed.config) as store:
        checked = audit_mechanisms(fed.config, store).decisions
        summary, listing = overrides_report(fed.config, store)
    assert {(d.reason, d.cost_impact, c.status, c.effect) for d, c in checked} == expected
    assert [(r["action"], r["status"], r["decisions"], r["cost_impact"]) for r in summary.to_pylist()] == [
        ("override", "in effect", 1, made.cost_impact)]
    assert [(r["decision_id"], r["reason"], r["cost_impact_usd_h"]) for r in listing.to_pylist()] == [
        (made.decision_id, "line 3 out", made.cost_impact)]
    with Snapshot(fed.config, VersionCache()) as snapshot:
        shown = recommendations_view(snapshot).decisions
    assert {(d.reason, d.cost_impact, d.verified, d.effect) for d in shown} == expected
    assert {d.decision_id for d in shown} == {made.decision_id}  # the id each row carries


@pytest.mark.parametrize("page_rows", [1, 40, tables.PAGE_ROWS])
def test_verify_and_the_report_read_tables_past_the_config_s_sql_limits(
    mech_federation: Build, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], page_rows: int
) -> None:
    """`fusion verify`, `fusion decisions` and the dashboard's provenance page read the mechanisms' tables whole under
    limits of their own, `recommendations` a page of whole recommendations at a time (each alone, several, all): a
    store past the config's [sql] bounds, which are for the queries people run, is checked all the same. Those bounds
    stopped them (by default 1,000,000 rows and 256MB: about two weeks of hourly Pareto recommendations)."""
    monkeypatch.setattr(tables, "PAGE_ROWS", page_rows)
    fed = mech_federation()
    old = _recommend(fed)
    ratified = decide(fed.config, DecideRequest(Action.RATIFY, old.recommendation_id, "grid-ops", "alice")).decision
    pareto = _recommend(fed, Kind.PARETO)
    new = _supersede(fed)
    late = _write(fed, _decision(old, Action.REJECT, ReasonCode.OTHER.value),
                  at=(new.created_at or now()) + timedelta(seconds=1))  # on a superseded recommendation: invalid
    stored = fed.store.read("recommendations")
    sizes = [pc.sum(pc.equal(stored["recommendation_id"], r.recommendation_id)).as_py() for r in (old, pareto, new)]
    assert min(sizes) > 10 and sum(sizes) > 40  # each recommendation past the limit below, the pages of 40 several
    expected = {old.recommendation_id: "verified", pareto.recommendation_id: "verified",
                new.recommendation_id: "verified", f"{ratified.decision_id}/alice": "verified",
                f"{late.decision_id}/alice": "invalid"}
    assert {c.record_id: c.status for c in _checks(fed).values()} == expected
    with fed.config_path.open("a") as config:
        config.write('[sql]\nmax_rows = 10\nmax_size = "4KB"\n')
    with open_store(fed.config) as store:
        with pytest.raises(SqlLimitExceeded):
            store.sql("SELECT * FROM recommendations")  # the limits hold for the queries people run
        checks = verify_mechanisms(fed.config, store)
        summary, _ = overrides_report(fed.config, store)
    assert [c.record_id for c in checks[:3]] == sorted(r.recommendation_id for r in (old, pareto, new))
    assert {c.record_id: c.status for c in checks} == expected
    assert [(r["action"], r["status"]) for r in summary.to_pylist()] == [("ratify", "in effect")]
    assert not verify_mechanisms_tables(fed.config, "csv")  # `fusion verify` lists them all, and fails on the invalid
    assert capsys.readouterr().out.count("\n") == 1 + len(expected)  # a header, then one line each
    with Snapshot(fed.config, VersionCache()) as snapshot:
        error, shown = record_checks(snapshot)
    assert error is None and {c.record_id: c.status for c in shown} == expected


def test_a_non_finite_value_in_a_stored_row_is_tampered(mech_federation: Build) -> None:
    """Fusion records finite numbers only (no digest or id is computed over another): a NaN written into either
    table is `tampered` in `fusion verify`, left out of the report, and `fusion decide` reads on past it or refuses,
    naming it."""
    fed = mech_federation()
    rec = _recommend(fed)
    made = decide(fed.config, DecideRequest(Action.RATIFY, rec.recommendation_id, "grid-ops", "alice")).decision
    row = made.rows().to_pylist()[0] | {"signer": "mallory", "cost_impact": float("nan")}
    fed.store.insert_new("decisions", pa.Table.from_pylist([row], schema=made.rows().schema))
    checks = _checks(fed)
    assert (checks[f"{made.decision_id}/mallory"].status, checks[f"{made.decision_id}/mallory"].reason) == (
        "tampered", "it holds a non-finite value (cost_impact is nan), which Fusion never records")
    assert checks[f"{made.decision_id}/alice"].status == "verified"
    assert [(r["action"], r["status"]) for r in _report(fed)] == [("ratify", "in effect")]
    rejected = decide(fed.config, DecideRequest(Action.REJECT, rec.recommendation_id, "grid-ops", "alice",
                                                reason_code=ReasonCode.TEST)).decision
    assert rejected.previous_decision_id == made.decision_id
    item = rec.rows().slice(0, 1).to_pylist()[0] | {"item_type": "lmp", "item_key": "Z", "value": float("nan")}
    fed.store.insert_new("recommendations", pa.Table.from_pylist([item], schema=rec.rows().schema))
    check = _checks(fed)[rec.recommendation_id]
    assert (check.status, check.reason) == (
        "tampered", "it holds a non-finite value (item lmp/Z is nan), which Fusion never records")
    with pytest.raises(DecisionRefused, match=r"is tampered: it holds a non-finite value \(item lmp/Z is nan\)"):
        decide(fed.config, DecideRequest(Action.RATIFY, rec.recommendation_id, "grid-ops", "alice"))


def _forged_release(region: str, *, mean: float, hours: range) -> pa.Table:
    """Cells of `load` for `region` appended under a release id the key holder never signed, released after the
    genuine ones (so the latest release of their windows, wherever every release is read)."""
    rows = load_releases(region, mean=mean, hours=hours)
    rows = rows.set_column(rows.schema.get_field_index("release_id"), "release_id",
                           pa.array(["release-forged"] * len(hours)))
    return rows.set_column(rows.schema.get_field_index("released_at"), "released_at",
                           pa.array([START + timedelta(hours=6)] * len(hours), rows.schema.field("released_at").type))


GENUINE = ("release-east-0", "release-north-0", "release-south-0")


def _with_release_signing_key(fed: MechFederation) -> None:
    """The key holder registers its release-signing key; the releases already published are legacy."""
    create_key_holder_key(fed.config, published=GENUINE)


@pytest.mark.parametrize("source", ["releases", "forecasts"])
def test_a_recommendation_that_read_a_release_that_does_not_verify_is_flagged(
    mech_federation: Build, source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A recommendation made before a release-signing key was registered read every release: here the latest of
    north's window, rows appended under an unsigned release id (or a forecast that read them). Once the key is
    registered, `fusion verify` calls that release tampered: the recommendation, still signed as it was, is
    `unverified_input`, naming it, and so is the ratification decided on it (in effect, flagged) in `fusion verify`,
    `fusion decisions` and the dashboard. The recommendation made afterwards leaves the release out and verifies."""
    fed = mech_federation()
    fed.store.insert_new("releases", _forged_release("north", mean=9.0, hours=range(1, 3)))
    if source == "forecasts":
        fed.store.insert_new("forecasts", forecast_rows(
            {"north": (9.0, 0.5), "south": (10.0, 0.5), "east": (10.0, 1.0)}, forecast_id="fc-read-forged",
            input_release_ids=("release-forged", *GENUINE)))
    old = _recommend(fed)
    assert old.item("load_mw", "B") == 270.0 and old.inputs["releases_verified"] is False
    ratified = decide(fed.config, DecideRequest(Action.RATIFY, old.recommendation_id, "grid-ops", "alice")).decision
    assert _checks(fed)[old.recommendation_id].status == "verified"  # nothing can be verified yet: nothing flagged
    _with_release_signing_key(fed)
    if source == "forecasts":  # a forecast of the genuine releases only, issued after
        fed.store.insert_new("forecasts", forecast_rows(
            {"north": (10.0, 0.5), "south": (10.0, 0.5), "east": (10.0, 1.0)}, forecast_id="fc-genuine",
            issued_at=HOUR - timedelta(minutes=30), input_release_ids=GENUINE))
    new = _recommend(fed)
    assert new.item("load_mw", "B") == 300.0 and new.supersedes == old.recommendation_id
    checks = _checks(fed)
    read = "release-forged (tampered)" + (
        ", through forecast(s) fc-read-forged-east, fc-read-forged-north, fc-read-forged-south"
        if source == "forecasts" else "")
    assert (checks[old.recommendation_id].status, checks[old.recommendation_id].reason) == (
        "unverified_input", f"it read release(s) that `fusion verify` does not call verified or legacy: {read}")
    assert (checks[new.recommendation_id].status, checks[new.recommendation_id].reason) == ("verified", "")
    decision = checks[f"{ratified.decision_id}/alice"]
    assert (decision.status, decision.effect, decision.reason) == (
        "unverified_input", "ratify: 1 of 1 signature(s), in effect",
        f"its recommendation {old.recommendation_id} read release(s) that `fusion verify` does not call verified or "
        f"legacy: {read}")
    assert {"unverified_input"} <= FAILING
    assert not verify_mechanisms_tables(fed.config, "csv")  # `fusion verify` exits 1
    capsys.readouterr()
    # `fusion decisions`: counted, flagged in the summary, and listed with the release read.
    assert [(r["action"], r["status"]) for r in _report(fed)] == [("ratify", "in effect, unverified input")]
    assert cli_main(["decisions", "--config", str(fed.config_path), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert (f'"{ratified.decision_id}/alice","grid-ops","ratify","{old.recommendation_id}",'
            '"ratify: 1 of 1 signature(s), in effect","release-forged"') in out
    # The dashboard shows the same statuses.
    with Snapshot(fed.config, VersionCache()) as snapshot:
        error, shown = record_checks(snapshot)
        view = recommendations_view(snapshot, recommendation=old.recommendation_id)
    assert error is None and {c.record_id: c.status for c in shown} == {c.record_id: c.status for c in checks.values()}
    assert view.chosen_status == "unverified_input"
    assert [(d.decision_id, d.verified) for d in view.decisions] == [(ratified.decision_id, "unverified_input")]
    # A decision on the recommendation that verifies is not flagged.
    honest = decide(fed.config, DecideRequest(Action.RATIFY, new.recommendation_id, "grid-ops", "alice")).decision
    assert _checks(fed)[f"{honest.decision_id}/alice"].status == "verified"
    assert sorted(str(r["status"]) for r in _report(fed)) == ["in effect", "in effect, unverified input"]


def test_decide_refuses_to_ratify_a_recommendation_that_read_a_release_that_does_not_verify(
    mech_federation: Build, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fusion decide ratify` on a recommendation that read a release `fusion verify` does not call verified or
    legacy is refused in one line naming the release (recorded as a refusal, nothing else written); an override of
    it is accepted and says what it read; a ratification of the fresh recommendation is decided as before."""
    fed = mech_federation()
    fed.store.insert_new("releases", _forged_release("north", mean=9.0, hours=range(1, 3)))
    old = _recommend(fed)  # made before a release-signing key was registered: it read release-forged
    _with_release_signing_key(fed)
    config, rid = str(fed.config_path), old.recommendation_id
    decide_ = ["decide", "--config", config, "--recommendation", rid, "--authority", "grid-ops", "--signer", "alice"]
    assert cli_main([decide_[0], "ratify", *decide_[1:]]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err  # one message (the console wraps it)
    assert (f"error: decision refused (recorded in `decisions`): recommendation {rid} read release(s) that `fusion "
            "verify` does not call verified or legacy: release-forged (tampered); a ratification would adopt it as it "
            "is: override it (with a reason code), or ratify a fresh recommendation") in " ".join(err.split())
    with open_store(fed.config) as store:
        rows = store.sql("SELECT action, outcome FROM decisions").to_pylist()
    assert rows == [{"action": "ratify", "outcome": "refused"}]
    assert cli_main([decide_[0], "override", *decide_[1:], "--set", "Sundance=50", "--reason-code", "data_error"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "grid-ops overrides recommendation" in out and "in effect" in out
    assert (f"note: recommendation {rid} read release(s) that `fusion verify` does not call verified or legacy: "
            "release-forged (tampered)") in out
    new = _recommend(fed)
    honest = decide(fed.config, DecideRequest(Action.RATIFY, new.recommendation_id, "grid-ops", "alice"))
    assert honest.effective and honest.unverified_input is None
    assert _checks(fed)[f"{honest.decision.decision_id}/alice"].status == "verified"


def test_a_signed_recommendation_naming_a_forged_release_or_forecast_is_flagged(mech_federation: Build) -> None:
    """Rows written by the operator's key holder without `fusion recommend`'s check (its key signs them): naming
    an unsigned release, one the store does not hold, a forecast that read the unsigned one, or a forecast the store
    does not hold, each is `unverified_input`, naming what it read; the honest recommendation is not. A
    recommendation that names nothing it read (a network of fixed loads) is checked without asking verify."""
    fed = mech_federation()
    _with_release_signing_key(fed)
    fed.store.insert_new("releases", _forged_release("north", mean=9.0, hours=range(1, 3)))
    fed.store.insert_new("forecasts", forecast_rows({"north": (9.0, 0.5)}, forecast_id="fc-forged",
                                                    input_release_ids=("release-forged",)))
    honest = _recommend(fed)
    assert honest.inputs["release_ids"] == list(GENUINE)
    private, public = load_operator_key(fed.config)

    def forged(region_loads: dict[str, str], **inputs: object) -> Recommendation:
        loads = {region: {**honest.inputs["region_loads"][region], "record": record}
                 for region, record in region_loads.items()}
        region_loads_now = honest.inputs["region_loads"] | loads
        changed = replace(honest, inputs=honest.inputs | inputs | {"region_loads": region_loads_now})
        signed = changed.signed(private, public, supersedes=None, created_at=now())
        fed.store.insert_new("recommendations", signed.rows())
        return signed

    unsigned = forged({"north": "release:release-forged"},
                      release_ids=["release-east-0", "release-forged", "release-south-0"])
    absent = forged({"south": "release:release-ghost"})  # named in its region loads only
    through = forged({"north": "forecast:fc-forged-north"}, load_source="forecasts",
                     forecast_ids=["fc-forged-north"])
    unknown = forged({"east": "forecast:fc-ghost-east"}, forecast_ids=["fc-ghost-east"])
    checks = _checks(fed)
    assert checks[honest.recommendation_id].status == "verified"
    prefix = "it read release(s) that `fusion verify` does not call verified or legacy: "
    assert {rid: (checks[rid].status, checks[rid].reason) for rid in
            (unsigned.recommendation_id, absent.recommendation_id, through.recommendation_id,
             unknown.recommendation_id)} == {
        unsigned.recommendation_id: ("unverified_input", prefix + "release-forged (tampered)"),
        absent.recommendation_id: ("unverified_input", prefix + "release-ghost (not in the store)"),
        through.recommendation_id: ("unverified_input",
                                    prefix + "release-forged (tampered), through forecast(s) fc-forged-north"),
        unknown.recommendation_id: ("unverified_input", "it read forecast(s) the store does not hold, so what they "
                                    "read cannot be checked: fc-ghost-east"),
    }


def test_a_recommendation_that_took_its_load_from_a_forecast_that_does_not_replay_is_flagged(
    mech_federation: Build,
) -> None:
    """Before `fusion recommend` replayed forecasts, a row appended under a genuine forecast's id with north's mean
    raised by 3 kW (or under an id of the forger's own), naming genuine releases, was taken as north's load, and the
    recommendation verified in `fusion verify` as signed. It is `unverified_input` now, naming the forecast and why,
    and so is the ratification decided on it; the recommendation from the forecast as issued verifies."""
    from mechanisms.recommend import _Run
    from mechanisms.tables import write_rows

    fed, ids = forecast_federation(mech_federation)
    honest = recommend(fed.config, Request(Kind.DISPATCH, at=FORECAST_AT)).recommendation
    private, public = load_operator_key(fed.config)

    def as_before(forged: pa.Table) -> Recommendation:
        """A dispatch computed and recorded as before forecasts were replayed, after `forged` was appended."""
        fed.store.insert_new("forecasts", forged)
        with open_store(fed.config) as store:
            run = _Run(fed.config, Kind.DISPATCH, honest.parameters, FORECAST_AT, store.versions, None,
                       unverified=None, record_trust=False)
            made = run.compute(store)[0].signed(private, public, supersedes=None, created_at=now())
        write_rows(fed.config, "recommendations", made.rows())
        return made

    raised = as_before(reissued(fed, ids["north"], mean=lambda means: [means[0] + 3.0, *means[1:]]))
    north = honest.inputs["region_loads"]["north"]
    assert raised.inputs["region_loads"]["north"]["value"] == pytest.approx(north["value"] + 3.0)
    made_up = as_before(reissued(fed, ids["east"], forecast_id="f-" + "0" * 24,
                                 issued_at=lambda at: [FORECAST_AT + timedelta(hours=2)] * len(at)))
    assert made_up.inputs["region_loads"]["east"]["record"] == "forecast:f-" + "0" * 24
    ratified = decide(fed.config, DecideRequest(Action.OVERRIDE, raised.recommendation_id, "grid-ops", "alice",
                                                reason_code=ReasonCode.RELIABILITY, reason="checked by hand",
                                                set_mw=(("Sundance", 50.0),))).decision
    checks = _checks(fed)
    assert (checks[honest.recommendation_id].status, checks[honest.recommendation_id].reason) == ("verified", "")
    prefix = "it read forecast(s) that do not replay from the releases they name ("
    assert checks[raised.recommendation_id].status == "unverified_input"
    assert checks[raised.recommendation_id].reason == (
        f"{prefix}{ids['north']}: the load it took for north, {north['value'] + 3.0:.6g} (SD {north['sd']:.6g}), is "
        f"not the forecast's for its window, {north['value']:.6g} (SD {north['sd']:.6g}))")
    assert checks[made_up.recommendation_id].status == "unverified_input"
    assert checks[made_up.recommendation_id].reason.startswith(
        f"{prefix}f-{'0' * 24}: its forecast_id is not the one its model, series, origin, horizon, input releases, "
        "calibration and params name")
    assert checks[f"{ratified.decision_id}/alice"].status == "unverified_input"
    assert not verify_mechanisms_tables(fed.config, "csv")  # `fusion verify` exits 1


@pytest.mark.parametrize("page_rows", [1, tables.PAGE_ROWS])
def test_verify_s_releases_are_taken_once_per_audit(
    mech_federation: Build, monkeypatch: pytest.MonkeyPatch, page_rows: int
) -> None:
    """Which releases `fusion verify` does not call verified or legacy is taken once per audit (it reads every
    release: seconds on a large store), however many pages of recommendations there are, and not at all where no
    recommendation names a release or forecast it read."""
    monkeypatch.setattr(tables, "PAGE_ROWS", page_rows)
    fed = mech_federation()
    _with_release_signing_key(fed)
    for kind in (Kind.DISPATCH, Kind.PARETO):
        _recommend(fed, kind)
    calls: list[object] = []

    def counted(config: object) -> dict[str, str] | None:
        calls.append(config)
        return unverified_releases(fed.config)

    monkeypatch.setattr(audit, "unverified_releases", counted)
    assert {c.status for c in _checks(fed).values()} == {"verified"}
    assert len(calls) == 1
    # `fusion verify` checks what the recommendations read against its own check of the releases: one in all.
    checked: list[object] = []

    def counted_releases(*args: Any, **kwargs: Any) -> object:
        checked.append(args)
        return verify_releases(*args, **kwargs)

    monkeypatch.setattr(verification, "verify_releases", counted_releases)
    monkeypatch.setattr(release_check, "verify_releases", counted_releases)
    assert cli_main(["verify", "--config", str(fed.config_path), "--format", "csv"]) == 0
    assert len(checked) == 1
    calls.clear()
    bare = mech_federation(releases=False, subdir="bare")
    _with_release_signing_key(bare)
    _refused(bare)  # a refusal that names nothing it read
    assert {c.status for c in _checks(bare).values()} == {"refusal"}
    assert calls == []


def test_a_recommendation_whose_signed_release_is_then_tampered_is_flagged(mech_federation: Build) -> None:
    """A recommendation of signed releases verifies; once a row is added to one of them (only write access to the
    store needed), `fusion verify` calls that release tampered and the recommendation `unverified_input`: in the
    dashboard too, whose check of the records is kept per version of the releases as well as of their own tables."""
    fed = mech_federation(releases=False)
    create_key_holder_key(fed.config)
    publish_signed(fed.config, fed.store, pa.concat_tables([load_releases(r) for r in ("north", "south", "east")]))
    rec = _recommend(fed)
    assert rec.inputs["release_ids"] == list(GENUINE)
    cache = VersionCache()
    with Snapshot(fed.config, cache) as snapshot:
        assert {c.record_id: c.status for c in record_checks(snapshot)[1]} == {rec.recommendation_id: "verified"}
    extra = load_releases("north", hours=range(5, 6))
    fed.store.insert_new("releases", extra.set_column(extra.schema.get_field_index("release_id"), "release_id",
                                                      pa.array(["release-north-0"])))
    check = _checks(fed)[rec.recommendation_id]
    assert (check.status, check.reason) == ("unverified_input", "it read release(s) that `fusion verify` does not "
                                            "call verified or legacy: release-north-0 (tampered)")
    with Snapshot(fed.config, cache) as snapshot:
        assert {c.record_id: c.status for c in record_checks(snapshot)[1]} == {
            rec.recommendation_id: "unverified_input"}
