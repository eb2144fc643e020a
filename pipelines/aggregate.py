"""The aggregator's Beam pipeline: envelopes -> checks -> homomorphic sum -> roster, then aggregate envelope.

The aggregator holds only the public context: it can add ciphertexts but never read them. It runs twice per
release: first over the contributions, closing the roster (included / absent) that starts the unmask round;
then over the contributions and the institutions' answers, removing the self masks and sealing the aggregate,
which it signs. Every envelope it refuses is listed, with its reason, in the aggregate's header (the key
holder records them in `audit`).

An envelope is its signer's (verified signature), never its file name's; and it counts only in its signer's own
place, `contributions/<institution>.fenv` (`unmask/<institution>.fenv` for an answer), because that is where the
institutions answering the roster read each included contribution. One filed under another institution's name
(two envelopes swapped by hand, say) is refused as misnamed, naming the file and both institutions, and the round
goes on without it: accepted under its signer's name instead, it would close a roster nobody can answer.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

from fusion.errors import FusionError
from fusion.keys.registry import check_he_context, load_aggregator_signing_key, load_registry
from fusion.release.exchange import (
    EnvelopePlace,
    FileTooLarge,
    aggregate_path,
    aggregation_status_path,
    contributions_dir,
    delete_if_exists,
    list_files,
    public_context_path,
    public_context_sha256,
    read_bounded,
    read_bytes,
    refusal_path,
    unmask_dir,
    write_bytes,
    write_json,
)
from fusion.release.plan import ReleasePlan
from fusion.runtime.faults import crash_point
from pipelines.contribute import masking_graph
from pipelines.unmask import (
    Roster,
    absent_mask_total,
    acknowledged,
    acknowledgements_needed,
    read_roster,
    removable_noise,
    self_mask_total,
    sparse_roster_problem,
    write_roster,
)
from privacy import he
from privacy.envelope import (
    EnvelopeError,
    EnvelopeHeader,
    PayloadMismatch,
    max_envelope_bytes,
    pack_envelope,
    signature_valid,
    unpack_envelope,
)
from privacy.masking import centred
from privacy.sharing import ShareError

REFUSED = "refused"

_LOADED: dict[tuple[str, str], tuple[bytes, Any]] = {}  # (path, digest) -> (bytes, context), per process


class PublicContext:
    """The exchange's public HE context by path and SHA-256: Beam pickles a few bytes instead of megabytes, and
    each worker process loads (and checks) it once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sha256 = public_context_sha256(path)

    def _load(self) -> tuple[bytes, Any]:
        key = (self.path, self.sha256)
        if key not in _LOADED:
            data = read_bytes(self.path)
            if hashlib.sha256(data).hexdigest() != self.sha256:
                raise FusionError(f"the public HE context {self.path} changed while the aggregator ran")
            _LOADED[key] = (data, he.load_public_context(data))
        return _LOADED[key]

    @property
    def context(self) -> Any:
        return self._load()[1]


