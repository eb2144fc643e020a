"""`fusion train --role ...`: one party's step of a model's current round, as `fusion contribute`, `fusion aggregate`
and `fusion release` are for releases; each loads only its own keys from the config. The round in progress is what
every party derives alike from the store's public tables and the exchange: the round after the last committed one
in `models`, under its attempt the ledger charged last if that one was lost before its commit and can still be
completed (its aggregate in the exchange, the one charged), otherwise its first attempt the ledger has not charged
(training/attempts.py).

    institution  --institution ID     its gradients at the current model, sealed in the round's exchange folder
    aggregator                        sum and close the roster; once the answers are in, remove the masks
    institution  --institution ID --unmask   acknowledge and answer the roster
    key-holder                        charge the ledger, decrypt the noisy sum, step the model, commit the round
                                      (refused before the charge where the run's remaining rounds cannot fit the
                                      period's cap, as `fusion train` refuses such a run)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fusion.config.federation import Config
from fusion.config.training import ModelConfig
from fusion.errors import FusionError
from fusion.release.exchange import contribution_path, exists, read_bytes
from fusion.release.plan import ReleasePlan
from fusion.runtime.faults import crash_point
from fusion.store.charge_record import ChargeRecord
from fusion.store.delta import Store
from fusion.store.ledger import BudgetLedger
from pipelines.release import charge_record, registered_signing_key
from privacy.noise_shares import NoiseLayers
from privacy.skellam import secure_generator, seeded_generator
from training.accounting import TrainingBudget
from training.attempts import run_charges
from training.charging import LedgerTerms, TrainingSettings, budget_for, feature_width, settings_for, terms_for
from training.exchange_round import (
    ExchangeFederation,
    Sealing,
    aggregate,
    answer,
    decrypt,
    open_round,
    round_plan,
    seal_contribution,
)
from training.recomputed_round import RefusalAudit
from training.run import (
    RoundCharge,
    charged_rounds,
    check_fits,
    commit_round,
    forecast_run,
    institution_rows,
    last_committed,
    round_attempt,
)
from training.run_lock import RunLock, run_lock
from training.secure_sum import RoundId, RoundSum
from training.trainer import Institution, Progress, RoundRecord, check_no_wrap


class Role(StrEnum):
    INSTITUTION = "institution"
    AGGREGATOR = "aggregator"
    KEY_HOLDER = "key-holder"


@dataclass(frozen=True)
class CurrentRound:
    """The round in progress of a model's run, and what every party needs of it."""

    config: Config
    settings: TrainingSettings
    terms: LedgerTerms
    budget: TrainingBudget
    width: int
    classes: int
    start: RoundRecord | None
    round_id: RoundId

    @property
    def plan(self) -> ReleasePlan:
        return round_plan(
            self.config, self.round_id, slots=self.budget.sensitivity.dimension + 1, variance=self.budget.variance,
            start=self.terms.start, end=self.terms.end,
        )  # fmt: skip

    def progress(self) -> Progress:
        return Progress.resume(self.settings, features=self.width, classes=self.classes, start=self.start)


def current_round(config: Config, model: ModelConfig, store: Store, record: ChargeRecord | None = None) -> CurrentRound:
    """The model's round in progress; refuses a run whose rounds are all committed. `record`: the key holder's own
    record of its charges, which it reads the period's charges from where the store's row is behind it (the other
    parties read the store's row)."""
    settings, terms = settings_for(config, model), terms_for(config, model)
    width = feature_width(config, model)
    progress = Progress.resume(settings, features=width, classes=model.class_count, start=None)
    budget = budget_for(settings, progress.velocity.size)
    start = last_committed(store, settings)
    number = (start.round if start else 0) + 1
    if number > settings.rounds:
        raise FusionError(f"model {model.name}: all {settings.rounds} rounds are committed; nothing is left to run")
    federation = ExchangeFederation(config, terms.start, terms.end)
    round_id = round_attempt(settings, number, charged_rounds(store, terms, record), federation, budget)
    return CurrentRound(config, settings, terms, budget, width, model.class_count, start, round_id)


def institution_data(config: Config, model: ModelConfig, institution_id: str) -> tuple[Institution, list[str]]:
    """The institution's own rows for the model: from its feeds, or from its table (`rows`); and a line per feed
    file it skipped as damaged."""
    institution = config.institution(institution_id)
    if model.rows is None:
        from training.feed_rows import check_feed_model, feed_rows

        check_feed_model(config, model)
        read = feed_rows(config, model, institution)
        return read.rows, read.report(institution_id)
    path = config.base / model.rows.format(institution=institution_id)
    return institution_rows(model, path, f"institution {institution_id}"), []


def _generator(config: Config, institution_id: str, round_id: RoundId) -> np.random.Generator:
    """A secure generator; in test mode with a seed, a stream of its own per institution and round."""
    if config.privacy.seed is None:
        return secure_generator()
    label = hashlib.sha256(f"{institution_id}/{round_id.release_id}".encode()).digest()
    return seeded_generator(config.privacy.seed ^ int.from_bytes(label[:8], "big"))


