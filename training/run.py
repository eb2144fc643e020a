"""A training run against the store: every round is charged to the budget ledger (the same period, cap and
privacy unit as the releases of the readings it learns from) before its sum is decrypted, and committed to the
`models` table once the model is updated; a run resumes from its last committed round, and a round lost after its
charge under the same attempt where it can still be completed (training/attempts.py). The run's remaining rounds
are checked against the period's cap before each round is drawn and as it is charged, counting what other runs in
progress claim on the period (training/run_lock.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fusion.config.federation import Config
from fusion.config.training import ModelConfig
from fusion.errors import FusionError, InternalError
from fusion.keys.holder import load_registered_public_context_bytes, load_secret_context_bytes
from fusion.keys.registry import (
    load_aggregator_public_key,
    load_aggregator_signing_key,
    load_agreement_key,
    load_agreement_keys,
    load_registry,
    load_signing_key,
)
from fusion.runtime.faults import crash_point
from fusion.store.charge_record import ChargeRecord
from fusion.store.delta import Store
from fusion.store.ledger import BudgetLedger
from fusion.store.provenance import SIGNATURE_FIELD, sign_round
from fusion.store.signed_budget import budget_claim
from privacy.accountant import ReleaseCharge
from schemas.tables import AUDIT_SCHEMA, MODELS_SCHEMA
from training.accounting import TrainingBudget
from training.attempts import (
    check_signed_row,
    next_round_id,
    recorded_round,
    run_charges,
    superseded,
)
from training.charging import LedgerTerms, TrainingSettings
from training.secure_sum import Federation, Party, RoundId, RoundSum
from training.trainer import Institution, RoundRecord, RoundResumer, RoundSummer, train

if TYPE_CHECKING:
    from training.run_lock import RunLock  # it reads the seal records' charges (pipelines/), which read training's


def charged_rounds(store: Store, terms: LedgerTerms, record: ChargeRecord | None = None) -> dict[str, str]:
    """Release id -> the SHA-256 of the aggregate the ledger charged it for, of every release (rounds' and
    releases') charged to the run's period, as the ledger charges against it: the store's `budget` row, or with
    `record` the key holder's own record of the period where the store's row is behind it (a crash between the
    two writes, a row deleted or rolled back). Which attempt a round runs under, and what a run has spent, follow
    from it (training/attempts.py)."""
    return BudgetLedger(store, record=record).charged(
        period=terms.period, cap=terms.cap, delta=terms.delta, composition=terms.composition
    )


@dataclass(frozen=True)
class TrainingForecast:
    """What `fusion train --plan` shows before a run: the run's own epsilon (every charge its rounds made and will
    make, attempts lost in crashes included) and the period's before and after."""

    rounds: int
    remaining: int  # rounds not yet committed
    parameters: int
    variance: float
    run_epsilon: float
    period_epsilon_before: float
    period_epsilon_after: float
    cap: float
    lost: int  # attempts charged, lost in crashes and drawn anew: each a charge on top of the run's rounds
    to_charge: int = 0  # the charges the remaining rounds will make (a round resumed, already charged, makes none)
    claimed: int = 0  # the charges other runs in progress claim on the period (training/run_lock.py)

    @property
    def fits(self) -> bool:
        return self.period_epsilon_after <= self.cap


def check_fits(model_name: str, predicted: TrainingForecast, terms: LedgerTerms) -> None:
    """Refuse a run whose remaining rounds would take its period past the cap, before any of them is charged: the
    ledger would refuse a later round, and the budget the earlier ones spent would buy no finished model."""
    if not predicted.fits:
        others = (
            f", counting the {predicted.claimed} round charge(s) other runs in progress claim on it (or wait for them "
            "to end)"
            if predicted.claimed
            else ""
        )
        raise FusionError(
            f"model {model_name} would take period {terms.period.name} to epsilon "
            f"{predicted.period_epsilon_after:.4f}, above its cap {predicted.cap:g}{others}: lower the model's "
            "epsilon or train on another period's readings"
        )


