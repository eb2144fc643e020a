"""The commands: recommend, decide, decisions, mechanism-keys, bid and `fusion verify` over the mechanisms' tables,
run in-process through `main`; user mistakes answer one line, never a traceback; and `fusion sql` / `fusion
verify` start without the solver."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from fusion.cli.core import main
from fusion.keys.registry import create_key_holder_key
from tests.mechanisms.conftest import MechFederation, forecast_federation, load_releases, reissued

Build = Callable[..., MechFederation]
ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_recommend_decide_report_and_verify_from_the_command_line(mech_federation: Build,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fed = mech_federation()
    config = str(fed.config_path)
    create_key_holder_key(fed.config, published=fed.store.release_ids())  # releases verify as legacy
    code, out = _run(["recommend", "dispatch", "--config", config, "--at", "2026-01-01T01:00"], capsys)
    assert code == 0, out
    assert "26.38" in out and "39.94" in out and "line D-E" in out and "Advisory only" in out
    rid = out.split("recommendation ")[-1].split()[0]
    code, out = _run(["recommend", "--config", config, "--replay", rid], capsys)
    assert code == 0 and "reproduces its digest" in out
    code, out = _run(["decide", "override", "--config", config, "--recommendation", rid, "--authority", "grid-ops",
                      "--signer", "alice", "--set", "Sundance=50", "--reason-code", "reliability"], capsys)
    assert code == 0 and "overrides" in out and "cost impact +2.86 $/h" in out and "in effect" in out
    code, out = _run(["decide", "override", "--config", config, "--recommendation", rid, "--authority", "grid-ops",
                      "--signer", "alice", "--set", "Sundance=50"], capsys)
    assert code == 1 and "error: decision refused (recorded in `decisions`): an override needs a reason code" in out
    code, out = _run(["decisions", "--config", config, "--format", "json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    summary = {(r["action"], r["reason_code"], r["status"]): r["decisions"] for r in rows if "status" in r}
    assert code == 0 and summary == {("override", "reliability", "in effect"): 1, ("override", "-", "refused"): 1}
    assert [r["adopted"] for r in rows if "adopted" in r] == ["Sundance=50 MW"]
    code, out = _run(["verify", "--config", config, "--format", "json"], capsys)
    assert code == 0, out
    statuses = [json.loads(line)["status"] for line in out.splitlines()]
    assert statuses.count("verified") == 2 and statuses.count("refusal") == 1 and "legacy" in statuses
    # A recommendation's row changed in the store: verify fails.
    rows = fed.store.read("recommendations").slice(0, 1)
    rows = rows.set_column(rows.schema.get_field_index("item_key"), "item_key", pa.array(["Z"]))
    fed.store.insert_new("recommendations", rows)
    code, out = _run(["verify", "--config", config, "--format", "json"], capsys)
    assert code == 1 and '"status":"tampered"' in out.replace(" ", "")


def test_recommend_names_the_releases_it_left_out_as_not_verified(mech_federation: Build,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A release written into the store without the key holder is left out of the loads, and the command says so
    (on stderr beside CSV or JSON, which stay clean), its id's escape codes written out, not sent to the terminal."""
    fed = mech_federation()
    create_key_holder_key(fed.config, published=fed.store.release_ids())
    forged = load_releases("north", mean=9.0, hours=range(1, 2))
    fed.store.insert_new("releases", forged.set_column(0, "release_id", pa.array(["release-forged\x1b[2K"])))
    code, out = _run(["recommend", "dispatch", "--config", str(fed.config_path), "--at", "2026-01-01T01:00",
                      "--format", "json"], capsys)
    assert code == 0 and "left out 1 release(s) that `fusion verify` does not call verified or legacy: " \
        "release-forged\\x1b[2K (tampered)" in " ".join(out.split()) and "\x1b" not in out, out
    loads = {r["item_key"]: r["value"] for r in map(json.loads, (line for line in out.splitlines()
                                                                  if line.startswith("{")))
             if r["item_type"] == "load_mw"}
    assert loads == {"A": 0.0, "B": 300.0, "C": 300.0, "D": 400.0, "E": 0.0}


