"""Training rounds are signed by the key holder as releases are: `fusion verify` checks each round's `models` row,
its budget claim recomposes the period with the releases', an attempt lost in a crash is superseded by the signed
attempt that replaced it, and rounds committed before rounds were signed are legacy once the key holder registers
them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake

import fusion.api
from fusion.cli.core import main
from fusion.keys.registry import load_key_holder_public_keys, load_unsigned_rounds
from fusion.runtime.faults import CRASH_ENV, CRASH_EXIT_CODE
from fusion.store.delta import Store
from fusion.store.provenance import SIGNATURE_FIELD, ReleaseSignature
from fusion.store.verification import GOOD, verify_releases
from privacy.skellam import seeded_generator
from schemas.tables import AUDIT_SCHEMA, BUDGET_SCHEMA, MODELS_SCHEMA
from tests.conftest import Federation
from tests.training.test_cli import MODEL, _rows
from tests.training.test_training import IDS, _data, _settings, _terms
from training.run import train_into_store
from training.secure_sum import Federation as RoundFederation


def _trained(make_federation: Callable[..., Federation], **options: object) -> Federation:
    fed = make_federation(noise=True, entities=2, extra=MODEL, **options)
    for k, inst in enumerate(("alpha", "beta", "gamma")):
        _rows(fed.directory / "training" / f"{inst}.parquet", k)
    _rows(fed.directory / "training" / "held_out.parquet", 9)
    return fed


def _overwrite(store: Store, name: str, table: pa.Table, schema: pa.Schema) -> None:
    write_deltalake(store.table_path(name), table.select(schema.names).cast(schema), mode="overwrite")


def _statuses(fed: Federation) -> dict[str, tuple[str, str]]:
    checks = verify_releases(Store(fed.config.store_path), load_key_holder_public_keys(fed.config))
    return {c.release_id: (c.status, c.reason) for c in checks}


def test_verify_checks_every_round_and_finds_each_change(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = _trained(make_federation)
    assert main(["train", "--config", str(fed.config_path), "--model", "tiny"]) == 0
    assert main(["verify", "--config", str(fed.config_path)]) == 0  # it said "missing" of every round before
    assert capsys.readouterr().out.count("verified") == 2
    store = Store(fed.config.store_path)
    models, audit, budget = store.read("models"), store.read("audit"), store.read("budget")
    first, second = sorted(models.column("release_id").to_pylist())
    trained = [a for a in audit.to_pylist() if a["action"] == "training_round"]
    claim = ReleaseSignature.from_doc(json.loads(trained[0]["detail"])[SIGNATURE_FIELD])
    assert claim.is_round and claim.budget is not None and claim.budget["period"] == budget.to_pylist()[0]["period"]
    assert _statuses(fed) == {first: ("verified", ""), second: ("verified", "")}

    # One parameter of a committed round changed.
    rows = models.to_pylist()
    rows[0]["parameters"] = [rows[0]["parameters"][0] + 1e-3, *rows[0]["parameters"][1:]]
    _overwrite(store, "models", pa.Table.from_pylist(rows, schema=MODELS_SCHEMA), MODELS_SCHEMA)
    status, reason = _statuses(fed)[rows[0]["release_id"]]
    assert status == "tampered" and "differs from the row signed" in reason
    _overwrite(store, "models", models, MODELS_SCHEMA)

    # A round's signature taken out of its audit record.
    edited = audit.to_pylist()
    for a in edited:
        if a["action"] == "training_round" and a["release_id"] == first:
            detail = json.loads(a["detail"])
            del detail[SIGNATURE_FIELD]
            a["detail"] = json.dumps(detail)
    _overwrite(store, "audit", pa.Table.from_pylist(edited, schema=AUDIT_SCHEMA), AUDIT_SCHEMA)
    assert _statuses(fed)[first][0] == "tampered"

    # A second record of a round (a copy of its signed one, at another time), read before or after the genuine one.
    (record,) = [a for a in audit.to_pylist() if a["event_id"] == f"{first}:trained"]
    copy = pa.Table.from_pylist([{**record, "at": record["at"].replace(year=2020), "actor": "mallory"}],
                                schema=audit.schema)
    for tables in ([audit, copy], [copy, audit]):
        _overwrite(store, "audit", pa.concat_tables(tables), AUDIT_SCHEMA)
        assert _statuses(fed)[first] == ("tampered", "2 audit records of its training round, where Fusion writes one")
    _overwrite(store, "audit", audit, AUDIT_SCHEMA)

    # A round removed whole (its row and audit record): its charge in the ledger still names it.
    _overwrite(store, "audit", audit.filter(pc.not_equal(audit.column("release_id"), first)), AUDIT_SCHEMA)
    _overwrite(store, "models", models.filter(pc.not_equal(models.column("release_id"), first)), MODELS_SCHEMA)
    status, reason = _statuses(fed)[first]
    assert status == "missing" and "never committed" in reason
    _overwrite(store, "audit", audit, AUDIT_SCHEMA)
    _overwrite(store, "models", models, MODELS_SCHEMA)
    assert all(status in GOOD for status, _ in _statuses(fed).values())

    # The period's budget row rolled back: the signed rounds alone recompose what it spent.
    row = budget.to_pylist()[0]
    rolled = {**row, "epsilon_spent": 0.0}
    _overwrite(store, "budget", pa.Table.from_pylist([rolled], schema=BUDGET_SCHEMA), BUDGET_SCHEMA)
    status, reason = _statuses(fed)[f"(period {row['period']})"]
    assert status == "ledger" and "less than its signed releases show" in reason
    assert main(["verify", "--config", str(fed.config_path)]) == 1


def test_a_round_lost_after_its_signed_audit_row_commits_the_row_signed(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = _trained(make_federation)
    argv = ["train", "--config", str(fed.config_path), "--model", "tiny"]
    assert main(argv) == 0
    store = Store(fed.config.store_path)
    models = store.read("models").sort_by("round")
    second = models.column("release_id").to_pylist()[1]
    # Round 2's `models` row lost, as in a crash after its signed audit row: the round is charged and signed.
    _overwrite(store, "models", models.slice(0, 1), MODELS_SCHEMA)
    status, reason = _statuses(fed)[second]
    assert status == "missing" and "signed but its `models` row is not committed" in reason
    # The held-out table changed since: the round is completed all the same, with the held-out accuracy its audit
    # record holds, which the row signed holds (it only evaluates the model: the round's model is the one signed).
    held_out = fed.directory / "training" / "held_out.parquet"
    rows = pq.read_table(held_out)
    pq.write_table(rows.set_column(3, "label", pc.subtract(1, rows.column("label"))), held_out)
    capsys.readouterr()
    assert main(argv) == 0
    assert store.read("models").sort_by("round").equals(models)
    assert {status for status, _ in _statuses(fed).values()} == {"verified"}
    # Recorded by an earlier Fusion, the audit record holds no accuracy to restore: the row computed now is not the
    # row signed, none is committed, and the error names the held-out table as the cause.
    _overwrite(store, "models", models.slice(0, 1), MODELS_SCHEMA)
    audit = store.read("audit").to_pylist()
    for a in audit:
        if a["action"] == "training_round" and a["release_id"] == second:
            detail = json.loads(a["detail"])
            del detail["held_out_accuracy"]
            a["detail"] = json.dumps(detail)
    _overwrite(store, "audit", pa.Table.from_pylist(audit, schema=AUDIT_SCHEMA), AUDIT_SCHEMA)
    assert main(argv) == 1
    error = " ".join(capsys.readouterr().err.split())
    assert "signs another `models` row than the one this run computes" in error
    assert "holds no held-out accuracy to restore" in error and "`held_out` or its table changed" in error
    assert store.read("models").num_rows == 1
    pq.write_table(rows, held_out)
    # Resumed as it was: the same attempt, charged no more, its row the one signed.
    assert main(argv) == 0
    assert store.read("models").sort_by("round").equals(models)
    assert _charged(fed) == models.column("release_id").to_pylist()
    assert {status for status, _ in _statuses(fed).values()} == {"verified"}


def _train(config: Path, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "fusion.cli", "train", "--config", str(config), "--model", "tiny"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def _charged(fed: Federation) -> list[str]:
    return Store(fed.config.store_path).read("budget").column("release_ids").to_pylist()[0]


@pytest.mark.e2e
def test_a_lost_round_is_resumed_and_one_that_cannot_be_is_superseded(
    make_federation: Callable[..., Federation],
) -> None:
    fed = _trained(make_federation, extra_privacy="epsilon_cap = 4.0")  # room for a superseded attempt's charge
    lost = _train(fed.config_path, "round_after_charge")  # charged, nothing committed
    assert lost.returncode == CRASH_EXIT_CODE, lost.stderr
    (first,) = _charged(fed)
    status, reason = _statuses(fed)[first]
    assert status == "missing" and "resume it" in reason
    # Its aggregate gone from the exchange, the attempt cannot be completed: a new one is drawn and charged.
    (aggregate,) = (Path(fed.config.exchange_path) / "training" / "tiny" / first).rglob("aggregate.fenv")
    aggregate.unlink()
    again = _train(fed.config_path, "round_after_charge")
    assert again.returncode == CRASH_EXIT_CODE, again.stderr
    first, second = _charged(fed)
    # That one resumed (its aggregate is in the exchange): signed and recorded, then lost before its `models` row.
    half = _train(fed.config_path, "round_after_audit")
    assert half.returncode == CRASH_EXIT_CODE, half.stderr
    assert _charged(fed) == [first, second]  # resumed: charged no more
    status, reason = _statuses(fed)[second]
    assert status == "missing" and "signed but its `models` row is not committed" in reason
    # The store's `budget` row lost too (restored from a backup taken before training): the key holder's record
    # still holds both charges, and the run reads them from there, so it resumes the second attempt, not the first.
    shutil.rmtree(Store(fed.config.store_path).table_path("budget"))
    done = _train(fed.config_path)  # commits the row the audit row signed, then round 2
    assert done.returncode == 0, done.stderr
    statuses = _statuses(fed)
    models = Store(fed.config.store_path).read("models").sort_by("round").to_pylist()
    assert models[0]["release_id"] == second and statuses[second][0] == "verified"
    assert statuses[models[1]["release_id"]][0] == "verified"
    assert statuses[first][0] == "superseded" and statuses[first][1].endswith(f"{second} replaces it")
    charged = _charged(fed)
    assert charged == [first, second, models[1]["release_id"]]  # three charges for two rounds, each once
    # The epsilon the run reports composes all three, as the ledger does.
    budget = Store(fed.config.store_path).read("budget").to_pylist()[0]
    assert models[-1]["epsilon"] == pytest.approx(budget["epsilon_spent"]) and models[-1]["epsilon"] > 1.0
    assert main(["verify", "--config", str(fed.config_path)]) == 0


def test_rounds_committed_before_rounds_were_signed_are_legacy_once_the_key_holder_registers_them(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = make_federation()
    store = Store(fed.config.store_path)
    summer = RoundFederation.generate("test", IDS)

    def train_unsigned(model_id: str) -> None:  # as a Fusion from before rounds were signed committed them
        generators = {name: seeded_generator(k) for k, name in enumerate(IDS)}
        settings = replace(_settings(2), model_id=model_id)
        train_into_store(store, settings, summer, _data(), classes=3, terms=_terms(), generators=generators)

    train_unsigned("tiny")
    old = sorted(store.read("models").column("release_id").to_pylist())
    assert {rid: status for rid, (status, _) in _statuses(fed).items()} == dict.fromkeys(old, "tampered")
    argv = ["verify", "--config", str(fed.config_path)]
    assert main(argv) == 1
    capsys.readouterr()

    assert main(["keys", "--config", str(fed.config_path), "--register-unsigned-rounds"]) == 0
    assert "2 training round(s) without a signature registered" in " ".join(capsys.readouterr().out.split())
    assert {rid: status for rid, (status, _) in _statuses_registered(fed).items()} == dict.fromkeys(old, "legacy")
    assert main(argv) == 0
    assert {c.status for c in fusion.api.verify(fed.config_path)} == {"legacy"}  # the Python API reads them too

    # Only the rounds without a signature at registration are registered: a round committed unsigned since is not.
    train_unsigned("later")
    later = set(store.read("models").column("release_id").to_pylist()) - set(old)
    assert {_statuses_registered(fed)[rid][0] for rid in later} == {"tampered"}
    assert main(argv) == 1

    # A registered round removed (its `models` row, then its audit record too) is missing, as a release is.
    models, audit = store.read("models"), store.read("audit")
    _overwrite(store, "models", models.filter(pc.not_equal(models.column("release_id"), old[0])), MODELS_SCHEMA)
    status, reason = _statuses_registered(fed)[old[0]]
    assert status == "missing" and "its `models` row is gone" in reason
    _overwrite(store, "audit", audit.filter(pc.not_equal(audit.column("release_id"), old[0])), AUDIT_SCHEMA)
    status, reason = _statuses_registered(fed)[old[0]]
    assert status == "missing" and "row and audit record are gone" in reason
    assert _statuses_registered(fed)[old[1]][0] == "legacy"


def _statuses_registered(fed: Federation) -> dict[str, tuple[str, str]]:
    """`_statuses`, with the training rounds the key holder registered as unsigned."""
    checks = verify_releases(
        Store(fed.config.store_path), load_key_holder_public_keys(fed.config),
        unsigned_rounds=load_unsigned_rounds(fed.config),
    )  # fmt: skip
    return {c.release_id: (c.status, c.reason) for c in checks}
