"""`fusion train --role ...`: one party's step of a model's current round at a time, as releases' role commands."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from fusion.cli.core import main
from fusion.config.federation import load_config
from fusion.runtime.faults import CRASH_ENV, CRASH_EXIT_CODE
from fusion.store.delta import Store
from pipelines.release import charge_record
from tests.conftest import Federation
from tests.training.test_cli import MODEL, _rows


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


def test_the_key_holder_refuses_a_run_over_the_period_cap_before_its_first_charge(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    """Role by role, as `fusion train` does: a run whose rounds cannot all fit the period's cap (greedy: epsilon
    1.6, cap 1; its first round alone would fit) spends nothing, rather than its first rounds' budget on a model the
    ledger will not let finish."""
    fed = make_federation(noise=True, entities=2, extra=MODEL)
    for k, inst in enumerate(("alpha", "beta", "gamma")):
        _rows(fed.directory / "training" / f"{inst}.parquet", k)
    base = ["train", "--config", str(fed.config_path), "--model", "greedy", "--role"]
    for inst in ("alpha", "beta"):
        assert main([*base, "institution", "--institution", inst]) == 0
    assert main([*base, "aggregator"]) == 0
    for inst in ("alpha", "beta", "alpha"):  # alpha's first try waits for beta's acknowledgement
        assert main([*base, "institution", "--institution", inst, "--unmask"]) == 0
    assert main([*base, "aggregator"]) == 0
    assert "aggregated" in capsys.readouterr().out  # the round is ready to decrypt
    assert main([*base, "key-holder"]) == 1
    assert "above its cap 1" in " ".join(capsys.readouterr().err.split())
    store = Store(load_config(fed.config_path).store_path)
    assert store.read("budget").num_rows == 0 and store.read("models").num_rows == 0