def test_recommend_run_again_past_a_forged_release_keeps_the_recommendation_in_force(
    mech_federation: Build, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run again after a release was written into the store without the key holder, `fusion recommend` names it and
    says that the recommendation in force is kept (on stderr beside CSV), rather than recording a new one."""
    fed = mech_federation()
    create_key_holder_key(fed.config, published=fed.store.release_ids())
    argv = ["recommend", "dispatch", "--config", str(fed.config_path), "--at", "2026-01-01T01:00"]
    code, out = _run(argv, capsys)
    assert code == 0 and ": recorded" in out, out
    rid = out.split("recommendation ")[-1].split()[0]
    forged = load_releases("north", mean=9.0, hours=range(1, 2))
    fed.store.insert_new("releases", forged.set_column(0, "release_id", pa.array(["release-forged"])))
    code, out = _run([*argv, "--format", "csv"], capsys)
    said = " ".join(out.split())
    assert code == 0 and "release-forged (tampered)" in said, out
    assert f"recommendation {rid} kept in force: this run read the same verified releases and forecasts" in said
    ids = {line.split(",")[0].strip('"') for line in out.splitlines() if line.count(",") == 4}
    assert ids == {"recommendation_id", rid}  # the rows of the one in force


def test_recommend_names_a_forecast_that_does_not_replay_and_keeps_the_recommendation_in_force(
    mech_federation: Build, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run again after a forecast row was written into the store with another mean under a genuine forecast's id,
    `fusion recommend` names it and why it does not replay, and keeps the recommendation in force."""
    fed, ids = forecast_federation(mech_federation)
    argv = ["recommend", "dispatch", "--config", str(fed.config_path), "--at", "2026-01-04T00:00"]
    code, out = _run(argv, capsys)
    assert code == 0 and ": recorded" in out, out
    rid = out.split("recommendation ")[-1].split()[0]
    fed.store.insert_new("forecasts", reissued(fed, ids["north"], mean=lambda m: [m[0] + 3.0, *m[1:]]))
    code, out = _run([*argv, "--format", "csv"], capsys)
    said = " ".join(out.split())
    assert code == 0, out
    assert (f"left out 1 forecast(s) that do not replay from the releases they name: {ids['north']} (issued "
            "2026-01-04T01:00:00Z) its mean at 2026-01-04T00:00Z is ") in said
    assert f"recommendation {rid} kept in force" in said


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["recommend"], "name a mechanism (dispatch, pareto or auction), or --replay ID"),
        (["recommend", "dispatch", "--at", "soon"], "--at 'soon' is not an ISO 8601 time"),
        (["recommend", "pareto", "--loading-caps", "1,x"], "--loading-caps '1,x': comma-separated fractions"),
        (["recommend", "pareto", "--loading-caps", "1.5", "--at", "2026-01-01T01:00"], "--loading-caps: each a"),
        (["recommend", "auction", "--at", "2026-01-01T01:00"], "needs --bids FILE"),
        (["recommend", "dispatch", "--voll", "-1000", "--at", "2026-01-01T01:00"], "--voll -1000: the value of lost"),
        (["recommend", "dispatch", "--voll", "0", "--at", "2026-01-01T01:00"], "--voll 0: the value of lost load"),
        (["recommend", "dispatch", "--voll", "nan", "--at", "2026-01-01T01:00"], "--voll nan: the value of lost"),
        (["recommend", "pareto", "--carbon-price", "inf", "--at", "2026-01-01T01:00"], "--carbon-price inf: a finite"),
        (["recommend", "pareto", "--carbon-price", "nan", "--at", "2026-01-01T01:00"], "--carbon-price nan: a finite"),
        (["recommend", "--replay", "nope"], "no recommendation nope in the store"),
        (["decide", "ratify", "--recommendation", "x", "--authority", "grid-ops", "--signer", "zed"],
         "grid-ops/zed's signing key"),
        (["decide", "override", "--recommendation", "x", "--authority", "grid-ops", "--signer", "alice", "--set",
          "Sundance"], "--set 'Sundance': write UNIT=MW"),
        (["decide", "ratify", "--recommendation", "x", "--authority", "grid-ops", "--signer", "alice"],
         "no recommendation x in the store"),
        (["decide", "override", "--recommendation", "x", "--authority", "grid-ops", "--signer", "alice", "--set",
          "Sundance=nan"], "--set Sundance=nan: a unit's MW is a finite number"),
        (["decide", "override", "--recommendation", "x", "--authority", "grid-ops", "--signer", "alice", "--set",
          "Sundance=-inf"], "--set Sundance=-inf: a unit's MW is a finite number"),
        (["mechanism-keys"], "choose one: --operator, --authority ID --signer NAME, or --bidder ID"),
        (["mechanism-keys", "--authority", "a"], "--authority needs --signer NAME"),
        (["mechanism-keys", "--authority", "a", "--signer", "b", "--kinds", "lunch"], "--kinds: unknown kinds"),
        (["bid", "--bidder", "x", "--bus", "A", "--mw", "1", "--price", "1", "--at", "2026-01-01T01:00", "--bids",
          "b.toml"], "bidder x's key is missing"),
        (["bid", "--bidder", "x", "--bus", "A", "--mw", "nan", "--price", "1", "--at", "2026-01-01T01:00", "--bids",
          "b.toml"], "--mw nan: MW offered, a finite number of at least 0"),
        (["bid", "--bidder", "x", "--bus", "A", "--mw", "-5", "--price", "1", "--at", "2026-01-01T01:00", "--bids",
          "b.toml"], "--mw -5: MW offered, a finite number of at least 0"),
        (["bid", "--bidder", "x", "--bus", "A", "--mw", "5", "--price", "inf", "--at", "2026-01-01T01:00", "--bids",
          "b.toml"], "--price inf: $/MWh asked, a finite number"),
    ],
)
def test_mistakes_answer_one_clear_line(mech_federation: Build, capsys: pytest.CaptureFixture[str], argv: list[str],
                                        message: str) -> None:
    fed = mech_federation(subdir=f"f{abs(hash(tuple(argv))) % 10**8}")
    command = [argv[0], *([argv[1]] if len(argv) > 1 and not argv[1].startswith("-") else []), "--config",
               str(fed.config_path)]
    code, out = _run(command + argv[len(command) - 2 :], capsys)
    assert code == 1, out
    assert "Traceback" not in out and message in out, out
    assert out.strip().startswith("error:") and len(out.strip().splitlines()) <= 3


