"""Recommendations from the store: loads from releases or forecasts, the reserve stated, idempotence, replay of
the digest from the recorded store versions, supersession, and the refusals (a load missing for a bus, an
infeasible network), each recorded as a signed refusal with nothing else written."""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from forecasting.run import run_forecasts
from fusion.keys.registry import create_key_holder_key
from mechanisms.loads import MissingLoad
from mechanisms.opf import Infeasible
from mechanisms.recommend import Request, recommend, replay
from mechanisms.records import Kind
from tests.conftest import START, publish_signed
from tests.mechanisms.conftest import (
    FORECAST_AT,
    FORECAST_DAYS,
    HOUR,
    MechFederation,
    daily_releases,
    forecast_federation,
    forecast_ids,
    forecast_rows,
    load_releases,
    recommendation_ids,
    reissued,
    versions,
    with_daily_releases,
)
from tests.mechanisms.test_opf import CASE5_COST, CASE5_LMP

Build = Callable[..., MechFederation]


def test_a_dispatch_from_releases_reproduces_case5_and_states_its_reserve(mech_federation: Build) -> None:
    fed = mech_federation()
    outcome = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR))
    rec = outcome.recommendation
    assert outcome.written and rec.outcome == "recorded"
    lmp = rec.items_of("lmp")
    assert [lmp[b] for b in "ABCDE"] == pytest.approx(CASE5_LMP, abs=0.01)
    assert rec.items_of("objective")["cost"] == pytest.approx(CASE5_COST, abs=0.01)
    assert rec.items_of("shadow_price")["line D-E"] == pytest.approx(62.32, abs=0.01)
    assert rec.items_of("load_mw") == {"A": 0.0, "B": 300.0, "C": 300.0, "D": 400.0, "E": 0.0}
    # Regions independent, a region's buses together: sqrt((30 x 0.25)^2 + (30 x 0.25)^2 + (40 x 0.25)^2).
    total_sd = math.sqrt(7.5**2 + 7.5**2 + 10.0**2)
    assert rec.items_of("uncertainty")["load_sd"] == pytest.approx(total_sd, abs=1e-6)
    assert rec.items_of("uncertainty")["reserve"] == pytest.approx(1.645 * total_sd, abs=1e-6)
    assert sum(v or 0.0 for v in rec.items_of("reserve_mw").values()) == pytest.approx(1.645 * total_sd, abs=1e-6)
    assert rec.inputs["load_source"] == "releases"
    assert rec.inputs["release_ids"] == ["release-east-0", "release-north-0", "release-south-0"]
    assert rec.inputs["store_versions"] == {"releases": 1, "forecasts": None}
    assert rec.inputs["releases_verified"] is False  # no release-signing key registered: nothing can be verified
    assert set(rec.regions) == {"north", "south", "east"} and "Advisory only" in rec.summary
    stored = fed.store.read("recommendations")
    assert stored.num_rows == len(rec.items) and not any(stored.column("binding").to_pylist())
    again = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR))  # same inputs, same answer: nothing new
    assert not again.written and again.recommendation.recommendation_id == rec.recommendation_id
    assert fed.store.read("recommendations").num_rows == stored.num_rows


def test_forecasts_take_over_and_the_newer_recommendation_supersedes_the_older(mech_federation: Build) -> None:
    fed = mech_federation()
    first = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR)).recommendation
    fed.store.insert_new("forecasts", forecast_rows({"north": (9.0, 0.5), "south": (11.0, 0.5), "east": (10.0, 1.0)}))
    second = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR)).recommendation
    assert second.inputs["load_source"] == "forecasts"
    assert second.items_of("load_mw") == {"A": 0.0, "B": 270.0, "C": 330.0, "D": 400.0, "E": 0.0}
    assert second.inputs["forecast_ids"] == ["fc-1-east", "fc-1-north", "fc-1-south"]
    assert second.supersedes == first.recommendation_id
    # The first still replays from the versions it recorded (forecasts did not exist then: read as empty).
    original, again = replay(fed.config, first.recommendation_id)
    assert again.digest == original.recorded_digest == first.digest
    original, again = replay(fed.config, second.recommendation_id)
    assert again.digest == second.digest


