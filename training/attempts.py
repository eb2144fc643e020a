"""Which attempt a training round runs under, and what a run's rounds have charged the budget ledger.

A round's attempts (training/secure_sum.py `RoundId`) are drawn in turn: attempt k + 1 only once attempt k was
charged and then lost before its commit (a crash between the key holder's charge and the `models` row). A lost
attempt is resumed, not redrawn, while it can still be completed: its aggregate still in the exchange and the very
one the ledger charged it for. The institutions publish their kept envelopes again, the ledger charges a release
once (fusion/store/ledger.py), and decrypting that aggregate again reveals nothing new, so a resumed attempt costs
nothing more. Only an attempt that cannot be completed (its aggregate gone or replaced; every attempt in a process
without an exchange, training/secure_sum.py `Federation`) is superseded by a new draw, charged again: the run's
epsilon counts that charge too (`run_charges`). An attempt lost between its signed audit row and its `models` row
is completed by committing the very row that audit row signed (`recorded_round`, `check_signed_row`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from fusion.errors import FusionError
from fusion.store.delta import Store
from fusion.store.provenance import SIGNATURE_FIELD, ReleaseSignature, record_digest
from privacy.signing import public_key, verify
from training.charging import TrainingSettings
from training.secure_sum import RoundId
from training.trainer import RoundRecord


def charged_attempts(settings: TrainingSettings, number: int, charged: Collection[str]) -> list[RoundId]:
    """Round `number`'s attempts among the `charged` release ids, in order (attempts are drawn in turn, so these
    are attempts 0..k)."""
    attempts: list[RoundId] = []
    while (attempt := RoundId(settings.model_id, number, settings.digest(), len(attempts))).release_id in charged:
        attempts.append(attempt)
    return attempts


def next_round_id(
    settings: TrainingSettings,
    number: int,
    charged: Mapping[str, str],
    resumable: Callable[[RoundId, str], bool] | None = None,
) -> RoundId:
    """Round `number`'s attempt (none of its attempts committed yet): its last charged one when
    `resumable(attempt, aggregate it was charged for)` says it can still be completed (resumed: charged no more),
    otherwise its first attempt not yet charged (a new draw, charged anew). `charged`: release id -> the aggregate
    it was charged for (training/run.py `charged_rounds`)."""
    attempts = charged_attempts(settings, number, charged)
    if attempts and resumable is not None and resumable(attempts[-1], charged[attempts[-1].release_id]):
        return attempts[-1]
    return RoundId(settings.model_id, number, settings.digest(), len(attempts))


def superseded(round_id: RoundId) -> list[str]:
    """The ids of the earlier attempts at `round_id`'s round (each charged, then lost and not resumable)."""
    return [
        RoundId(round_id.model_id, round_id.round, round_id.parameters_digest, attempt).release_id
        for attempt in range(round_id.attempt)
    ]


def run_charges(settings: TrainingSettings, through: int, charged: Collection[str]) -> int:
    """How many charges the run's rounds 1..`through` made (attempts lost and superseded included): the number of
    rounds its epsilon composes, which is more than `through` once an attempt was lost and drawn anew."""
    return sum(len(charged_attempts(settings, number, charged)) for number in range(1, through + 1))


#: What a round's `training_round` audit record states of its `models` row, compared with a resumed attempt's row
#: to name what differs where the signature does not cover it.
RECORDED_FIELDS = ("parameters_sha256", "held_out_accuracy", "epsilon", "noise_variance", "contributors")


