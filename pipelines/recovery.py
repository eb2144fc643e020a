"""The recovery round: when institutions are declared absent, each survivor removes its masks with them.

A survivor's correction is the negation of its pairwise masks with the absent institutions, encrypted and
signed like a contribution; the aggregator adds the corrections of every survivor to the sum. No mask key is
revealed, and an absent institution's own envelope (if it turns up late) is refused, so its masks keep it
unreadable.
"""

from __future__ import annotations

import hashlib
import json

from fusion.errors import FusionError
from fusion.exchange import absent_path, correction_path, exists, public_context_path, read_bytes, write_bytes
from fusion.plan import ReleasePlan
from fusion.registry import load_agreement_key, load_agreement_keys, load_signing_key
from privacy import he
from privacy.envelope import pack_envelope
from privacy.masking import centred, recovery_correction


def declared_absent(plan: ReleasePlan) -> tuple[str, ...]:
    """The institutions the aggregator declared absent for this release (empty if none were)."""
    path = absent_path(plan.config.exchange_path, plan.key)
    return tuple(json.loads(read_bytes(path))["absent"]) if exists(path) else ()


def seal_correction(plan: ReleasePlan, institution_id: str) -> str:
    """Write `institution_id`'s correction envelope for the declared absent set; returns its path."""
    absent = declared_absent(plan)
    if not absent:
        raise FusionError("no institution was declared absent for this release: there is nothing to recover")
    if institution_id in absent:
        raise FusionError(f"{institution_id} was declared absent from this release; it cannot send a correction")
    peers = load_agreement_keys(plan.config)
    correction = recovery_correction(
        institution_id,
        load_agreement_key(plan.config, institution_id),
        {a: peers[a] for a in absent},
        slots=plan.layout.slots,
        modulus=he.PLAIN_MODULUS,
        context=plan.key.release_id.encode(),
    )
    public_context = read_bytes(public_context_path(plan.config.exchange_path))
    ciphertexts = he.encrypt_vector(
        he.load_public_context(public_context), centred(correction, he.PLAIN_MODULUS), residues=True
    )
    header = plan.envelope_header(
        kind="correction",
        contributors=(institution_id,),
        noise_variance=0.0,
        context_sha256=hashlib.sha256(public_context).hexdigest(),
        reject_counts={},
        absent=absent,
    )
    path = correction_path(plan.config.exchange_path, plan.key, institution_id)
    write_bytes(path, pack_envelope(header, ciphertexts, signing_key=load_signing_key(plan.config, institution_id)))
    return path
