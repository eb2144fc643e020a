"""The key holder's checks before it charges a release (pipelines/release.py): a damaged aggregate envelope and a
missing, damaged or foreign HE secret key are refused with a message naming the file, an aggregate that is not what
the signed envelopes in the exchange give is refused as `aggregate_mismatch`, and nothing is charged."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from fusion.errors import FusionError, ReleaseRefused
from fusion.keys.holder import load_checked_secret_context, secret_key_file
from fusion.keys.registry import key_holder_signing_key_file, load_aggregator_signing_key, load_key_holder_public_keys
from fusion.release.exchange import (
    aggregate_path,
    contribution_path,
    public_context_path,
    read_bytes,
    unmask_path,
)
from fusion.release.plan import ReleasePlan, plan_release
from fusion.store.delta import Store
from fusion.store.verification import GOOD, verify_releases
from pipelines import aggregate_envelope, unmask
from pipelines.release import release
from pipelines.run import run_aggregate, run_contributions, run_unmask
from pipelines.unmask import acknowledge
from privacy import he
from privacy.envelope import EnvelopeHeader, pack_envelope, unpack_envelope
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


def _resealed(fed: Federation, header: EnvelopeHeader, ciphertexts: list[bytes]) -> bytes:
    """An aggregate with these ciphertexts and header, signed with the registered aggregator's key: what a
    malicious aggregator can seal."""
    return pack_envelope(header, ciphertexts, signing_key=load_aggregator_signing_key(fed.config))


def _forget_sums_and_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty what this process remembers of the sums and noise layers it computed as the aggregator: the key holder
    then recomputes the aggregate from the exchange alone, as in a process of its own."""
    monkeypatch.setattr(aggregate_envelope, "_SUMS", OrderedDict())
    monkeypatch.setattr(unmask, "_LAYERS", OrderedDict())


def _refusals(store: Store, reason: str) -> list[dict[str, object]]:
    return [a for a in store.read("audit").to_pylist() if a["action"] == "release_refused" and a["reason"] == reason]