def test_a_config_without_mechanisms_and_a_bad_mechanisms_block_are_refused(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import config_text

    plain = tmp_path / "plain.toml"
    plain.write_text(config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2))
    code, out = _run(["mechanism-keys", "--config", str(plain), "--operator"], capsys)
    assert code == 1 and "no [mechanisms] block" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(plain.read_text() + '[mechanisms]\nload_metric = "rain"\nreserve_z = -1\n')
    code, out = _run(["recommend", "dispatch", "--config", str(bad)], capsys)
    assert code == 1 and "mechanisms.reserve_z: Input should be greater than or equal to 0" in out
    bad.write_text(plain.read_text() + '[mechanisms]\nload_metric = "rain"\n')
    code, out = _run(["recommend", "dispatch", "--config", str(bad)], capsys)
    assert code == 1 and "mechanisms.load_metric = 'rain' is not a metric of this federation" in out


SCRIPT = """
import sys
from fusion.cli.core import main
code = main(sys.argv[1:])
print("loaded:", ",".join(m for m in ("scipy.optimize", "mechanisms", "mechanisms.opf", "apache_beam", "torch")
                          if m in sys.modules), "exit:", code, file=sys.stderr)
"""


def test_sql_and_verify_start_without_the_solver(mech_federation: Build) -> None:
    fed = mech_federation()
    from mechanisms.recommend import Request, recommend
    from mechanisms.records import Kind
    from tests.mechanisms.conftest import HOUR

    recommend(fed.config, Request(Kind.DISPATCH, at=HOUR))
    create_key_holder_key(fed.config, published=fed.store.release_ids())

    def loaded(*argv: str) -> str:
        done = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        return done.stderr.strip().splitlines()[-1]

    assert loaded("sql", "--config", str(fed.config_path), "SELECT count(*) FROM recommendations") == (
        "loaded:  exit: 0")
    assert loaded("verify", "--config", str(fed.config_path)) == "loaded: mechanisms exit: 0"
