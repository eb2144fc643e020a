"""A training round through the releases' role path (training/exchange_round.py): envelopes in the exchange, the
aggregator's sum and roster, the unmask round, the key holder's paid-for decryption."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from fusion.config.federation import load_config
from fusion.errors import FusionError
from fusion.keys.holder import secret_key_file
from fusion.keys.registry import load_aggregator_signing_key
from fusion.release.exchange import aggregate_path, contribution_path, roster_path
from privacy.accountant import Composition, NormBoundMechanism, ReleaseCharge
from privacy.envelope import pack_envelope, unpack_envelope
from privacy.noise_shares import NoiseLayers
from privacy.skellam import seeded_generator
from tests.conftest import Federation
from training.exchange_round import (
    ExchangeFederation,
    Sealing,
    aggregate,
    answer,
    decrypt,
    open_round,
    seal_contribution,
)
from training.secure_sum import RoundId, RoundRefused

START, END = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 6, tzinfo=UTC)
IDS = ("alpha", "beta", "gamma")
#: What each of these rounds costs an institution's period: next to nothing (their noise is not calibrated).
CHARGE = ReleaseCharge(NormBoundMechanism(1e12, 1.0, 1.0), START, END, Composition.PARALLEL)
ROUNDS = 4  # the rounds of their run (m), each holding the cap for its later ones too


def _vectors(slots: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {i: rng.integers(-5000, 5000, size=slots) for i in IDS}


def test_a_round_sums_bit_for_bit_through_the_exchange(make_federation: Callable[..., Federation]) -> None:
    fed = make_federation(noise=True, entities=2)
    config = load_config(fed.config_path)
    federation = ExchangeFederation(config, START, END)
    round_id = RoundId("m", 1, "p")
    plan = federation.plan(round_id, slots=9001, variance=400.0)  # two ciphertexts
    open_round(plan, config.exchange_path)
    vectors = _vectors(9001)
    noised: dict[str, np.ndarray] = {}
    for k, i in enumerate(IDS):
        sealed = seal_contribution(
            plan, i, vectors[i], round_id=round_id, generator=seeded_generator(k), charge=CHARGE, rounds=ROUNDS
        )
        assert sealed.sealing is Sealing.DRAWN and sealed.noised is not None
        assert not np.array_equal(sealed.noised, vectors[i])
        noised[i] = sealed.noised
        # Published under the releases' own layout of the exchange, masked: its ciphertexts are not the vector.
        assert contribution_path(plan.config.exchange_path, plan.key, i).endswith(f"{i}.fenv")
    assert aggregate(plan)["status"] == "awaiting_unmask"  # the roster closes: the unmask round starts
    for i in IDS:
        answer(plan, i, round_id=round_id)
    status = aggregate(plan)
    assert status["status"] == "aggregated" and status["contributors"] == list(IDS)
    paid: list[str] = []
    header, total, _ = decrypt(plan, paid.append)
    assert len(paid) == 1 and paid[0] == header.payload_sha256
    # Charged for this aggregate and lost, the round can be resumed under its id; charged for another, it cannot.
    assert federation.can_resume(round_id, slots=9001, variance=400.0, charged_for=header.payload_sha256)
    assert not federation.can_resume(round_id, slots=9001, variance=400.0, charged_for="0" * 64)
    plain = np.sum([noised[i] for i in IDS], axis=0)
    np.testing.assert_array_equal(total, plain)  # the decrypted sum is the plaintext sum of the noised vectors
    # No removable layers: each seals s_q = v / h(quorum 2) = v, and keeps it: exactly that in the header, and
    # the seeded draws' sample variance within 10% (9,001 slots: its sd is about 1.5%).
    assert header.noise_variance == 3 * 400.0
    for i in IDS:
        assert (noised[i] - vectors[i]).var() == pytest.approx(400.0, rel=0.1)
    # Sealing again republishes the kept envelope: never a second noisy version of a round.
    again = seal_contribution(
        plan, "alpha", vectors["alpha"], round_id=round_id, generator=seeded_generator(99), charge=CHARGE, rounds=ROUNDS
    )
    assert again.sealing is Sealing.REPUBLISHED and again.noised is None

    # A new attempt of the same round (the store and the exchange, which the aggregator and the key holder can
    # write, say the first was lost): each institution seals the noisy update it kept, under fresh masks, whatever
    # vector and generator it is handed. The sum decrypted is the first attempt's, bit for bit: no second draw of
    # noise to average with the first.
    retry = RoundId("m", 1, "p", attempt=1)
    replan = federation.plan(retry, slots=9001, variance=400.0)
    open_round(replan, config.exchange_path)
    for k, i in enumerate(IDS):
        sealed = seal_contribution(
            replan, i, vectors[i] + 7, round_id=retry, generator=seeded_generator(50 + k), charge=CHARGE, rounds=ROUNDS
        )
        assert sealed.sealing is Sealing.REMASKED and sealed.noised is not None
        np.testing.assert_array_equal(sealed.noised, noised[i])
        assert sealed.envelope != Path(contribution_path(plan.config.exchange_path, plan.key, i)).read_bytes()
    assert aggregate(replan)["status"] == "awaiting_unmask"
    for i in IDS:
        answer(replan, i, round_id=retry)
    assert aggregate(replan)["status"] == "aggregated"
    np.testing.assert_array_equal(decrypt(replan, None)[1], total)
    # An attempt summing other institutions (alpha left out): beta and gamma do not answer its roster, since the
    # difference of the two sums would be alpha's noisy update alone.
    third = RoundId("m", 1, "p", attempt=2)
    plan3 = federation.plan(third, slots=9001, variance=400.0)
    open_round(plan3, config.exchange_path)
    for i in ("beta", "gamma"):
        seal_contribution(
            plan3, i, vectors[i], round_id=third, generator=seeded_generator(9), charge=CHARGE, rounds=ROUNDS
        )
    assert aggregate(plan3)["status"] == "awaiting_unmask"
    for i in ("beta", "gamma"):
        with pytest.raises(FusionError, match="does not answer attempt"):
            answer(plan3, i, round_id=third)
    # Its kept update gone, an institution refuses to seal a round it sealed before rather than draw anew.
    keys = Path(config.institution_keys_path(config.institution("alpha"))) / "training" / "rounds"
    (update,) = keys.glob("*.npy")
    update.unlink()
    with pytest.raises(FusionError, match="does not seal the round again"):
        seal_contribution(
            plan3,
            "alpha",
            vectors["alpha"],
            round_id=third,
            generator=seeded_generator(7),
            charge=CHARGE,
            rounds=ROUNDS,
        )


def test_a_round_with_a_dropped_institution_completes(make_federation: Callable[..., Federation]) -> None:
    fed = make_federation(noise=True, entities=2)
    config = load_config(fed.config_path)
    federation = ExchangeFederation(config, START, END, charge=CHARGE, rounds=ROUNDS)
    layers = NoiseLayers(total_variance=100.0, quorum=2, institutions=3, max_colluding=0)
    vectors = {i: v for i, v in _vectors(50).items() if i != "beta"}  # beta drops out of this round
    generators = {i: seeded_generator(k) for k, i in enumerate(IDS)}
    summed = federation.sum_round(vectors, round_id=RoundId("m", 2, "p"), layers=layers, generators=generators)
    assert summed.contributors == ("alpha", "gamma")
    plan = federation.plan(RoundId("m", 2, "p"), slots=50, variance=100.0)
    roster = json.loads(Path(roster_path(plan.config.exchange_path, plan.key)).read_text())
    assert (roster["included"], roster["absent"]) == (["alpha", "gamma"], ["beta"])
    # Alpha and gamma's masks with beta were removed from shares; the sum is theirs alone, with their noise.
    noise = summed.noisy_sum - vectors["alpha"] - vectors["gamma"]
    assert summed.noise_variance == 200.0
    assert np.abs(noise).max() < 10 * np.sqrt(200.0)
    with pytest.raises(RoundRefused, match="quorum"):
        federation.sum_round(
            {"alpha": vectors["alpha"]}, round_id=RoundId("m", 3, "p"), layers=layers, generators=generators
        )


def test_the_key_holder_refuses_a_damaged_aggregate_or_lost_key_before_paying(
    make_federation: Callable[..., Federation],
) -> None:
    """Nothing is charged for a round whose aggregate is damaged, or whose HE secret key is missing or damaged:
    each is refused naming its file (RoundRefused, FusionError), not a traceback after the charge."""
    fed = make_federation(noise=True, entities=2)
    config = load_config(fed.config_path)
    federation = ExchangeFederation(config, START, END)
    plan = federation.plan(RoundId("m", 4, "p"), slots=50, variance=100.0)
    open_round(plan, config.exchange_path)
    for k, (i, vector) in enumerate(_vectors(50).items()):
        seal_contribution(
            plan, i, vector, round_id=RoundId("m", 4, "p"), generator=seeded_generator(k), charge=CHARGE, rounds=ROUNDS
        )
    assert aggregate(plan)["status"] == "awaiting_unmask"
    for i in IDS:
        answer(plan, i, round_id=RoundId("m", 4, "p"))
    assert aggregate(plan)["status"] == "aggregated"
    paid: list[str] = []
    envelope = Path(aggregate_path(plan.config.exchange_path, plan.key))
    good = envelope.read_bytes()
    envelope.write_bytes(good[: len(good) // 2])
    with pytest.raises(RoundRefused, match="unreadable") as refused:
        decrypt(plan, paid.append)
    assert str(envelope) in str(refused.value) and paid == []
    # An aggregate the registered aggregator signed, stating a noise variance its contributions cannot hold (none,
    # or more than every contributor sealed): refused before the charge, as a release's is.
    header, ciphertexts = unpack_envelope(good)
    assert header.noise_variance == 3 * 100.0
    for stated in (0.0, 99.0, 301.0, float("nan")):
        forged = dataclasses.replace(header, noise_variance=stated)
        envelope.write_bytes(pack_envelope(forged, ciphertexts, signing_key=load_aggregator_signing_key(config)))
        with pytest.raises(RoundRefused, match=r"states a noise variance of .*, outside \[100, 300\]"):
            decrypt(plan, paid.append)
        assert paid == []
    envelope.write_bytes(good)
    secret = secret_key_file(config)
    kept = secret.read_bytes()
    secret.write_bytes(b"garbage" * 10)
    with pytest.raises(FusionError, match="unreadable") as refused:
        decrypt(plan, paid.append)
    assert str(secret) in str(refused.value) and paid == []
    secret.write_bytes(kept)
    assert decrypt(plan, paid.append)[0].payload_sha256 == paid[0]


def test_a_crashed_run_resumes_through_the_exchange(make_federation: Callable[..., Federation]) -> None:
    from fusion.release.plan import Period
    from fusion.store.delta import Store
    from fusion.store.ledger import BudgetLedger
    from privacy.accountant import Composition
    from training.run import LedgerTerms, train_into_store
    from training.trainer import Institution, RoundRecord, TrainingSettings

    fed = make_federation(noise=True, entities=2)
    config = load_config(fed.config_path)
    store = Store(config.store_path)
    rng = np.random.default_rng(1)
    data = {}
    for i in IDS:
        targets = rng.integers(0, 2, size=20)
        data[i] = Institution((rng.normal(size=(20, 3)) + targets[:, None]).astype(np.float32), targets)
    settings = TrainingSettings(model_id="x", hidden=(), rounds=2, clip=1.0, learning_rate=1.0, epsilon=2.0,
                                delta=1e-5, quorum=2)  # fmt: skip
    terms = LedgerTerms(period=Period("2026-01-01", START, START.replace(day=2)), cap=5.0, delta=1e-5,
                        composition=Composition.PARALLEL, start=START, end=END)  # fmt: skip
    federation = ExchangeFederation(config, START, END, charge=CHARGE, rounds=ROUNDS)
    generators = {i: seeded_generator(k) for k, i in enumerate(IDS)}

    def crash(record: RoundRecord) -> None:
        raise RuntimeError("crash once round 1 is committed")

    with pytest.raises(RuntimeError):
        train_into_store(store, settings, federation, data, classes=2, terms=terms, generators=generators,
                         progress=crash)  # fmt: skip
    # Round 1 was committed before the progress callback crashed; a re-run goes on from it.
    last = train_into_store(store, settings, federation, data, classes=2, terms=terms, generators=generators)
    assert last is not None and last.round == 2
    models = store.read("models").sort_by("round").to_pylist()
    assert [m["round"] for m in models] == [1, 2]
    assert BudgetLedger(store).rows().to_pylist()[0]["release_ids"] == [m["release_id"] for m in models]


ROLE = """
import sys
import numpy as np
from datetime import UTC, datetime
from pathlib import Path
from fusion.config.federation import load_config
from privacy.accountant import Composition, NormBoundMechanism, ReleaseCharge
from privacy.skellam import seeded_generator
from training.exchange_round import ExchangeFederation, aggregate, answer, decrypt, open_round, seal_contribution
from training.secure_sum import RoundId

