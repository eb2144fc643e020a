"""`fusion train --role ...`: one party's step of a model's current round at a time, as releases' role commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fusion.cli.core import main
from fusion.config.federation import load_config
from fusion.keys.holder import load_checked_secret_context
from fusion.keys.registry import load_aggregator_signing_key, read_private, write_private
from fusion.release.exchange import aggregate_path, contribution_path, public_context_path, read_bytes
from fusion.runtime.faults import CRASH_ENV, CRASH_EXIT_CODE
from fusion.store.delta import Store
from pipelines.release import charge_record
from privacy import he
from privacy.envelope import pack_envelope, unpack_envelope
from tests.conftest import Federation
from tests.training.test_cli import MODEL, _rows
from training import roles
from training.recomputed_round import ROUND_REFUSED
from training.roles import current_round


def test_a_round_runs_role_by_role_with_a_dropped_institution(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = make_federation(noise=True, entities=2, extra=MODEL)
    for k, inst in enumerate(("alpha", "beta", "gamma")):
        _rows(fed.directory / "training" / f"{inst}.parquet", k)
    _rows(fed.directory / "training" / "held_out.parquet", 9)
    base = ["train", "--config", str(fed.config_path), "--model", "tiny", "--role"]

    def run(*argv: str) -> str:
        assert main([*base, *argv]) == 0
        return capsys.readouterr().out.replace("\n", " ")

    assert "alpha sealed round 1" in run("institution", "--institution", "alpha")
    assert "gamma sealed round 1" in run("institution", "--institution", "gamma")  # beta never shows up
    assert "awaiting_unmask, contributors alpha, gamma" in run("aggregator")
    assert "too few" in run("institution", "--institution", "alpha", "--unmask")  # it waits for gamma's signature
    assert "gamma answered" in run("institution", "--institution", "gamma", "--unmask")
    assert "alpha answered" in run("institution", "--institution", "alpha", "--unmask")
    assert "aggregated" in run("aggregator")
    config = load_config(fed.config_path)
    store = Store(config.store_path)
    # The key holder's process ends right after the charge (a kill): the round is charged, not lost.
    crashed = subprocess.run(
        [sys.executable, "-m", "fusion.cli", *base, "key-holder"],
        capture_output=True, text=True, timeout=300, env={**os.environ, CRASH_ENV: "round_after_charge"},
    )  # fmt: skip
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
    (charged,) = store.read("budget").to_pylist()[0]["release_ids"]
    # Every party still derives the same attempt (its aggregate is in the exchange): the step again commits it.
    assert "alpha sealed round 1" in run("institution", "--institution", "alpha")  # its kept envelope, again
    assert "round 1/2 of model tiny committed: 2 contributors" in run("key-holder")
    models = store.read("models").to_pylist()
    assert [(m["round"], m["contributors"], m["release_id"]) for m in models] == [(1, ["alpha", "gamma"], charged)]
    audit = [a for a in store.read("audit").to_pylist() if a["action"] == "training_round"]
    assert [a["release_id"] for a in audit] == [models[0]["release_id"]]
    budget = store.read("budget").to_pylist()[0]
    assert budget["release_ids"] == [models[0]["release_id"]]
    # Charged against the key holder's own record of the period, as a release is: a deleted row cannot undo it.
    held = charge_record(config, store).read(budget["period"])
    assert held is not None and held["release_ids"] == [models[0]["release_id"]]
    # The key holder cannot decrypt round 2 before it is aggregated; a whole run then finishes the model.
    assert main([*base, "key-holder"]) == 1
    assert "no aggregate yet" in capsys.readouterr().err
    assert main(["train", "--config", str(fed.config_path), "--model", "tiny"]) == 0
    assert "round 2/2: 3 contributors" in capsys.readouterr().out
    assert sorted(store.read("models").column("round").to_pylist()) == [1, 2]
    # The key holder signed the round it committed role by role as `fusion train` signs its own.
    assert main(["verify", "--config", str(fed.config_path)]) == 0
    assert capsys.readouterr().out.count("verified") == 2


def test_a_role_needs_its_options(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = make_federation(noise=True, entities=2, extra=MODEL)
    base = ["train", "--config", str(fed.config_path), "--model", "tiny", "--role"]
    assert main([*base, "institution"]) == 1
    assert "--institution ID" in capsys.readouterr().err
    assert main([*base, "aggregator", "--unmask"]) == 1
    assert "an institution's options" in capsys.readouterr().err


def test_an_institution_draws_no_round_of_a_run_that_cannot_fit_its_cap(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    """greedy (epsilon 1.6 over 3 rounds, the cap 1; its first round alone would fit): each institution refuses its
    first round, by its own records, before it draws anything, rather than spend a round of its period on a run that
    cannot finish (the key holder would refuse it before the charge, and the institution's record of the round would
    stay). A model that fits (tiny: epsilon 1, the cap) then trains in the period."""
    fed = make_federation(noise=True, entities=2, extra=MODEL)
    for k, inst in enumerate(("alpha", "beta", "gamma")):
        _rows(fed.directory / "training" / f"{inst}.parquet", k)
    _rows(fed.directory / "training" / "held_out.parquet", 9)
    base = ["train", "--config", str(fed.config_path), "--model", "greedy", "--role"]
    for inst in ("alpha", "beta", "gamma"):
        assert main([*base, "institution", "--institution", inst]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert (
            f"institution {inst} does not seal round 1 of model greedy: the round with the 2 round(s) of its run "
            "after it needs epsilon 1.5999" in err
        ), err
        assert "with the 0 training round(s) and 0 interval(s)" in err and "the cap is 1.0000" in err, err
        rounds = fed.directory / "institution-keys" / inst / "training" / "rounds"
        assert not list(rounds.glob("t-*")), "nothing drawn, nothing recorded"
    store = Store(load_config(fed.config_path).store_path)
    refused = [a for a in store.read("audit").to_pylist() if a["action"] == "contribution_refused"]
    assert sorted(a["actor"] for a in refused) == ["alpha", "beta", "gamma"]
    assert main(["train", "--config", str(fed.config_path), "--model", "tiny"]) == 0  # before: alpha refused round 1
    assert "round 2/2: 3 contributors, epsilon 0.9997" in capsys.readouterr().out
    assert store.read("budget").to_pylist()[0]["epsilon_spent"] <= 1.0


def test_the_key_holder_refuses_a_run_over_the_period_cap_before_its_first_charge(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    """Role by role, as `fusion train` does: a run whose rounds cannot all fit the period's cap (greedy: epsilon
    1.6, cap 1; its first round alone would fit) spends nothing, rather than its first rounds' budget on a model the
    ledger will not let finish. The institutions' own configs allow the period more (epsilon_cap 2), so they seal
    its round: the key holder holds its own cap."""
    fed = make_federation(noise=True, entities=2, extra=MODEL)
    for k, inst in enumerate(("alpha", "beta", "gamma")):
        _rows(fed.directory / "training" / f"{inst}.parquet", k)
    looser = fed.directory / "institution.toml"
    looser.write_text(fed.config_path.read_text().replace("[privacy]\n", "[privacy]\nepsilon_cap = 2\n", 1))
    base = ["train", "--config", str(fed.config_path), "--model", "greedy", "--role"]
    own = ["train", "--config", str(looser), "--model", "greedy", "--role"]
    for inst in ("alpha", "beta"):
        assert main([*own, "institution", "--institution", inst]) == 0
    assert main([*base, "aggregator"]) == 0
    for inst in ("alpha", "beta", "alpha"):  # alpha's first try waits for beta's acknowledgement
        assert main([*own, "institution", "--institution", inst, "--unmask"]) == 0
    assert main([*base, "aggregator"]) == 0
    assert "aggregated" in capsys.readouterr().out  # the round is ready to decrypt
    assert main([*base, "key-holder"]) == 1
    assert "above its cap 1" in " ".join(capsys.readouterr().err.split())
    store = Store(load_config(fed.config_path).store_path)
    assert store.read("budget").num_rows == 0 and store.read("models").num_rows == 0


TWIN = MODEL.split("[[models]]")[1].replace('name = "tiny"', 'name = "twin"')  # tiny over the same readings


def test_each_institution_holds_the_period_cap_for_its_rounds_against_a_key_holder_that_does_not(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key holder's ledger alone cannot hold the cap against a coalition that includes the key holder: here it
    skips its forecast and charges nothing (code it runs itself), and the aggregator runs the rounds. Each
    institution holds the cap by its own records: it draws no noise for greedy, whose run alone cannot fit (epsilon
    1.6 over 3 rounds, the cap 1); after round 1 of tiny (epsilon 1, the cap) none for twin, tiny over the same
    readings under another name, and audits the refusals; a round it sealed before is sealed again from its kept
    update (the run rewound by deleting `models`): no new charge."""
    fed = make_federation(noise=True, entities=2, extra=MODEL + "[[models]]" + TWIN)
    for k, inst in enumerate(("alpha", "beta")):
        _rows(fed.directory / "training" / f"{inst}.parquet", k)
    _rows(fed.directory / "training" / "held_out.parquet", 9)

    def base(model: str) -> list[str]:
        return ["train", "--config", str(fed.config_path), "--model", model, "--role"]

    class Uncharged:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def spend(self, **kwargs: object) -> SimpleNamespace:
            return SimpleNamespace(epsilon_after=0.0)

    with monkeypatch.context() as rogue:
        rogue.setattr(roles, "check_fits", lambda *args: None)
        rogue.setattr(roles, "BudgetLedger", Uncharged)
        for inst in ("alpha", "beta"):
            assert main([*base("greedy"), "institution", "--institution", inst]) == 1
            err = " ".join(capsys.readouterr().err.split())
            assert f"institution {inst} does not seal round 1 of model greedy" in err, err
        for inst in ("alpha", "beta"):
            assert main([*base("tiny"), "institution", "--institution", inst]) == 0
        assert main([*base("tiny"), "aggregator"]) == 0
        for inst in ("alpha", "beta", "alpha"):
            assert main([*base("tiny"), "institution", "--institution", inst, "--unmask"]) == 0
        assert main([*base("tiny"), "aggregator"]) == 0
        assert main([*base("tiny"), "key-holder"]) == 0
        assert "round 1/2 of model tiny committed" in capsys.readouterr().out
        config = load_config(fed.config_path)
        store = Store(config.store_path)
        assert store.read("budget").num_rows == 0  # nothing charged: the ledger knows of no spend
        for inst in ("alpha", "beta"):
            assert main([*base("twin"), "institution", "--institution", inst]) == 1
            err = " ".join(capsys.readouterr().err.split())
            assert f"institution {inst} does not seal round 1 of model twin" in err, err
            assert "with the 1 training round(s) and 0 interval(s)" in err and "the cap is 1.0000" in err, err
        # A record kept before records kept their charge counts as a round of its model under the config.
        keys = fed.directory / "institution-keys" / "alpha" / "training" / "rounds"
        (record,) = (r for r in keys.glob("t-*.json") if "roster" not in r.name)
        write_private(record, json.dumps({**json.loads(read_private(record, "a record")), "charge": None}).encode())
        assert main([*base("twin"), "institution", "--institution", "alpha"]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert "institution alpha does not seal round 1 of model twin" in err and "1 training round(s)" in err, err
    assert len(list(keys.glob("*.npy"))) == 1  # tiny's round 1 update alone: no other noise was drawn
    refused = [a for a in store.read("audit").to_pylist() if a["action"] == "contribution_refused"]
    assert sorted({(a["actor_role"], a["actor"], json.loads(a["detail"])["model"]) for a in refused}) == [
        ("institution", "alpha", "greedy"), ("institution", "alpha", "twin"),
        ("institution", "beta", "greedy"), ("institution", "beta", "twin"),
    ]  # fmt: skip
    assert all("the cap is 1.0000" in (a["reason"] or "") for a in refused)
    # The coalition rewinds the run: round 1 again is alpha's kept update, no new charge.
    shutil.rmtree(Path(config.store_path) / "models")
    assert main([*base("tiny"), "institution", "--institution", "alpha"]) == 0
    assert "alpha sealed round 1 of model tiny" in capsys.readouterr().out


def test_the_key_holder_refuses_a_round_aggregate_its_envelopes_do_not_give_before_the_charge(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    """The registered aggregator re-signs the round's aggregate with an offset in one slot of the vector it adds
    (the model update moved by 1000 in one gradient sum): the key holder recomputes the aggregate from the signed
    contributions and answers in the exchange and refuses it (`aggregate_mismatch`) before anything is charged,
    committed or decrypted, by its role step as by `fusion train`. With a contribution gone from the exchange it
    cannot recompute it (`aggregate_unverifiable`) until the institution publishes its kept envelope again. The
    honest round then completes."""
    fed = make_federation(noise=True, entities=2, extra=MODEL)
    for k, inst in enumerate(("alpha", "beta")):
        _rows(fed.directory / "training" / f"{inst}.parquet", k)
    base = ["train", "--config", str(fed.config_path), "--model", "tiny", "--role"]
    for inst in ("alpha", "beta"):
        assert main([*base, "institution", "--institution", inst]) == 0
    assert main([*base, "aggregator"]) == 0
    for inst in ("alpha", "beta", "alpha"):  # alpha's first try waits for beta's acknowledgement
        assert main([*base, "institution", "--institution", inst, "--unmask"]) == 0
    assert main([*base, "aggregator"]) == 0
    assert "aggregated" in capsys.readouterr().out
    config = load_config(fed.config_path)
    store = Store(config.store_path)
    current = current_round(config, config.models[0], store)
    plan, round_id = current.plan, current.round_id
    exchange = plan.config.exchange_path
    path = Path(aggregate_path(exchange, plan.key))
    genuine = path.read_bytes()
    header, ciphertexts = unpack_envelope(genuine)
    offset = np.zeros(plan.layout.slots, dtype=np.int64)
    offset[0] = 1000
    public = he.load_public_context(read_bytes(public_context_path(exchange)))
    shifted = he.add_plain(public, ciphertexts, offset)
    secret = load_checked_secret_context(config)
    slots = plan.layout.slots
    moved = he.decrypt_vector(secret, shifted, slots) - he.decrypt_vector(secret, ciphertexts, slots)
    assert np.flatnonzero(moved).tolist() == [0] and moved[0] == 1000  # a real shift of one gradient sum
    path.write_bytes(pack_envelope(header, shifted, signing_key=load_aggregator_signing_key(config)))

    def refused(reason: str, found: str) -> None:
        assert main([*base, "key-holder"]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"({reason})" in err and found in err and "nothing is charged" in err, err
        assert store.read("budget").num_rows == 0 and store.read("models").num_rows == 0
        assert charge_record(config, store).read(plan.period.name) is None  # nor in the key holder's own record
        assert "training_round" not in {a["action"] for a in store.read("audit").to_pylist()}

    refused("aggregate_mismatch", "its ciphertexts are not the sum of its roster's contributions")
    # `fusion train` resumes the round at its aggregate in the exchange, and refuses it alike.
    _rows(fed.directory / "training" / "gamma.parquet", 2)
    _rows(fed.directory / "training" / "held_out.parquet", 9)
    assert main(["train", "--config", str(fed.config_path), "--model", "tiny"]) == 1
    assert "(aggregate_mismatch)" in capsys.readouterr().err
    assert store.read("budget").num_rows == 0 and store.read("models").num_rows == 0
    path.write_bytes(genuine)
    alpha = Path(contribution_path(exchange, plan.key, "alpha"))
    alpha.unlink()
    refused("aggregate_unverifiable", "the contribution of alpha: no file at")
    rows = sorted((a for a in store.read("audit").to_pylist() if a["action"] == ROUND_REFUSED), key=lambda a: a["at"])
    assert [(r["reason"], r["release_id"], r["actor_role"]) for r in rows] == [
        ("aggregate_mismatch", round_id.release_id, "key_holder"),
        ("aggregate_unverifiable", round_id.release_id, "key_holder"),
    ]
    assert json.loads(rows[0]["detail"])["aggregate"] == str(path)
    assert main([*base, "institution", "--institution", "alpha"]) == 0  # its kept envelope, published again
    assert main([*base, "key-holder"]) == 0
    assert "round 1/2 of model tiny committed: 2 contributors" in capsys.readouterr().out
    assert store.read("models").column("release_id").to_pylist() == [round_id.release_id]
