"""The unmask round: once the aggregator closes a release's roster, each included institution answers it.

The roster names the institutions whose contributions are in the sum (included) and those that are not
(absent). The round has two steps for each included institution:
1. *acknowledge*: it checks the roster, records it (create-once, in its own key directory: it will never
   acknowledge or answer another roster for this release) and publishes its signature on it;
2. *answer*, only once more than (n + c + 1) / 2 of the federation's n institutions (c = `max_colluding`) have
   signed that same roster ((n + c) / 2 at quorum c + 2; `acknowledgements_needed`): one signed envelope (no
   ciphertexts) holding, opened from the included institutions' signed contributions,
   - its share of every included institution's self-mask seed, so the aggregator can remove the self masks; and
   - if any institution is absent, its share of the mask key every included institution holds with each absent
     one, so the aggregator can remove the pairwise masks that no longer cancel (never a key between two
     included institutions). Any `quorum` answers therefore complete the release, whoever else drops out
     during the round. On a sparse masking graph (privacy/masking_graph.py) an institution holds, and reveals,
     shares of its closed neighbourhood's secrets only; each secret needs `threshold` of them, and a roster
     that the assumed colluders could use to cut the graph, or that starves a neighbourhood, is refused.
Step 1 is Bonawitz et al.'s consistency check. An honest institution signs one roster per release, so two
different rosters cannot both gather more than (n + c + 1) / 2 signatures (their signers would number more than
n + c + 1, and only the c colluders and the contributor that keeps its own draws sign both): every honest answer
is to one roster, and rosters that differ per institution (a split view) cannot isolate anyone's contribution
with less than the calibrated noise on it. Its contribution is refused if it turns up
after being declared absent (privacy/sharing.py explains the masks).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fusion.errors import FusionError
from fusion.keys.registry import (
    load_aggregator_public_key,
    load_aggregator_signing_key,
    load_agreement_key,
    load_agreement_keys,
    load_registry,
    load_signing_key,
)
from fusion.release.exchange import (
    ENVELOPE_SUFFIX,
    FileTooLarge,
    acknowledgement_path,
    contribution_path,
    contributions_dir,
    exists,
    list_files,
    public_context_path,
    public_context_sha256,
    read_bounded,
    read_head,
    roster_path,
    unmask_path,
    write_bytes,
    write_json,
)
from fusion.release.plan import ReleasePlan, masking_graph
from pipelines.sealing import forget_layer_seed, sealed_layer_seed
from privacy import he
from privacy.envelope import (
    HEADER_PREFIX,
    EnvelopeError,
    EnvelopeHeader,
    header_region_size,
    header_signer,
    pack_envelope,
)
from privacy.masking import pair_term
from privacy.masking_graph import MaskingGraph
from privacy.noise_shares import (
    chain_seeds,
    layer_commitment,
    layer_noise,
    noise_digest,
    roster_signatures_needed,
)
from privacy.sharing import (
    ShareError,
    decode_share,
    encode_share,
    open_share,
    pair_entry,
    pair_key_context,
    reconstruct,
    self_mask,
    share_coordinates,
    share_digest,
)
from privacy.signing import sign, verify


class RosterConflict(FusionError):
    """An institution was asked to answer a second, different roster for a release it already answered."""


@dataclass(frozen=True)
class Roster:
    """Who is in a release's sum (included) and who is not (absent); sorted ids."""

    included: tuple[str, ...]
    absent: tuple[str, ...]

    release_id: str = ""  # the release this roster closes (an answer for one release is no answer for another)
    # When the aggregator closed it (ISO 8601 UTC): answers wait up to the federation's deadline from here for
    # enough signatures to remove their excess noise. Empty in rosters of earlier versions (signed without it).
    closed_at: str = ""

    def to_doc(self) -> dict[str, Any]:
        doc = {"release_id": self.release_id, "included": list(self.included), "absent": list(self.absent)}
        return {**doc, "closed_at": self.closed_at} if self.closed_at else doc


def _canonical(roster: Roster) -> bytes:
    return json.dumps(roster.to_doc(), sort_keys=True, separators=(",", ":")).encode()


def _roster_message(roster: Roster) -> bytes:
    return b"fusion/roster/v1\n" + _canonical(roster)