def forecast(
    store: Store,
    budget: TrainingBudget,
    terms: LedgerTerms,
    *,
    remaining: int,
    record: ChargeRecord | None = None,
    charged: int | None = None,
    resuming: bool = False,
    claimed: Sequence[ReleaseCharge] = (),
) -> TrainingForecast:
    """The spend of the `remaining` rounds of a run, predicted on the ledger as it stands (with `record`, the key
    holder's own record of the period, where the store's row is behind it). `charged`: the charges the run's
    rounds made so far (`run_charges`; None: one per committed round); `resuming`: the next round resumes an
    attempt already charged, so it charges nothing more; `claimed`: the charges other runs in progress will make
    in the period (training/run_lock.py), counted before this run's."""
    new = remaining - int(resuming)
    before, after = BudgetLedger(store, record=record).preview(
        period=terms.period, charges=[*claimed, *[terms.charge(budget)] * max(new, 1)], cap=terms.cap, delta=terms.delta
    )
    done = budget.rounds - remaining
    made = done if charged is None else max(charged, done)  # every committed round was charged, at the least
    return TrainingForecast(
        rounds=budget.rounds,
        remaining=remaining,
        parameters=budget.sensitivity.dimension,
        variance=budget.variance,
        run_epsilon=budget.epsilon_after(made + new),
        period_epsilon_before=before,
        period_epsilon_after=after if new else before,
        cap=terms.cap,
        lost=made - done - int(resuming),
        to_charge=new,
        claimed=len(claimed),
    )


def forecast_run(
    store: Store,
    settings: TrainingSettings,
    budget: TrainingBudget,
    terms: LedgerTerms,
    federation: RoundResumer,
    *,
    record: ChargeRecord | None = None,
    claimed: Sequence[ReleaseCharge] = (),
) -> TrainingForecast:
    """`forecast` of the run's remaining rounds from the store: its last committed round, the charges its rounds
    made, and whether its next round resumes an attempt already charged (training/attempts.py); `claimed`: the
    charges other runs in progress claim on the period."""
    done = last_committed(store, settings)
    number = (done.round if done else 0) + 1
    charged = charged_rounds(store, terms, record)
    resuming = False
    if number <= settings.rounds:
        resuming = round_attempt(settings, number, charged, federation, budget).release_id in charged
    return forecast(
        store, budget, terms, remaining=settings.rounds - number + 1, record=record,
        charged=run_charges(settings, settings.rounds, charged), resuming=resuming, claimed=claimed,
    )  # fmt: skip


def round_attempt(
    settings: TrainingSettings,
    number: int,
    charged: Mapping[str, str],
    federation: RoundResumer,
    budget: TrainingBudget,
) -> RoundId:
    """Round `number`'s attempt (`next_round_id`): its last charged one where `federation` can still complete it,
    otherwise a new draw."""

    def resumable(attempt: RoundId, charged_for: str) -> bool:
        slots = budget.sensitivity.dimension + 1  # the gradient slots and the count slot
        return federation.can_resume(attempt, slots=slots, variance=budget.variance, charged_for=charged_for)

    return next_round_id(settings, number, charged, resumable)


def last_committed(store: Store, settings: TrainingSettings) -> RoundRecord | None:
    """The run's last committed round (None: none yet); refuses a model id committed under other settings."""
    rows = store.read("models", filter=pc.field("model_id") == settings.model_id)
    if rows.num_rows == 0:
        return None
    digests = set(rows.column("settings_sha256").to_pylist())
    if digests != {settings.digest()}:
        raise FusionError(
            f"model {settings.model_id} was trained under other settings (rounds, C, learning rate, epsilon, its "
            "architecture, features, target, rows or interval changed); give the new run another model name"
        )
    row = rows.sort_by([("round", "descending")]).slice(0, 1).to_pylist()[0]
    parameters = np.asarray(row["parameters"], dtype=np.float32)
    summed = RoundSum(
        noisy_sum=np.zeros(0, dtype=np.int64),
        contributors=tuple(row["contributors"]),
        noise_variance=row["noise_variance"],
        envelope_digests=dict(d.split(":", 1) for d in row["envelope_digests"]),
        aggregate_digest=row["aggregate_sha256"],
        bytes_per_contributor=0,
    )
    metrics = {} if row["held_out_accuracy"] is None else {"accuracy": row["held_out_accuracy"]}
    velocity = None if row["velocity"] is None else np.asarray(row["velocity"], dtype=np.float32)
    return RoundRecord(row["round"], parameters, row["count_estimate"], row["epsilon"], summed, metrics, velocity)


