"""The aggregator's Beam pipeline: envelopes -> checks -> homomorphic sum -> roster, then aggregate envelope.

The aggregator holds only the public context: it can add ciphertexts but never read them. It runs twice per
release: first over the contributions, closing the roster (included / absent) that starts the unmask round;
then over the contributions and the institutions' answers, removing the self masks and sealing the aggregate,
which it signs. Every envelope it refuses is listed, with its reason, in the aggregate's header (the key
holder records them in `audit`). The checks of each envelope (pipelines/envelope_checks.py) and the making of
the aggregate from the envelopes that pass them (pipelines/aggregate_envelope.py) run without Beam: the key
holder runs them again to recompute the aggregate before it charges anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

from fusion.keys.registry import check_he_context, load_aggregator_signing_key, load_registry
from fusion.release.exchange import (
    EnvelopePlace,
    aggregate_path,
    aggregation_status_path,
    contributions_dir,
    delete_if_exists,
    list_files,
    public_context_path,
    refusal_path,
    unmask_dir,
    write_bytes,
    write_json,
)
from fusion.release.plan import ReleasePlan, masking_graph
from fusion.runtime.faults import crash_point
from pipelines.aggregate_envelope import aggregate_header, contributions_sum, unmasked_sum
from pipelines.envelope_checks import EnvelopeChecks, Opened, PublicContext, one_per_institution
from pipelines.unmask import (
    Roster,
    acknowledged,
    acknowledgements_needed,
    read_roster,
    removable_noise,
    removed_masks,
    revealed_layers,
    sparse_roster_problem,
    write_roster,
)
from privacy import he
from privacy.envelope import EnvelopeHeader, pack_envelope
from privacy.sharing import ShareError

REFUSED = "refused"


class OpenEnvelope(beam.DoFn):
    """path -> (institution, (path, header, ciphertexts)); envelopes that fail a check are tagged refused
    (pipelines/envelope_checks.py)."""

    def __init__(
        self, plan: ReleasePlan, public_context: PublicContext, registry: dict[str, bytes], roster: Roster | None
    ) -> None:
        self._checks = EnvelopeChecks(plan, public_context, registry, roster)
        self._public_context = public_context

    def setup(self) -> None:
        _ = self._public_context.context  # loaded (and checked) once per worker, before the first envelope

    def process(self, path: str) -> Iterator[Any]:
        opened = self._checks.open(path)
        yield TaggedOutput(REFUSED, opened) if isinstance(opened, dict) else opened


class OnePerInstitution(beam.DoFn):
    """((kind, institution), its signed envelopes) -> the one that counts for it (`one_per_institution`: the one
    in its own place); the others tagged refused."""

    def process(self, element: tuple[tuple[str, str], Iterable[Opened]]) -> Iterator[Any]:
        (kind, institution), envelopes = element
        kept, refusals = one_per_institution(kind, institution, envelopes)
        for refusal in refusals:
            yield TaggedOutput(REFUSED, refusal)
        if kept is not None:
            yield kept


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
            masks = removed_masks(plan, headers, answers, roster.absent)
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
        layers = removable_noise(plan, headers, revealed_layers(answers))
        added = contributions_sum(self._public_context, headers, parts)
        ciphertexts = unmasked_sum(self._public_context.context, added, masks, layers)
        header = aggregate_header(
            plan,
            context_sha256=self._public_context.sha256,
            contributions=headers,
            roster=roster,
            layers=layers,
            refused=tuple(refused),
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