def test_a_pareto_recommendation_replays_to_its_digest(mech_federation: Build) -> None:
    fed = mech_federation()
    rec = recommend(fed.config, Request(Kind.PARETO, at=HOUR, points=9, carbon_price=50.0)).recommendation
    proposed = int(rec.items_of("proposed_point")["index"] or 0)
    assert "at 50 $/t" in rec.summary and len(rec.items_of("frontier_cost")) == 9
    assert rec.items_of("objective")["cost"] == rec.items_of("frontier_cost")[f"{proposed:03d}"]
    # The store moves on; the replay reads the versions it recorded.
    fed.store.insert_new("releases", load_releases("north", mean=20.0, hours=range(5, 6)))
    original, again = replay(fed.config, rec.recommendation_id)
    assert again.digest == original.recorded_digest


def test_a_pareto_recommendation_records_a_skipped_loading_cap_and_takes_the_value_of_lost_load(
    mech_federation: Build,
) -> None:
    fed = mech_federation()
    rec = recommend(fed.config, Request(Kind.PARETO, at=HOUR, points=3, loading_caps=(1.0, 0.05))).recommendation
    assert rec.items_of("skipped_loading_cap") == {"0.05": 0.05}
    assert ("Loading cap 0.05 skipped: no dispatch is feasible under it (network case5 is infeasible: line A-B: "
            in rec.summary)
    heavy = mech_federation(releases=False, subdir="heavy")  # 2,000 MW of load against 1,530 MW of capacity
    heavy.store.insert_new("releases", pa.concat_tables(
        [load_releases(region, mean=20.0) for region in ("north", "south", "east")]))
    dispatch = recommend(heavy.config, Request(Kind.DISPATCH, at=HOUR, voll=1000.0)).recommendation
    pareto = recommend(heavy.config, Request(Kind.PARETO, at=HOUR, points=3, voll=1000.0)).recommendation
    assert pareto.outcome == "recorded"
    assert sum(v or 0.0 for v in pareto.items_of("shed_mw").values()) == pytest.approx(
        sum(v or 0.0 for v in dispatch.items_of("shed_mw").values()))


def test_a_forecast_missing_for_a_bus_is_refused_and_recorded(mech_federation: Build) -> None:
    fed = mech_federation()
    fed.store.insert_new("forecasts", forecast_rows({"north": (9.0, 0.5), "south": (11.0, 0.5)}))
    before = versions(fed.store)
    with pytest.raises(MissingLoad, match=r"no forecast of load for region east \(bus D\) at 2026-01-01T01:00Z"):
        recommend(fed.config, Request(Kind.DISPATCH, at=HOUR))
    after = versions(fed.store)
    assert {name for name in after if after[name] != before[name]} == {"recommendations"}
    table = fed.store.read("recommendations")
    assert table.num_rows == 1 and table.column("outcome").to_pylist() == ["refused"]
    assert "bus D" in table.column("refusal")[0].as_py()
    # A release missing too: no forecasts, no release for the window.
    with pytest.raises(MissingLoad, match="no release of load for region north"):
        recommend(fed.config, Request(Kind.DISPATCH, at=HOUR + timedelta(hours=5)))


@pytest.mark.parametrize("voll", [None, 1000.0])
def test_a_negative_load_is_refused_naming_bus_region_and_release_and_recorded(mech_federation: Build,
                                                                              voll: float | None) -> None:
    """A released mean below 0 (noise on a small load, unclipped) would be generation nobody offered: refused, with
    or without a value of lost load, and recorded; never dispatched as a negative load."""
    fed = mech_federation(releases=False)
    fed.store.insert_new("releases", pa.concat_tables(
        [load_releases("north", mean=-2.0), load_releases("south"), load_releases("east")]))
    with pytest.raises(MissingLoad, match=r"the release release-north-0 of load for region north \(bus B\) at "
                       r"2026-01-01T01:00Z is -2, below 0"):
        recommend(fed.config, Request(Kind.DISPATCH, at=HOUR, voll=voll))
    table = fed.store.read("recommendations")
    assert set(table.column("outcome").to_pylist()) == {"refused"} and "bus B" in table.column("refusal")[0].as_py()


