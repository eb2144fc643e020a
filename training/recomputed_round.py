"""The key holder's recomputation of a training round's aggregate before it charges the round, as it recomputes a
release's (pipelines/aggregate_envelope.py, whose code it runs unchanged: a round is a `ReleasePlan` and its
envelopes are the releases' own).

The aggregator adds a plaintext vector to the homomorphic sum of the round's contributions (the vector that removes
the self masks and the masks held with absent institutions) and signs the result; its signature says who sealed the
aggregate, not what it holds, so an offset in that vector would move the decrypted model update at will. The key
holder therefore rebuilds the aggregate from exactly the roster its header names (each included contribution read
from its own place in the round's exchange folder and checked as the aggregator checks it, the masks rebuilt from
the institutions' answers) and compares ciphertexts and header fields; a round whose aggregate differs, or can no
longer be rebuilt, is refused and audited before anything is charged or decrypted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

from fusion.release.plan import ReleasePlan
from fusion.store.delta import Store
from pipelines.aggregate_envelope import AGGREGATE_MISMATCH, recompute_problem
from privacy.envelope import EnvelopeHeader
from schemas.tables import AUDIT_SCHEMA
from training.secure_sum import RoundId, RoundRefused

#: The `audit` action of a round the key holder refuses because its aggregate is not what its envelopes give.
ROUND_REFUSED = "training_round_refused"


@dataclass(frozen=True)
class RefusalAudit:
    """Where the key holder records a round it refuses: `store`'s `audit` table, under the round's id (the id its
    `training_round` row and `models` row carry)."""

    store: Store
    round_id: RoundId

    def record(self, plan: ReleasePlan, *, reason: str, detail: dict[str, str]) -> None:
        """One `training_round_refused` row (keyed by its content: the same refusal again adds no row)."""
        digest = hashlib.sha256(json.dumps([reason, detail], sort_keys=True).encode()).hexdigest()[:12]
        row = {
            "event_id": f"{self.round_id.release_id}:refused:{digest}",
            "at": datetime.now(UTC),
            "actor_role": "key_holder",
            "actor": self.round_id.model_id,
            "action": ROUND_REFUSED,
            "release_id": self.round_id.release_id,
            "interval_start": plan.layout.start,
            "interval_end": plan.layout.end,
            "reason": reason,
            "content_sha256": detail["aggregate_sha256"],
            "detail": json.dumps(detail, sort_keys=True),
        }
        self.store.insert_new("audit", pa.Table.from_pylist([row], schema=AUDIT_SCHEMA))


def check_recomputed(
    plan: ReleasePlan, header: EnvelopeHeader, *, path: str, data: bytes, audit: RefusalAudit | None
) -> None:
    """Refuse (RoundRefused), audited in `audit` (None: not audited), the round's signed aggregate (`data`, read
    from `path`; `header` its checked header) unless recomputing it from the round's exchange folder gives the same
    ciphertexts and header. Decrypts nothing."""
    problem = recompute_problem(plan, header)
    if problem is None:
        return
    detail = {"aggregate": str(path), "aggregate_sha256": hashlib.sha256(data).hexdigest(), "found": problem.found}
    if audit is not None:
        audit.record(plan, reason=problem.reason, detail=detail)
    if problem.reason == AGGREGATE_MISMATCH:
        fix = (
            "the aggregator runs `fusion train --role aggregator` again (an honest one seals the same sum from the "
            "same envelopes); if the aggregate still differs, the aggregator's operator finds out what sealed it"
        )
    else:
        fix = (
            "restore the round's exchange folder: an institution whose contribution is missing or refused runs "
            "`fusion train --role institution` again (it publishes its kept envelope again), one whose answer is, "
            "with `--unmask`; then run the key holder's step again"
        )
    raise RoundRefused(
        f"the round's aggregate {path} is refused ({problem.reason}): it is not what the signed contributions and "
        f"answers in the exchange give: {problem.found}. It is not decrypted, nothing is charged; {fix}"
    )