config = load_config(sys.argv[1])
start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 6, tzinfo=UTC)
plan = ExchangeFederation(config, start, end).plan(RoundId("m", 1, "p"), slots=20, variance=50.0)
charge = ReleaseCharge(NormBoundMechanism(1e12, 1.0, 1.0), start, end, Composition.PARALLEL)
role, who = sys.argv[2], sys.argv[3]
if role == "institution":
    open_round(plan, config.exchange_path)
    sealed = seal_contribution(
        plan, who, np.full(20, 1000 + len(who)), round_id=RoundId("m", 1, "p"), generator=seeded_generator(len(who)),
        charge=charge, rounds=1,
    )
    np.save(sys.argv[4], sealed.noised)
elif role == "aggregator":
    print(aggregate(plan)["status"])
elif role == "answer":
    print(answer(plan, who, round_id=RoundId("m", 1, "p")) is not None)
else:
    np.save(sys.argv[4], decrypt(plan, None)[1])
"""


@pytest.mark.e2e  # every party a fresh process: a whole round of role commands
def test_each_party_runs_its_step_in_its_own_process(
    make_federation: Callable[..., Federation],
) -> None:
    fed = make_federation(noise=True, entities=2)
    out = fed.directory / "out"
    out.mkdir()

    def role(*argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", ROLE, str(fed.config_path), *argv], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    for i in ("alpha", "gamma"):  # beta never shows up
        role("institution", i, str(out / f"{i}.npy"))
    assert role("aggregator", "-") == "awaiting_unmask"
    assert [role("answer", i) for i in ("alpha", "gamma")] == ["False", "True"]  # alpha waits for gamma's ack
    assert role("answer", "alpha") == "True"
    assert role("aggregator", "-") == "aggregated"
    role("key_holder", "-", str(out / "sum.npy"))
    total = np.load(out / "sum.npy")
    np.testing.assert_array_equal(total, np.load(out / "alpha.npy") + np.load(out / "gamma.npy"))
