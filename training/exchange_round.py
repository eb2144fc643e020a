"""One training round through the releases' role path: each institution seals its vector in a signed envelope in
the exchange (pairwise and self masks, Shamir-shared seeds and mask keys), the aggregator sums the envelopes and
closes the roster (pipelines/aggregate.py), each included institution acknowledges and answers it
(pipelines/unmask.py), the aggregator removes the masks, and the key holder, once the round is paid for, decrypts
only the noisy sum. An institution that drops out is declared absent and the round completes as a release does.

A round is a `ReleasePlan` of its own: its layout is the model's vector (`RoundLayout`), its interval the readings
the rows come from, and its exchange a folder of the federation's exchange, `training/<model>/<round id>`, so the
releases' per-interval folders never meet a round's. Each role function loads only its own party's keys from the
config, as the releases' commands do, so every step can run in its own process. An institution draws its noise
for a round once, whatever attempt the round runs under (training/kept_updates.py): a later attempt seals the
same noisy update, masked anew; and it draws none for a round that would take its privacy period past its cap.

Not (yet) as releases: the round's noise has no removable layers (each contributor seals s_q = v / h(quorum) and
keeps it, so with more than the quorum present the noise is larger than needed, never smaller): the releases keep a
layer's seed in one record per interval, which a model's rounds over one interval cannot share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fusion.config.federation import Config
from fusion.config.parameters import release_parameters
from fusion.errors import FusionError, InternalError, ReleaseRefused
from fusion.keys.holder import load_checked_secret_context, published_context_digest
from fusion.keys.registry import (
    check_he_context,
    load_aggregator_public_key,
    load_signing_key,
    read_private,
    write_private,
)
from fusion.release.exchange import (
    ReleaseKey,
    aggregate_path,
    contribution_path,
    exists,
    join,
    public_context_path,
    read_bytes,
    write_bytes,
)
from fusion.release.plan import ReleasePlan, noise_variance_problem, period_of
from fusion.store.delta import Store
from fusion.store.ledger import BudgetExceeded
from pipelines.contribute import double_mask
from pipelines.release import audit_row
from pipelines.run import run_aggregate
from pipelines.unmask import acknowledge, read_roster, seal_unmask
from privacy import he
from privacy.accountant import ReleaseCharge
from privacy.envelope import (
    EnvelopeError,
    EnvelopeHeader,
    envelope_header,
    pack_envelope,
    signature_valid,
    unpack_envelope,
)
from privacy.layout import PartitionLayout
from privacy.masking import centred
from privacy.noise_shares import NoiseLayers
from privacy.skellam import SkellamNoise
from schemas.tables import AUDIT_SCHEMA
from training.kept_updates import check_answered_roster, keep_update, kept_update
from training.recomputed_round import RefusalAudit, check_recomputed
from training.secure_sum import RoundId, RoundRefused, RoundSum


@dataclass(frozen=True)
class RoundLayout(PartitionLayout):
    """A round's public layout: the model's `vector` slots (gradient sums, then the count slot) over one window,
    the interval of the readings the rows come from. `round_name` (the round's context) makes its digest, and so
    its release id and exchange folder, its own."""

    vector: int = 1
    round_name: str = ""

    @property
    def slots(self) -> int:
        return self.vector

    def digest(self) -> str:
        doc = {
            "training": self.round_name,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "slots": self.vector,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def round_exchange(config: Config, round_id: RoundId) -> str:
    """The round's folder in the federation's exchange."""
    return join(config.exchange_path, "training", round_id.model_id, round_id.release_id)


def round_plan(
    config: Config, round_id: RoundId, *, slots: int, variance: float, start: datetime, end: datetime
) -> ReleasePlan:
    """The round as a release plan every party derives alike from public values: the config, the round's id, its
    vector length and the run's calibrated variance v. No removable noise layers (module docstring)."""
    exchange = round_exchange(config, round_id)
    federation = config.federation.model_copy(update={"exchange": exchange})
    round_config = config.model_copy(update={"federation": federation})
    layout = RoundLayout(
        metrics=("training",),
        regions=(round_id.model_id,),
        start=start,
        window=end - start,
        windows=1,
        vector=slots,
        round_name=round_id.context.decode(),
    )
    base = release_parameters(config)
    params = dataclasses.replace(
        base, encodings=(), total_variance=variance, institutions=base.quorum, cell_caps={}, epsilon=float("nan")
    )
    key = ReleaseKey(config.federation.id, layout.start, layout.end, layout.digest(), params.digest())
    return ReleasePlan(config=round_config, layout=layout, params=params, key=key, period=period_of(config, start, end))


def open_round(plan: ReleasePlan, federation_exchange: str) -> None:
    """Publish the federation's public HE context in the round's folder (what the releases' steps read)."""
    target = public_context_path(plan.config.exchange_path)
    if not exists(target):
        write_bytes(target, read_bytes(public_context_path(federation_exchange)))


def _kept_path(plan: ReleasePlan, institution_id: str) -> Path:
    keys = Path(plan.config.institution_keys_path(plan.config.institution(institution_id)))
    return keys / "training" / f"{plan.key.release_id}.fenv"


class Sealing(StrEnum):
    """How an institution's envelope of a round attempt came about."""

    DRAWN = "drawn"  # its noise for the round drawn now (the round's first attempt it seals)
    REMASKED = "remasked"  # its noisy update kept from an earlier attempt of the round, masked anew
    REPUBLISHED = "republished"  # the envelope it sealed for this very attempt, published again


@dataclass(frozen=True)
class SealedContribution:
    """An institution's envelope of a round attempt, and the noisy update it encrypts (which never leaves the
    institution; None where the envelope kept for the attempt was published again)."""

    envelope: bytes
    noised: np.ndarray | None
    sealing: Sealing


def seal_contribution(
    plan: ReleasePlan,
    institution_id: str,
    vector: np.ndarray,
    *,
    round_id: RoundId,
    generator: np.random.Generator,
    charge: ReleaseCharge,
    rounds: int,
    audit: Store | None = None,
) -> SealedContribution:
    """The institution's step: `vector` (int64, the round's slots) plus its Skellam share s_q, masked as a release
    contribution is (`double_mask`: pairwise masks with its masking-graph neighbours, a self mask, both
    Shamir-shared for the unmask round), BFV-encrypted, signed and published in the round's folder. The noise of a
    round is drawn once: the noisy update is kept (training/kept_updates.py) and any later attempt of the round
    seals that same update with fresh masks (`vector` unused); the envelope of an attempt is kept too, and
    published again byte for byte. A round whose `charge` (the ledger's for a round of the run), with those of the
    run's later rounds (`rounds` in all), would take the institution's privacy period past its cap is refused before
    its noise is drawn (BudgetExceeded), and recorded in `audit`'s `audit` table (`contribution_refused`; None: not
    recorded)."""
    kept = _kept_path(plan, institution_id)
    path = contribution_path(plan.config.exchange_path, plan.key, institution_id)
    if kept.exists():
        envelope = read_private(kept, f"institution {institution_id}'s sealed training envelope")
        write_bytes(path, envelope)
        return SealedContribution(envelope, None, Sealing.REPUBLISHED)
    noised = kept_update(plan.config, institution_id, round_id)
    sealing = Sealing.REMASKED
    if noised is None:
        if vector.shape != (plan.layout.slots,):
            raise FusionError(f"a round's vector has {plan.layout.slots} slots, got shape {vector.shape}")
        drawn = vector + SkellamNoise(plan.params.share_variance, generator=generator).sample(vector.size)
        try:
            noised = keep_update(plan.config, institution_id, round_id, drawn, charge=charge, rounds=rounds)
        except BudgetExceeded as exc:
            if audit is not None:
                _audit_refusal(audit, plan, round_id, institution_id, str(exc))
            raise
        sealing = Sealing.DRAWN
    if noised.shape != (plan.layout.slots,):
        raise FusionError(
            f"institution {institution_id}'s noisy update of round {round_id.round} of model {round_id.model_id} "
            f"has {noised.size} slots, the round {plan.layout.slots}: the model changed under the same settings"
        )
    # Masked exactly as a release contribution is (pipelines/contribute.py): pairwise masks with the round's
    # masking-graph neighbours, a self mask, and Shamir shares of both for the unmask round.
    masked, mask_fields = double_mask(plan, institution_id, noised)
    public_context = read_bytes(public_context_path(plan.config.exchange_path))
    context_sha256 = hashlib.sha256(public_context).hexdigest()
    check_he_context(plan.config, context_sha256)
    ciphertexts = he.encrypt_vector(he.load_public_context(public_context), masked, residues=True)
    header = plan.envelope_header(
        kind="contribution",
        contributors=(institution_id,),
        noise_variance=plan.params.share_variance,
        context_sha256=context_sha256,
        reject_counts={},
        **mask_fields,
    )
    envelope = pack_envelope(header, ciphertexts, signing_key=load_signing_key(plan.config, institution_id))
    write_private(kept, envelope)  # kept before it is published: a re-run publishes these bytes, never a new draw
    write_bytes(path, envelope)
    return SealedContribution(envelope, noised, sealing)


def _audit_refusal(store: Store, plan: ReleasePlan, round_id: RoundId, institution_id: str, reason: str) -> None:
    """The institution's `contribution_refused` row for a round it does not seal (keyed by its content)."""
    detail = {"institution": institution_id, "model": round_id.model_id, "round": round_id.round}
    digest = hashlib.sha256(json.dumps([reason, detail], sort_keys=True).encode()).hexdigest()[:12]
    row = audit_row(
        event_id=f"{round_id.release_id}:contribution_refused:{digest}", action="contribution_refused",
        actor_role="institution", actor=institution_id, plan=plan, reason=reason, detail=detail,
    )  # fmt: skip
    store.insert_new("audit", pa.Table.from_pylist([row | {"release_id": round_id.release_id}], schema=AUDIT_SCHEMA))


def aggregate(plan: ReleasePlan) -> dict[str, Any]:
    """The aggregator's step (pipelines/aggregate.py, in this process): the first pass closes the roster, those
    missing declared absent; once the answers are in, the next seals the unmasked sum. Returns its status."""
    try:
        return run_aggregate(plan, in_process=True, may_declare_absent=True)
    except ReleaseRefused as exc:
        raise RoundRefused(str(exc)) from None


def answer(plan: ReleasePlan, institution_id: str, *, round_id: RoundId) -> str | None:
    """An included institution's step in the unmask round (pipelines/unmask.py): acknowledge the roster, then
    answer it once enough have; returns its answer's path (None: too few acknowledgements yet). A roster that
    includes other institutions than one it answered for another attempt of the round is refused
    (training/kept_updates.py `check_answered_roster`)."""
    roster = read_roster(plan)
    if roster is not None and institution_id in roster.included:
        check_answered_roster(plan.config, institution_id, round_id, roster.included)
    return seal_unmask(plan, institution_id).path


def acknowledge_roster(plan: ReleasePlan, institution_id: str) -> None:
    acknowledge(plan, institution_id)


def decrypt(
    plan: ReleasePlan, pay: Callable[[str], None] | None, *, audit: RefusalAudit | None = None
) -> tuple[EnvelopeHeader, np.ndarray, str]:
    """The key holder's step: check the aggregate (kind, layout, parameters, the aggregator's signature, the HE
    context, the quorum, its stated noise variance, and that the exchange's signed envelopes give it:
    training/recomputed_round.py), call `pay(payload SHA-256)` (the ledger's charge), then decrypt only the noisy
    sum. A refusal on recomputation is recorded in `audit` (None: not recorded). Returns (its header, the sum int64
    centred mod t, the envelope's SHA-256)."""
    path = aggregate_path(plan.config.exchange_path, plan.key)
    if not exists(path):
        raise RoundRefused("the round has no aggregate yet: nothing is decrypted")
    data = read_bytes(path)
    try:
        header, ciphertexts = unpack_envelope(data, max_ciphertexts=he.ciphertexts_for(plan.layout.slots))
    except EnvelopeError as exc:
        raise RoundRefused(
            f"the round's aggregate {path} is unreadable ({exc}): nothing is charged or decrypted"
        ) from None
    expected = ("aggregate", plan.key.layout_digest, plan.key.parameters_digest)
    if (header.kind, header.layout_digest, header.parameters_digest) != expected:
        raise RoundRefused("the aggregate envelope does not match this round's layout or parameters")
    if not signature_valid(header, load_aggregator_public_key(plan.config)):
        raise RoundRefused("the aggregate is not signed by the federation's registered aggregator: not decrypted")
    if header.context_sha256 != published_context_digest(plan.config):
        raise RoundRefused("the aggregate was encrypted under another public HE context than the one published")
    if len(header.contributors) < plan.params.quorum:
        raise RoundRefused(f"the aggregate has {len(header.contributors)} contributors; quorum is {plan.params.quorum}")
    check_noise_variance(plan, header)
    check_recomputed(plan, header, path=path, data=data, audit=audit)  # a signature says who sealed it, not what
    context = load_checked_secret_context(plan.config)  # before the charge: a lost key would spend for nothing
    if pay is not None:
        pay(header.payload_sha256)
    total = centred(he.decrypt_vector(context, ciphertexts, plan.layout.slots), he.PLAIN_MODULUS)
    return header, total, hashlib.sha256(data).hexdigest()


def check_noise_variance(plan: ReleasePlan, header: EnvelopeHeader) -> None:
    """Refuse, before anything is charged, an aggregate whose stated noise variance its contributions could not
    hold, as the releases' key holder does (pipelines/release.py): the variance is recorded in the round's `models`
    row and signed. With noise on it lies between v (what the guarantee keeps) and every contributor's sealed share
    s_q (no layers come off a round's noise: each contributor's share stays whole): noise_variance_problem."""
    problem = noise_variance_problem(plan, header)
    if problem is not None:
        raise RoundRefused(f"the round's aggregate states {problem}")


def can_resume(plan: ReleasePlan, charged_for: str) -> bool:
    """Whether a round charged and lost before its commit can still be completed under its own id: its aggregate
    is still in the exchange and is the one the ledger charged (payload SHA-256 `charged_for`). Its contributions
    are the institutions' kept envelopes, so every step re-runs alike and the key holder decrypts that same
    aggregate again, charged once (training/attempts.py)."""
    path = aggregate_path(plan.config.exchange_path, plan.key)
    if not exists(path):
        return False
    try:
        return envelope_header(read_bytes(path)).payload_sha256 == charged_for
    except EnvelopeError:
        return False


@dataclass(frozen=True)
class ExchangeFederation:
    """A federation whose rounds go through the exchange (training/trainer.py's `RoundSummer`): this process runs
    each party's role function in turn, each with its own keys from the config; `present` institutions seal. `store`:
    where the key holder audits a round it refuses, and an institution a round it does not seal (None: not audited).
    `charge`: what a round of the run costs a privacy period (the ledger's charge), which each institution holds
    against its cap, for the round and the run's later ones (`rounds`: how many the run has), before it draws a
    round's noise; a federation without one only resumes rounds, and seals none."""

    config: Config
    start: datetime
    end: datetime
    store: Store | None = None
    charge: ReleaseCharge | None = None
    rounds: int = 0

    @property
    def institutions(self) -> tuple[str, ...]:
        return tuple(i.id for i in self.config.institutions)

    def plan(self, round_id: RoundId, *, slots: int, variance: float) -> ReleasePlan:
        return round_plan(self.config, round_id, slots=slots, variance=variance, start=self.start, end=self.end)

    def can_resume(self, round_id: RoundId, *, slots: int, variance: float, charged_for: str) -> bool:
        return can_resume(self.plan(round_id, slots=slots, variance=variance), charged_for)

    def sum_round(
        self,
        vectors: Mapping[str, np.ndarray],
        *,
        round_id: RoundId,
        layers: NoiseLayers,
        generators: Mapping[str, np.random.Generator],
        pay: Callable[[str], None] | None = None,
    ) -> RoundSum:
        if self.charge is None or self.rounds < round_id.round:
            raise InternalError("an exchange federation without its run's charges sealed a round; this is a bug")
        slots = next(iter(vectors.values())).size
        plan = self.plan(round_id, slots=slots, variance=layers.total_variance)
        open_round(plan, self.config.exchange_path)
        charge, rounds, store = self.charge, self.rounds, self.store

        def seal(i: str) -> bytes:
            sealed = seal_contribution(
                plan,
                i,
                vectors[i],
                round_id=round_id,
                generator=generators[i],
                charge=charge,
                rounds=rounds,
                audit=store,
            )
            return sealed.envelope

        envelopes = {i: seal(i) for i in sorted(vectors)}
        # An aggregate already sealed (a round resumed after a crash) is decrypted as it is: sealed again it would
        # be other bytes, and the ledger and a signature already written may name these.
        if not exists(aggregate_path(plan.config.exchange_path, plan.key)):
            status = aggregate(plan) if read_roster(plan) is None else {"status": "awaiting_unmask"}
            if status["status"] == "awaiting_unmask":
                run_unmask_round(plan, sorted(vectors), round_id=round_id)
                status = aggregate(plan)
            if status["status"] != "aggregated":
                raise RoundRefused(f"the round was not aggregated: {status.get('reason', status['status'])}")
        audit = None if self.store is None else RefusalAudit(self.store, round_id)
        header, total, digest = decrypt(plan, pay, audit=audit)
        return RoundSum(
            noisy_sum=total,
            contributors=header.contributors,
            noise_variance=header.noise_variance,
            envelope_digests={i: hashlib.sha256(e).hexdigest() for i, e in envelopes.items()},
            aggregate_digest=digest,
            bytes_per_contributor=max(len(e) for e in envelopes.values()),
            refused=tuple(header.refused),
        )


def run_unmask_round(plan: ReleasePlan, institutions: Sequence[str], *, round_id: RoundId) -> None:
    """Every included institution of `institutions` acknowledges the roster, then answers it."""
    roster = read_roster(plan)
    included = [i for i in institutions if roster is not None and i in roster.included]
    for institution in included:
        acknowledge_roster(plan, institution)
    for institution in included:
        answer(plan, institution, round_id=round_id)