def test_an_infeasible_network_is_refused_naming_the_constraint_and_recorded(mech_federation: Build) -> None:
    fed = mech_federation()
    fed.store.insert_new("forecasts", forecast_rows({"north": (40.0, 0.1), "south": (10.0, 0.1),
                                                     "east": (10.0, 0.1)}))
    with pytest.raises(Infeasible, match="energy balance: load that cannot be served") as caught:
        recommend(fed.config, Request(Kind.DISPATCH, at=HOUR))
    refused = recommendation_ids(fed.store, outcome="refused")
    assert len(refused) == 1
    original, again = replay(fed.config, refused[0])  # a refusal replays to the same refusal
    assert again.digest == original.recorded_digest and again.refusal == str(caught.value)


def test_a_dispatch_before_any_data_or_off_the_grid_is_refused(mech_federation: Build) -> None:
    from fusion.errors import FusionError

    fed = mech_federation(releases=False)
    with pytest.raises(MissingLoad, match="no release or forecast of load in the store yet"):
        recommend(fed.config, Request(Kind.DISPATCH))
    with pytest.raises(FusionError, match="not on the 1:00:00 window grid"):
        recommend(fed.config, Request(Kind.DISPATCH, at=HOUR + timedelta(minutes=30)))


def test_the_mechanisms_write_only_their_own_tables_and_nothing_outside_the_store(mech_federation: Build) -> None:
    from mechanisms.decisions import DecideRequest, decide
    from mechanisms.records import Action, ReasonCode

    fed = mech_federation()
    fed.store.insert_new("forecasts", forecast_rows({"north": (9.0, 0.5), "south": (11.0, 0.5), "east": (10.0, 1.0)}))
    outside = {p: p.read_bytes() for p in fed.directory.rglob("*") if p.is_file() and "store" not in p.parts}
    before = versions(fed.store)
    rec = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR)).recommendation
    recommend(fed.config, Request(Kind.PARETO, at=HOUR, points=3))
    decide(fed.config, DecideRequest(Action.OVERRIDE, rec.recommendation_id, "grid-ops", "alice",
                                     reason_code=ReasonCode.RELIABILITY, set_mw=(("Sundance", 50.0),)))
    after = versions(fed.store)
    assert {name for name in after if after[name] != before[name]} == {"recommendations", "decisions"}
    assert {p: p.read_bytes() for p in fed.directory.rglob("*") if p.is_file() and "store" not in p.parts} == outside


def test_the_mechanisms_import_only_the_public_read_surface() -> None:
    """mechanisms/ reads through fusion.api (SQL) and writes its own two tables through it (write_derived, which
    refuses any other table); nothing touches the store's writer, feeds, envelopes, the exchange, HE or the
    federation's keys."""
    from fusion.api import DECISION_TABLES
    from mechanisms.tables import OWN_TABLES

    assert set(OWN_TABLES) == DECISION_TABLES
    forbidden = {"fusion.release.exchange", "fusion.keys.holder", "fusion.feeds.files", "fusion.release.contribution",
                 "fusion.store.ledger",
                 "privacy.he", "privacy.envelope", "privacy.masking", "pipelines"}
    root = Path(__file__).resolve().parents[2] / "mechanisms"
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)}, path.name
        assert not {n for n in names if n.startswith("fusion.store")}, f"{path.name} goes around fusion.api"


def test_loads_scale_with_the_statistic_and_sd(mech_federation: Build) -> None:
    fed = mech_federation()
    fed.store.insert_new("forecasts", forecast_rows({"north": (5.0, 2.0), "south": (5.0, 0.0), "east": (5.0, 0.0)}))
    rec = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR)).recommendation
    margin = rec.items_of("reserve_margin_mw")
    assert margin == {"B": pytest.approx(1.645 * 30 * 2.0)}  # only north is uncertain: all of it at bus B
    np.testing.assert_allclose([rec.items_of("load_mw")[b] for b in "BCD"], [150.0, 150.0, 200.0])


