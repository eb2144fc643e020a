"""A store writer rolls a period's budget back (its `budget` row deleted or rewritten): the key holder's own record
of its charges refuses the release the rollback would let through, and `fusion verify` recomposes each period from
the signed releases alone, so a period charged past its cap, or a budget row that disagrees, is reported."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from fusion.keys.registry import key_holder_signing_key_file, load_key_holder_public_keys
from fusion.release.plan import ReleasePlan, plan_release
from fusion.store.charge_record import CHARGE_RECORD_DIR
from fusion.store.delta import Store
from fusion.store.ledger import BudgetExceeded
from fusion.store.verification import GOOD, verify_releases
from pipelines.batch import run_batch
from pipelines.release import release
from pipelines.run import run_aggregate, run_contributions, run_unmask
from schemas.tables import BUDGET_SCHEMA
from tests.conftest import END, START, Federation

pytestmark = pytest.mark.e2e

#: Entity level: the period's releases compose sequentially, and one release (epsilon 1) fills the cap of 1.
ENTITY = 'unit = "entity"\nmax_partitions = 3\nmax_readings_per_partition = 2'


def _aggregated(plan: ReleasePlan, fed: Federation) -> None:
    """Contribute, aggregate and unmask `plan`'s interval, up to the key holder's step (no budget pre-check)."""
    run_contributions(plan, fed.config.institutions, in_process=True)
    status = run_aggregate(plan, in_process=True)
    if status["status"] == "awaiting_unmask":
        run_unmask(plan, [i for i in fed.config.institutions if i.id in status["unmask_pending"]])
        status = run_aggregate(plan, in_process=True)
    assert status["status"] == "aggregated", status


def _findings(store: Store, fed: Federation) -> list[tuple[str, str, str]]:
    checks = verify_releases(store, load_key_holder_public_keys(fed.config))
    return [(c.release_id, c.status, c.reason) for c in checks if c.status not in GOOD]


@pytest.fixture
def two_releases(make_federation) -> tuple[Federation, ReleasePlan, ReleasePlan]:  # type: ignore[no-untyped-def]
    """One release published (the period's cap spent), a second interval of the same period aggregated."""
    fed = make_federation(noise=True, mode="production", extra_privacy=ENTITY)
    first = plan_release(fed.config, START, END)
    assert run_batch(first).status == "released"
    second = plan_release(fed.config, START + timedelta(hours=6), END + timedelta(hours=6))
    # The institutions refuse to seal the period past its cap by their own seal records (pipelines/sealing.py);
    # set aside here, as if their key directories were restored from before the first release, so that the
    # key holder's ledger is what stands between the aggregated second interval and its release.
    for institution in fed.config.institutions:
        sealed = fed.directory / "institution-keys" / institution.id / "sealed"
        sealed.rename(sealed.with_name("sealed-set-aside"))
    _aggregated(second, fed)
    return fed, first, second


def test_a_deleted_or_rewritten_budget_row_lets_no_release_past_the_cap(two_releases) -> None:  # type: ignore[no-untyped-def]
    fed, first, second = two_releases
    store = Store(fed.config.store_path)
    with pytest.raises(BudgetExceeded):  # the honest attempt
        release(second, store)
    assert _findings(store, fed) == []
    honest = store.read("budget").to_pylist()[0]

    DeltaTable(store.table_path("budget")).delete(f"period = '{honest['period']}'")
    (finding,) = _findings(store, fed)  # verify sees the signed release's period without a row
    assert finding[:2] == (f"(period {honest['period']})", "ledger") and "no row for the period" in finding[2]
    with pytest.raises(BudgetExceeded):  # `fusion batch` refuses before any work
        run_batch(second)
    with pytest.raises(BudgetExceeded):  # and so does the key holder's step
        release(second, Store(fed.config.store_path))
    store = Store(fed.config.store_path)
    (row,) = store.read("budget").to_pylist()
    assert row["release_ids"] == [first.key.release_id] and row["epsilon_spent"] == honest["epsilon_spent"]
    restored = [r for r in store.read("audit").to_pylist() if r["action"] == "budget_restored"]
    assert len(restored) == 1 and json.loads(restored[0]["detail"])["store_release_ids"] is None
    assert _findings(store, fed) == []

    # Rewritten instead: the mechanism's variance raised a hundredfold, the spend lowered to match.
    weaker = {**honest["mechanisms"][0], "variance": honest["mechanisms"][0]["variance"] * 100}
    rewritten = {**honest, "mechanisms": [weaker], "epsilon_spent": 0.01}
    write_deltalake(
        store.table_path("budget"), pa.Table.from_pylist([rewritten], schema=BUDGET_SCHEMA), mode="overwrite"
    )
    reasons = [reason for _, status, reason in _findings(store, fed) if status == "ledger"]
    assert any("another aggregate or mechanism" in r for r in reasons)
    assert any("less than its signed releases show" in r for r in reasons)
    with pytest.raises(BudgetExceeded):
        release(second, Store(fed.config.store_path))
    assert Store(fed.config.store_path).read("budget").to_pylist()[0]["mechanisms"] == honest["mechanisms"]
    assert set(Store(fed.config.store_path).read("releases").column("release_id").to_pylist()) == {first.key.release_id}


def test_verify_recomposes_each_period_from_the_signed_releases_alone(two_releases) -> None:  # type: ignore[no-untyped-def]
    """A key holder without its record (lost, or moved away) charges from the rolled-back row: the second
    release is published past the cap, and `fusion verify` reports the period over its cap and the row's gap."""
    fed, first, second = two_releases
    store = Store(fed.config.store_path)
    period = store.read("budget").column("period")[0].as_py()
    DeltaTable(store.table_path("budget")).delete(f"period = '{period}'")
    shutil.rmtree(Path(key_holder_signing_key_file(fed.config).parent) / CHARGE_RECORD_DIR)
    assert release(second, Store(fed.config.store_path)).status == "released"

    found = _findings(Store(fed.config.store_path), fed)
    assert {rid for rid, _, _ in found} == {f"(period {period})"}
    (over,) = [reason for _, status, reason in found if status == "overspent"]
    assert "over its cap" in over
    ledger = [reason for _, status, reason in found if status == "ledger"]
    assert len(ledger) == 2 and f"signed releases ['{first.key.release_id}'] are missing" in ledger[0]
    assert "less than its signed releases show" in ledger[1]
    # Asked about one release, verify names what is wrong with its period too.
    own = verify_releases(
        Store(fed.config.store_path), load_key_holder_public_keys(fed.config), release_id=second.key.release_id
    )
    assert [c.status for c in own] == ["verified", "overspent", "ledger", "ledger"]
