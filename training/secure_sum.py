"""One training round's vector sum, in this process, with Fusion's own parts: each contributor adds its Skellam
share (privacy/noise_shares.py: v / h(n), so the noise no admissible coalition knows is exactly v), pairwise masks
that cancel in the sum (privacy/masking.py), BFV encryption (privacy/he.py) and a signed envelope
(privacy/envelope.py); the aggregator checks each signature and adds the ciphertexts, signs the aggregate; the key
holder checks that signature and decrypts only the noisy sum.

This is the in-process path (every party's keys in one `Federation`), for tests and benchmarks that run many
rounds: the contributors are known before anyone seals, so the masks are agreed among them. `fusion train` runs its
rounds through the exchange and the releases' roles instead (training/exchange_round.py).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from fusion.errors import ReleaseRefused
from privacy import he
from privacy.envelope import EnvelopeHeader, pack_envelope, signature_valid, unpack_envelope
from privacy.masking import add_mod, centred, generate_agreement_key, pairwise_mask
from privacy.noise_shares import NoiseLayers
from privacy.signing import generate_signing_key
from privacy.skellam import SkellamNoise


class RoundRefused(ReleaseRefused):
    """An envelope of the round failed a check: nothing of it is decrypted."""


@dataclass(frozen=True)
class Party:
    """An institution's keys for the round: X25519 (masks) and Ed25519 (envelopes), private and public."""

    agreement_private: bytes
    agreement_public: bytes
    signing_private: bytes
    signing_public: bytes

    @classmethod
    def generate(cls) -> Party:
        agreement = generate_agreement_key()
        signing = generate_signing_key()
        return cls(agreement[0], agreement[1], signing[0], signing[1])


@dataclass(frozen=True)
class Federation:
    """The parties of a training federation: institutions, the aggregator's and key holder's keys."""

    name: str
    institutions: Mapping[str, Party]
    aggregator: Party
    secret_context: bytes
    public_context: bytes

    @classmethod
    def generate(cls, name: str, institution_ids: list[str]) -> Federation:
        secret_context, public_context = he.generate_keys()
        return cls(
            name=name,
            institutions={i: Party.generate() for i in institution_ids},
            aggregator=Party.generate(),
            secret_context=secret_context,
            public_context=public_context,
        )

    def sum_round(
        self,
        vectors: Mapping[str, np.ndarray],
        *,
        round_id: RoundId,
        layers: NoiseLayers,
        generators: Mapping[str, np.random.Generator],
        pay: Callable[[str], None] | None = None,
    ) -> RoundSum:
        """One round in this process (`secure_sum`): the trainer's `RoundSummer`."""
        return secure_sum(self, vectors, round_id=round_id, layers=layers, generators=generators, pay=pay)[0]

    def can_resume(self, round_id: RoundId, *, slots: int, variance: float, charged_for: str) -> bool:
        """Never: nothing of a round outlives this process (no exchange keeps its envelopes or its aggregate), so a
        round lost after its charge is drawn anew and charged again."""
        return False


@dataclass(frozen=True)
class RoundId:
    """What names one round: the model, the round number, the digest of its settings, and the attempt."""

    model_id: str
    round: int
    parameters_digest: str
    attempt: int = 0  # > 0: an earlier attempt was charged, lost in a crash and not resumable; a new draw, charged

    @property
    def context(self) -> bytes:
        retry = f"|retry{self.attempt}" if self.attempt else ""
        return f"fusion/training/v1|{self.model_id}|{self.round}|{self.parameters_digest}{retry}".encode()

    @property
    def release_id(self) -> str:
        return "t-" + hashlib.sha256(self.context).hexdigest()[:24]


@dataclass(frozen=True)
class RoundSum:
    """The key holder's view of one round: the noisy sum and what it is made of."""

    noisy_sum: np.ndarray  # (slots,) int64
    contributors: tuple[str, ...]
    noise_variance: float  # total Skellam variance in the sum (n * v / h(n))
    envelope_digests: dict[str, str]  # contributor -> SHA-256 of its envelope
    aggregate_digest: str
    bytes_per_contributor: int
    refused: tuple[dict[str, str], ...] = ()  # envelopes the aggregator refused (reason, source), for the audit


def layout_digest(round_id: RoundId, slots: int) -> str:
    """Binds an envelope to its round and vector length (a round's envelope is refused in any other)."""
    return hashlib.sha256(f"{round_id.release_id}|{slots}".encode()).hexdigest()


def _header(
    round_id: RoundId,
    *,
    kind: str,
    slots: int,
    contributors: tuple[str, ...],
    variance: float,
    public_context: bytes,
    federation: str,
) -> EnvelopeHeader:
    now = datetime.now(UTC).isoformat()
    return EnvelopeHeader(
        kind=kind,
        federation=federation,
        interval_start=now,
        interval_end=now,
        layout_digest=layout_digest(round_id, slots),
        parameters_digest=round_id.parameters_digest,
        slots=slots,
        contributors=contributors,
        noise_variance=variance,
        context_sha256=hashlib.sha256(public_context).hexdigest(),
        nonce=secrets.token_hex(16),
        created_at=now,
    )