class OpenEnvelope(beam.DoFn):
    """path -> (institution, (path, header, ciphertexts)); envelopes that fail a check are tagged refused."""

    def __init__(
        self, plan: ReleasePlan, public_context: PublicContext, registry: dict[str, bytes], roster: Roster | None
    ) -> None:
        self._plan = plan
        self._public_context = public_context
        self._registry = registry
        self._roster = roster
        self._ciphertexts = he.ciphertexts_for(plan.layout.slots)

    def setup(self) -> None:
        self._context = self._public_context.context

    def process(self, path: str) -> Iterator[Any]:
        try:
            data = read_bounded(path, max_envelope_bytes(self._ciphertexts))
        except FileTooLarge as exc:  # not read: no envelope of this layout is that large
            yield TaggedOutput(REFUSED, {"source": path, "institution": "", "reason": f"unreadable: {exc}"})
            return
        try:
            header, ciphertexts = unpack_envelope(data, max_ciphertexts=self._ciphertexts)
        except PayloadMismatch:
            yield TaggedOutput(REFUSED, {"source": path, "institution": "", "reason": "tampered"})
            return
        except EnvelopeError as exc:
            yield TaggedOutput(REFUSED, {"source": path, "institution": "", "reason": f"unreadable: {exc}"})
            return
        institution = header.contributors[0] if header.contributors else ""
        refusal = {"source": path, "institution": institution}
        reason = self._check_signer(header)
        place = EnvelopePlace.of(path)
        if not reason and self._filed_as_another(place, header):
            # Before the release checks: whatever else is wrong with it, the audit says whose it is and where it lay.
            refusal["claimed"] = place.named
            reason = misnamed(place, header.kind, institution)
        reason = reason or self._check_release(header) or self._check_ciphertexts(header, ciphertexts)
        if reason:
            yield TaggedOutput(REFUSED, {**refusal, "reason": reason})
        else:
            yield (header.kind, institution), (path, header, ciphertexts)

    def _filed_as_another(self, place: EnvelopePlace, header: EnvelopeHeader) -> bool:
        """Whether a verified envelope lies in another institution's place, or in the folder of the other kind.
        (A file named after no institution, e.g. a copy, is judged with its signer's other envelopes.)"""
        own = EnvelopePlace.own(header.kind, header.contributors[0])
        registered = {i.id for i in self._plan.config.institutions}
        return place.folder != own.folder or (place.named != own.named and place.named in registered)

    def _check_signer(self, header: EnvelopeHeader) -> str:
        """The checks that establish who signed the envelope, and for which release."""
        plan = self._plan
        registered = {i.id for i in plan.config.institutions}
        if header.kind not in ("contribution", "unmask") or len(header.contributors) != 1:
            return "not_a_contribution"
        if header.federation != plan.key.federation:
            return "wrong_federation"
        if (header.interval_start, header.interval_end) != (
            plan.layout.start.isoformat(),
            plan.layout.end.isoformat(),
        ):
            return "wrong_interval"
        if header.layout_digest != plan.key.layout_digest or header.slots != plan.layout.slots:
            return "wrong_layout"
        if header.parameters_digest != plan.key.parameters_digest:
            return "wrong_parameters"
        if header.contributors[0] not in registered or header.contributors[0] not in self._registry:
            return "unregistered_institution"
        if not header.signature:
            return "unsigned"
        if not signature_valid(header, self._registry[header.contributors[0]]):
            return "bad_signature"
        return ""

    def _check_release(self, header: EnvelopeHeader) -> str:
        """The checks of a signed envelope against this release's public context and roster."""
        if header.context_sha256 != self._public_context.sha256:
            return "wrong_he_context"
        if header.kind == "contribution" and not self._sealed_variance(header.noise_variance):
            # Summed into the aggregate's header, a claim the key holder's error bars and its plausibility check
            # rest on: negative, it would fail the decode after the charge; NaN, it would disable the check.
            return "wrong_noise_variance"
        roster = self._roster
        if header.kind == "contribution" and roster is not None and header.contributors[0] in roster.absent:
            return "declared_absent"  # too late: its masks must keep it unreadable now
        if header.kind == "unmask":
            if roster is None or (tuple(sorted(header.included)), tuple(sorted(header.absent))) != (
                roster.included,
                roster.absent,
            ):
                return "wrong_roster"
            if header.contributors[0] not in roster.included:
                return "declared_absent"
        return ""

    def _sealed_variance(self, claimed: float) -> bool:
        """Whether a contribution's noise variance is the share every institution seals under this plan (with
        noise off, test mode, none or the share: a training round seals its share whatever the config says)."""
        share = self._plan.params.share_variance
        allowed = (share,) if self._plan.params.noise else (0.0, share)
        return math.isfinite(claimed) and any(math.isclose(claimed, a, rel_tol=1e-9, abs_tol=0.0) for a in allowed)

    def _check_ciphertexts(self, header: EnvelopeHeader, ciphertexts: list[bytes]) -> str:
        # An answer is revealed shares alone: the aggregator removes every mask itself.
        expected = 0 if header.kind == "unmask" else he.ciphertexts_for(self._plan.layout.slots)
        if len(ciphertexts) != expected:
            return "wrong_layout"
        sizes = he.ciphertext_sizes(self._plan.layout.slots) if expected else []
        for data, size in zip(ciphertexts, sizes, strict=True):
            try:
                slots = he.check_ciphertext(self._context, data)
            except ValueError:
                return "unreadable_ciphertext"
            if slots != size:  # it would stop the sum of every envelope, the roster already closed on it
                return "wrong_layout"
        return ""


def misnamed(place: EnvelopePlace, kind: str, signer: str) -> str:
    """The reason an envelope signed by `signer` and filed at `place`, not in its own place, is refused."""
    return (
        f"misnamed: signed by {signer}, filed as {place.relative}; it counts only as "
        f"{EnvelopePlace.own(kind, signer).relative} (put it back there, then run `fusion aggregate` again)"
    )


