"""An institution's records of the intervals it sealed are secrets, read like its keys; they also hold each
interval's charge, by which (with its training rounds' records) the institution refuses to seal its privacy period
past the cap."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import pytest

from fusion.cli.core import main
from fusion.errors import FusionError
from fusion.keys.registry import read_private, write_private
from fusion.release.plan import ReleasePlan, plan_release
from fusion.store.ledger import BudgetExceeded
from pipelines.run import run_contributions
from pipelines.sealing import forget_layer_seed, record_sealed, sealed_envelope, sealed_layer_seed
from privacy.accountant import skellam_epsilon
from tests.conftest import END, START, Federation
from tests.training.test_cli import MODEL, _rows

#: Entity level, a cap that takes two releases of epsilon 1 composed in sequence (about 1.45) but not three.
ENTITY = 'unit = "entity"\nmax_partitions = 3\nmax_readings_per_partition = 2\nepsilon_cap = 1.5'


def test_a_sealed_record_others_can_read_is_refused_like_a_key(make_federation) -> None:
    """The record holds the seed that regenerates the institution's removable noise layers: every read of it
    refuses a file group or others can access, as the docs promise of every secret file."""
    fed = make_federation(noise=True, seed=None)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    alpha = fed.config.institution("alpha")
    assert sealed_layer_seed(plan, alpha) is not None
    record = fed.directory / "institution-keys" / "alpha" / "sealed" / f"{plan.key.interval_name}.json"
    record.chmod(0o644)
    for read in (sealed_layer_seed, sealed_envelope, forget_layer_seed):
        with pytest.raises(FusionError, match="chmod 600"):
            read(plan, alpha)
    record.chmod(0o600)
    assert sealed_envelope(plan, alpha) is not None


def _thirds(fed) -> list[ReleasePlan]:  # type: ignore[no-untyped-def]
    """Three consecutive 2-hour intervals of one privacy period (a day)."""
    hours = timedelta(hours=2)
    return [plan_release(fed.config, START + k * hours, START + (k + 1) * hours) for k in range(3)]


def test_at_entity_level_every_institution_refuses_to_seal_its_period_past_the_cap(make_federation) -> None:
    """The key holder's ledger alone cannot hold the cap against a coalition that includes the key holder (it
    would decrypt a further interval without charging it): each institution composes the charges of the intervals
    it sealed in the period, as the ledger does, and refuses the interval that would pass the cap."""
    fed = make_federation(noise=True, extra_privacy=ENTITY)
    first, second, third = _thirds(fed)
    mechanism = first.params.mechanism
    assert mechanism is not None
    delta = first.params.delta
    assert skellam_epsilon([mechanism] * 2, delta=delta) <= 1.5 < skellam_epsilon([mechanism] * 3, delta=delta)
    run_contributions(first, fed.config.institutions)
    run_contributions(second, fed.config.institutions)  # within the cap: sealed
    kept = {i.id: sealed_envelope(second, i) for i in fed.config.institutions}
    assert all(kept.values())
    for institution in fed.config.institutions:  # each refuses, before any work and under its sealing lock
        refusal = (rf"institution {institution.id} does not seal .*period 2026-01-01, which would reach "
                   r"1\.[6-9]\d* with the 2 interval\(s\).*the cap is 1\.5000")
        with pytest.raises(BudgetExceeded, match=refusal):
            sealed_envelope(third, institution)
        with pytest.raises(BudgetExceeded, match=refusal):
            record_sealed(third, institution, b"x")
    with pytest.raises(BudgetExceeded):
        run_contributions(third, fed.config.institutions)
    # Crash recovery: the interval sealed already is the kept envelope again, not a new charge.
    run_contributions(second, fed.config.institutions)
    assert {i.id: sealed_envelope(second, i) for i in fed.config.institutions} == kept
    sealed = fed.directory / "institution-keys" / "alpha" / "sealed"
    assert sorted(p.name for p in sealed.glob("2*.json")) == [f"{p.key.interval_name}.json" for p in (first, second)]


def test_a_seal_record_without_its_charge_counts_at_the_current_parameters_or_refuses(make_federation) -> None:
    """Records written before seals kept their charge: charged at the current parameters when the record's release
    id shows it was sealed under them, and otherwise the period is refused (its cost is unknown), never skipped."""
    fed = make_federation(noise=True, extra_privacy=ENTITY)
    first, second, third = _thirds(fed)
    run_contributions(first, fed.config.institutions)
    run_contributions(second, fed.config.institutions)
    alpha = fed.config.institution("alpha")
    sealed = fed.directory / "institution-keys" / "alpha" / "sealed"
    for plan in (first, second):
        record = sealed / f"{plan.key.interval_name}.json"
        doc = json.loads(read_private(record, "a record"))
        del doc["charge"]
        write_private(record, json.dumps(doc).encode())
    with pytest.raises(BudgetExceeded, match=r"which would reach 1\.[6-9]\d* with the 2 interval\(s\)"):
        sealed_envelope(third, alpha)
    record = sealed / f"{first.key.interval_name}.json"
    doc = json.loads(read_private(record, "a record"))
    write_private(record, json.dumps({**doc, "release_id": "r-sealed-under-other-parameters"}).encode())
    with pytest.raises(BudgetExceeded, match=rf"sealed {first.key.interval_name} in period 2026-01-01 before its "
                       "seal records kept what each interval costs, under other parameters"):
        sealed_envelope(third, alpha)


@pytest.mark.parametrize("unit", ["reading", "entity"])
def test_an_institution_seals_no_release_its_training_rounds_left_no_room_for(
    make_federation: Callable[..., Federation], unit: str
) -> None:
    """Training rounds and releases of the same readings add up against one cap, and the key holder's ledger alone
    cannot hold it against a coalition that includes the key holder: each institution counts the rounds it drew
    (their records keep their charges) with the intervals it sealed. Model `tiny` spent the period's cap (epsilon 1
    of 1) over [00:00, 06:00): no institution seals an hour inside it, at event level (the rounds' readings overlap
    the hour's) as at entity level; the next period is untouched."""
    entity = 'unit = "entity"\nmax_partitions = 3\nmax_readings_per_partition = 2'
    fed = make_federation(noise=True, entities=2, extra=MODEL, extra_privacy=entity if unit == "entity" else "")
    for k, name in enumerate(("alpha", "beta", "gamma", "held_out")):
        _rows(fed.directory / "training" / f"{name}.parquet", k if k < 3 else 9)
    assert main(["train", "--config", str(fed.config_path), "--model", "tiny"]) == 0
    hour = plan_release(fed.config, START, START + timedelta(hours=1))
    composed = "in sequence" if unit == "entity" else "where they overlap"
    refusal = (rf"with the 0 interval\(s\) it sealed and the 2 training round\(s\) it drew in the period; the cap is "
               rf"1\.0000 .*compose {composed}")
    for institution in fed.config.institutions:
        with pytest.raises(BudgetExceeded, match=refusal):
            sealed_envelope(hour, institution)
    later = plan_release(fed.config, START + timedelta(days=1), START + timedelta(days=1, hours=1))
    assert all(sealed_envelope(later, i) is None for i in fed.config.institutions)  # not refused


@pytest.mark.parametrize("unit", ["reading", "entity"])
def test_a_round_record_without_its_charge_counts_as_a_round_of_its_model_or_refuses(
    make_federation: Callable[..., Federation], unit: str
) -> None:
    """Round records written before they kept their charge name their model and its settings digest, not the
    interval: a release counts each as a round of that model under the config (over the model's interval), as the
    rounds' own check does, so the hour inside the period `tiny` spent is refused and the next period is not. Once
    the config no longer names the model under those settings, nothing bounds the round nor says which period it
    was charged to: every release is refused, naming the record, rather than sealed as if the round never was."""
    entity = 'unit = "entity"\nmax_partitions = 3\nmax_readings_per_partition = 2'
    fed = make_federation(noise=True, entities=2, extra=MODEL, extra_privacy=entity if unit == "entity" else "")
    for k, name in enumerate(("alpha", "beta", "gamma", "held_out")):
        _rows(fed.directory / "training" / f"{name}.parquet", k if k < 3 else 9)
    assert main(["train", "--config", str(fed.config_path), "--model", "tiny"]) == 0
    rounds = fed.directory / "institution-keys" / "alpha" / "training" / "rounds"
    records = sorted(r for r in rounds.glob("t-*.json") if "roster" not in r.name)
    assert len(records) == 2
    for record in records:
        doc = json.loads(read_private(record, "a round record"))
        del doc["charge"]
        write_private(record, json.dumps(doc).encode())
    alpha = fed.config.institution("alpha")
    hour = plan_release(fed.config, START, START + timedelta(hours=1))
    with pytest.raises(BudgetExceeded, match=r"and the 2 training round\(s\) it drew in the period; the cap is 1\.0"):
        sealed_envelope(hour, alpha)
    later = plan_release(fed.config, START + timedelta(days=1), START + timedelta(days=1, hours=1))
    assert sealed_envelope(later, alpha) is None  # the rounds' readings are the first day's: not refused
    fed.config_path.write_text(fed.config_path.read_text().replace('name = "tiny"', 'name = "tiny-v2"'))
    later = plan_release(fed.config, START + timedelta(days=1), START + timedelta(days=1, hours=1))
    with pytest.raises(BudgetExceeded, match=rf"alpha does not seal {later.key.interval_name}: it drew noise for "
                       rf"round [12] of model tiny \(its record (?:{records[0].stem}|{records[1].stem})\) before"):
        sealed_envelope(later, alpha)
    assert sealed_envelope(later, fed.config.institution("beta")) is None  # beta's records keep their charges


def test_at_event_level_institutions_seal_every_disjoint_interval_of_the_period(make_federation) -> None:
    """Disjoint intervals compose in parallel at event level: three releases of epsilon 1 fit a cap of 1."""
    fed = make_federation(noise=True)
    plans = _thirds(fed)
    for plan in plans:
        run_contributions(plan, fed.config.institutions)
    assert all(sealed_envelope(plan, i) for plan in plans for i in fed.config.institutions)
