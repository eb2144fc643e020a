"""Federated DP training (training/): clipping, rounding, exact noise, accounting, the secure sum, resume."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from fusion.errors import FusionError
from fusion.release.plan import Period
from fusion.store.charge_record import ChargeRecord
from fusion.store.delta import Store
from fusion.store.ledger import BudgetLedger
from privacy.accountant import ORDERS, Composition, ReleaseCharge, epsilon_from_rdp, mechanism_rdp, skellam_rdp
from privacy.noise_shares import NoiseLayers
from privacy.pld import SkellamMechanism
from privacy.skellam import seeded_generator
from training.accounting import TrainingSensitivity, plan_budget
from training.gradients import clip_rows, contribution_vector, per_example_gradients, random_round
from training.run import LedgerTerms, forecast, forecast_run, train_into_store
from training.secure_sum import Federation, RoundId, RoundRefused, aggregate, seal_contribution, secure_sum
from training.trainer import (
    Institution,
    RoundRecord,
    TrainingSettings,
    budget_for,
    build_model,
    flat_parameters,
    load_parameters,
    train,
)

IDS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def federation() -> Federation:
    return Federation.generate("test", IDS)


def _data(seed: int = 0, rows: int = 24) -> dict[str, Institution]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 5))
    out = {}
    for name in IDS:
        targets = rng.integers(0, 3, size=rows)
        features = (centres[targets] + 0.3 * rng.normal(size=(rows, 5))).astype(np.float32)
        out[name] = Institution(features, targets)
    return out


def test_every_example_is_clipped_to_the_bound() -> None:
    data = _data()["alpha"]
    model = build_model(5, 3, (4,), 0)
    gradients = per_example_gradients(model, data.features * 50, data.targets)  # large inputs: large gradients
    assert gradients.shape == (24, 5 * 4 + 4 + 4 * 3 + 3)
    clipped = clip_rows(gradients, 0.5)
    norms = np.linalg.norm(clipped, axis=1)
    assert (np.linalg.norm(gradients, axis=1) > 0.5).any()
    assert (norms <= 0.5 * (1 + 1e-12)).all()
    small = np.linalg.norm(gradients, axis=1) <= 0.5
    np.testing.assert_array_equal(clipped[small], gradients[small])  # rows within the bound are unchanged
    # After scaling and rounding, one example moves the vector by at most gamma C + sqrt(d) in L2.
    scale = 2.0**10
    rounded = random_round(scale * clipped, seeded_generator(1))
    bound = TrainingSensitivity(clip=0.5, scale=scale, dimension=gradients.shape[1]).gradient_l2
    assert (np.linalg.norm(rounded, axis=1) <= bound).all()


def test_a_changed_example_is_charged_as_well_as_an_added_one() -> None:
    """A row averaging several readings (feed models) changes, not disappears, when one reading is removed: its
    clipped gradient may turn to the opposite direction, moving the vector by up to 2 (gamma C + sqrt(d)) with the
    count slot unchanged, about twice the add-or-remove bound the rounds were charged before."""
    dimension, clip, scale = 24, 1.0, 2.0**12
    bound = TrainingSensitivity(clip=clip, scale=scale, dimension=dimension)
    direction = np.ones((1, dimension)) / math.sqrt(dimension)
    before = contribution_vector(direction * 5.0, clip=clip, scale=scale, generator=seeded_generator(1))
    after = contribution_vector(-direction * 5.0, clip=clip, scale=scale, generator=seeded_generator(2))
    moved = after - before
    assert moved[-1] == 0  # the same number of examples: the count slot does not see the change
    added = math.hypot(bound.gradient_l2, bound.count_weight)
    assert np.linalg.norm(moved) > added  # the add-or-remove bound alone did not cover it
    assert np.linalg.norm(moved) <= bound.l2 == 2.0 * bound.gradient_l2
    assert np.abs(moved).sum() <= bound.l1


def test_rows_declared_one_unit_each_are_charged_for_an_example_added_or_removed() -> None:
    changed = plan_budget(epsilon=1.0, delta=1e-5, rounds=30, clip=1.0, scale=4096.0, dimension=650)
    whole = plan_budget(epsilon=1.0, delta=1e-5, rounds=30, clip=1.0, scale=4096.0, dimension=650,
                        changed_examples=False)  # fmt: skip
    moved, count = whole.sensitivity.gradient_l2, whole.sensitivity.count_weight
    assert (whole.sensitivity.l2, changed.sensitivity.l2) == (math.hypot(moved, count), 2 * moved)
    ratio = (changed.sensitivity.l2 / whole.sensitivity.l2) ** 2  # about 3.8: the variance scales with L2^2
    assert changed.variance / whole.variance == pytest.approx(ratio, rel=0.02)
    settings = _settings(3)
    assert budget_for(replace(settings, unit_rows=True), 650).sensitivity == whole.sensitivity
    assert budget_for(settings, 650).sensitivity == changed.sensitivity
    # The digest names every round and covers unit_rows either way: a run committed before rounds were charged
    # for an example changed (its digest left the option out) is refused, not resumed with noise of another size.
    before = {k: v for k, v in asdict(settings).items() if k != "unit_rows"}
    assert settings.digest() != hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert replace(settings, unit_rows=True).digest() != settings.digest()


def test_a_gradient_that_is_not_finite_is_refused() -> None:
    gradients = np.zeros((3, 4))
    gradients[1, 2] = np.inf  # a feature beyond float32, or a model that diverged
    with pytest.raises(FusionError, match="not finite"):
        contribution_vector(gradients, clip=1.0, scale=2.0**12, generator=seeded_generator(1))


def test_the_plans_parameter_count_is_the_models() -> None:
    from fusion.config.training import parameter_count

    for hidden in ((), (4,), (7, 3)):
        assert parameter_count(5, 3, hidden) == sum(p.numel() for p in build_model(5, 3, hidden, 0).parameters())


def test_parameters_of_another_size_are_refused() -> None:
    model = build_model(5, 3, (4,), 0)
    flat = flat_parameters(model)
    for other in (flat[:-3], np.concatenate([flat, np.zeros(4, np.float32)])):  # torch ignored a surplus
        with pytest.raises(FusionError, match=f"hold {other.size} values, but the model .* has {flat.size}"):
            load_parameters(model, other)
    load_parameters(model, flat + 1)
    np.testing.assert_array_equal(flat_parameters(model), flat + 1)


def test_per_example_gradients_match_one_at_a_time() -> None:
    import torch

    data = _data()["beta"]
    model = build_model(5, 3, (4,), 0)
    batched = per_example_gradients(model, data.features, data.targets)
    for k in (0, 7):
        model.zero_grad()
        logits = model(torch.as_tensor(data.features[k : k + 1]))
        torch.nn.functional.cross_entropy(logits, torch.as_tensor(data.targets[k : k + 1])).backward()
        reference = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
        np.testing.assert_allclose(batched[k], reference, rtol=1e-5, atol=1e-6)


def test_random_rounding_is_unbiased_and_within_one() -> None:
    values = np.full(20_000, 0.3)
    rounded = random_round(values, seeded_generator(2))
    assert set(np.unique(rounded)) == {0, 1}
    assert abs(rounded.mean() - 0.3) < 4 * math.sqrt(0.21 / values.size)


def test_noise_variance_is_exact(federation: Federation) -> None:
    v = 1234.5
    layers = NoiseLayers(total_variance=v, quorum=2, institutions=3, max_colluding=0)
    vectors = {i: np.zeros(4001, dtype=np.int64) for i in IDS}
    generators = {i: seeded_generator(k) for k, i in enumerate(IDS)}
    summed, noised = secure_sum(
        federation, vectors, round_id=RoundId("m", 1, "p"), layers=layers, generators=generators
    )
    # Each of n = 3 contributors adds v / (n - 1 - c) = v / 2; the sum carries 3 v / 2.
    assert summed.noise_variance == 3 * v / 2
    assert layers.share(3) == v / 2
    # Seeded draw: the sample variance of the total within 5% (4001 slots: its sd is about 2.2%).
    assert summed.noisy_sum.var() == pytest.approx(3 * v / 2, rel=0.1)
    for i in IDS:
        assert noised[i].var() == pytest.approx(v / 2, rel=0.1)


def test_decrypted_sum_equals_plaintext_sum_bit_for_bit(federation: Federation) -> None:
    data = _data()
    model = build_model(5, 3, (4,), 0)
    vectors = {
        i: contribution_vector(
            per_example_gradients(model, d.features, d.targets), clip=1.0, scale=2.0**12, generator=seeded_generator(k)
        )
        for k, (i, d) in enumerate(data.items())
    }
    layers = NoiseLayers(total_variance=1e9, quorum=3, institutions=3, max_colluding=0)
    generators = {i: seeded_generator(10 + k) for k, i in enumerate(IDS)}
    summed, noised = secure_sum(
        federation, vectors, round_id=RoundId("m", 1, "p"), layers=layers, generators=generators
    )
    plain = np.sum([noised[i] for i in IDS], axis=0)
    np.testing.assert_array_equal(summed.noisy_sum, plain)
    assert summed.noisy_sum[-1] != 0 and not np.array_equal(noised["alpha"], vectors["alpha"])


def test_a_round_with_a_dropped_institution_completes(federation: Federation) -> None:
    layers = NoiseLayers(total_variance=100.0, quorum=2, institutions=3, max_colluding=0)
    vectors = {i: np.arange(10, dtype=np.int64) for i in ("alpha", "gamma")}
    generators = {i: seeded_generator(k) for k, i in enumerate(IDS)}
    summed, noised = secure_sum(
        federation, vectors, round_id=RoundId("m", 2, "p"), layers=layers, generators=generators
    )
    assert summed.contributors == ("alpha", "gamma")
    assert summed.noise_variance == 2 * 100.0  # h(2) = 1: each of the two holds all of v
    np.testing.assert_array_equal(summed.noisy_sum, noised["alpha"] + noised["gamma"])
    with pytest.raises(RoundRefused, match="quorum"):
        secure_sum(
            federation, {"alpha": vectors["alpha"]}, round_id=RoundId("m", 2, "p"), layers=layers, generators=generators
        )


def test_an_envelope_of_another_round_is_refused(federation: Federation) -> None:
    layers = NoiseLayers(total_variance=100.0, quorum=1, institutions=3, max_colluding=0)
    vector = np.zeros(8, dtype=np.int64)
    envelope, _ = seal_contribution(
        federation,
        "alpha",
        vector,
        round_id=RoundId("m", 1, "p"),
        contributors=("alpha",),
        layers=layers,
        generator=seeded_generator(0),
    )
    with pytest.raises(RoundRefused, match="another round"):
        aggregate(federation, {"alpha": envelope}, round_id=RoundId("m", 2, "p"), slots=8)
    with pytest.raises(RoundRefused, match="not signed"):
        aggregate(federation, {"beta": envelope}, round_id=RoundId("m", 1, "p"), slots=8)


def test_reported_epsilon_matches_an_independent_computation() -> None:
    from opacus.accountants.analysis.rdp import get_privacy_spent

    budget = plan_budget(epsilon=1.0, delta=1e-5, rounds=30, clip=1.0, scale=4096.0, dimension=2410)
    assert budget.epsilon <= 1.0
    # Independently: the Skellam RDP bound (Agarwal et al. 2021) written out, composed 30 times, converted by
    # Opacus's own conversion, at the sensitivity of an example changed (two rounded gradients apart), which is
    # larger than an example added or removed (a rounded gradient and the count slot).
    v = budget.variance
    moved = 4096.0 + math.sqrt(2410)
    d2 = max(math.hypot(moved, math.ceil(4096 / 4)), 2 * moved)
    d1 = max(math.sqrt(2410) * moved + math.ceil(4096 / 4), 2 * math.sqrt(2410) * moved)
    assert (d2, d1) == (2 * moved, 2 * math.sqrt(2410) * moved)
    rdp = [
        30 * (a * d2**2 / (2 * v) + min(((2 * a - 1) * d2**2 + 6 * d1) / (4 * v**2), 3 * d1 / (2 * v))) for a in ORDERS
    ]
    epsilon, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=1e-5)
    assert budget.epsilon == pytest.approx(float(epsilon), rel=1e-9)
    assert budget.epsilon > 0.99  # calibrated to the target, not far below it
    assert budget.epsilon_after(0) == 0.0 and budget.epsilon_after(10) < budget.epsilon


def _settings(rounds: int) -> TrainingSettings:
    return TrainingSettings(
        model_id="tiny",
        hidden=(4,),
        rounds=rounds,
        clip=1.0,
        learning_rate=0.5,
        epsilon=2.0,
        delta=1e-5,
        quorum=2,
        momentum=0.5,
    )


def test_resume_after_a_crash_continues_from_the_last_committed_round(federation: Federation) -> None:
    data = _data()
    committed: list[RoundRecord] = []

    def crash_after_two(record: RoundRecord) -> None:
        committed.append(record)
        if record.round == 2:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        train(
            _settings(4),
            federation,
            data,
            classes=3,
            on_round=crash_after_two,
            generators={i: seeded_generator(k) for k, i in enumerate(IDS)},
        )
    assert [r.round for r in committed] == [1, 2]
    resumed: list[RoundRecord] = []
    last = train(
        _settings(4),
        federation,
        data,
        classes=3,
        start=committed[-1],
        on_round=resumed.append,
        generators={i: seeded_generator(9 + k) for k, i in enumerate(IDS)},
        present=lambda r: {"alpha", "beta"} if r == 3 else set(IDS),
    )
    assert [r.round for r in resumed] == [3, 4]
    assert resumed[0].sum.contributors == ("alpha", "beta")  # round 3 lost gamma and completed all the same
    assert last.epsilon == pytest.approx(
        plan_budget(epsilon=2.0, delta=1e-5, rounds=4, clip=1.0, scale=2.0**12, dimension=last.parameters.size).epsilon
    )
    assert np.isfinite(last.parameters).all()


def test_a_round_s_epsilon_counts_at_least_its_own_rounds_whatever_the_charges_read_back(
    federation: Federation,
) -> None:
    """The charges a run's rounds made are read back from the ledger (`run_charges`): a ledger that lost a charge
    (a store row rolled back) reads back fewer than the rounds decrypted, and a model's reported epsilon must not
    drop with it: every round up to this one was charged."""
    settings = _settings(3)
    rounds: list[RoundRecord] = []
    train(
        settings,
        federation,
        _data(),
        classes=3,
        on_round=rounds.append,
        charges=lambda number: number - 1,  # round 1's charge gone from the ledger read back
        generators={i: seeded_generator(k) for k, i in enumerate(IDS)},
    )
    budget = budget_for(settings, rounds[-1].parameters.size)
    assert [r.epsilon for r in rounds] == [budget.epsilon_after(n) for n in (1, 2, 3)]


def _terms() -> LedgerTerms:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    period = Period("2026-01-01", start, start + timedelta(days=1))
    return LedgerTerms(
        period=period,
        cap=5.0,
        delta=1e-5,
        composition=Composition.SEQUENTIAL,
        start=start,
        end=start + timedelta(hours=6),
    )


def test_a_run_spends_the_ledger_commits_models_and_resumes(federation: Federation, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    settings, terms, data = _settings(3), _terms(), _data()
    generators = {i: seeded_generator(k) for k, i in enumerate(IDS)}
    # A release of the same readings already spent part of the period: training composes with it.
    release = ReleaseCharge(SkellamMechanism(3.16e7, 4, 600), terms.start, terms.end, Composition.SEQUENTIAL)
    BudgetLedger(store).spend(
        period=terms.period,
        release_id="r-1",
        aggregate_sha256="a" * 64,
        charge=release,
        cap=terms.cap,
        delta=terms.delta,
    )
    budget = budget_for(settings, 5 * 4 + 4 + 4 * 3 + 3)
    predicted = forecast(store, budget, terms, remaining=3)
    assert predicted.period_epsilon_before > 0 and predicted.fits

    def crash_after_two(record: RoundRecord) -> None:
        if record.round == 2:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):  # the crash comes once round 2 is committed
        train_into_store(
            store, settings, federation, data, classes=3, terms=terms, generators=generators, progress=crash_after_two
        )
    assert sorted(store.read("models").column("round").to_pylist()) == [1, 2]
    last = train_into_store(store, settings, federation, data, classes=3, terms=terms, generators=generators)
    assert last is not None and last.round == 3
    models = store.read("models").sort_by("round").to_pylist()
    assert [m["round"] for m in models] == [1, 2, 3]
    assert models[-1]["contributors"] == IDS and len(models[-1]["envelope_digests"]) == 3
    assert models[-1]["noise_variance"] == pytest.approx(3 * budget.variance / 2)  # h(3) = 2 with quorum 2
    np.testing.assert_array_equal(np.asarray(models[-1]["parameters"], dtype=np.float32), last.parameters)
    assert last.velocity is not None
    np.testing.assert_array_equal(np.asarray(models[-1]["velocity"], dtype=np.float32), last.velocity)
    row = BudgetLedger(store).rows().to_pylist()[0]
    assert row["release_ids"][0] == "r-1" and row["release_ids"][1:] == [m["release_id"] for m in models]
    # The ledger's epsilon: the release and three rounds composed (RDP: a round is a norm-bound mechanism).
    curves = mechanism_rdp(release.mechanism) + 3 * skellam_rdp(
        variance=budget.variance, l1=budget.sensitivity.l1, l2=budget.sensitivity.l2
    )
    assert row["epsilon_spent"] == pytest.approx(epsilon_from_rdp(curves, delta=terms.delta))
    assert row["epsilon_spent"] == pytest.approx(predicted.period_epsilon_after)
    assert (
        train_into_store(store, settings, federation, data, classes=3, terms=terms, generators=generators).round == 3
    )  # nothing left to run


def test_a_round_lost_after_its_charge_is_drawn_anew_and_its_charge_counted(
    federation: Federation, tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    record = ChargeRecord(tmp_path / "key-holder", "store-1")  # the key holder's own record of its charges
    settings, terms = _settings(3), _terms()
    generators = {i: seeded_generator(k) for k, i in enumerate(IDS)}

    def crash(record: RoundRecord) -> None:
        raise RuntimeError("crash before commit")

    with pytest.raises(RuntimeError):  # round 1 charged and decrypted, then lost before its commit
        train(
            settings,
            federation,
            _data(),
            classes=3,
            generators=generators,
            on_round=crash,
            pay=lambda rid, budget, digest: BudgetLedger(store, record=record).spend(
                period=terms.period,
                release_id=rid.release_id,
                aggregate_sha256=digest,
                charge=terms.charge(budget),
                cap=terms.cap,
                delta=terms.delta,
            ),
        )
    # The store's `budget` row is then lost (deleted, restored from an older backup, or a crash between the key
    # holder's record and the store's commit): the charge is still in the key holder's record, which the ledger
    # charges against, and the run counts it from there too, not from the store's row alone.
    shutil.rmtree(store.table_path("budget"))
    assert store.read("budget").num_rows == 0
    budget = budget_for(settings, 5 * 4 + 4 + 4 * 3 + 3)
    # The plan counts the lost charge: the run's epsilon composes four charges, and the period takes three more.
    predicted = forecast_run(store, settings, budget, terms, federation, record=record)
    assert (predicted.remaining, predicted.lost) == (3, 1)
    assert predicted.run_epsilon == pytest.approx(budget.epsilon_after(4)) and predicted.run_epsilon > budget.epsilon
    reported: list[float] = []
    last = train_into_store(
        store, settings, federation, _data(), classes=3, terms=terms, generators=generators, record=record,
        progress=lambda committed: reported.append(committed.epsilon),
    )  # fmt: skip
    assert last is not None and last.round == 3
    row = BudgetLedger(store).rows().to_pylist()[0]
    models = store.read("models").sort_by("round").to_pylist()
    # No exchange keeps the lost round's aggregate in this process: it was drawn anew, and stays charged.
    assert row["releases"] == 4 and [m["release_id"] for m in models] == row["release_ids"][1:]
    # Every epsilon the run reports counts the lost charge: never below what the ledger spent on it.
    expected = [budget.epsilon_after(charges) for charges in (2, 3, 4)]
    audit = [json.loads(a["detail"]) for a in store.read("audit").to_pylist() if a["action"] == "training_round"]
    assert [m["epsilon"] for m in models] == pytest.approx(expected)
    assert [a["epsilon"] for a in sorted(audit, key=lambda a: a["round"])] == pytest.approx(expected)
    assert reported == pytest.approx(expected) and last.epsilon == pytest.approx(expected[-1])
    assert last.epsilon == pytest.approx(row["epsilon_spent"]) and last.epsilon == pytest.approx(predicted.run_epsilon)
    assert row["epsilon_spent"] == pytest.approx(predicted.period_epsilon_after)


def test_a_run_stops_before_a_round_once_its_remaining_rounds_no_longer_fit(
    federation: Federation, tmp_path: Path
) -> None:
    """A charge made to the period while a run is in progress (a release, or a round of another run, between its
    rounds 1 and 2) leaves room for round 2 but not for round 3: the run stops before round 2 is drawn or charged,
    as it would have been refused at its start, rather than spend round 2 on a model the ledger will not let
    finish."""
    store = Store(tmp_path / "store")
    settings = _settings(3)
    budget = budget_for(settings, 5 * 4 + 4 + 4 * 3 + 3)
    terms = replace(_terms(), cap=(budget.epsilon_after(3) + budget.epsilon_after(4)) / 2)  # three charges fit
    generators = {i: seeded_generator(k) for k, i in enumerate(IDS)}
    assert forecast(store, budget, terms, remaining=3).fits

    def meanwhile(record: RoundRecord) -> None:
        BudgetLedger(store).spend(
            period=terms.period, release_id="r-meanwhile", aggregate_sha256="b" * 64, charge=terms.charge(budget),
            cap=terms.cap, delta=terms.delta,
        )  # fmt: skip

    with pytest.raises(FusionError, match=r"would take period 2026-01-01 to epsilon [0-9.]+, above its cap"):
        train_into_store(
            store, settings, federation, _data(), classes=3, terms=terms, generators=generators, progress=meanwhile
        )  # before: round 2 charged, then round 3 refused by the ledger
    assert store.read("models").column("round").to_pylist() == [1]
    row = BudgetLedger(store).rows().to_pylist()[0]
    assert row["releases"] == 2 and row["release_ids"][1] == "r-meanwhile"  # round 1 and the release alone


def test_a_model_id_reused_under_other_settings_is_refused(federation: Federation, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    generators = {i: seeded_generator(k) for k, i in enumerate(IDS)}
    train_into_store(store, _settings(1), federation, _data(), classes=3, terms=_terms(), generators=generators)
    with pytest.raises(FusionError, match="other settings"):
        train_into_store(store, _settings(2), federation, _data(), classes=3, terms=_terms(), generators=generators)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(federation: Federation) -> None:
    def generators() -> dict[str, np.random.Generator]:
        return {i: seeded_generator(40 + k) for k, i in enumerate(IDS)}

    whole = train(_settings(3), federation, _data(), classes=3, generators=generators())
    shared = generators()  # the same streams, continued across the crash as an institution's would be
    committed: list[RoundRecord] = []

    def crash_after_one(record: RoundRecord) -> None:
        committed.append(record)
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train(_settings(3), federation, _data(), classes=3, generators=shared, on_round=crash_after_one)
    resumed = train(_settings(3), federation, _data(), classes=3, generators=shared, start=committed[0])
    np.testing.assert_allclose(resumed.parameters, whole.parameters, rtol=1e-5, atol=1e-6)


def test_a_run_whose_noise_cannot_be_sampled_exactly_is_refused(federation: Federation) -> None:
    settings = TrainingSettings(
        model_id="huge", hidden=(), rounds=1, clip=1.0, learning_rate=0.5, epsilon=1.0, delta=1e-5, scale=2.0**40
    )
    with pytest.raises(FusionError, match=r"models\.huge: the calibrated noise .* lower `scale`"):
        train(settings, federation, _data(), classes=3, generators={i: seeded_generator(0) for i in IDS})