def test_a_release_from_before_mean_sd_takes_the_sd_its_interval_implies_never_zero(mech_federation: Build) -> None:
    """Rows released before the mean's SD was a column hold NULL there but their 95% interval: the load's SD is
    half its width over 1.96 (0 made the dispatch treat a noisy load as exact, with no reserve)."""
    fed = mech_federation(releases=False)
    sd = 0.25
    for region in ("north", "south", "east"):
        rows = load_releases(region, sd=sd)
        for name, value in (("mean_sd", None), ("mean_ci_low", 10.0 - 1.959964 * sd),
                            ("mean_ci_high", 10.0 + 1.959964 * sd)):
            index = rows.schema.get_field_index(name)
            rows = rows.set_column(index, rows.schema.field(index), pa.array([value] * rows.num_rows, pa.float64()))
        fed.store.insert_new("releases", rows)
    rec = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR)).recommendation
    total_sd = math.sqrt(7.5**2 + 7.5**2 + 10.0**2)  # as with the SD column: 30, 30 and 40 times 0.25
    assert rec.items_of("uncertainty")["load_sd"] == pytest.approx(total_sd, rel=1e-5)


TWO = START + timedelta(hours=2)


def _forged(region: str, *, mean: float, hours: range, release_id: str = "release-forged") -> pa.Table:
    """Cells of `load` for `region` written into the store without the key holder, released after the genuine ones
    (so the latest release of their windows, were it counted)."""
    rows = load_releases(region, mean=mean, hours=hours)
    rows = rows.set_column(rows.schema.get_field_index("release_id"), "release_id", pa.array([release_id] * len(hours)))
    return rows.set_column(rows.schema.get_field_index("released_at"), "released_at",
                           pa.array([START + timedelta(hours=6)] * len(hours), rows.schema.field("released_at").type))


def _with_release_signing_key(fed: MechFederation) -> None:
    """The key holder registers its release-signing key; the releases already published are legacy."""
    create_key_holder_key(fed.config, published=[f"release-{r}-0" for r in ("north", "south", "east")])


def test_releases_that_do_not_verify_are_left_out_and_recorded(mech_federation: Build) -> None:
    """Where a release-signing key is registered, bus loads come only from releases `fusion verify` calls verified
    or legacy, as forecasts do: a row written into the store without the key holder (north at 9.0, released later)
    was the dispatch's load, and its recommendation superseded the one built on the signed release."""
    fed = mech_federation()
    _with_release_signing_key(fed)
    honest = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR)).recommendation
    fed.store.insert_new("releases", _forged("north", mean=9.0, hours=range(1, 6)))
    kept = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR))  # the same verified inputs: the one in force kept
    assert kept.kept and kept.recommendation.recommendation_id == honest.recommendation_id
    assert kept.extra["left_out"] == {"release-forged": "tampered"}
    rec = recommend(fed.config, Request(Kind.DISPATCH, at=TWO)).recommendation  # a window not recommended before
    assert rec.items_of("load_mw") == honest.items_of("load_mw") == {"A": 0.0, "B": 300.0, "C": 300.0, "D": 400.0,
                                                                    "E": 0.0}
    assert rec.inputs["release_ids"] == ["release-east-0", "release-north-0", "release-south-0"]
    assert honest.inputs["releases_verified"] is True and honest.inputs["unverified_releases_skipped"] == []
    assert rec.inputs["releases_verified"] is True and rec.inputs["unverified_releases_skipped"] == ["release-forged"]
    original, again = replay(fed.config, rec.recommendation_id)
    assert again.digest == original.recorded_digest == rec.digest
    # The window a dispatch is for by default is the last one a good release holds, not the forged rows' last.
    assert recommend(fed.config, Request(Kind.DISPATCH)).recommendation.valid_from == TWO
    # A window only the forged rows hold for north is refused, naming them, and the refusal records them.
    with pytest.raises(MissingLoad, match=r"no release of load for region north \(bus B\) at 2026-01-01T05:00Z that "
                       r"`fusion verify` calls verified or legacy; left out: release-forged \(tampered\)"):
        recommend(fed.config, Request(Kind.DISPATCH, at=START + timedelta(hours=5)))
    refused = recommendation_ids(fed.store, outcome="refused")
    original, again = replay(fed.config, refused[0])
    assert original.inputs["unverified_releases_skipped"] == ["release-forged"]
    assert again.digest == original.recorded_digest



