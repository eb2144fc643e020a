"""The aggregate envelope, made from the included contributions and the answers to the roster: the aggregator seals
it (pipelines/aggregate.py), and the key holder makes it again before it charges anything (pipelines/release.py).

The aggregator adds a plaintext vector to the homomorphic sum of the included contributions (the vector that
removes the self masks, the masks held with absent institutions and the excess noise layers the answers reveal)
and signs the result. Its signature says who sealed the aggregate, not what it holds: an aggregator that added an
offset to that vector would shift released cells at will. So the key holder recomputes the aggregate from the
exchange with the aggregator's own steps, over exactly the roster the aggregate names: each included
institution's contribution in its own place, checked as the aggregator checks it (pipelines/envelope_checks.py);
the answers, whose shares rebuild every mask (each share checked against the digest its dealer signed, each
secret against its commitment, so the masks are the same whichever answers rebuild them); and the noise layers
the aggregate says it removed, each checked against the commitments its contributor signed. A plaintext is added
deterministically, so an honest aggregate has exactly the recomputed ciphertexts (and header fields); any other
is refused before the charge. Nothing is decrypted here, and the key holder decrypts only the aggregate, once it
matches: never one contribution or a partial sum.

In a process that sealed the aggregate itself (`fusion batch`, the stream), the sum of the contributions and the
revealed noise layers it computed are taken up again, by the signed digests they were computed from: there the
check costs the masks and one plaintext addition (about 20 ms for 5 institutions and 48,025 slots, against
about 110 ms in a key holder's own process: docs/performance.md).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from fusion.keys.registry import load_registry
from fusion.release.exchange import contribution_path, exists, public_context_path, unmask_path
from fusion.release.plan import ReleasePlan
from pipelines.envelope_checks import EnvelopeChecks, PublicContext
from pipelines.unmask import RemovedLayers, Roster, removable_noise, removed_masks
from privacy import he
from privacy.envelope import EnvelopeHeader, payload_digest
from privacy.masking import centred
from privacy.sharing import ShareError

#: The aggregate is not what its roster's signed contributions and answers give.
AGGREGATE_MISMATCH = "aggregate_mismatch"
#: What the aggregate is made of is no longer all in the exchange (or no longer passes the aggregator's checks).
AGGREGATE_UNVERIFIABLE = "aggregate_unverifiable"
#: Header fields a recomputation does not give: fresh at each sealing (nonce, time), the payload's (compared as
#: ciphertexts), the signature, the aggregator's list of the envelopes it refused (what the exchange held then),
#: and the noise variance (a float, compared to within rounding).
_NOT_RECOMPUTED = frozenset({"nonce", "created_at", "payload_sha256", "signature", "refused", "noise_variance"})


def total(context: Any, parts: list[list[bytes]]) -> list[bytes]:
    """The homomorphic sum of encrypted vectors (EncryptedSum's, pipelines/aggregate.py)."""
    return parts[0] if len(parts) == 1 else he.add_encrypted(context, parts)


#: Homomorphic sums of contributions this process computed, by the public context's SHA-256 and the payload
#: SHA-256s of the contributions summed (each signed in its institution's header, and checked against the
#: ciphertexts before they were summed). The key holder, recomputing an aggregate sealed in this process (`fusion
#: batch`, the stream), takes the sum from here instead of reading, inflating and adding the contributions again.
#: At most _SUMS_KEPT_BYTES of them: a stream's burst of windows is aggregated whole before the key holder's step
#: (24 windows of one ciphertext each are 6 MB; one release of the bench's 48,025 slots, 1.5 MB).
_SUMS: OrderedDict[tuple[str, tuple[str, ...]], list[bytes]] = OrderedDict()
_SUMS_KEPT_BYTES = 64 << 20
_SUMS_LOCK = threading.Lock()


def contributions_sum(
    public_context: PublicContext, contributions: Mapping[str, EnvelopeHeader], parts: list[list[bytes]]
) -> list[bytes]:
    """`total` of `parts`, the ciphertexts of `contributions` (headers by institution, whose payloads they are)."""
    summed = total(public_context.context, parts)
    with _SUMS_LOCK:
        _SUMS[_sum_key(public_context, contributions)] = summed
        while sum(len(c) for cs in _SUMS.values() for c in cs) > _SUMS_KEPT_BYTES:
            _SUMS.popitem(last=False)
    return summed


def remembered_sum(public_context: PublicContext, contributions: Mapping[str, EnvelopeHeader]) -> list[bytes] | None:
    """The sum of `contributions` if this process computed it (`contributions_sum`), else None."""
    with _SUMS_LOCK:
        return _SUMS.get(_sum_key(public_context, contributions))


def _sum_key(public_context: PublicContext, contributions: Mapping[str, EnvelopeHeader]) -> tuple[str, tuple[str, ...]]:
    return public_context.sha256, tuple(sorted(h.payload_sha256 for h in contributions.values()))


def unmasked_sum(context: Any, summed: list[bytes], masks: np.ndarray, layers: RemovedLayers) -> list[bytes]:
    """The aggregate's ciphertexts: the homomorphic sum of the contributions (`contributions_sum`) plus the
    plaintext vector that removes `masks` (their sum mod t, `removed_masks`) and the noise `layers`."""
    masks = (masks + layers.noise % he.PLAIN_MODULUS) % he.PLAIN_MODULUS
    return he.add_plain(context, summed, centred(he.PLAIN_MODULUS - masks, he.PLAIN_MODULUS))


def aggregate_header(
    plan: ReleasePlan,
    *,
    context_sha256: str,
    contributions: Mapping[str, EnvelopeHeader],
    roster: Roster,
    layers: RemovedLayers,
    refused: tuple[dict[str, str], ...],
) -> EnvelopeHeader:
    """The aggregate's header for the `contributions` (by institution) of `roster`'s included institutions, less
    the noise `layers` removed, naming the reveals they came from (so that the key holder removes the same ones,
    whatever answers came later); unsigned, its payload digest filled in when it is packed."""
    reject_counts: dict[str, dict[str, int]] = {}
    for _, h in sorted(contributions.items()):
        reject_counts.update(h.reject_counts)
    return plan.envelope_header(
        kind="aggregate",
        contributors=tuple(sorted(contributions)),
        # fsum: the same float whatever order the contributions come in
        noise_variance=math.fsum(h.noise_variance for h in contributions.values()) - layers.variance,
        context_sha256=context_sha256,
        reject_counts=reject_counts,
        refused=refused,
        absent=roster.absent,
        included=roster.included,
        revealed_layers=layers.revealed,
    )


@dataclass(frozen=True)
class AggregateProblem:
    """Why the key holder does not release an aggregate: `reason`, its code in `audit`, and what it found."""

    reason: str
    found: str


def recompute_problem(plan: ReleasePlan, header: EnvelopeHeader) -> AggregateProblem | None:
    """The key holder's check of a signed aggregate (its `header`: its payload digest binds its ciphertexts):
    None if recomputing it from the exchange gives the same ciphertexts and header, else what differs."""
    exchange = plan.config.exchange_path
    roster = Roster(tuple(sorted(header.included)), tuple(sorted(header.absent)), plan.key.release_id)
    named = [*roster.included, *roster.absent]
    if len(set(named)) != len(named) or set(named) != {i.id for i in plan.config.institutions}:
        return _mismatch(
            f"its roster (included {list(roster.included)}, absent {list(roster.absent)}) does not partition the "
            "federation's institutions"
        )
    if header.contributors != roster.included:
        return _mismatch(f"it names contributors {list(header.contributors)}, its roster {list(roster.included)}")
    public_context = PublicContext(public_context_path(exchange))
    if public_context.sha256 != header.context_sha256:
        return _unverifiable("the exchange's public HE context is not the one the aggregate was sealed under")
    checks = EnvelopeChecks(plan, public_context, load_registry(plan.config), roster)
    included = _included_sum(plan, checks, roster, public_context)
    if isinstance(included, AggregateProblem):
        return included
    contributions, summed = included
    answers = []
    for institution in roster.included:  # an answer counts only in its own place, as the aggregator counts it
        path = unmask_path(exchange, plan.key, institution)
        answer = checks.open(path) if exists(path) else {}
        if not isinstance(answer, dict):
            answers.append(answer[1][1])
    try:
        masks = removed_masks(plan, contributions, answers, roster.absent)
    except ShareError as exc:
        return _unverifiable(f"the answers in the exchange do not rebuild its masks ({exc})")
    layers = removable_noise(plan, contributions, header.revealed_layers)
    if layers.revealed != header.revealed_layers:
        wrong = sorted(set(header.revealed_layers) - set(layers.revealed))
        kept = "; ".join(f"{i}: {layers.kept.get(i, 'no removable layer of an included contributor')}" for i in wrong)
        return _mismatch(f"it removes noise layers its contributions do not commit to ({kept})")
    expected = aggregate_header(
        plan,
        context_sha256=public_context.sha256,
        contributions=contributions,
        roster=roster,
        layers=layers,
        refused=header.refused,
    )
    differ = [
        f.name
        for f in fields(EnvelopeHeader)
        if f.name not in _NOT_RECOMPUTED and getattr(expected, f.name) != getattr(header, f.name)
    ]
    if not math.isclose(expected.noise_variance, header.noise_variance, rel_tol=1e-12, abs_tol=0.0):
        differ.append("noise_variance")
    if differ:
        return _mismatch(f"its header's {', '.join(differ)} differ from what its contributions give")
    if payload_digest(unmasked_sum(public_context.context, summed, masks, layers)) != header.payload_sha256:
        return _mismatch(
            "its ciphertexts are not the sum of its roster's contributions plus the vector that removes their masks "
            "and the noise layers it names"
        )
    return None


def _included_sum(
    plan: ReleasePlan, checks: EnvelopeChecks, roster: Roster, public_context: PublicContext
) -> tuple[dict[str, EnvelopeHeader], list[bytes]] | AggregateProblem:
    """(the included institutions' contributions by id, their homomorphic sum), each contribution read from its
    own place and checked as the aggregator checks it; the sum remembered if this process computed it."""
    exchange = plan.config.exchange_path
    contributions: dict[str, EnvelopeHeader] = {}
    for institution in roster.included:  # the headers first: their signatures bind the payloads' digests
        path = contribution_path(exchange, plan.key, institution)
        opened = checks.open_header(path) if exists(path) else {"reason": f"no file at {path}"}
        if isinstance(opened, dict):
            return _unverifiable(f"the contribution of {institution}: {opened['reason']}")
        contributions[institution] = opened[1]
    summed = remembered_sum(public_context, contributions)
    if summed is not None:
        return contributions, summed
    parts = []  # not summed in this process: read, check and add up the ciphertexts
    for institution in roster.included:
        full = checks.open(contribution_path(exchange, plan.key, institution))
        if isinstance(full, dict):
            return _unverifiable(f"the contribution of {institution}: {full['reason']}")
        _, (_, contributions[institution], ciphertexts) = full
        parts.append(ciphertexts)
    return contributions, contributions_sum(public_context, contributions, parts)


def _mismatch(found: str) -> AggregateProblem:
    return AggregateProblem(AGGREGATE_MISMATCH, found)


def _unverifiable(found: str) -> AggregateProblem:
    return AggregateProblem(AGGREGATE_UNVERIFIABLE, found)