def contribute(config: Config, model: ModelConfig, store: Store, institution_id: str) -> str:
    """The institution's step: its clipped, rounded gradient sum at the current model, noised, masked, sealed;
    refused (and audited) where the round, with the run's rounds after it, would take the institution's privacy
    period past its cap, by its own records of what it contributed (training/kept_updates.py)."""
    current = current_round(config, model, store)
    rows, skipped = institution_data(config, model, institution_id)
    if rows.targets.size == 0:
        raise FusionError(
            f"institution {institution_id} holds no rows for model {model.name}: it takes no part"
            + "".join(f"\n{line}" for line in skipped)
        )
    layers = NoiseLayers(
        total_variance=current.budget.variance, quorum=current.settings.quorum, institutions=len(config.institutions),
        max_colluding=current.settings.max_colluding,
    )  # fmt: skip
    # Its own rows stand for every institution's here (it sees no other's): a bound per institution.
    check_no_wrap(current.settings, current.budget, layers, rows=rows.targets.size * len(config.institutions))
    generator = _generator(config, institution_id, current.round_id)
    vector = current.progress().vector(current.settings, rows, generator)
    plan = current.plan
    open_round(plan, config.exchange_path)
    sealed = seal_contribution(
        plan, institution_id, vector, round_id=current.round_id, generator=generator,
        charge=current.terms.charge(current.budget), rounds=current.settings.rounds, audit=store,
    )  # fmt: skip
    again = {
        Sealing.DRAWN: "",
        Sealing.REMASKED: " (its noisy update kept from an earlier attempt, masked anew)",
        Sealing.REPUBLISHED: " (its envelope sealed before, published again)",
    }[sealed.sealing]
    return "\n".join([*skipped, f"{institution_id} sealed round {current.round_id.round} of model {model.name}{again}"])


def answer_roster(config: Config, model: ModelConfig, store: Store, institution_id: str) -> str:
    """The institution's step in the unmask round."""
    current = current_round(config, model, store)
    path = answer(current.plan, institution_id, round_id=current.round_id)
    if path is None:
        return f"{institution_id} acknowledged round {current.round_id.round}'s roster; too few have yet to answer"
    return f"{institution_id} answered round {current.round_id.round}'s roster"


def aggregate_round(config: Config, model: ModelConfig, store: Store) -> str:
    """The aggregator's step: close the roster, or seal the unmasked sum."""
    current = current_round(config, model, store)
    status = aggregate(current.plan)
    return f"round {current.round_id.round} of model {model.name}: {status['status']}, contributors " + ", ".join(
        status.get("contributors", [])
    )


def release_round(config: Config, model: ModelConfig, store: Store) -> RoundRecord:
    """The key holder's step: charge the ledger, decrypt only the noisy sum, step the model and commit the round
    (its audit rows first, then its `models` row). It holds the model as `fusion train` does (training/run_lock.py):
    refused while a run of the model is in progress on this machine."""
    held = charge_record(config, store)  # the key holder's own record: a round shares the period's cap
    with run_lock(held, model.name) as runs:
        return _release_round(config, model, store, held, runs)


def _release_round(config: Config, model: ModelConfig, store: Store, held: ChargeRecord, runs: RunLock) -> RoundRecord:
    current = current_round(config, model, store, held)
    plan, terms, budget = current.plan, current.terms, current.budget
    signing_key = registered_signing_key(config)  # before the round is charged: every round is signed
    federation = ExchangeFederation(config, terms.start, terms.end)
    spent: list[RoundCharge] = []

    def pay(aggregate_sha256: str) -> None:
        # As `fusion train` does before each charge: a run whose remaining rounds cannot fit the period's cap, with
        # what the runs in progress claim on it, is refused before this round is charged (a round it resumes,
        # already charged, costs nothing more); the check and the charge at once for the runs in progress.
        with runs.claiming(terms.period, terms.charge(budget)) as claimed:
            predicted = forecast_run(store, current.settings, budget, terms, federation, record=held, claimed=claimed)
            check_fits(model.name, predicted, terms)
            # Against the key holder's own record of the period, as a release is.
            spend = BudgetLedger(store, record=held).spend(
                period=terms.period, release_id=current.round_id.release_id, aggregate_sha256=aggregate_sha256,
                charge=terms.charge(budget), cap=terms.cap, delta=terms.delta,
            )  # fmt: skip
        spent.append(RoundCharge(aggregate_sha256, spend.epsilon_after))
        crash_point("round_after_charge")

    header, total, digest = decrypt(plan, pay, audit=RefusalAudit(store, current.round_id))
    envelopes = {}
    for institution in header.contributors:
        path = contribution_path(plan.config.exchange_path, plan.key, institution)
        if exists(path):
            envelopes[institution] = hashlib.sha256(read_bytes(path)).hexdigest()
    summed = RoundSum(
        noisy_sum=total, contributors=header.contributors, noise_variance=header.noise_variance,
        envelope_digests=envelopes, aggregate_digest=digest, bytes_per_contributor=0, refused=tuple(header.refused),
    )  # fmt: skip
    charges = run_charges(current.settings, current.round_id.round, charged_rounds(store, terms, held))
    record = current.progress().step(current.settings, budget, current.round_id.round, summed, charges=charges)
    return commit_round(
        store, current.settings, record, current.round_id, terms=terms, budget=budget, charged=spent[0],
        signing_key=signing_key,
    )  # fmt: skip


def run_role(
    config: Config, model: ModelConfig, store: Store, role: Role, *, institution: str | None, unmask: bool
) -> str:
    """One party's step of the model's current round; returns what it did, in a line."""
    if role is Role.INSTITUTION:
        if institution is None:
            raise FusionError("--role institution: name the institution (--institution ID)")
        return (answer_roster if unmask else contribute)(config, model, store, institution)
    if institution is not None or unmask:
        raise FusionError(f"--role {role.value}: --institution and --unmask are an institution's options")
    if role is Role.AGGREGATOR:
        return aggregate_round(config, model, store)
    record = release_round(config, model, store)
    return (
        f"round {record.round}/{current_settings_rounds(config, model)} of model {model.name} committed: "
        f"{len(record.sum.contributors)} contributors, epsilon {record.epsilon:.4f}"
    )


def current_settings_rounds(config: Config, model: ModelConfig) -> int:
    return settings_for(config, model).rounds