def model_row(
    settings: TrainingSettings, budget_variance: float, record: RoundRecord, release_id: str, committed_at: datetime
) -> pa.Table:
    parameters = record.parameters.astype(np.float32)
    doc = {
        "model_id": settings.model_id,
        "round": record.round,
        "settings_sha256": settings.digest(),
        "parameters": parameters.tolist(),
        "parameters_sha256": _parameters_sha256(parameters),
        "clip": settings.clip,
        "scale": settings.scale,
        "learning_rate": settings.learning_rate,
        "noise_variance": record.sum.noise_variance,
        "calibrated_variance": budget_variance,
        "epsilon": record.epsilon,
        "delta": settings.delta,
        "contributors": list(record.sum.contributors),
        "count_estimate": record.count_estimate,
        "release_id": release_id,
        "envelope_digests": [f"{i}:{d}" for i, d in sorted(record.sum.envelope_digests.items())],
        "aggregate_sha256": record.sum.aggregate_digest,
        "held_out_accuracy": record.metrics.get("accuracy"),
        "velocity": None if record.velocity is None else record.velocity.astype(np.float32).tolist(),
        "committed_at": committed_at,
    }
    return pa.Table.from_pylist([doc], schema=MODELS_SCHEMA)


def _parameters_sha256(parameters: np.ndarray) -> str:
    return hashlib.sha256(parameters.astype("<f4").tobytes()).hexdigest()


@dataclass(frozen=True)
class RoundCharge:
    """What the ledger charged for a round: the aggregate it bound the charge to, and the period's spend after."""

    aggregate_sha256: str
    epsilon_after: float


def commit_round(
    store: Store,
    settings: TrainingSettings,
    record: RoundRecord,
    round_id: RoundId,
    *,
    terms: LedgerTerms,
    budget: TrainingBudget,
    charged: RoundCharge,
    signing_key: bytes | None,
) -> RoundRecord:
    """Commit a charged round: its audit rows first, holding the key holder's signature (`sign_round`: the
    round's `models` row, its budget claim and the attempts it supersedes), then its `models` row, the row
    signed. `signing_key` None: unsigned (a store nobody verifies, as the benches'); `fusion verify` reads an
    unsigned round as tampered. An attempt resumed after a crash between the two commits only its `models` row,
    the one its audit row signed, with the held-out accuracy recorded there (the held-out table may have changed
    since). Returns the round as committed."""
    recorded = recorded_round(store, round_id.release_id)
    if recorded is not None:
        record = recorded.restore_metrics(record)
        row = model_row(settings, budget.variance, record, round_id.release_id, recorded.at)
        check_signed_row(row, recorded, round_id, signing_key)
        store.insert_new("models", row)
        return record
    now = datetime.now(UTC)  # the audit row's time and the row's: a resumed attempt rebuilds the row signed
    row = model_row(settings, budget.variance, record, round_id.release_id, now)
    signature = None
    if signing_key is not None:
        claim = budget_claim(
            period=terms.period, charge=terms.charge(budget), cap=terms.cap, delta=terms.delta,
            epsilon_after=charged.epsilon_after, charged_for=charged.aggregate_sha256,
        )  # fmt: skip
        signature = sign_round(
            row, release_id=round_id.release_id, aggregate_sha256=record.sum.aggregate_digest,
            signing_key=signing_key, budget=claim, supersedes=superseded(round_id),
        ).to_doc()  # fmt: skip
    # Audit first, the model last (both keyed): a crash in between leaves the round uncommitted, and the run's
    # next try at it resumes this attempt and commits the row signed here.
    store.insert_new(
        "audit", audit_rows(settings, record, round_id.release_id, terms, charged.epsilon_after, signature, at=now)
    )
    crash_point("round_after_audit")
    store.insert_new("models", row)
    return record


