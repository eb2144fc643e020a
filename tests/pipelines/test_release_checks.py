"""The key holder's checks before it charges a release (pipelines/release.py): a damaged aggregate envelope and a
missing, damaged or foreign HE secret key are refused with a message naming the file, and nothing is charged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fusion.errors import FusionError, ReleaseRefused
from fusion.keys.holder import secret_key_file
from fusion.keys.registry import key_holder_signing_key_file
from fusion.release.exchange import aggregate_path
from fusion.release.plan import ReleasePlan, plan_release
from fusion.store.delta import Store
from pipelines.release import release
from pipelines.run import run_aggregate
from privacy import he
from tests.conftest import END, START, Federation
from tests.pipelines.test_budget_rollback import _aggregated as up_to_the_key_holder


def _aggregated(fed: Federation) -> ReleasePlan:
    """An interval contributed, aggregated and unmasked: ready for the key holder's step."""
    plan = plan_release(fed.config, START, END)
    up_to_the_key_holder(plan, fed)
    Store(fed.config.store_path).ensure_tables()
    return plan


def _charged(store: Store) -> list[dict[str, object]]:
    return store.read("budget").to_pylist()


def _actions(store: Store) -> list[str]:
    return [a["action"] for a in store.read("audit").to_pylist()]


def test_a_damaged_aggregate_is_refused_audited_and_never_charged(make_federation: Callable[..., Federation]) -> None:
    fed = make_federation()
    plan = _aggregated(fed)
    path = Path(aggregate_path(fed.config.exchange_path, plan.key))
    good = path.read_bytes()
    flipped = good[:-100] + bytes([good[-100] ^ 1]) + good[-99:]
    for damaged in (good[: len(good) // 2], flipped, b"hello"):
        path.write_bytes(damaged)
        store = Store(fed.config.store_path)
        with pytest.raises(ReleaseRefused, match="unreadable") as refused:
            release(plan, store)
        assert str(path) in str(refused.value)
        assert _charged(store) == [] and "budget_spend" not in _actions(store)
    refusals = [a for a in Store(fed.config.store_path).read("audit").to_pylist() if a["action"] == "release_refused"]
    assert len(refusals) == 3 and all(json.loads(a["detail"])["aggregate"] == str(path) for a in refusals)
    assert run_aggregate(plan, in_process=True)["status"] == "aggregated"  # sealed again, as the message says
    assert release(plan, Store(fed.config.store_path)).status == "released"


def test_an_unusable_secret_key_is_refused_before_the_charge(make_federation: Callable[..., Federation]) -> None:
    fed = make_federation()
    plan = _aggregated(fed)
    secret = secret_key_file(fed.config)
    good = secret.read_bytes()
    foreign, _ = he.generate_keys()  # another key holder's: it parses, but cannot decrypt this federation's
    damaged = (("^the HE secret key is missing", None), ("unreadable", b"garbage" * 10), ("does not belong", foreign))
    for label, data in damaged:
        if data is None:
            secret.unlink()
        else:
            secret.write_bytes(data)
            secret.chmod(0o600)
        store = Store(fed.config.store_path)
        with pytest.raises(FusionError, match=label) as refused:
            release(plan, store)
        assert str(secret) in str(refused.value)
        assert _charged(store) == [] and "budget_spend" not in _actions(store)
    secret.write_bytes(good)
    assert release(plan, Store(fed.config.store_path)).status == "released"


def test_an_unreadable_release_signing_key_is_refused_by_name(make_federation: Callable[..., Federation]) -> None:
    fed = make_federation()
    plan = _aggregated(fed)
    key = key_holder_signing_key_file(fed.config)
    key.write_bytes(b"\x01" * 10)
    store = Store(fed.config.store_path)
    with pytest.raises(FusionError, match="unreadable") as refused:
        release(plan, store)
    assert str(key) in str(refused.value) and _charged(store) == []
