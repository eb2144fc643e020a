"""A store keeps the privacy mode it was created in: test-mode runs (noise off or seeded, charged nothing to the
budget) never write into a production store, nor production runs into a test store; `fusion verify` reports
test-mode cells in a production store as a violation (issue 18, point 1)."""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from fusion.cli.core import main
from fusion.config.federation import PrivacyMode, load_config
from fusion.errors import FusionError
from fusion.keys.registry import load_key_holder_public_keys
from fusion.release.plan import plan_release
from fusion.store.delta import Store
from fusion.store.mode import MODE_PROPERTY, bind_store_mode, recorded_mode, store_mode
from fusion.store.verification import verify_releases
from pipelines.batch import run_batch
from schemas.tables import RELEASES_SCHEMA
from tests.conftest import START, Federation
from tests.fusion.store.test_store import release_rows

H = timedelta(hours=1)
#: Entity level: releases compose in sequence, so the default cap (epsilon) admits one release a day.
ENTITY = 'unit = "entity"\nmax_partitions = 3\nmax_readings_per_partition = 2'


def marked(rows: pa.Table, *, epsilon: float, noise: str) -> pa.Table:
    """`rows` as releases of another mode: every cell's epsilon and noise label replaced."""
    n = rows.num_rows
    rows = rows.set_column(rows.schema.get_field_index("epsilon"), "epsilon", pa.array([epsilon] * n, pa.float64()))
    rows = rows.set_column(rows.schema.get_field_index("noise"), "noise", pa.array([noise] * n, pa.string()))
    return rows.cast(RELEASES_SCHEMA)


def exact(release_id: str, hours: range) -> pa.Table:
    return marked(release_rows(release_id, hours), epsilon=math.inf, noise="off (test mode)")


# --- the store's mode, without pipelines ---------------------------------------------------------------------