def seal_contribution(
    federation: Federation,
    institution: str,
    vector: np.ndarray,
    *,
    round_id: RoundId,
    contributors: tuple[str, ...],
    layers: NoiseLayers,
    generator: np.random.Generator,
) -> tuple[bytes, np.ndarray]:
    """(the signed envelope, the noised vector it encrypts, which stays with the institution): `vector` plus the
    Skellam share for `contributors`, masked so the masks of `contributors` cancel, encrypted and signed."""
    share = layers.share(len(contributors))
    noised = vector + SkellamNoise(share, generator=generator).sample(vector.size)
    party = federation.institutions[institution]
    peers = {i: federation.institutions[i].agreement_public for i in contributors}
    mask = pairwise_mask(
        institution,
        party.agreement_private,
        peers,
        slots=vector.size,
        modulus=he.PLAIN_MODULUS,
        context=round_id.context,
    )
    context = he.load_public_context(federation.public_context)
    ciphertexts = he.encrypt_vector(context, add_mod(noised, mask, he.PLAIN_MODULUS), residues=True)
    header = _header(
        round_id,
        kind="contribution",
        slots=vector.size,
        contributors=(institution,),
        variance=share,
        public_context=federation.public_context,
        federation=federation.name,
    )
    return pack_envelope(header, ciphertexts, signing_key=party.signing_private), noised


def aggregate(federation: Federation, envelopes: Mapping[str, bytes], *, round_id: RoundId, slots: int) -> bytes:
    """The aggregator's signed envelope of the sum; refuses an envelope that is unsigned, of another round or
    another layout (RoundRefused)."""
    context = he.load_public_context(federation.public_context)
    parts, variance = [], 0.0
    for institution, data in sorted(envelopes.items()):
        header, ciphertexts = unpack_envelope(data, max_ciphertexts=he.ciphertexts_for(slots))
        if not signature_valid(header, federation.institutions[institution].signing_public):
            raise RoundRefused(f"{institution}'s envelope is not signed by its registered key")
        expected = (round_id.parameters_digest, layout_digest(round_id, slots))
        if (header.parameters_digest, header.layout_digest) != expected:
            raise RoundRefused(f"{institution}'s envelope is of another round or layout")
        parts.append(ciphertexts)
        variance += header.noise_variance
    summed = he.add_encrypted(context, parts)
    header = _header(
        round_id,
        kind="aggregate",
        slots=slots,
        contributors=tuple(sorted(envelopes)),
        variance=variance,
        public_context=federation.public_context,
        federation=federation.name,
    )
    return pack_envelope(header, summed, signing_key=federation.aggregator.signing_private)


def decrypt_sum(federation: Federation, aggregate_envelope: bytes, *, slots: int) -> tuple[EnvelopeHeader, np.ndarray]:
    """The key holder's step: check the aggregator's signature, decrypt the noisy sum (int64, centred mod t)."""
    header, ciphertexts = unpack_envelope(aggregate_envelope, max_ciphertexts=he.ciphertexts_for(slots))
    if header.kind != "aggregate" or not signature_valid(header, federation.aggregator.signing_public):
        raise RoundRefused("the aggregate is not signed by the federation's aggregator: it is not decrypted")
    context = he.load_secret_context(federation.secret_context)
    return header, centred(he.decrypt_vector(context, ciphertexts, slots), he.PLAIN_MODULUS)


def secure_sum(
    federation: Federation,
    vectors: Mapping[str, np.ndarray],
    *,
    round_id: RoundId,
    layers: NoiseLayers,
    generators: Mapping[str, np.random.Generator],
    pay: Callable[[str], None] | None = None,
) -> tuple[RoundSum, dict[str, np.ndarray]]:
    """One round end to end over the institutions in `vectors` (those present): (the key holder's sum, each
    institution's noised vector, for tests only: it never leaves the institution). `pay(aggregate SHA-256)` runs
    before the key holder decrypts (the ledger's charge: only a paid-for sum is decrypted)."""
    contributors = tuple(sorted(vectors))
    if len(contributors) < layers.quorum:
        raise RoundRefused(f"{len(contributors)} institution(s) contributed; the quorum is {layers.quorum}")
    slots = next(iter(vectors.values())).size
    envelopes, noised = {}, {}
    for institution in contributors:
        envelopes[institution], noised[institution] = seal_contribution(
            federation,
            institution,
            vectors[institution],
            round_id=round_id,
            contributors=contributors,
            layers=layers,
            generator=generators[institution],
        )
    aggregate_envelope = aggregate(federation, envelopes, round_id=round_id, slots=slots)
    if pay is not None:
        pay(hashlib.sha256(aggregate_envelope).hexdigest())
    header, total = decrypt_sum(federation, aggregate_envelope, slots=slots)
    result = RoundSum(
        noisy_sum=total,
        contributors=header.contributors,
        noise_variance=header.noise_variance,
        envelope_digests={i: hashlib.sha256(e).hexdigest() for i, e in envelopes.items()},
        aggregate_digest=hashlib.sha256(aggregate_envelope).hexdigest(),
        bytes_per_contributor=max(len(e) for e in envelopes.values()),
    )
    return result, noised