def audit_rows(
    settings: TrainingSettings,
    record: RoundRecord,
    release_id: str,
    terms: LedgerTerms,
    period_epsilon: float | None,
    signature: dict[str, object] | None = None,
    *,
    at: datetime,
) -> pa.Table:
    """The round's `audit` rows, as a release's: the envelopes the aggregator refused, then the round itself
    (action `training_round`, by the key holder, with the aggregate's hash, what it cost and its signature)."""

    def row(event: str, action: str, role: str, reason: str | None, content: str | None, detail: object) -> dict:
        return {
            "event_id": f"{release_id}:{event}",
            "at": at,
            "actor_role": role,
            "actor": settings.model_id,
            "action": action,
            "release_id": release_id,
            "interval_start": terms.start,
            "interval_end": terms.end,
            "reason": reason,
            "content_sha256": content,
            "detail": json.dumps(detail, sort_keys=True, default=str),
        }

    rows = [
        row(f"refused-envelope:{k}", "envelope_refused", "aggregator", r.get("reason"), None, r)
        for k, r in enumerate(record.sum.refused)
    ]
    rows.append(
        row(
            "trained",
            "training_round",
            "key_holder",
            None,
            record.sum.aggregate_digest,
            {
                "model": settings.model_id,
                "round": record.round,
                "rounds": settings.rounds,
                "contributors": list(record.sum.contributors),
                "noise_variance": record.sum.noise_variance,
                "epsilon": record.epsilon,
                # What its `models` row holds of the model, so that a resumed attempt commits the row signed, and
                # names what differs if it cannot (training/attempts.py RecordedRound).
                "parameters_sha256": _parameters_sha256(record.parameters),
                "held_out_accuracy": record.metrics.get("accuracy"),
                "delta": settings.delta,
                "period": terms.period.name,
                "period_epsilon_spent": period_epsilon,
                **({SIGNATURE_FIELD: signature} if signature is not None else {}),
            },
        )
    )
    return pa.Table.from_pylist(rows, schema=AUDIT_SCHEMA)


def train_into_store(
    store: Store,
    settings: TrainingSettings,
    federation: RoundSummer,
    data: Mapping[str, Institution],
    *,
    classes: int,
    terms: LedgerTerms,
    generators: Mapping[str, np.random.Generator],
    held_out: Institution | None = None,
    present: Callable[[int], set[str]] | None = None,
    progress: Callable[[RoundRecord], None] | None = None,
    record: ChargeRecord | None = None,
    signing_key: bytes | None = None,
    runs: RunLock | None = None,
) -> RoundRecord | None:
    """Run (or resume) the rounds not yet committed; returns the last round (None: nothing was left to run).
    `record`: the key holder's own record of what it charged (pipelines.release.charge_record), which a round's
    charge is checked against as a release's is. `signing_key`: the key holder's registered release-signing key,
    which signs each round as it is committed (`commit_round`). Before each round is drawn, and again as it is
    charged, the run's remaining rounds are checked against the period's cap as at its start (`check_fits`): a
    release or another run may have charged the period since, and a run that can no longer finish stops before it
    spends another round. `runs`: the run's hold on its model (training/run_lock.py), whose claim on the period
    the other runs in progress count, and whose check counts theirs; each round is charged under its lock."""
    start = last_committed(store, settings)
    if start is not None and start.round >= settings.rounds:
        return start
    ledger = BudgetLedger(store, record=record)
    charged = charged_rounds(store, terms, record)  # release id -> aggregate charged for; read again after a charge
    paid: dict[int, tuple[TrainingBudget, RoundCharge]] = {}  # round -> what it was charged, and for what
    names: dict[int, RoundId] = {}

    def held(budget: TrainingBudget) -> AbstractContextManager[list[ReleaseCharge]]:
        """The other runs' claims on the period, under the lock over the claims (none without `runs`)."""
        return nullcontext([]) if runs is None else runs.claiming(terms.period, terms.charge(budget))

    def still_fits(budget: TrainingBudget, claimed: list[ReleaseCharge]) -> TrainingForecast:
        predicted = forecast_run(store, settings, budget, terms, federation, record=record, claimed=claimed)
        check_fits(settings.model_id, predicted, terms)
        return predicted

    def round_id(number: int, budget: TrainingBudget) -> RoundId:
        """The round's attempt: one charged but lost in a crash is resumed where it can still be completed."""
        with held(budget) as claimed:
            predicted = still_fits(budget, claimed)  # before any institution draws the round
            if runs is not None:
                runs.claim(terms.period, terms.charge(budget), predicted.to_charge)
        names[number] = round_attempt(settings, number, charged, federation, budget)
        return names[number]

    def pay(round_id: RoundId, budget: TrainingBudget, aggregate_sha256: str) -> None:
        with held(budget) as claimed:  # the check and the charge at once, for the runs in progress
            predicted = still_fits(budget, claimed)
            spent = ledger.spend(
                period=terms.period,
                release_id=round_id.release_id,
                aggregate_sha256=aggregate_sha256,
                charge=terms.charge(budget),
                cap=terms.cap,
                delta=terms.delta,
            )  # a resumed attempt's charge is found, not made again: its aggregate is the one charged
            if runs is not None:
                runs.claim(terms.period, terms.charge(budget), predicted.to_charge - int(spent.charged))
        # The period's charges as the ledger now holds them (a store row behind the key holder's record was rebuilt
        # by this charge; another party may have charged meanwhile): the run's epsilon composes what was charged.
        charged.clear()
        charged.update(charged_rounds(store, terms, record))
        if charged.get(round_id.release_id) != aggregate_sha256:
            raise InternalError(f"round {round_id.release_id} was charged but its charge is not in the ledger")
        paid[round_id.round] = (budget, RoundCharge(aggregate_sha256, spent.epsilon_after))
        crash_point("round_after_charge")

    def commit(record: RoundRecord) -> None:
        budget, charge = paid[record.round]
        committed = commit_round(
            store, settings, record, names[record.round], terms=terms, budget=budget, charged=charge,
            signing_key=signing_key,
        )  # fmt: skip
        if progress is not None:
            progress(committed)

    return train(
        settings,
        federation,
        data,
        classes=classes,
        generators=generators,
        start=start,
        present=present,
        on_round=commit,
        pay=pay,
        held_out=held_out,
        round_ids=round_id,
        charges=lambda number: run_charges(settings, number, charged),
    )