def test_the_first_run_records_its_mode_and_a_run_of_the_other_mode_is_refused_in_one_line(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    assert store_mode(store) is None
    bind_store_mode(store, PrivacyMode.PRODUCTION)
    assert recorded_mode(store) is PrivacyMode.PRODUCTION
    bind_store_mode(store, PrivacyMode.PRODUCTION)  # the same mode goes on
    with pytest.raises(FusionError) as refused:
        bind_store_mode(store, PrivacyMode.TEST)
    message = str(refused.value)
    assert str(tmp_path / "store") in message and "production store" in message and 'privacy.mode = "test"' in message
    assert "\n" not in message and "federation.store" in message

    test_store = Store(tmp_path / "test-store")
    bind_store_mode(test_store, PrivacyMode.TEST)
    with pytest.raises(FusionError, match=r'is a test store, and this config has privacy.mode = "production"'):
        bind_store_mode(test_store, PrivacyMode.PRODUCTION)


def test_racing_first_runs_of_both_modes_record_one_mode(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.ensure_tables()
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def run(mode: PrivacyMode) -> None:
        barrier.wait()
        try:
            bind_store_mode(Store(tmp_path / "store"), mode)
            outcomes.append(mode.value)
        except FusionError:
            outcomes.append("refused")

    threads = [threading.Thread(target=run, args=(m,)) for m in [PrivacyMode.TEST, PrivacyMode.PRODUCTION] * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winner = recorded_mode(store)
    assert winner is not None and sorted(outcomes) == sorted([winner.value] * 2 + ["refused"] * 2)


@pytest.mark.parametrize(
    ("rows", "mode"),
    [
        pytest.param(lambda: release_rows("r-1", range(2)), PrivacyMode.PRODUCTION, id="calibrated-noise"),
        pytest.param(lambda: pa.concat_tables([release_rows("r-1", range(2)), exact("r-2", range(2, 4))]),
                     PrivacyMode.PRODUCTION, id="mixed"),
        pytest.param(lambda: exact("r-1", range(2)), PrivacyMode.TEST, id="noise-off"),
        pytest.param(lambda: marked(release_rows("r-1", range(2)), epsilon=math.inf,
                                    noise="skellam (seeded, test mode)"), PrivacyMode.TEST, id="seeded"),
    ],
)
def test_a_store_from_before_modes_were_recorded_takes_the_mode_its_releases_show(
    tmp_path: Path, rows: Callable[[], pa.Table], mode: PrivacyMode
) -> None:
    store = Store(tmp_path / "store")
    store.insert_new("releases", rows())  # written without a mode, as earlier versions did
    assert recorded_mode(store) is None and store_mode(store) is mode
    other = PrivacyMode.TEST if mode is PrivacyMode.PRODUCTION else PrivacyMode.PRODUCTION
    with pytest.raises(FusionError, match=f"is a {mode.value} store"):
        bind_store_mode(store, other)
    assert recorded_mode(store) is mode  # what it showed is recorded now
    bind_store_mode(store, mode)


# --- end to end: the scenario of the issue ---------------------------------------------------------------------

def production_federation(make_federation: Callable[..., Federation]) -> Federation:
    """A production federation (noise on, no seed) whose period cap admits one release a day."""
    return make_federation(mode="production", noise=True, extra_privacy=ENTITY)


def to_test_mode(fed: Federation) -> None:
    """The same federation's config switched to test mode with noise off."""
    text = fed.config_path.read_text()
    fed.config_path.write_text(text.replace('mode = "production"', 'mode = "test"').replace(
        "noise = true", "noise = false"))


@pytest.mark.e2e
def test_a_test_mode_batch_is_refused_by_a_production_store_whose_cap_refused_a_release(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = production_federation(make_federation)
    assert run_batch(plan_release(fed.config, START, START + H), in_process=True).status == "released"
    second = ["batch", "--config", str(fed.config_path), "--start", (START + H).isoformat(),
              "--end", (START + 2 * H).isoformat()]
    assert main(second) == 1
    assert "the cap is 1.0000" in " ".join(capsys.readouterr().err.split())  # the period's budget is spent

    to_test_mode(fed)
    store = Store(fed.config.store_path)
    before = (store.version("releases"), store.read("budget").to_pylist())
    assert main(second) == 1
    refused = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert refused.startswith("error: store ") and refused.count("error:") == 1 and "Traceback" not in refused
    assert fed.config.store_path in refused and "production store" in refused and '"test"' in refused
    assert (store.version("releases"), store.read("budget").to_pylist()) == before  # nothing written, nothing spent
    checks = verify_releases(store, load_key_holder_public_keys(fed.config))
    assert [c.status for c in checks] == ["verified"]

    # And the reverse: a production run against a store created in test mode.
    test_fed = make_federation(subdir="test-federation")
    assert run_batch(plan_release(test_fed.config, START, START + H), in_process=True).status == "released"
    text = test_fed.config_path.read_text().replace('mode = "test"', 'mode = "production"')
    test_fed.config_path.write_text(text.replace("noise = false", "noise = true").replace("seed = 7\n", ""))
    assert main(["batch", "--config", str(test_fed.config_path), "--start", (START + H).isoformat(),
                 "--end", (START + 2 * H).isoformat()]) == 1
    refused = " ".join(capsys.readouterr().err.split())
    assert 'is a test store, and this config has privacy.mode = "production"' in refused


@pytest.mark.e2e
def test_verify_reports_exact_cells_in_a_production_store_as_a_violation(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    """A store that holds both (written before stores recorded their mode: here, its record changed by hand for
    the test-mode run): the exact release verifies by its signature, and is a violation all the same."""
    fed = production_federation(make_federation)
    first = plan_release(fed.config, START, START + H)
    assert run_batch(first, in_process=True).status == "released"
    store = Store(fed.config.store_path)
    releases = store.table_path("releases")
    DeltaTable(releases).alter.set_table_properties({MODE_PROPERTY: "test"}, raise_if_not_exists=False)
    to_test_mode(fed)
    exact_plan = plan_release(fed.config, START + H, START + 2 * H)
    assert run_batch(exact_plan, in_process=True).status == "released"  # exact cells, charged nothing
    DeltaTable(releases).alter.set_table_properties({MODE_PROPERTY: "production"}, raise_if_not_exists=False)

    def statuses() -> dict[str, tuple[str, str]]:
        return {c.release_id: (c.status, c.reason) for c in verify_releases(store, load_key_holder_public_keys(
            fed.config))}

    checks = statuses()
    assert checks[first.key.release_id] == ("verified", "")
    status, reason = checks[exact_plan.key.release_id]
    assert status == "violation" and "exact cells (noise off)" in reason and "production store" in reason
    # The recorded mode is a table property anyone who writes the store could set: set to "test", the calibrated
    # release still shows a production store, and the exact one beside it is still a violation.
    DeltaTable(releases).alter.set_table_properties({MODE_PROPERTY: "test"}, raise_if_not_exists=False)
    assert statuses()[exact_plan.key.release_id][0] == "violation"
    DeltaTable(releases).alter.set_table_properties({MODE_PROPERTY: "production"}, raise_if_not_exists=False)
    assert main(["verify", "--config", str(fed.config_path), "--format", "json"]) == 1
    assert '"violation"' in capsys.readouterr().out

    # The same store as an earlier version left it, no mode recorded: its calibrated release shows production.
    rows = store.read("releases")
    shutil.rmtree(store.table_path("releases"))
    write_deltalake(store.table_path("releases"), rows)
    assert recorded_mode(store) is None and store_mode(store) is PrivacyMode.PRODUCTION
    checks = statuses()
    assert checks[exact_plan.key.release_id][0] == "violation" and checks[first.key.release_id][0] == "verified"


def test_a_stream_of_the_other_mode_is_refused_at_start(make_federation: Callable[..., Federation]) -> None:
    """`fusion stream` checks the store's mode when it starts, before it spools or releases anything."""
    from pipelines.stream_driver import StreamDriver

    fed = production_federation(make_federation)
    bind_store_mode(Store(fed.config.store_path), PrivacyMode.PRODUCTION)
    to_test_mode(fed)
    with pytest.raises(FusionError, match="production store"):
        StreamDriver(load_config(fed.config_path))