class OnePerInstitution(beam.DoFn):
    """((kind, institution), its signed envelopes) -> the one that counts for it: the one in its own place.

    Copies of it elsewhere (same nonce and payload) are replays, refused, so dropping a copy into the exchange
    cannot knock an institution out; with none in its own place, none counts (misnamed: the institutions answering
    the roster would not find it). Two different envelopes signed by one institution are ambiguous: all are
    refused as duplicates.
    """

    def process(
        self, element: tuple[tuple[str, str], Iterable[tuple[str, EnvelopeHeader, list[bytes]]]]
    ) -> Iterator[Any]:
        (kind, institution), envelopes = element
        own = EnvelopePlace.own(kind, institution)
        envelopes = sorted(envelopes, key=lambda e: (EnvelopePlace.of(e[0]) != own, e[0]))  # its own place first

        def refused(path: str, reason: str) -> TaggedOutput:
            place = EnvelopePlace.of(path)
            claimed = {} if place == own else {"claimed": place.named}
            return TaggedOutput(REFUSED, {"source": path, "institution": institution, **claimed, "reason": reason})

        if len({(h.nonce, h.payload_sha256) for _, h, _ in envelopes}) > 1:
            for path, _, _ in envelopes:
                yield refused(path, "duplicate")
            return
        if EnvelopePlace.of(envelopes[0][0]) != own:
            for path, _, _ in envelopes:
                yield refused(path, misnamed(EnvelopePlace.of(path), kind, institution))
            return
        yield envelopes[0]
        for path, _, _ in envelopes[1:]:
            yield refused(path, "replayed")


#: Encrypted vectors an EncryptedSum accumulator holds before adding them up: one homomorphic sum over several
#: vectors loads each ciphertext once and serializes the total once, where adding them pairwise reloads and
#: reserializes the running total for every vector (about 1 ms a ciphertext); bounded so that an accumulator, and
#: the element SealAggregate receives, stays a few vectors.
PENDING_VECTORS = 16


class EncryptedSum(beam.CombineFn):
    """Collects contribution envelopes for their homomorphic sum. Accumulator and output: (headers, encrypted
    vectors not yet added up, at most PENDING_VECTORS: beyond, they are added up into one). SealAggregate adds
    them up once it needs the total, after the roster is closed (`total`): before, only the headers count."""

    def __init__(self, public_context: PublicContext) -> None:
        self._public_context = public_context

    def _ctx(self) -> Any:
        return self._public_context.context

    def create_accumulator(self) -> tuple[list[EnvelopeHeader], list[list[bytes]]]:
        return [], []

    def add_input(
        self,
        accumulator: tuple[list[EnvelopeHeader], list[list[bytes]]],
        element: tuple[str, EnvelopeHeader, list[bytes]],
    ) -> tuple[list[EnvelopeHeader], list[list[bytes]]]:
        _, header, ciphertexts = element
        return self.merge_accumulators([accumulator, ([header], [ciphertexts] if ciphertexts else [])])

    def merge_accumulators(
        self, accumulators: Iterable[tuple[list[EnvelopeHeader], list[list[bytes]]]]
    ) -> tuple[list[EnvelopeHeader], list[list[bytes]]]:
        headers: list[EnvelopeHeader] = []
        parts: list[list[bytes]] = []
        for acc_headers, acc_parts in accumulators:
            headers.extend(acc_headers)
            parts.extend(acc_parts)
        if len(parts) > PENDING_VECTORS:
            parts = [he.add_encrypted(self._ctx(), parts)]
        return headers, parts

    def extract_output(
        self, accumulator: tuple[list[EnvelopeHeader], list[list[bytes]]]
    ) -> tuple[list[EnvelopeHeader], list[list[bytes]]]:
        return accumulator


def total(context: Any, parts: list[list[bytes]]) -> list[bytes]:
    """The homomorphic sum of EncryptedSum's vectors."""
    return parts[0] if len(parts) == 1 else he.add_encrypted(context, parts)