def _acknowledgement_message(roster: Roster, institution_id: str) -> bytes:
    return f"fusion/roster-acknowledgement/v1\n{institution_id}\n".encode() + _canonical(roster)


def acknowledgements_needed(plan: ReleasePlan) -> int:
    """Signatures on one roster an institution must see before it answers: more than (n + c + 1) / 2 whenever
    its sealed noise share is below the calibrated v (quorum >= c + 3), so that no two rosters can both be answered
    even when the contributor that keeps its own draws signs both with the c colluders; more than (n + c) / 2 at
    quorum c + 2; its own signature below that (test mode only). privacy/noise_shares.py says why."""
    return roster_signatures_needed(
        len(plan.config.institutions), quorum=plan.params.quorum, max_colluding=plan.params.max_colluding
    )


def layer_signatures_needed(plan: ReleasePlan) -> int:
    """Signatures on one roster an institution must see before its answer also reveals its excess noise layers:
    more than (n + c + 1) / 2, counting as a colluder the contributor that keeps its own draws. Two rosters can
    then never both be answered with layers revealed under one of them (their signers would number more than
    n + c + 1), so a split view, which could show an institution a roster larger than the sum it ends up in,
    never removes noise. Below this, an answer still unmasks, and keeps its layers (more noise, never less)."""
    return (len(plan.config.institutions) + plan.params.max_colluding + 1) // 2 + 1


def read_roster(plan: ReleasePlan) -> Roster | None:
    """The roster the aggregator closed for this release, or None if it has not closed one yet. A roster not
    signed by the federation's registered aggregator is refused: anyone else with write access to the exchange
    (the key holder publishes its public HE context there) could otherwise show institutions rosters of its
    own making, and hold the consistency round up (docs/concepts/trust-model.md)."""
    path = roster_path(plan.config.exchange_path, plan.key)
    if not exists(path):
        return None
    try:
        doc = json.loads(read_bounded(path, _roster_bytes(plan)))
        included, absent = doc["included"], doc["absent"]
        release_id, closed_at, signed = (doc.get(field, "") for field in ("release_id", "closed_at", "signature"))
        if not (isinstance(included, list) and isinstance(absent, list)) or not all(
            isinstance(text, str) for text in (*included, *absent, release_id, closed_at, signed)
        ):
            raise TypeError("included and absent must be lists of institution ids, the other fields text")
        roster = Roster(tuple(sorted(included)), tuple(sorted(absent)), release_id, closed_at)
        signature = bytes.fromhex(signed)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, FileTooLarge) as exc:
        raise FusionError(f"the roster {path} is malformed: {str(exc)[:200]}") from None
    if not signature or not verify(load_aggregator_public_key(plan.config), _roster_message(roster), signature):
        raise FusionError(
            f"the roster {path} is not signed by the federation's registered aggregator: it is not answered "
            "(a roster closed by a Fusion version before signed rosters: the aggregator deletes it before any "
            "institution answered, and aggregates again)"
        )
    for side in (roster.included, roster.absent):
        if len(set(side)) != len(side):  # one signature counted twice would let split views through
            raise FusionError(f"the roster {path} names an institution twice: {list(side)}")
    return roster


def _roster_bytes(plan: ReleasePlan) -> int:
    """The most bytes a roster or an acknowledgement of one can hold: its fields, a signature, and each of the
    federation's ids (at most 64 characters) once, indented; anything larger in their place is not read."""
    return 8_192 + 128 * len(plan.config.institutions)


def write_roster(plan: ReleasePlan, roster: Roster) -> None:
    """Close the release's roster, signed with the aggregator's key."""
    signature = sign(load_aggregator_signing_key(plan.config), _roster_message(roster))
    write_json(roster_path(plan.config.exchange_path, plan.key), {**roster.to_doc(), "signature": signature.hex()})


def _answer_file(plan: ReleasePlan, institution_id: str) -> Path:
    keys = Path(plan.config.institution_keys_path(plan.config.institution(institution_id)))
    return keys / "answered" / f"{plan.key.release_id}.json"