def test_a_row_that_does_not_verify_does_not_displace_a_ratified_recommendation(mech_federation: Build) -> None:
    """A row written into the store without the key holder changed a re-run's inputs (the releases table's version;
    the window's releases left out), so `fusion recommend` run again recorded a new recommendation superseding the
    ratified one, on which no decision could then be made. Now the recommendation in force is kept, nothing written,
    and the rows left out named; what verifies changing (a newer signed release) still supersedes it."""
    from mechanisms.decisions import DecideRequest, decide
    from mechanisms.records import Action, ReasonCode
    from tests.mechanisms.test_decisions import _checks

    fed = mech_federation()
    _with_release_signing_key(fed)
    honest = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR)).recommendation
    ratified = decide(fed.config, DecideRequest(Action.RATIFY, honest.recommendation_id, "grid-ops", "alice"))
    assert ratified.effective
    stored = fed.store.read("recommendations").num_rows
    # Forged rows of another window (only the releases table's version moves), then of this one (left out).
    for hours, release in ((range(9, 10), "release-elsewhere"), (range(1, 2), "release-forged")):
        fed.store.insert_new("releases", _forged("north", mean=9.0, hours=hours, release_id=release))
        again = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR))
        assert again.kept and not again.written and again.recommendation.recommendation_id == honest.recommendation_id
        assert again.recommendation.supersedes is None and again.recommendation.digest == honest.digest
    assert again.extra["left_out"] == {"release-forged": "tampered"}
    assert fed.store.read("recommendations").num_rows == stored
    # Still in force: a decision on it is made (not refused as superseded), and both verify.
    rejected = decide(fed.config, DecideRequest(Action.REJECT, honest.recommendation_id, "grid-ops", "alice",
                                                reason_code=ReasonCode.DATA_ERROR))
    assert rejected.effective
    checks = _checks(fed)
    assert checks[honest.recommendation_id] == "verified"
    assert {checks[f"{d.decision.decision_id}/alice"] for d in (ratified, rejected)} == {"verified"}
    again = load_releases("north", mean=9.5, hours=range(1, 2))
    for name, value in (("release_id", "release-north-again"), ("released_at", START + timedelta(hours=7))):
        index = again.schema.get_field_index(name)
        again = again.set_column(index, name, pa.array([value], again.schema.field(name).type))
    publish_signed(fed.config, fed.store, again)
    newer = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR))
    assert newer.written and not newer.kept and newer.recommendation.supersedes == honest.recommendation_id
    assert newer.recommendation.items_of("load_mw")["B"] == 285.0


def test_forecasts_that_read_a_release_that_does_not_verify_are_left_out(mech_federation: Build) -> None:
    """forecasting/ reads only releases that verify when it issues a forecast; one that read a release `fusion
    verify` does not call verified or legacy (issued before the key was registered, or before the release stopped
    verifying) is left out, and the window's latest good forecast counts."""
    fed = mech_federation(releases=False)
    genuine = with_daily_releases(fed)
    issued = FORECAST_AT + timedelta(hours=1)
    good = forecast_ids(run_forecasts(fed.config, metrics=["load"], horizon="24h", now=issued))
    north = forecast_ids(run_forecasts(fed.config, metrics=["load"], regions=["north"], horizon="48h",
                                        now=issued + timedelta(minutes=1)))
    # Rows written into the store without the key holder, before it registered its key: a forecast read them.
    fed.store.insert_new("releases", pa.concat_tables([_later(daily_releases(r, FORECAST_DAYS - 1,
                                                                             release_id="release-forged"))
                                                       for r in ("north", "south", "east")]))
    tainted = forecast_ids(run_forecasts(fed.config, metrics=["load"], horizon="48h", now=issued + timedelta(hours=1)))
    create_key_holder_key(fed.config, published=genuine)
    rec = recommend(fed.config, Request(Kind.DISPATCH, at=FORECAST_AT)).recommendation
    assert rec.inputs["load_source"] == "forecasts"
    assert rec.inputs["forecast_ids"] == sorted([north["north"], good["south"], good["east"]])
    assert rec.inputs["forecasts_skipped"] == sorted(tainted.values())
    assert rec.inputs["unverified_releases_skipped"] == ["release-forged"]
    assert "forecasts_not_replayed" not in rec.inputs  # the good ones replay
    # A region whose every forecast read one is refused, naming them, though the others have a good one.
    with pytest.raises(MissingLoad, match=r"no forecast of load for region south \(bus C\) at 2026-01-05T06:00Z \(its "
                       rf"forecasts {tainted['south']} are left out: they read releases that `fusion verify` does not "
                       r"call verified or legacy, release-forged \(\w+\)\)"):
        recommend(fed.config, Request(Kind.DISPATCH, at=FORECAST_AT + timedelta(hours=30)))