@dataclass(frozen=True)
class RecordedRound:
    """A round's `training_round` audit row, committed by a try at its attempt that crashed before its `models`
    row: when it was recorded (the row's `committed_at`), the signature it holds (None: none readable) and the
    rest of its detail (the round's held-out accuracy among it, from Fusion versions that record it)."""

    at: datetime
    signature: dict[str, object] | None
    detail: Mapping[str, object]

    def restore_metrics(self, record: RoundRecord) -> RoundRecord:
        """`record` with the held-out accuracy the audit row recorded, which the signed row holds: a held-out table
        changed (or `held_out` set or dropped) since then must not keep the attempt from being completed. The
        signature still decides whether the row is the one signed."""
        if "held_out_accuracy" not in self.detail:  # recorded before Fusion kept it there: evaluated again
            return record
        accuracy = self.detail["held_out_accuracy"]
        metrics = {"accuracy": float(accuracy)} if isinstance(accuracy, int | float) else {}
        return replace(record, metrics=metrics)


def recorded_round(store: Store, release_id: str) -> RecordedRound | None:
    """The attempt's `training_round` audit row (None: none yet)."""
    event = f"{release_id}:trained"
    dataset = store.dataset("audit")
    columns = ["event_id", "at", "detail"]
    try:  # pushed down: only the row groups that may hold the event are read
        rows = dataset.to_table(columns=columns, filter=pc.field("event_id") == event)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):  # string_view files of old stores
        rows = dataset.to_table(columns=columns)
        rows = rows.filter(pc.equal(pc.cast(rows.column("event_id"), pa.string()), event))
    if rows.num_rows == 0:
        return None
    row = rows.to_pylist()[0]  # event ids are keyed: there is one
    try:
        detail = json.loads(row["detail"] or "{}")
    except (ValueError, RecursionError):
        detail = None
    detail = detail if isinstance(detail, dict) else {}
    signature = detail.pop(SIGNATURE_FIELD, None)
    return RecordedRound(row["at"], signature if isinstance(signature, dict) else None, detail)


def check_signed_row(row: pa.Table, recorded: RecordedRound, round_id: RoundId, signing_key: bytes | None) -> None:
    """Refuse to commit a resumed attempt's row unless it is the row its audit row's signature covers (the same
    aggregate decrypted from the same model gives the same row): `fusion verify` would read any other as
    tampered."""
    if signing_key is None:
        return
    problem = None
    try:
        claim = None if recorded.signature is None else ReleaseSignature.from_doc(recorded.signature)
        signature = b"" if claim is None else bytes.fromhex(claim.signature)
        authentic = claim is not None and verify(public_key(signing_key), claim.message(), signature)
    except (ValueError, KeyError, TypeError):
        claim, authentic = None, False
    if claim is None or claim.release_id != round_id.release_id or not claim.is_round:
        problem = "holds no readable signature of it"
    elif not authentic:
        problem = "holds a signature the key holder did not make"
    elif record_digest(row, claim.columns) != claim.rows_sha256:
        problem = "signs another `models` row than the one this run computes" + _difference(row, recorded.detail)
    if problem is not None:
        raise FusionError(
            f"round {round_id.round} of model {round_id.model_id}: the audit row of its attempt {round_id.release_id} "
            f"{problem}; nothing was committed (`fusion verify` reports the round; restore the `audit` table if "
            "it was changed)"
        )


def _difference(row: pa.Table, detail: Mapping[str, object]) -> str:
    """What tells the row computed now from the one signed, as far as the audit record states it (its signature
    covers a digest of the row only)."""
    computed = row.to_pylist()[0]
    differ = [f for f in RECORDED_FIELDS if f in detail and detail[f] != computed[f]]
    if "parameters_sha256" in differ:
        return (
            ": its parameters differ from those the round's audit record states (the model it stepped from, the "
            "aggregate or the settings are not those of the round signed)"
        )
    if differ:
        return f": its {', '.join(differ)} differ from the round's audit record"
    if "held_out_accuracy" not in detail and computed["held_out_accuracy"] is not None:
        return (
            ": the round's audit record (from an earlier Fusion) holds no held-out accuracy to restore, so the row "
            "signed is the one evaluated on the held-out table of then; if `held_out` or its table changed since, "
            "restore them to complete the round"
        )
    return ""