def check_roster(plan: ReleasePlan, institution_id: str, roster: Roster) -> None:
    """What an honest institution checks before acknowledging: a partition of the federation, with itself
    included, at least the quorum, and enough included institutions to complete the consistency round."""
    if roster.release_id != plan.key.release_id:
        raise FusionError(
            f"the roster closes release {roster.release_id or '(none named)'}, not {plan.key.release_id}: "
            "the aggregator and this institution disagree on the release's parameters"
        )
    configured = {i.id for i in plan.config.institutions}
    if len(set(roster.included)) != len(roster.included) or len(set(roster.absent)) != len(roster.absent):
        raise FusionError(f"the roster {roster.to_doc()} names an institution twice")
    if set(roster.included) & set(roster.absent) or set(roster.included) | set(roster.absent) != configured:
        raise FusionError(f"the roster {roster.to_doc()} does not partition the federation's institutions")
    if institution_id not in roster.included:
        raise FusionError(f"{institution_id} was declared absent from this release; it has nothing to answer")
    if len(roster.included) < plan.params.quorum:
        raise FusionError(f"the roster includes {len(roster.included)} institutions, below the quorum")
    if len(roster.included) < acknowledgements_needed(plan):
        raise FusionError(
            f"the roster includes {len(roster.included)} institutions; answering needs signatures of "
            f"{acknowledgements_needed(plan)} on one roster (more than half of the federation, its colluders and the "
            "contributor that keeps its own draws)"
        )
    problem = sparse_roster_problem(masking_graph(plan), roster, max_colluding=plan.params.max_colluding)
    if problem:
        raise FusionError(problem)


def sparse_roster_problem(graph: MaskingGraph, roster: Roster, *, max_colluding: int) -> str | None:
    """Why a roster cannot be answered on a sparse masking graph, or None. Its masks must be removable (every
    included institution has `threshold` of its closed neighbourhood included), and no coalition of one included
    institution and `max_colluding` others (c + 1 in all, the coalition the guarantee names) may, with the absent
    ones, split the rest into groups without a mask between them (with the aggregator and key holder it could then
    unmask each group's sum, a group of one included). Never a problem on the complete graph."""
    if graph.complete:
        return None
    short = graph.short_of_shares(roster.included)
    if short:
        listed = ", ".join(f"{i} ({m})" for i, m in sorted(short.items())[:5])
        return (
            f"the roster leaves {len(short)} included institution(s) with fewer than {graph.threshold} of their "
            f"{graph.degree + 1}-member masking neighbourhood included, so their masks could never be removed: "
            f"{listed}"
        )
    split = graph.colluders_to_split(roster.included)
    if split is not None and split <= max_colluding + 1:
        return (
            f"with these absent institutions, {split} included institution(s) could cut the masking graph in two "
            f"and let the aggregator and key holder unmask a part of the sum (the guarantee holds against one "
            f"institution and up to {max_colluding} colluding with it, {max_colluding + 1} in all); the roster is "
            "refused"
        )
    return None