def _later(rows: pa.Table, *, plus: float = 1.0) -> pa.Table:
    """`rows` released a day after the genuine ones (so each window's latest release, where counted), `plus` kW."""
    for name in ("ratio_mean", "mean"):
        index = rows.schema.get_field_index(name)
        rows = rows.set_column(index, name, pc.add(rows.column(name), plus))
    index = rows.schema.get_field_index("released_at")
    return rows.set_column(index, "released_at", pc.add(rows.column("released_at"), pa.scalar(timedelta(days=1))))


def test_a_forecast_that_replays_gives_the_loads(mech_federation: Build) -> None:
    """Where a release-signing key is registered, a forecast gives a bus its load only where it replays: computed
    again from the verified releases it names, it is the same. `fusion forecast`'s own forecasts do."""
    fed, ids = forecast_federation(mech_federation)
    rec = recommend(fed.config, Request(Kind.DISPATCH, at=FORECAST_AT)).recommendation
    assert rec.inputs["load_source"] == "forecasts" and rec.inputs["forecast_ids"] == sorted(ids.values())
    assert "forecasts_not_replayed" not in rec.inputs and "forecasts_skipped" not in rec.inputs
    means = {row["region"]: row["mean"] for row in fed.store.read("forecasts").to_pylist()
             if row["window_start"] == FORECAST_AT}
    assert rec.items_of("load_mw") == pytest.approx({"A": 0.0, "B": 30 * means["north"], "C": 30 * means["south"],
                                                     "D": 40 * means["east"], "E": 0.0})
    original, again = replay(fed.config, rec.recommendation_id)
    assert again.digest == original.recorded_digest == rec.digest


def test_a_forged_forecast_row_is_left_out_and_does_not_displace_a_ratified_recommendation(
    mech_federation: Build,
) -> None:
    """`forecasts` rows are not signed: a row appended under a genuine forecast's id, naming its genuine, verifying
    releases, with north's mean raised by 3 kW and issued later, was the latest forecast of the window, so it was
    north's load (90 MW more), and `fusion recommend` run again superseded the ratified recommendation with it. It
    does not replay now: it is left out, the region's latest forecast that replays counts, the one in force is
    kept, and a recommendation records it with why."""
    from mechanisms.decisions import DecideRequest, decide
    from mechanisms.records import Action

    fed, ids = forecast_federation(mech_federation)
    honest = recommend(fed.config, Request(Kind.DISPATCH, at=FORECAST_AT)).recommendation
    assert decide(fed.config, DecideRequest(Action.RATIFY, honest.recommendation_id, "grid-ops", "alice")).effective
    raised = reissued(fed, ids["north"], mean=lambda means: [means[0] + 3.0, *means[1:]])
    fed.store.insert_new("forecasts", raised)
    stored = fed.store.read("recommendations").num_rows
    again = recommend(fed.config, Request(Kind.DISPATCH, at=FORECAST_AT))
    assert again.kept and not again.written and again.recommendation.recommendation_id == honest.recommendation_id
    assert fed.store.read("recommendations").num_rows == stored
    why = again.extra["loads"].trust["forecasts_not_replayed"]
    assert list(why) == [ids["north"]]
    assert re.fullmatch(r"\(issued 2026-01-04T01:00:00Z\) its mean at 2026-01-04T00:00Z is [\d.]+, [\d.]+ computed "
                        "again", why[ids["north"]])
    # The next window: the forged issue (the latest) is left out whole, recorded with why.
    later = recommend(fed.config, Request(Kind.DISPATCH, at=FORECAST_AT + timedelta(hours=1))).recommendation
    assert later.inputs["forecast_ids"] == sorted(ids.values())
    assert later.inputs["forecasts_not_replayed"] == why
    north = _mean(fed, ids["north"], FORECAST_AT + timedelta(hours=1))
    assert later.items_of("load_mw")["B"] == pytest.approx(30 * north)
    original, replayed = replay(fed.config, later.recommendation_id)
    assert replayed.digest == original.recorded_digest