def federation_from_config(config: Config) -> Federation:
    """The federation's registered keys (fusion keys): each institution's X25519 and Ed25519 keys, the
    aggregator's, and the key holder's HE contexts. In one process: the trainer acts for every party."""
    agreement = load_agreement_keys(config)
    signing = load_registry(config)
    institutions = {
        i.id: Party(load_agreement_key(config, i.id), agreement[i.id], load_signing_key(config, i.id), signing[i.id])
        for i in config.institutions
    }
    aggregator_key = load_aggregator_signing_key(config)
    aggregator = Party(b"", b"", aggregator_key, load_aggregator_public_key(config))
    return Federation(
        name=config.federation.id,
        institutions=institutions,
        aggregator=aggregator,
        secret_context=load_secret_context_bytes(config),
        public_context=load_registered_public_context_bytes(config),
    )


def _table(path: Path, what: str) -> pa.Table:
    """The rows table at `path` (CSV by its suffix, otherwise Parquet); one that is missing, not a file, or that
    Arrow cannot read is refused naming `what` (the institution) and the file."""
    if not path.exists():
        raise FusionError(f"{what}: {path} does not exist; write the training rows there or fix `rows`")
    if not path.is_file():
        raise FusionError(f"{what}: {path} is not a file; write the training rows there as one table or fix `rows`")
    try:
        if path.suffix == ".csv":
            return pacsv.read_csv(path)
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        kind = "CSV" if path.suffix == ".csv" else "Parquet"
        raise FusionError(
            f"{what}: {path} is not a readable {kind} table ({str(exc).splitlines()[0][:200]}); write it again or "
            "fix `rows`"
        ) from None


def institution_rows(model: ModelConfig, path: Path, what: str) -> Institution:
    """The model's features (float32) and target (int64) from one table, checked."""
    table = _table(path, what)
    missing = [c for c in (*model.features, model.target) if c not in table.column_names]
    if missing:
        raise FusionError(f"{what}: {path} has no column(s) {missing}; add them or fix models.{model.name}")
    for name in (*model.features, model.target):
        kind = table.schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)):
            raise FusionError(f"{what}: {path}'s column '{name}' is {kind}, not numbers; fix it or models.{model.name}")
    with np.errstate(over="ignore"):  # as the model reads them: a value beyond float32's range is infinite there
        features = np.column_stack(
            [table.column(c).cast(pa.float64()).to_numpy(zero_copy_only=False) for c in model.features]
        ).astype(np.float32)
    target = table.column(model.target).cast(pa.float64()).to_numpy(zero_copy_only=False)
    if not np.isfinite(features).all():
        raise FusionError(
            f"{what}: {path} holds missing or infinite feature values (or values beyond float32's range, about "
            "3.4e38); drop or fill those rows"
        )
    classes = np.isfinite(target) & (target >= 0) & (target < model.class_count) & (target == np.round(target))
    if not classes.all():
        raise FusionError(f"{what}: {path}'s '{model.target}' must hold class numbers 0..{model.class_count - 1}")
    return Institution(features, target.astype(np.int64))
