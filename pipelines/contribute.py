"""The institution's Beam pipeline: feed files -> validated Arrow batches -> de-duplicated by entity shard ->
one packed vector -> Skellam share -> BFV envelope in the exchange. Dead letters stay local.

Elements are file shards and Arrow tables, never single readings; the logic lives in fusion/ and privacy/.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.pvalue import TaggedOutput

from fusion.config import InstitutionConfig, PrivacyUnit
from fusion.contribution import (
    PartialAggregate,
    aggregate_readings,
    bound_by_entity,
    cell_reading_counts,
    deduplicate,
    split_by_entity_shard,
)
from fusion.errors import FusionError, InternalError
from fusion.exchange import contribution_path, join, public_context_path, read_bytes, write_bytes, write_json
from fusion.faults import crash_point
from fusion.feeds import feed_files, mapped_columns, read_feed_file
from fusion.plan import ReleasePlan
from fusion.registry import load_agreement_key, load_agreement_keys, load_signing_key, read_private, write_private
from fusion.transport import table_from_bytes, table_to_bytes
from privacy import he
from privacy.envelope import EnvelopeHeader, pack_envelope
from privacy.masking import add_mod, pairwise_mask
from privacy.sharing import commitment, new_seed, self_mask, share_seed
from privacy.skellam import SkellamNoise, secure_generator, seeded_generator
from schemas.readings import DEAD_LETTER_REASON, DEAD_LETTER_ROW, DEAD_LETTER_SOURCE
from schemas.reasons import RejectReason
from schemas.validation import ReadingValidator, readings_as_dead_letters

DEAD = "dead"
COUNTS = "counts"
#: DuckDB threads of each worker's validation query (validation is the busiest step of a contribution).
VALIDATION_THREADS = 2


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class ReadAndValidate(beam.DoFn):
    """(feed index, file path) -> (entity shard, accepted readings as Arrow IPC bytes); dead letters and counts
    tagged."""

    def __init__(self, plan: ReleasePlan, institution: InstitutionConfig) -> None:
        self._plan = plan
        self._institution = institution

    def setup(self) -> None:
        self._validator = ReadingValidator(self._plan.rules, threads=VALIDATION_THREADS)

    def process(self, element: tuple[int, str]) -> Iterator[Any]:
        feed_index, path = element
        feed = self._institution.feeds[feed_index]
        batch_rows = self._plan.config.pipeline.batch_rows
        shards = self._plan.config.pipeline.entity_shards
        offset = 0  # rows of this file already read, so dead letters' _row points into the file
        for number, raw in enumerate(read_feed_file(path, feed, batch_rows=batch_rows)):
            name = f"{feed.name}-{_short_hash(path)}-{number:05d}"
            checked = self._validator.validate(
                raw.table,
                columns=mapped_columns(feed),
                time_format=feed.time_format.value,
                source=path,
                row_offset=offset,
            )
            offset += raw.table.num_rows
            rejected = Counter(checked.reasons)
            if raw.malformed:
                rejected[RejectReason.MALFORMED_RECORD.value] += len(raw.malformed)
                yield TaggedOutput(DEAD, (f"{name}-malformed", malformed_letters(raw.malformed, path)))
            yield TaggedOutput(COUNTS, PartialAggregate(rows_read=raw.rows, rejected=rejected))
            if checked.rejected.num_rows:
                yield TaggedOutput(DEAD, (f"{name}-invalid", checked.rejected))
            for shard, table in split_by_entity_shard(checked.accepted, shards):
                yield shard, table_to_bytes(table)


def malformed_letters(lines: tuple[tuple[int, str], ...], source: str) -> pa.Table:
    return pa.table(
        {
            "_text": pa.array([text for _, text in lines], pa.string()),
            DEAD_LETTER_REASON: pa.array([RejectReason.MALFORMED_RECORD.value] * len(lines), pa.string()),
            DEAD_LETTER_SOURCE: pa.array([source] * len(lines), pa.string()),
            DEAD_LETTER_ROW: pa.array([n for n, _ in lines], pa.int64()),
        }
    )


class AggregateShard(beam.DoFn):
    """(entity shard, [readings as Arrow IPC bytes]) -> PartialAggregate of that shard; duplicates to dead
    letters."""

    def __init__(self, plan: ReleasePlan, institution: InstitutionConfig) -> None:
        self._plan = plan
        self._institution = institution

    def process(self, element: tuple[int, Iterable[bytes]]) -> Iterator[Any]:
        shard, parts = element
        plan, privacy = self._plan, self._plan.config.privacy
        readings = pa.concat_tables([table_from_bytes(part) for part in parts])
        kept, duplicates = deduplicate(readings)
        if duplicates.num_rows:
            letters = readings_as_dead_letters(duplicates, RejectReason.DUPLICATE, source=f"entity-shard-{shard}")
            yield TaggedOutput(DEAD, (f"duplicates-shard-{shard:04d}", letters))
        contributed = kept
        if privacy.unit is PrivacyUnit.ENTITY:
            assert privacy.max_partitions is not None and privacy.max_readings_per_partition is not None
            contributed = bound_by_entity(
                kept,
                layout=plan.layout,
                max_partitions=privacy.max_partitions,
                max_per_partition=privacy.max_readings_per_partition,
                generator=noise_generator(plan, self._institution.id, f"bounding-{shard}"),
            )
        vector = aggregate_readings(contributed, layout=plan.layout, encodings=plan.params.encodings)
        rejected = Counter({RejectReason.DUPLICATE.value: duplicates.num_rows}) if duplicates.num_rows else Counter()
        yield PartialAggregate(
            vector=vector,
            rows_accepted=kept.num_rows,
            rows_bounded=kept.num_rows - contributed.num_rows,
            rejected=rejected,
        )


class MergePartials(beam.CombineFn):
    """Adds PartialAggregates: vectors slot-wise, counts by key."""

    def create_accumulator(self) -> PartialAggregate:
        return PartialAggregate()

    def add_input(self, accumulator: PartialAggregate, element: PartialAggregate) -> PartialAggregate:
        return accumulator.merge(element)

    def merge_accumulators(self, accumulators: Iterable[PartialAggregate]) -> PartialAggregate:
        total = PartialAggregate()
        for accumulator in accumulators:
            total.merge(accumulator)
        return total

    def extract_output(self, accumulator: PartialAggregate) -> PartialAggregate:
        return accumulator


class WriteDeadLetters(beam.DoFn):
    """(name, table) -> a Parquet file in the institution's local dead-letter directory."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def process(self, element: tuple[str, pa.Table]) -> Iterator[str]:
        name, table = element
        path = join(self._directory, f"{name}.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_bytes(path, sink.getvalue().to_pybytes())
        yield path


class SealContribution(beam.DoFn):
    """The institution's total -> plus its Skellam share -> BFV-encrypted envelope in the exchange."""

    def __init__(self, plan: ReleasePlan, institution: InstitutionConfig, dead_letter_dir: str) -> None:
        self._plan = plan
        self._institution = institution
        self._dead_letter_dir = dead_letter_dir

    def process(self, total: PartialAggregate) -> Iterator[EnvelopeHeader]:
        plan, institution = self._plan, self._institution
        if not total.reconciles():
            raise InternalError(f"row counts do not reconcile for {institution.id}: {total.counts()}")
        vector = total.vector if total.vector is not None else np.zeros(plan.layout.slots, dtype=np.int64)
        busiest = int(cell_reading_counts(vector, layout=plan.layout, encodings=plan.params.encodings).max())
        cap = plan.params.cell_caps[institution.id]
        if busiest > cap:  # only a configured cap can bind in practice: derived caps are ~10^12 readings
            raise FusionError(
                f"institution {institution.id}: a cell holds {busiest} readings, above its cap of {cap} "
                "(max_readings_per_cell); raise or remove it in the config"
            )
        if plan.params.noise:
            noise = SkellamNoise(plan.params.share_variance, generator=noise_generator(plan, institution.id, "noise"))
            vector = vector + noise.sample(plan.layout.slots)
        crash_point("before_encrypt")
        # Double masking: pairwise masks (they cancel in the sum of all institutions) plus a self mask whose
        # seed is Shamir-shared among the institutions, so the envelope alone, and any sum the aggregator could
        # form without the unmask round, is uniform mod t.
        context = plan.key.release_id.encode()
        own_key = load_agreement_key(plan.config, institution.id)
        peers = load_agreement_keys(plan.config)
        mask = pairwise_mask(
            institution.id, own_key, peers, slots=plan.layout.slots, modulus=he.PLAIN_MODULUS, context=context
        )
        seed = new_seed()
        mask = (mask + self_mask(seed, slots=plan.layout.slots, modulus=he.PLAIN_MODULUS, context=context)) % (
            he.PLAIN_MODULUS
        )
        shares, share_digests = share_seed(
            seed, own_id=institution.id, own_private=own_key, peers=peers, threshold=plan.params.quorum, context=context
        )
        masked = add_mod(vector, mask, he.PLAIN_MODULUS)
        public_context = read_bytes(public_context_path(plan.config.exchange_path))
        ciphertexts = he.encrypt_vector(he.load_public_context(public_context), masked, residues=True)
        header = plan.envelope_header(
            kind="contribution",
            contributors=(institution.id,),
            noise_variance=plan.params.share_variance if plan.params.noise else 0.0,
            context_sha256=hashlib.sha256(public_context).hexdigest(),
            reject_counts={institution.id: dict(total.rejected)},
            seed_commitment=commitment(seed, context=context),
            seed_shares=shares,
            share_digests=share_digests,
        )
        path = contribution_path(plan.config.exchange_path, plan.key, institution.id)
        signing_key = load_signing_key(plan.config, institution.id)
        envelope = record_sealed(plan, institution, pack_envelope(header, ciphertexts, signing_key=signing_key))
        write_bytes(path, envelope)
        write_json(join(self._dead_letter_dir, "report.json"), total.counts())  # local only, never shared
        crash_point("after_encrypt")
        yield header


#: Kept envelopes older than this are pruned (their records, a few bytes each, are kept forever).
KEEP_SEALED = timedelta(days=7)


def _sealed_dir(plan: ReleasePlan, institution: InstitutionConfig) -> Path:
    return Path(plan.config.institution_keys_path(institution)) / "sealed"


def sealed_envelope(plan: ReleasePlan, institution: InstitutionConfig) -> bytes | None:
    """The envelope this institution already sealed for the plan's interval (None if it has not sealed one).

    An institution seals one envelope per interval, ever: a record of it stays in its key directory (owner-only),
    and the envelope itself is kept for `KEEP_SEALED`. Whoever deletes it from the exchange gets the same bytes
    re-published, never a second draw of noise (averaging several would wear the noise away); a second release
    of the same interval under other parameters is refused, and so is sealing again once the copy is pruned.
    """
    record = _sealed_dir(plan, institution) / f"{plan.key.interval_name}.json"
    if not record.exists():
        return None
    doc = json.loads(record.read_text())
    if doc["release_id"] != plan.key.release_id:
        raise FusionError(
            f"institution {institution.id} already contributed to {plan.key.interval_name} as release "
            f"{doc['release_id']}; it does not contribute to the same interval again as {plan.key.release_id} "
            "(other parameters): repeated contributions of the same readings would let their noise be averaged away"
        )
    kept = record.parent / doc["envelope"]
    if not kept.exists():
        raise FusionError(
            f"institution {institution.id} sealed {plan.key.interval_name} before and its kept copy has been pruned "
            f"(after {KEEP_SEALED.days} days); it does not seal the interval again"
        )
    return read_private(kept, f"institution {institution.id}'s sealed envelope")


def record_sealed(plan: ReleasePlan, institution: InstitutionConfig, envelope: bytes) -> bytes:
    """Keep the envelope and record it, before it is published; returns what to publish (if another run of this
    institution recorded one first, that one). A crash before the record exists leaves only an unpublished
    copy, so no second noisy version ever leaves the institution."""
    directory = _sealed_dir(plan, institution)
    name = f"{plan.key.interval_name}-{hashlib.sha256(envelope).hexdigest()[:16]}.fenv"
    write_private(directory / name, envelope)
    pending = directory / f".{name}.json"
    write_private(pending, json.dumps({"release_id": plan.key.release_id, "envelope": name}).encode())
    try:
        os.link(pending, directory / f"{plan.key.interval_name}.json")  # create-once, complete or not at all
    except FileExistsError:
        (directory / name).unlink()
        return sealed_envelope(plan, institution) or envelope
    finally:
        pending.unlink()
    _prune(directory)
    return envelope


def _prune(directory: Path) -> None:
    cutoff = time.time() - KEEP_SEALED.total_seconds()
    for kept in directory.glob("*.fenv"):
        if kept.stat().st_mtime < cutoff:
            kept.unlink(missing_ok=True)


def noise_generator(plan: ReleasePlan, institution: str, purpose: str) -> np.random.Generator:
    """A secure generator; in test mode (the config refuses seeds in production) a distinct seeded stream per
    institution and purpose."""
    seed = plan.config.privacy.seed
    if seed is None:
        return secure_generator()
    return seeded_generator(seed ^ int(_short_hash(f"{institution}/{purpose}"), 16))


def feed_shards(plan: ReleasePlan, institution: InstitutionConfig) -> list[tuple[int, str]]:
    """(feed index, file) for every file of every feed of the institution that the interval needs."""
    return [
        (index, path)
        for index, feed in enumerate(institution.feeds)
        for path in feed_files(plan.config.resolve(feed.path), plan.layout.start, plan.layout.end)
    ]


class Contribute(beam.PTransform):
    """An institution's whole contribution for one release, as one composite transform."""

    def __init__(self, plan: ReleasePlan, institution: InstitutionConfig, dead_letter_dir: str) -> None:
        super().__init__(label=f"Contribute[{institution.id}]")
        self._plan = plan
        self._institution = institution
        self._dead_letter_dir = dead_letter_dir

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        plan, institution = self._plan, self._institution
        shards = feed_shards(plan, institution)
        read = (
            pbegin
            | "Files" >> beam.Create(shards)
            | "Reshuffle" >> beam.Reshuffle()
            | "ReadAndValidate" >> beam.ParDo(ReadAndValidate(plan, institution)).with_outputs(DEAD, COUNTS, main="ok")
        )
        aggregated = (
            read.ok
            | "GroupByEntityShard" >> beam.GroupByKey()
            | "AggregateShards" >> beam.ParDo(AggregateShard(plan, institution)).with_outputs(DEAD, main="partial")
        )
        _ = (
            (read[DEAD], aggregated[DEAD])
            | "AllDeadLetters" >> beam.Flatten()
            | "WriteDeadLetters" >> beam.ParDo(WriteDeadLetters(self._dead_letter_dir))
        )
        return (
            (read[COUNTS], aggregated.partial)
            | "AllPartials" >> beam.Flatten()
            | "Total" >> beam.CombineGlobally(MergePartials())
            | "Seal" >> beam.ParDo(SealContribution(plan, institution, self._dead_letter_dir))
        )