def test_a_forecast_row_under_a_made_up_id_is_left_out_and_the_releases_count(mech_federation: Build) -> None:
    """Rows with a forecast_id of the forger's own, naming genuine releases, for a window already released: they
    were the forecasts of the window, so they gave its loads instead of its releases. Their id is not the one what
    they record names: left out, recorded, and the window's releases give its loads, as where no forecast is."""
    fed, ids = forecast_federation(mech_federation)
    last = FORECAST_AT - timedelta(hours=1)  # the last window released

    def day_before(moments: list[datetime]) -> list[datetime]:
        return [t - timedelta(days=1) for t in moments]

    made_up = pa.concat_tables([
        reissued(fed, forecast_id, forecast_id=f"f-{region:0>24}", window_start=day_before, window_end=day_before,
               mean=lambda means: [1.1 * v for v in means])
        for region, forecast_id in ids.items()
    ])
    fed.store.insert_new("forecasts", made_up)
    rec = recommend(fed.config, Request(Kind.DISPATCH, at=last)).recommendation
    assert rec.inputs["load_source"] == "releases"
    assert rec.inputs["release_ids"] == ["load-east-d2", "load-north-d2", "load-south-d2"]
    assert sorted(rec.inputs["forecasts_not_replayed"]) == [f"f-{r:0>24}" for r in ("east", "north", "south")]
    assert all("its forecast_id is not the one its model, series, origin, horizon, input releases, calibration and "
               "params name" in why for why in rec.inputs["forecasts_not_replayed"].values())


def test_an_older_genuine_forecast_issued_again_does_not_displace_the_one_read_from_later_releases(
    mech_federation: Build,
) -> None:
    """A genuine forecast replays whenever it is issued: its rows copied under a later issued_at were the latest
    forecast of the window, so a forecast made before a day was released displaced the one that read it. The load
    is the replaying forecast from the latest origin (then the latest releases read), whenever it was issued."""
    fed = mech_federation(releases=False)
    early = [daily_releases(r, d) for r in ("north", "south", "east") for d in range(FORECAST_DAYS - 1)]
    fed.store.insert_new("releases", pa.concat_tables(early))
    older = forecast_ids(run_forecasts(fed.config, metrics=["load"], horizon="48h",
                                       now=FORECAST_AT - timedelta(days=1)))
    last = [daily_releases(r, FORECAST_DAYS - 1) for r in ("north", "south", "east")]
    fed.store.insert_new("releases", pa.concat_tables(last))
    create_key_holder_key(fed.config, published=[t.column("release_id")[0].as_py() for t in early + last])
    newer = forecast_ids(run_forecasts(fed.config, metrics=["load"], horizon="24h", now=FORECAST_AT))
    assert _mean(fed, older["north"], FORECAST_AT) != pytest.approx(_mean(fed, newer["north"], FORECAST_AT))
    fed.store.insert_new("forecasts", reissued(fed, older["north"]))  # genuine rows, issued after the newer one
    rec = recommend(fed.config, Request(Kind.DISPATCH, at=FORECAST_AT)).recommendation
    assert rec.inputs["forecast_ids"] == sorted(newer.values())
    assert rec.items_of("load_mw")["B"] == pytest.approx(30 * _mean(fed, newer["north"], FORECAST_AT))


def _mean(fed: MechFederation, forecast_id: str, at: datetime) -> float:
    rows = fed.store.read("forecasts").to_pylist()
    return next(r["mean"] for r in rows if r["forecast_id"] == forecast_id and r["window_start"] == at)