def remember_answer(plan: ReleasePlan, institution_id: str, roster: Roster) -> None:
    """Record (owner-only, before anything is revealed) which roster this institution answers for the release;
    refuse a different one."""
    path = _answer_file(plan, institution_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    doc = json.dumps(roster.to_doc(), sort_keys=True).encode()
    if _create_once(path, doc):
        return
    previous = json.loads(path.read_text())
    if previous != roster.to_doc():
        raise RosterConflict(
            f"{institution_id} already answered the roster {previous} for release {plan.key.release_id} and "
            f"refuses a different one ({roster.to_doc()}): an aggregator that changes a roster after the "
            "unmask round could isolate one institution's contribution"
        )


def acknowledge(plan: ReleasePlan, institution_id: str) -> Roster:
    """Step 1: check the release's roster, record it as the one this institution answers (refusing any other,
    before anything is signed), and publish this institution's signature on it. Idempotent."""
    roster = read_roster(plan)
    if roster is None:
        raise FusionError("the aggregator has not closed this release's roster yet; run `fusion aggregate` first")
    check_roster(plan, institution_id, roster)
    remember_answer(plan, institution_id, roster)
    signature = sign(load_signing_key(plan.config, institution_id), _acknowledgement_message(roster, institution_id))
    doc = {"institution": institution_id, "roster": roster.to_doc(), "signature": signature.hex()}
    write_json(acknowledgement_path(plan.config.exchange_path, plan.key, institution_id), doc)
    return roster


def acknowledged(plan: ReleasePlan, roster: Roster, registry: dict[str, bytes] | None = None) -> tuple[str, ...]:
    """The included institutions whose valid signature on exactly `roster` is in the exchange. A signature on
    another roster, by an unregistered key, or unreadable counts for nothing."""
    registry = load_registry(plan.config) if registry is None else registry
    signers = []
    for institution in sorted(set(roster.included)):  # each institution's signature counts once
        path = acknowledgement_path(plan.config.exchange_path, plan.key, institution)
        if institution not in registry or not exists(path):
            continue
        try:
            signature = bytes.fromhex(json.loads(read_bounded(path, _roster_bytes(plan)))["signature"])
        except (ValueError, KeyError, TypeError, RecursionError, FileTooLarge):
            continue
        if verify(registry[institution], _acknowledgement_message(roster, institution), signature):
            signers.append(institution)
    return tuple(signers)


@dataclass(frozen=True)
class Answer:
    """One institution's step in the unmask round."""

    institution: str
    path: str | None  # its answer envelope, or None: too few institutions have acknowledged its roster yet
    acknowledged: tuple[str, ...]  # who had signed the roster it was shown
    needed: int
    # Not answered yet only so that the answer can also remove the institution's excess noise: it waits for
    # `needed` signatures until this time (ISO 8601), then answers keeping its layers.
    layers_until: str | None = None


def _verified_contribution(plan: ReleasePlan, institution_id: str, registry: dict[str, bytes]) -> EnvelopeHeader:
    path = contribution_path(plan.config.exchange_path, plan.key, institution_id)
    if not exists(path):
        raise MisfiledContribution(_misfiled(plan, institution_id, registry, f"is not at {path}"))
    try:  # only the header: its signature binds the payload, which this party never uses
        header, signer = header_signer(_header_bytes(path), registry)
    except EnvelopeError as exc:
        raise FusionError(f"the contribution of {institution_id} listed as included is unreadable: {exc}") from None
    if signer is not None and signer != institution_id:
        raise MisfiledContribution(_misfiled(plan, institution_id, registry, f"at {path} is {signer}'s, signed by it"))
    if (
        header.kind != "contribution"
        or header.contributors != (institution_id,)
        or (header.layout_digest, header.parameters_digest) != (plan.key.layout_digest, plan.key.parameters_digest)
        or signer != institution_id  # registered, and its valid signature
    ):
        raise FusionError(f"the contribution of {institution_id} listed as included is not valid for this release")
    return header


def _header_bytes(path: str) -> bytes:
    """An envelope file's bytes up to the end of its header, all that `header_signer` reads: not its megabytes of
    ciphertexts (each institution answering a roster reads every contribution of its neighbourhood)."""
    return read_head(path, header_region_size(read_head(path, HEADER_PREFIX)))


class MisfiledContribution(FusionError):
    """An included institution's contribution is not in its place in the exchange (renamed or swapped by hand
    after the roster was closed, or before, under a Fusion version that did not check envelopes' names)."""


def _misfiled(plan: ReleasePlan, institution_id: str, registry: dict[str, bytes], what: str) -> str:
    """Why no answer is given while `institution_id`'s contribution is not in its place, where it is instead (if
    it lies in the contributions folder under another name) and how to go on."""
    own = contribution_path(plan.config.exchange_path, plan.key, institution_id)
    found = []
    for path in list_files(contributions_dir(plan.config.exchange_path, plan.key), ENVELOPE_SUFFIX):
        with contextlib.suppress(EnvelopeError, FusionError):
            if path != own and header_signer(_header_bytes(path), registry)[1] == institution_id:
                found.append(path)
    where = f"; {institution_id}'s own lies at {', '.join(found)}" if found else ""
    return (
        f"the roster includes {institution_id}, but the contribution {what}{where}: envelope files were renamed or "
        "swapped in the exchange (an envelope counts only under its signer's name). No answer is given; put each "
        "envelope back as contributions/<its signer>.fenv, then run `fusion contribute --unmask` again (a lost "
        "one: remove what lies in its place and have its institution run `fusion contribute` again, which "
        "re-publishes its kept envelope)"
    )


def seal_unmask(plan: ReleasePlan, institution_id: str, roster: Roster | None = None) -> Answer:
    """Step 2: once `acknowledgements_needed` institutions have signed the roster this institution acknowledged
    (`roster`, what `acknowledge` returned), write its answer to it. Without `roster`, acknowledges first."""
    roster = roster or acknowledge(plan, institution_id)
    registry = load_registry(plan.config)
    signers = acknowledged(plan, roster, registry)
    needed = acknowledgements_needed(plan)
    if len(signers) < needed:
        return Answer(institution_id, None, signers, needed)
    strong = layer_signatures_needed(plan)
    reveal = len(signers) >= strong
    answered = _answer_file(plan, institution_id).with_suffix(".fenv").exists()
    if not (reveal or answered) and plan.params.layers.removable(len(roster.included)) and plan.params.noise:
        # Answering now would keep this institution's excess noise in the release: before the deadline (from when
        # the roster was closed), wait for the signatures that let the answer remove it, unless none can come.
        until = _layer_wait_until(plan, roster)
        if until is not None and datetime.now(UTC) < until and len(signers) < len(roster.included):
            return Answer(institution_id, None, signers, strong, layers_until=until.isoformat())
    return Answer(institution_id, _seal_answer(plan, institution_id, roster, registry, reveal), signers, needed)


def _layer_wait_until(plan: ReleasePlan, roster: Roster) -> datetime | None:
    """Until when an answer waits for a strong majority of signatures: the roster's closing time plus the
    federation's deadline (None for a roster of an earlier version, which has no closing time)."""
    try:
        closed = datetime.fromisoformat(roster.closed_at)
    except ValueError:
        return None
    return closed.astimezone(UTC) + plan.config.deadline


def _seal_answer(
    plan: ReleasePlan, institution_id: str, roster: Roster, registry: dict[str, bytes], reveal_layers: bool = True
) -> str:
    path = unmask_path(plan.config.exchange_path, plan.key, institution_id)
    kept = _answer_file(plan, institution_id).with_suffix(".fenv")
    if kept.exists():  # answered before (this roster: it is the only one it answers): the same bytes again
        write_bytes(path, kept.read_bytes())
        return path
    graph = masking_graph(plan)
    # Only the contributions of its closed neighbourhood hold shares for it (everyone's on the complete graph).
    contributions = {
        peer: _verified_contribution(plan, peer, registry)
        for peer in roster.included
        if peer in graph.closed(institution_id)
    }
    revealed, revealed_pairs = opened_shares(
        graph,
        institution_id,
        load_agreement_key(plan.config, institution_id),
        load_agreement_keys(plan.config),
        contributions,
        roster,
        context=plan.key.release_id.encode(),
    )
    header = plan.envelope_header(
        kind="unmask",
        revealed_layers=_own_layers(plan, institution_id, roster) if reveal_layers else {},
        contributors=(institution_id,),
        noise_variance=0.0,
        context_sha256=public_context_sha256(public_context_path(plan.config.exchange_path)),
        reject_counts={},
        absent=roster.absent,
        included=roster.included,
        revealed_shares=revealed,
        revealed_pair_shares=revealed_pairs,
    )
    envelope = pack_envelope(header, [], signing_key=load_signing_key(plan.config, institution_id))
    write_bytes(path, _keep_answer(kept, envelope))
    forget_layer_seed(plan, plan.config.institution(institution_id))  # answered: the seed is never needed again
    return path


def opened_shares(
    graph: MaskingGraph,
    institution_id: str,
    own_key: bytes,
    agreement: Mapping[str, bytes],
    contributions: Mapping[str, EnvelopeHeader],
    roster: Roster,
    *,
    context: bytes,
) -> tuple[dict[str, str], dict[str, str]]:
    """What `institution_id` reveals for `roster` from the (verified) `contributions` of its closed neighbourhood:
    (included dealer -> its share of the dealer's self-mask seed, 'dealer/absent' -> its share of the mask key
    the dealer holds with an absent neighbour). Never a key between two included institutions."""
    own_x = share_coordinates(agreement)[institution_id]

    def opened(dealer: str, sealed: str | None, bound: bytes, what: str) -> str:
        if sealed is None:
            raise FusionError(
                f"the contribution of {dealer} holds no {what} share for {institution_id} (a contribution sealed "
                "by a Fusion version before shared mask keys cannot be recovered with institutions absent)"
            )
        try:
            share = open_share(
                sealed, own_key, agreement[dealer], context=bound, sender=dealer, recipient=institution_id
            )
        except ShareError as exc:
            raise FusionError(f"{exc}: {dealer}'s signed contribution is faulty, so no answer is given") from None
        if share[0] != own_x:
            raise FusionError(f"the {what} share {dealer} sealed for {institution_id} has the wrong coordinate")
        return encode_share(share)

    revealed, revealed_pairs = {}, {}
    holds = set(graph.closed(institution_id))
    for peer in roster.included:
        if peer not in holds:
            continue
        header = contributions[peer]
        revealed[peer] = opened(peer, header.seed_shares.get(institution_id), context, "seed")
        for absent in roster.absent:  # only keys with absent institutions: included ones' masks still cancel
            if not graph.adjacent(peer, absent):
                continue  # no mask between them
            entry = pair_entry(peer, absent)
            bound = pair_key_context(context, dealer=peer, peer=absent)
            sealed = header.pair_shares.get(pair_entry(absent, institution_id))
            revealed_pairs[entry] = opened(peer, sealed, bound, f"mask-key ({peer}, {absent})")
    return revealed, revealed_pairs


def _own_layers(plan: ReleasePlan, institution_id: str, roster: Roster) -> dict[str, str]:
    """{institution: "layer:seed"}: the seed of the highest of its own noise layers that the roster's size makes
    removable (layers quorum..n-1 for n included; privacy/noise_shares.py), or {} when none is (every institution
    contributed at the quorum, or it kept no seed)."""
    removable = plan.params.layers.removable(len(roster.included)) if plan.params.noise else ()
    seed = sealed_layer_seed(plan, plan.config.institution(institution_id)) if removable else None
    if seed is None:
        return {}
    top = plan.params.layers.levels[-1]
    revealed = chain_seeds(seed, top=top, bottom=removable[-1])[removable[-1]]
    return {institution_id: f"{removable[-1]}:{revealed.hex()}"}


def _keep_answer(kept: Path, envelope: bytes) -> bytes:
    """Keep the answer (owner-only, create-once) before publishing it; returns what to publish: the answer
    another run of this institution kept first, if one did."""
    return envelope if _create_once(kept, envelope) else kept.read_bytes()


def _create_once(path: Path, data: bytes) -> bool:
    """Write `data` whole to an owner-only sibling, then link it into place: False (and nothing written) if
    `path` exists. A crash never leaves a partial file, and of two racing runs exactly one creates it."""
    pending = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    descriptor = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(pending, path)
    except FileExistsError:
        return False
    finally:
        pending.unlink(missing_ok=True)
    return True


def _valid_shares(
    graph: MaskingGraph,
    answers: Mapping[str, EnvelopeHeader],
    revealed: Any,
    digests: Any,
    *,
    dealer: str,
    bound: bytes,
) -> dict[int, int]:
    """x -> y of the shares of one secret of `dealer` that the answers of its closed neighbourhood reveal
    (`revealed(answer)`, None when an answer has none) and whose digest matches the one the dealer signed for the
    sender (`digests(sender)`); a wrong or malformed share is discarded on its own."""
    xs = share_coordinates(graph.ring)
    shares: dict[int, int] = {}
    for sender in graph.closed(dealer):
        answer = answers.get(sender)
        text = None if answer is None else revealed(answer)
        if text is None:
            continue
        try:
            x, y = decode_share(text)
        except ShareError:
            continue
        digest = share_digest((x, y), context=bound, dealer=dealer, recipient=sender)
        if x == xs.get(sender) and secrets.compare_digest(digest, digests(sender)):
            shares[x] = y
    return shares


def _by_sender(answers: list[EnvelopeHeader]) -> dict[str, EnvelopeHeader]:
    return {a.contributors[0]: a for a in answers if len(a.contributors) == 1}


def self_mask_total(
    plan: ReleasePlan, contributions: dict[str, EnvelopeHeader], answers: list[EnvelopeHeader]
) -> np.ndarray:
    """The aggregator's step: the sum (mod t) of every included institution's self mask, from its seed
    reconstructed out of the revealed shares and checked against its commitment. Raises ShareError."""
    return self_mask_sum(
        masking_graph(plan), contributions, answers, slots=plan.layout.slots, context=plan.key.release_id.encode()
    )


def self_mask_sum(
    graph: MaskingGraph,
    contributions: Mapping[str, EnvelopeHeader],
    answers: list[EnvelopeHeader],
    *,
    slots: int,
    context: bytes,
) -> np.ndarray:
    """`self_mask_total` on the masking graph `graph`: each seed from `graph.threshold` shares revealed by its
    dealer's closed neighbourhood (O(n k) shares in all)."""
    by_sender = _by_sender(answers)
    total = np.zeros(slots, dtype=np.int64)
    for institution, header in sorted(contributions.items()):
        shares = _valid_shares(
            graph,
            by_sender,
            lambda a, i=institution: a.revealed_shares.get(i),
            lambda sender, h=header: h.share_digests.get(sender, ""),
            dealer=institution,
            bound=context,
        )
        seed = reconstruct(shares, threshold=graph.threshold, expected=header.seed_commitment, context=context)
        mask = self_mask(seed, slots=slots, modulus=he.PLAIN_MODULUS, context=context)
        total = (total + mask) % he.PLAIN_MODULUS
    return total


def absent_mask_total(
    plan: ReleasePlan, contributions: dict[str, EnvelopeHeader], answers: list[EnvelopeHeader], absent: tuple[str, ...]
) -> np.ndarray:
    """The aggregator's step when institutions are absent: the sum (mod t) of the pairwise masks each included
    institution added for the absent ones (they no longer cancel), from the mask keys reconstructed out of the
    revealed shares and checked against the commitments their dealers signed. Raises ShareError."""
    return absent_mask_sum(
        masking_graph(plan),
        contributions,
        answers,
        absent,
        slots=plan.layout.slots,
        context=plan.key.release_id.encode(),
    )


def absent_mask_sum(
    graph: MaskingGraph,
    contributions: Mapping[str, EnvelopeHeader],
    answers: list[EnvelopeHeader],
    absent: tuple[str, ...],
    *,
    slots: int,
    context: bytes,
) -> np.ndarray:
    """`absent_mask_total` on the masking graph `graph`: only the masks between an included dealer and its
    absent neighbours, each key from `graph.threshold` shares revealed by the dealer's closed neighbourhood."""
    by_sender = _by_sender(answers)
    total = np.zeros(slots, dtype=np.int64)
    for dealer, header in sorted(contributions.items()):
        for peer in absent:
            if not graph.adjacent(dealer, peer):
                continue  # no mask between them
            entry = pair_entry(dealer, peer)
            bound = pair_key_context(context, dealer=dealer, peer=peer)
            expected = header.pair_commitments.get(peer)
            if expected is None:
                raise ShareError(
                    f"the contribution of {dealer} commits to no mask key with {peer} (sealed by a Fusion version "
                    "before shared mask keys)"
                )
            shares = _valid_shares(
                graph,
                by_sender,
                lambda a, e=entry: a.revealed_pair_shares.get(e),
                lambda sender, h=header, p=peer: h.pair_share_digests.get(pair_entry(p, sender), ""),
                dealer=dealer,
                bound=bound,
            )
            key = reconstruct(shares, threshold=graph.threshold, expected=expected, context=bound)
            term = pair_term(dealer, peer, key, slots=slots, modulus=he.PLAIN_MODULUS)
            total = (total + term) % he.PLAIN_MODULUS
    return total


def removed_masks(
    plan: ReleasePlan, contributions: dict[str, EnvelopeHeader], answers: list[EnvelopeHeader], absent: tuple[str, ...]
) -> np.ndarray:
    """The masks the aggregator removes from the sum of `contributions` (included institutions by id), mod t:
    every self mask, and with institutions `absent` every mask held with them. Raises ShareError."""
    masks = self_mask_total(plan, contributions, answers)
    if absent:
        masks = (masks + absent_mask_total(plan, contributions, answers, absent)) % he.PLAIN_MODULUS
    return masks


@dataclass(frozen=True)
class RemovedLayers:
    """The noise layers the aggregator removes: their sum (int64 slots), the variance they took out, the reveals
    they came from ({institution: "layer:seed hex"}, which the aggregate's header records, so that the key holder
    removes the same ones whatever answers came later), and why a contributor's layers stayed (its noise is then
    larger than needed, never smaller)."""

    noise: np.ndarray
    variance: float
    kept: dict[str, str]
    revealed: dict[str, str] = field(default_factory=dict)


def revealed_layers(answers: list[EnvelopeHeader]) -> dict[str, str]:
    """{sender: "layer:seed hex"} of the answers that reveal their sender's top removable noise layer."""
    revealed = {a.contributors[0]: a.revealed_layers.get(a.contributors[0]) for a in answers if a.contributors}
    return {sender: text for sender, text in revealed.items() if text is not None}


def removable_noise(
    plan: ReleasePlan, contributions: dict[str, EnvelopeHeader], revealed: Mapping[str, str]
) -> RemovedLayers:
    """The aggregator's step (and the key holder's, over the reveals the aggregate names): for each included
    institution whose top removable layer `revealed` holds ({institution: "layer:seed hex"}: `revealed_layers`
    of the answers), derive the seeds of layers quorum..n-1, check each against the commitment it signed, draw
    the layers and check them against their digests. A reveal that fails a check is ignored (its layers stay in
    the sum)."""
    layers = plan.params.layers
    context = plan.key.release_id.encode()
    removable = layers.removable(len(contributions)) if plan.params.noise else ()
    total = np.zeros(plan.layout.slots, dtype=np.int64)
    removed, kept, used = 0.0, {}, {}
    if not removable:
        return RemovedLayers(total, 0.0, {})
    for institution, header in sorted(contributions.items()):
        text = revealed.get(institution)
        try:
            level_text, seed_hex = (text or "").split(":")
            level, seed = int(level_text), bytes.fromhex(seed_hex)
        except ValueError:
            kept[institution] = "revealed no noise layer" if text is None else "malformed layer"
            continue
        if level != removable[-1]:  # checked before the chain is walked: a level of 10^15 would hash for ever
            kept[institution] = f"revealed layer {level_text[:20]}, the roster makes {removable[-1]} the top one"
            continue
        try:
            seeds = chain_seeds(seed, top=level, bottom=removable[0])
        except ValueError:
            kept[institution] = "malformed layer"
            continue
        draws = []
        for level in removable:
            seed = seeds[level]
            if not secrets.compare_digest(
                layer_commitment(seed, level=level, context=context), header.layer_commitments.get(str(level), "")
            ):
                kept[institution] = f"layer {level}'s seed does not match its commitment"
                break
            digest = header.layer_digests.get(str(level), "")
            noise = _revealed_layer(seed, level=level, variance=layers.layer(level), slots=plan.layout.slots,
                                    context=context, digest=digest)
            if noise is None:
                kept[institution] = (
                    f"layer {level} regenerates differently (the parties' NumPy versions differ: upgrade in lockstep)"
                )
                break
            draws.append(noise)
        else:
            for noise in draws:
                total += noise
            removed += sum(layers.layer(level) for level in removable)
            used[institution] = str(text)
    return RemovedLayers(total, removed, kept, used)


#: Revealed noise layers this process drew and checked, by (seed, level, variance, slots, release, the digest
#: their contributor signed): the key holder, recomputing an aggregate sealed in this process (`fusion batch`, the
#: stream), takes them from here instead of drawing them again (drawing is most of `removable_noise`'s time). Only
#: revealed layers, which no longer protect anything, are kept; at most _LAYERS_KEPT_BYTES of them.
_LAYERS: OrderedDict[tuple[bytes, int, float, int, bytes, str], np.ndarray] = OrderedDict()
_LAYERS_KEPT_BYTES = 64 << 20
_LAYERS_LOCK = threading.Lock()


def _revealed_layer(
    seed: bytes, *, level: int, variance: float, slots: int, context: bytes, digest: str
) -> np.ndarray | None:
    """The revealed layer's noise (int64 slots, read-only), drawn from its seed, or None if it does not match the
    `digest` its contributor signed."""
    key = (seed, level, variance, slots, context, digest)
    with _LAYERS_LOCK:
        kept = _LAYERS.get(key)
        if kept is not None:
            _LAYERS.move_to_end(key)
            return kept
    noise = layer_noise(seed, variance=variance, slots=slots, context=context)
    if not secrets.compare_digest(noise_digest(noise, seed=seed, level=level, context=context), digest):
        return None
    noise.flags.writeable = False
    with _LAYERS_LOCK:
        _LAYERS[key] = noise
        while sum(a.nbytes for a in _LAYERS.values()) > _LAYERS_KEPT_BYTES:
            _LAYERS.popitem(last=False)
    return noise
