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
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from fusion.errors import FusionError
from fusion.store.delta import Store
from fusion.store.provenance import SIGNATURE_FIELD, ReleaseSignature, record_digest
from privacy.signing import public_key, verify
from training.secure_sum import RoundId
from training.trainer import TrainingSettings


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


@dataclass(frozen=True)
class RecordedRound:
    """A round's `training_round` audit row, committed by a try at its attempt that crashed before its `models`
    row: when it was recorded (the row's `committed_at`) and the signature it holds (None: none readable)."""

    at: datetime
    signature: dict[str, object] | None


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
    signature = detail.get(SIGNATURE_FIELD) if isinstance(detail, dict) else None
    return RecordedRound(row["at"], signature if isinstance(signature, dict) else None)


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
        problem = "signs another `models` row than the one this run computes"
    if problem is not None:
        raise FusionError(
            f"round {round_id.round} of model {round_id.model_id}: the audit row of its attempt {round_id.release_id} "
            f"{problem}; nothing was committed (`fusion verify` reports the round; restore the `audit` table if "
            "it was changed)"
        )