@pytest.mark.parametrize("signed", [False, True])
def test_a_withheld_mean_is_refused_as_withheld_not_as_unreleased(mech_federation: Build, signed: bool) -> None:
    """A window released with its mean withheld (its count's interval includes 0) is told apart from a window not
    released: 'release that window first' sent the operator to release it again. (Signed: the key holder's
    release, which verifies, withholds the mean.)"""
    fed = mech_federation(releases=False)
    north = load_releases("north")
    for name in ("mean", "ratio_mean", "mean_sd", "mean_ci_low", "mean_ci_high"):
        index = north.schema.get_field_index(name)
        north = north.set_column(index, north.schema.field(index), pa.nulls(north.num_rows, pa.float64()))
    rows = pa.concat_tables([north, load_releases("south"), load_releases("east")])
    if signed:
        create_key_holder_key(fed.config)
        publish_signed(fed.config, fed.store, rows)
    else:
        fed.store.insert_new("releases", rows)
    with pytest.raises(MissingLoad) as caught:
        recommend(fed.config, Request(Kind.DISPATCH, at=HOUR))
    assert str(caught.value) == (
        "the release release-north-0 of load for region north (bus B) at 2026-01-01T01:00Z withholds its mean (its "
        "count's interval includes 0, so no mean is released): choose another time with --at, or map the bus to a "
        "region that has data")
    with pytest.raises(MissingLoad, match=r"no release of load for region north \(bus B\) at 2026-01-01T05:00Z: "
                       "release that window first"):
        recommend(fed.config, Request(Kind.DISPATCH, at=START + timedelta(hours=5)))


def test_a_recommendation_recorded_before_releases_were_verified_replays_unless_it_read_an_unverified_one(
    mech_federation: Build,
) -> None:
    """One recorded before recommendations said whether their releases were verified (no releases_verified in its
    inputs, every release read) replays to its digest where what it read verifies, and not where it read a release
    that does not."""
    from fusion.api import open_store
    from mechanisms.authorities import load_operator_key
    from mechanisms.recommend import _Run
    from mechanisms.records import now
    from mechanisms.tables import write_rows

    fed = mech_federation()
    _with_release_signing_key(fed)
    private, public = load_operator_key(fed.config)
    made = recommend(fed.config, Request(Kind.DISPATCH, at=HOUR)).recommendation

    def as_before() -> str:
        """A dispatch computed and recorded as before releases were verified."""
        with open_store(fed.config) as store:
            run = _Run(fed.config, Kind.DISPATCH, made.parameters, HOUR, store.versions, None, unverified=None,
                       record_trust=False)
            old = run.compute(store)[0].signed(private, public, supersedes=None, created_at=now())
        write_rows(fed.config, "recommendations", old.rows())
        assert "releases_verified" not in old.inputs
        return old.recommendation_id

    honest = as_before()
    original, again = replay(fed.config, honest)
    assert again.digest == original.recorded_digest
    fed.store.insert_new("releases", _forged("north", mean=9.0, hours=range(1, 2)))
    forged = as_before()
    original, again = replay(fed.config, forged)
    assert original.items_of("load_mw")["B"] == 270.0 and again.items_of("load_mw")["B"] == 300.0
    assert again.digest != original.recorded_digest


def test_a_forecast_row_that_does_not_replay_does_not_choose_the_dispatch_window(mech_federation: Build) -> None:
    """Without --at, a dispatch is for the first forecast window after the last release. A row under a made-up id
    for a window half an hour after it (off the federation's grid) was that window, so the dispatch found no load
    there; it does not replay, and the first window of a forecast that does is the dispatch's."""
    fed, ids = forecast_federation(mech_federation)
    half = timedelta(minutes=30)
    fed.store.insert_new("forecasts", reissued(
        fed, ids["north"], forecast_id="f-" + "9" * 24, window_start=lambda t: [s - half for s in t],
        window_end=lambda t: [e - half for e in t]))
    rec = recommend(fed.config, Request(Kind.DISPATCH)).recommendation
    assert rec.valid_from == FORECAST_AT and rec.inputs["load_source"] == "forecasts"
    assert rec.inputs["forecast_ids"] == sorted(ids.values())
