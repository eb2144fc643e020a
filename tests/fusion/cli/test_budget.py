"""`fusion budget` counts each period as the key holder's ledger does where the key holder's record of its charges
is readable (its keys directory), marking a store row behind that record; elsewhere it shows the store's rows and
says that they are only as published."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from fusion.cli.core import main
from fusion.config.federation import load_config
from fusion.release.plan import Period
from fusion.store.charge_record import ChargeRecord
from fusion.store.delta import Store
from fusion.store.ledger import BudgetLedger
from fusion.store.provenance import store_id
from privacy.accountant import ReleaseCharge, skellam_epsilon
from tests.conftest import config_text
from tests.fusion.store.test_ledger import DAY, DELTA, MECHANISM, ONE, PARALLEL, SEQUENTIAL, charge, sha

NEXT = Period("2026-01-02", DAY.end, DAY.end + timedelta(days=1))
CAP = 10.0


def key_holder(root: Path) -> tuple[Path, BudgetLedger]:
    """A federation's config and its key holder's ledger: the store's rows checked against the record it keeps in
    its keys directory, where the config names it."""
    path = root / "federation.toml"
    path.write_text(config_text(institutions=[("alpha", "csv")], quorum=1))
    config = load_config(path, check_release=False)
    store = Store(config.store_path)
    return path, BudgetLedger(store, record=ChargeRecord(Path(config.keys_path), store_id(store)))


def rolled_back(root: Path) -> tuple[Path, BudgetLedger]:
    """Two periods charged by the key holder: the first's store row then deleted by another writer of the store (or
    lost to a crash between the key holder's two writes), the second's left as recorded."""
    path, ledger = key_holder(root)
    for release_id in ("r1", "r2"):
        ledger.spend(
            period=DAY, release_id=release_id, aggregate_sha256=sha(release_id), charge=charge(), cap=CAP, delta=DELTA
        )
    following = ReleaseCharge(MECHANISM, NEXT.start, NEXT.end, PARALLEL)
    ledger.spend(period=NEXT, release_id="n1", aggregate_sha256=sha("n1"), charge=following, cap=CAP, delta=DELTA)
    ledger.store.delta_table("budget").delete(f"period = '{DAY.name}'")
    return path, ledger


def test_the_key_holder_s_budget_is_counted_as_its_cap_check_counts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The store's row of a period is gone: `fusion budget` read only that row and said the period had nothing
    spent, while the key holder's cap check (its ledger, reading its own record) counted two releases."""
    path, ledger = rolled_back(tmp_path)
    assert main(["budget", "--config", str(path), "--format", "json"]) == 0
    captured = capsys.readouterr()
    shown = {row["period"]: row for row in map(json.loads, captured.out.splitlines())}
    cap_check, _ = ledger.preview(period=DAY, charges=[charge()], cap=CAP, delta=DELTA)
    two = skellam_epsilon([MECHANISM] * 2, delta=DELTA)
    assert cap_check == pytest.approx(two)
    day = shown[DAY.name]
    assert (day["epsilon_spent"], day["releases"], day["store_behind"]) == (pytest.approx(two), 2, True)
    assert day["epsilon_left"] == pytest.approx(CAP - two) and day["composition"] == SEQUENTIAL.value
    following = shown[NEXT.name]
    assert (following["epsilon_spent"], following["releases"], following["store_behind"]) == (ONE, 1, False)
    assert f"period {DAY.name}: STORE ROW BEHIND" in captured.err  # CSV and JSON stay data alone
    assert main(["budget", "--config", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"period {DAY.name}: STORE ROW BEHIND the key holder's record (store: no row; record: epsilon" in out
    assert f"period {NEXT.name}: STORE ROW BEHIND" not in out
    assert "checked against the key holder's own record of its charges" in out
    ledger.spend(period=DAY, release_id="r3", aggregate_sha256=sha("r3"), charge=charge(), cap=CAP, delta=DELTA)
    assert main(["budget", "--config", str(path), "--format", "json"]) == 0  # the next charge rebuilt the row
    day = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (day["releases"], day["store_behind"]) == (3, False)


def test_a_reader_without_the_key_holder_s_record_is_told_the_figures_are_as_published(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, ledger = rolled_back(tmp_path)
    elsewhere = tmp_path / "reader.toml"  # another party's config: the same store, its own keys directory
    elsewhere.write_text(path.read_text().replace("[federation]\n", '[federation]\nkeys = "reader-keys"\n'))
    assert load_config(elsewhere, check_release=False).keys_path != load_config(path, check_release=False).keys_path
    assert main(["budget", "--config", str(elsewhere), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].endswith('"composition","store_behind"')
    assert [line.split(",")[0] for line in captured.out.splitlines()[1:]] == [f'"{NEXT.name}"']  # the row left
    assert "only the key holder's `fusion budget`" in " ".join(captured.err.split())
    ledger.store.delta_table("budget").delete()
    assert main(["budget", "--config", str(elsewhere)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("no budget spent yet") and "as the store's budget table publishes it" in out