class SealAggregate(beam.DoFn):
    """The sum -> a refusal (quorum not met), or the roster that starts the unmask round, or (`quorum` answers
    in) the sum with every mask removed, sealed as the aggregate envelope and signed by the aggregator."""

    def __init__(
        self, plan: ReleasePlan, public_context: PublicContext, roster: Roster | None, may_declare: bool
    ) -> None:
        self._plan = plan
        self._public_context = public_context
        self._roster = roster
        self._may_declare = may_declare

    def process(
        self, summed: tuple[list[EnvelopeHeader], list[list[bytes]]], refused: list[dict[str, str]]
    ) -> Iterator[dict[str, Any]]:
        plan, roster = self._plan, self._roster
        all_headers, parts = summed
        headers = {h.contributors[0]: h for h in all_headers if h.kind == "contribution"}
        answers = [h for h in all_headers if h.kind == "unmask"]
        contributors = tuple(sorted(headers))
        expected = {i.id for i in plan.config.institutions}
        missing = sorted(expected - set(contributors))
        summary: dict[str, Any] = {"contributors": list(contributors), "refused": refused, "absent": missing}
        if roster is None and missing and not self._may_declare:
            # Before the deadline the missing may still contribute, below the quorum too: nothing is decided yet.
            delete_if_exists(refusal_path(plan.config.exchange_path, plan.key))
            yield self._status({**summary, "status": "waiting"})
            return
        if len(contributors) < plan.params.quorum or not parts:
            yield self._refuse(
                summary,
                f"quorum not met: {len(contributors)} valid contribution(s), the federation requires "
                f"{plan.params.quorum}",
            )
            return
        delete_if_exists(refusal_path(plan.config.exchange_path, plan.key))
        if roster is None:
            if len(contributors) < acknowledgements_needed(plan):
                yield self._refuse(
                    summary,
                    f"{len(contributors)} valid contribution(s): the unmask round needs "
                    f"{acknowledgements_needed(plan)} included institutions to acknowledge one roster (more than "
                    "(institutions + max_colluding + 1) / 2; (institutions + max_colluding) / 2 at quorum "
                    "max_colluding + 2)",
                )
                return
            unshared = sorted(i for i, h in headers.items() if not h.pair_commitments)
            if missing and unshared:
                yield self._refuse(
                    summary,
                    f"the contributions of {unshared} were sealed by a Fusion version before shared mask keys: their "
                    f"masks with the missing {missing} cannot be removed, so no roster is closed until every "
                    "institution has contributed (or all run this version)",
                )
                return
            # Close the roster: those present are included, the missing declared absent. The unmask round starts.
            closing = Roster(contributors, tuple(missing), plan.key.release_id, datetime.now(UTC).isoformat())
            problem = sparse_roster_problem(masking_graph(plan), closing, max_colluding=plan.params.max_colluding)
            if problem:  # the institutions would refuse to answer it: no roster is closed
                yield self._refuse(summary, problem)
                return
            write_roster(plan, closing)
            yield self._status({**summary, "status": "awaiting_unmask", "unmask_pending": list(contributors)})
            return
        if contributors != roster.included:
            lost = sorted(set(roster.included) - set(contributors))
            misfiled = sorted(
                f"{r['institution']}'s lies at {EnvelopePlace.of(r['source']).relative}"
                for r in refused
                if r["reason"].startswith("misnamed") and r["institution"] in lost
            )
            hint = (
                f" ({', '.join(misfiled)}: put each back as contributions/<its signer>.fenv, then run "
                "`fusion aggregate` again)"
                if misfiled
                else ""
            )
            yield self._refuse(
                summary, f"contributions listed in the roster are missing or were refused: {lost}{hint}"
            )
            return
        answered = {a.contributors[0] for a in answers}
        pending = sorted(set(roster.included) - answered)
        # Every seed and every mask key with an absent institution needs `threshold` shares from its dealer's
        # closed neighbourhood: on the complete graph the threshold is the quorum, and any `quorum` answers do.
        graph = masking_graph(plan)
        if len(answered) < (plan.params.quorum if graph.complete else graph.threshold):
            signers = list(acknowledged(plan, roster))
            yield self._status(
                {**summary, "status": "awaiting_unmask", "unmask_pending": pending, "acknowledged": signers}
            )
            return
        try:
            masks = self_mask_total(plan, headers, answers)
            if roster.absent:
                masks = (masks + absent_mask_total(plan, headers, answers, roster.absent)) % he.PLAIN_MODULUS
        except ShareError as exc:
            if pending:  # a wrong or unreadable share was discarded: the answers still to come may supply good ones
                yield self._status(
                    {
                        **summary,
                        "status": "awaiting_unmask",
                        "unmask_pending": pending,
                        "acknowledged": list(acknowledged(plan, roster)),
                        "reason": f"the masks cannot be removed yet: {exc}",
                    }
                )
                return
            yield self._refuse(summary, f"the masks cannot be removed: {exc}")
            return
        if pending and not self._may_declare and plan.params.layers.removable(len(contributors)):
            # Each answer also removes its sender's excess noise layers: before the deadline, wait for them all.
            yield self._status(
                {
                    **summary,
                    "status": "awaiting_unmask",
                    "unmask_pending": pending,
                    "acknowledged": list(acknowledged(plan, roster)),
                    "reason": "waiting for every included institution's answer, which removes its excess noise",
                }
            )
            return
        layers = removable_noise(plan, headers, answers)
        masks = (masks + layers.noise % he.PLAIN_MODULUS) % he.PLAIN_MODULUS
        unmasking = centred(he.PLAIN_MODULUS - masks, he.PLAIN_MODULUS)
        context = self._public_context.context
        ciphertexts = he.add_plain(context, total(context, parts), unmasking)
        reject_counts: dict[str, dict[str, int]] = {}
        for h in headers.values():
            reject_counts.update(h.reject_counts)
        header = plan.envelope_header(
            kind="aggregate",
            contributors=contributors,
            noise_variance=sum(h.noise_variance for h in headers.values()) - layers.variance,
            context_sha256=self._public_context.sha256,
            reject_counts=reject_counts,
            refused=tuple(refused),
            absent=roster.absent,
            included=roster.included,
        )
        signing_key = load_aggregator_signing_key(plan.config)
        write_bytes(
            aggregate_path(plan.config.exchange_path, plan.key),
            pack_envelope(header, ciphertexts, signing_key=signing_key),
        )
        crash_point("after_sum")
        if layers.kept:
            summary["noise_layers_kept"] = layers.kept
        yield self._status({**summary, "status": "aggregated", "noise_variance": header.noise_variance})

    def _refuse(self, summary: dict[str, Any], reason: str) -> dict[str, Any]:
        exchange = self._plan.config.exchange_path
        delete_if_exists(aggregate_path(exchange, self._plan.key))
        write_json(refusal_path(exchange, self._plan.key), {**summary, "reason": reason})
        return self._status({**summary, "status": "refused", "reason": reason})

    def _status(self, status: dict[str, Any]) -> dict[str, Any]:
        write_json(aggregation_status_path(self._plan.config.exchange_path, self._plan.key), status)
        return status