def test_an_aggregate_the_aggregator_shifted_or_summed_wrongly_is_refused_before_the_charge(
    make_federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registered aggregator signs (1) the honest aggregate plus an offset in one slot of the plaintext vector it
    adds (a released count moved by 1000), (2) a sum without gamma's contribution, (3) one with gamma's twice, each
    under the honest header. The key holder recomputes the aggregate from the signed envelopes in the exchange and
    refuses each before anything is charged or decrypted, auditing `aggregate_mismatch` (once per aggregate), whether
    or not this process remembers the sum it computed as the aggregator; the honest one is then released and
    verifies."""
    fed = make_federation()
    plan = _aggregated(fed)
    path = Path(aggregate_path(fed.config.exchange_path, plan.key))
    genuine = path.read_bytes()
    header, ciphertexts = unpack_envelope(genuine)
    public = he.load_public_context(read_bytes(public_context_path(fed.config.exchange_path)))
    offset = np.zeros(plan.layout.slots, dtype=np.int64)
    offset[0] = 1000
    gamma = unpack_envelope(read_bytes(contribution_path(fed.config.exchange_path, plan.key, "gamma")))[1]
    without_gamma = [
        (ts.bfv_vector_from(public, a) - ts.bfv_vector_from(public, g)).serialize()
        for a, g in zip(ciphertexts, gamma, strict=True)
    ]
    forged = {
        "shifted": he.add_plain(public, ciphertexts, offset),
        "gamma omitted": without_gamma,
        "gamma twice": he.add_encrypted(public, [ciphertexts, gamma]),
    }
    secret = load_checked_secret_context(fed.config)
    honest = he.decrypt_vector(secret, ciphertexts, plan.layout.slots)
    shifted = he.decrypt_vector(secret, forged["shifted"], plan.layout.slots)
    assert np.flatnonzero(shifted != honest).tolist() == [0] and shifted[0] - honest[0] == 1000  # a real shift
    store = Store(fed.config.store_path)
    for remembered in (True, False):  # the sum and layers the aggregator computed in this process, or not
        for label, payload in forged.items():
            if not remembered:
                _forget_sums_and_layers(monkeypatch)
            path.write_bytes(_resealed(fed, header, payload))
            with pytest.raises(ReleaseRefused, match=r"aggregate_mismatch.*its ciphertexts are not the sum") as refused:
                release(plan, store)
            assert "nothing is charged" in str(refused.value), label
            assert _charged(store) == [] and "budget_spend" not in _actions(store), label
            assert store.read("releases").num_rows == 0, label
    refusals = _refusals(store, "aggregate_mismatch")
    assert len(refusals) == 3 and {json.loads(str(r["detail"]))["aggregate"] for r in refusals} == {str(path)}
    path.write_bytes(genuine)
    _forget_sums_and_layers(monkeypatch)
    assert release(plan, store).status == "released"
    checks = verify_releases(store, load_key_holder_public_keys(fed.config))
    assert [c.status for c in checks] and all(c.status in GOOD for c in checks)


def test_the_key_holder_removes_the_noise_layers_the_aggregate_names_whatever_answers_came_later(
    make_federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quorum 2 of 3 with noise: alpha and beta answer, revealing their excess layers, and the aggregator seals
    without waiting for gamma; gamma's answer (with its layers) arrives after. The aggregate names the reveals it
    removed, so the key holder recomputes it as sealed and releases it. A header that understates the noise left in
    it, or names a layer it did not remove, is refused."""
    fed = make_federation(noise=True, seed=5, quorum=2)
    plan = plan_release(fed.config, START, END)
    v = plan.params.total_variance
    run_contributions(plan, fed.config.institutions, in_process=True)
    run_aggregate(plan, in_process=True)
    acknowledge(plan, "gamma")  # three signatures: the answers reveal their layers
    run_unmask(plan, [fed.config.institution(i) for i in ("alpha", "beta")])
    status = run_aggregate(plan, in_process=True)
    assert status["status"] == "aggregated" and status["noise_variance"] == pytest.approx(3 * v - 2 * (v / 2))
    run_unmask(plan, [fed.config.institution("gamma")])
    assert unpack_envelope(read_bytes(unmask_path(fed.config.exchange_path, plan.key, "gamma")))[0].revealed_layers
    Store(fed.config.store_path).ensure_tables()
    path = Path(aggregate_path(fed.config.exchange_path, plan.key))
    genuine = path.read_bytes()
    header, ciphertexts = unpack_envelope(genuine)
    assert sorted(header.revealed_layers) == ["alpha", "beta"]
    store = Store(fed.config.store_path)
    gamma = unpack_envelope(read_bytes(unmask_path(fed.config.exchange_path, plan.key, "gamma")))[0]
    only_alpha = {"alpha": header.revealed_layers["alpha"]}
    level, seed = header.revealed_layers["beta"].split(":")
    wrong_beta = f"{level}:{int(seed, 16) ^ 1:064x}"
    for forged, found in (
        (replace(header, noise_variance=2.5 * v), "noise_variance differ"),  # within the bounds checked before
        (replace(header, revealed_layers={**header.revealed_layers, **gamma.revealed_layers}), "noise_variance"),
        (replace(header, revealed_layers=only_alpha, noise_variance=2.5 * v), "its ciphertexts are not the sum"),
        (replace(header, revealed_layers={**only_alpha, "beta": wrong_beta}), "beta: layer 2's seed does not match"),
    ):
        path.write_bytes(_resealed(fed, forged, ciphertexts))
        with pytest.raises(ReleaseRefused, match=f"aggregate_mismatch.*{found}"):
            release(plan, store)
        assert _charged(store) == []
    path.write_bytes(genuine)
    _forget_sums_and_layers(monkeypatch)  # recomputed from the exchange alone, gamma's answer in it
    assert release(plan, store).status == "released"


def test_an_aggregate_whose_envelopes_left_the_exchange_is_refused_until_they_are_back(
    make_federation: Callable[..., Federation],
) -> None:
    """Gamma's contribution is deleted from the exchange after the aggregate was sealed: the key holder cannot
    recompute the aggregate, so it refuses it (`aggregate_unverifiable`) and charges nothing; once gamma runs
    `fusion contribute` again (which re-publishes its kept envelope), the release goes ahead."""
    fed = make_federation()
    plan = _aggregated(fed)
    Path(contribution_path(fed.config.exchange_path, plan.key, "gamma")).unlink()
    store = Store(fed.config.store_path)
    with pytest.raises(ReleaseRefused, match=r"aggregate_unverifiable.*the contribution of gamma: no file at"):
        release(plan, store)
    assert _charged(store) == [] and len(_refusals(store, "aggregate_unverifiable")) == 1
    run_contributions(plan, [fed.config.institution("gamma")], in_process=True)
    assert release(plan, store).status == "released"
