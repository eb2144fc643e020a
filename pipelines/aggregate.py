"""The aggregator's Beam pipeline: contribution envelopes -> checks -> homomorphic sum -> aggregate envelope.

The aggregator holds only the public context: it can add ciphertexts but never read them. Every envelope it
refuses is listed, with its reason, in the aggregate's header (the key holder records them in `audit`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

from fusion.exchange import (
    absent_path,
    aggregate_path,
    aggregation_status_path,
    contributions_dir,
    corrections_dir,
    delete_if_exists,
    list_files,
    public_context_path,
    read_bytes,
    refusal_path,
    write_bytes,
    write_json,
)
from fusion.faults import crash_point
from fusion.plan import ReleasePlan
from fusion.registry import load_registry
from pipelines.recovery import declared_absent
from privacy import he
from privacy.envelope import (
    EnvelopeError,
    EnvelopeHeader,
    PayloadMismatch,
    pack_envelope,
    signature_valid,
    unpack_envelope,
)

REFUSED = "refused"


class OpenEnvelope(beam.DoFn):
    """path -> (institution, (path, header, ciphertexts)); envelopes that fail a check are tagged refused."""

    def __init__(
        self, plan: ReleasePlan, public_context: bytes, registry: dict[str, bytes], absent: tuple[str, ...]
    ) -> None:
        self._plan = plan
        self._public_context = public_context
        self._registry = registry
        self._absent = absent

    def setup(self) -> None:
        self._context = he.load_public_context(self._public_context)

    def process(self, path: str) -> Iterator[Any]:
        try:
            header, ciphertexts = unpack_envelope(read_bytes(path))
        except PayloadMismatch:
            yield TaggedOutput(REFUSED, {"source": path, "institution": "", "reason": "tampered"})
            return
        except EnvelopeError as exc:
            yield TaggedOutput(REFUSED, {"source": path, "institution": "", "reason": f"unreadable: {exc}"})
            return
        reason = self._check(header) or self._check_ciphertexts(ciphertexts)
        institution = header.contributors[0] if header.contributors else ""
        if reason:
            yield TaggedOutput(REFUSED, {"source": path, "institution": institution, "reason": reason})
        else:
            yield (header.kind, institution), (path, header, ciphertexts)

    def _check(self, header: EnvelopeHeader) -> str:
        plan = self._plan
        registered = {i.id for i in plan.config.institutions}
        if header.kind not in ("contribution", "correction") or len(header.contributors) != 1:
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
        if header.context_sha256 != hashlib.sha256(self._public_context).hexdigest():
            return "wrong_he_context"
        if header.kind == "contribution" and header.contributors[0] in self._absent:
            return "declared_absent"  # too late: its masks must keep it unreadable now
        if header.kind == "correction" and set(header.absent) != set(self._absent):
            return "wrong_absent_set"
        return ""

    def _check_ciphertexts(self, ciphertexts: list[bytes]) -> str:
        if len(ciphertexts) != he.ciphertexts_for(self._plan.layout.slots):
            return "wrong_layout"
        try:
            for data in ciphertexts:
                he.check_ciphertext(self._context, data)
        except ValueError:
            return "unreadable_ciphertext"
        return ""


class OnePerInstitution(beam.DoFn):
    """(institution, signed envelopes) -> one envelope per institution.

    Copies of one signed envelope (same nonce and payload) are replays: the first by path is kept and the copies
    are refused, so dropping a copy into the exchange cannot knock an institution out. Two different envelopes
    signed by one institution are ambiguous: both are refused as duplicates.
    """

    def process(
        self, element: tuple[tuple[str, str], Iterable[tuple[str, EnvelopeHeader, list[bytes]]]]
    ) -> Iterator[Any]:
        (_, institution), envelopes = element
        envelopes = sorted(envelopes, key=lambda e: e[0])
        distinct = {(h.nonce, h.payload_sha256) for _, h, _ in envelopes}
        if len(distinct) == 1:
            yield envelopes[0]
            for path, _, _ in envelopes[1:]:
                yield TaggedOutput(REFUSED, {"source": path, "institution": institution, "reason": "replayed"})
            return
        for path, _, _ in envelopes:
            yield TaggedOutput(REFUSED, {"source": path, "institution": institution, "reason": "duplicate"})


class EncryptedSum(beam.CombineFn):
    """Sums contribution envelopes homomorphically. Accumulator: (headers, summed ciphertexts or None)."""

    def __init__(self, public_context: bytes) -> None:
        self._public_context = public_context
        self._context: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_public_context": self._public_context, "_context": None}

    def _ctx(self) -> Any:
        if self._context is None:
            self._context = he.load_public_context(self._public_context)
        return self._context

    def create_accumulator(self) -> tuple[list[EnvelopeHeader], list[bytes] | None]:
        return [], None

    def add_input(
        self,
        accumulator: tuple[list[EnvelopeHeader], list[bytes] | None],
        element: tuple[str, EnvelopeHeader, list[bytes]],
    ) -> tuple[list[EnvelopeHeader], list[bytes] | None]:
        _, header, ciphertexts = element
        return self.merge_accumulators([accumulator, ([header], ciphertexts)])

    def merge_accumulators(
        self, accumulators: Iterable[tuple[list[EnvelopeHeader], list[bytes] | None]]
    ) -> tuple[list[EnvelopeHeader], list[bytes] | None]:
        headers: list[EnvelopeHeader] = []
        parts: list[list[bytes]] = []
        for acc_headers, acc_ciphertexts in accumulators:
            headers.extend(acc_headers)
            if acc_ciphertexts is not None:
                parts.append(acc_ciphertexts)
        if not parts:
            return headers, None
        return headers, (parts[0] if len(parts) == 1 else he.add_encrypted(self._ctx(), parts))

    def extract_output(
        self, accumulator: tuple[list[EnvelopeHeader], list[bytes] | None]
    ) -> tuple[list[EnvelopeHeader], list[bytes] | None]:
        return accumulator


class SealAggregate(beam.DoFn):
    """The sum -> an aggregate envelope if the quorum is met and every mask cancels; otherwise a refusal file,
    or (institutions missing) a declaration of who is absent, which starts the recovery round."""

    def __init__(self, plan: ReleasePlan, absent: tuple[str, ...], may_declare: bool) -> None:
        self._plan = plan
        self._absent = absent
        self._may_declare = may_declare

    def process(
        self, summed: tuple[list[EnvelopeHeader], list[bytes] | None], refused: list[dict[str, str]]
    ) -> Iterator[dict[str, Any]]:
        plan = self._plan
        all_headers, ciphertexts = summed
        headers = [h for h in all_headers if h.kind == "contribution"]
        corrected = {h.contributors[0] for h in all_headers if h.kind == "correction"}
        contributors = tuple(sorted(h.contributors[0] for h in headers))
        exchange = plan.config.exchange_path
        expected = {i.id for i in plan.config.institutions}
        missing = sorted(expected - set(contributors))
        summary: dict[str, Any] = {"contributors": list(contributors), "refused": refused, "absent": missing}
        if len(contributors) < plan.params.quorum or ciphertexts is None:
            delete_if_exists(aggregate_path(exchange, plan.key))
            reason = (
                f"quorum not met: {len(contributors)} valid contribution(s), "
                f"the federation requires {plan.params.quorum}"
            )
            write_json(refusal_path(exchange, plan.key), {**summary, "reason": reason})
            yield self._status({**summary, "status": "refused", "reason": reason})
            return
        delete_if_exists(refusal_path(exchange, plan.key))
        if missing and not self._absent:
            # Masks of the missing institutions would not cancel: declare them absent, start the recovery round.
            if self._may_declare:
                write_json(absent_path(exchange, plan.key), {"absent": missing})
            yield self._status({**summary, "status": "awaiting_recovery" if self._may_declare else "waiting"})
            return
        if missing and (set(missing) != set(self._absent) or corrected != set(contributors)):
            pending = sorted(set(contributors) - corrected)
            yield self._status({**summary, "status": "awaiting_recovery", "corrections_pending": pending})
            return
        reject_counts: dict[str, dict[str, int]] = {}
        for h in headers:
            reject_counts.update(h.reject_counts)
        header = plan.envelope_header(
            kind="aggregate",
            contributors=contributors,
            noise_variance=sum(h.noise_variance for h in headers),
            context_sha256=headers[0].context_sha256,  # every contribution's was checked against the exchange's
            reject_counts=reject_counts,
            refused=tuple(refused),
        )
        write_bytes(aggregate_path(exchange, plan.key), pack_envelope(header, ciphertexts))
        crash_point("after_sum")
        yield self._status({**summary, "status": "aggregated", "noise_variance": header.noise_variance})

    def _status(self, status: dict[str, Any]) -> dict[str, Any]:
        write_json(aggregation_status_path(self._plan.config.exchange_path, self._plan.key), status)
        return status


class Aggregate(beam.PTransform):
    """All contribution envelopes in the exchange for one release -> the aggregate envelope."""

    def __init__(self, plan: ReleasePlan, *, may_declare_absent: bool = True) -> None:
        super().__init__(label="Aggregate")
        self._plan = plan
        self._may_declare = may_declare_absent

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        plan = self._plan
        exchange = plan.config.exchange_path
        absent = declared_absent(plan)
        paths = list_files(contributions_dir(exchange, plan.key), ".fenv")
        if absent:
            paths += list_files(corrections_dir(exchange, plan.key), ".fenv")
        public_context = read_bytes(public_context_path(exchange))
        opened = (
            pbegin
            | "Envelopes" >> beam.Create(paths)
            | "Open"
            >> beam.ParDo(OpenEnvelope(plan, public_context, load_registry(plan.config), absent)).with_outputs(
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
            | "Seal" >> beam.ParDo(SealAggregate(plan, absent, self._may_declare), refused=beam.pvalue.AsList(refused))
        )