def envelope_paths(plan: ReleasePlan, roster: Roster | None) -> list[str]:
    """The envelopes the aggregator reads: the contributions, and once a roster is closed, the answers to it."""
    exchange = plan.config.exchange_path
    paths = list_files(contributions_dir(exchange, plan.key), ".fenv")
    if roster is not None:
        paths += list_files(unmask_dir(exchange, plan.key), ".fenv")
    return paths


class Aggregate(beam.PTransform):
    """All contribution envelopes in the exchange for one release -> the aggregate envelope."""

    def __init__(self, plan: ReleasePlan, *, may_declare_absent: bool = True) -> None:
        super().__init__(label="Aggregate")
        self._plan = plan
        self._may_declare = may_declare_absent

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        plan = self._plan
        exchange = plan.config.exchange_path
        roster = read_roster(plan)
        paths = envelope_paths(plan, roster)
        public_context = PublicContext(public_context_path(exchange))
        check_he_context(plan.config, public_context.sha256)
        opened = (
            pbegin
            | "Envelopes" >> beam.Create(paths)
            | "Open"
            >> beam.ParDo(OpenEnvelope(plan, public_context, load_registry(plan.config), roster)).with_outputs(
                REFUSED, main="ok"
            )
        )
        unique = (
            opened.ok
            | "ByInstitution" >> beam.GroupByKey()
            | "OnePerInstitution" >> beam.ParDo(OnePerInstitution()).with_outputs(REFUSED, main="ok")
        )
        refused = (opened[REFUSED], unique[REFUSED]) | "AllRefused" >> beam.Flatten()
        return (
            unique.ok
            | "Sum" >> beam.CombineGlobally(EncryptedSum(public_context))
            | "Seal"
            >> beam.ParDo(
                SealAggregate(plan, public_context, roster, self._may_declare), refused=beam.pvalue.AsList(refused)
            )
        )
