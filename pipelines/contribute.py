"""The institution's Beam pipeline: feed files -> scan shards validated and encoded in DuckDB -> exact
duplicates removed, entity-level bounding -> one packed vector -> Skellam share -> BFV envelope in the exchange.
Dead letters stay local.

Elements are scan shards and packed vectors, never single readings, and no readings are shuffled: a scan shard
is a hash partition of one institution's readings (fusion/feeds/scan.py). An institution with one shard is scanned in
one pass; one with several first stages each of its files, scanned once for all of them (parsed, validated and
encoded, one Arrow file of encoded rows per shard, in the institution's private dead-letter area), and each shard
reads its own rows; a side input orders the two steps. The logic lives in fusion/ and privacy/.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.pvalue import TaggedOutput

from fusion.config.federation import InstitutionConfig, PrivacyUnit
from fusion.errors import FusionError, InternalError
from fusion.feeds.report import FileTally, RejectLevel, judge_rejects, merge_tallies, worst_files
from fusion.feeds.scan import (
    BIN,
    CELL,
    ENTITY,
    KEY,
    ROW,
    SOURCE,
    SUM,
    FeedScanner,
    ShardScan,
    estimated_rows,
    list_sources,
    scan_connection,
    scan_shards,
    scan_windows,
    staged_sources,
)
from fusion.keys.registry import check_he_context, load_agreement_key, load_agreement_keys, load_signing_key
from fusion.release.contribution import PartialAggregate, cell_reading_counts, find_duplicates, pack_encoded
from fusion.release.exchange import (
    contribution_path,
    join,
    public_context_path,
    read_bytes,
    remove_tree,
    write_bytes,
    write_json,
)
from fusion.release.plan import ReleasePlan, masking_graph
from fusion.release.rejects import pack_reject_tallies
from fusion.runtime.faults import crash_point
from pipelines.sealing import noise_generator, record_sealed, seal_noise_layers
from privacy import he
from privacy.bounding import bound_contributions
from privacy.envelope import EnvelopeHeader, pack_envelope
from privacy.layout import SUMSQ
from privacy.masking import add_mod, pairwise_mask
from privacy.sharing import commitment, new_seed, self_mask, share_coordinates, share_pair_keys, share_seed
from schemas.reasons import PUBLISHED_REASONS, RejectReason
from schemas.validation import readings_as_dead_letters, register_rules

DEAD = "dead"
PARTIAL = "partial"
#: Tag of (institution id, {file path: FileTally}) outputs: what each file held, for the run report.
FILES = "files"
#: DuckDB threads of each scan (the scan is the busiest step of a contribution).
SCAN_THREADS = 2


def dead_letter_dir(plan: ReleasePlan, institution: InstitutionConfig) -> str:
    """The institution's local dead letters for the interval (never shared)."""
    return join(plan.config.dead_letter_path(institution), plan.key.interval_name)


def staging_dir(plan: ReleasePlan, institution: InstitutionConfig) -> str:
    """Where the institution's text files are staged for a multi-shard scan: inside its private dead-letter area
    (what is derived from its readings never leaves the institution), cleared with it and deleted after the run."""
    return join(dead_letter_dir(plan, institution), f"_staging-{institution.id}")


def staging_prefix(plan: ReleasePlan, institution: InstitutionConfig, src: int) -> str:
    """Where file `src` of the institution is staged (fusion.feeds.scan.staged_path and staged_raw_path name its
    files)."""
    return join(staging_dir(plan, institution), f"{src:05d}")


def remove_staging(plan: ReleasePlan, institutions: Iterable[InstitutionConfig]) -> None:
    """Delete the institutions' staged files for the interval, on any file system (a run removes them when it
    ends, and every run first removes what a crashed one left)."""
    for institution in institutions:
        remove_tree(staging_dir(plan, institution))


class _ScanConnections:
    """Idle scan connections of this process, reused by the next scanning step: opening one costs more than a
    small interval's scan (a stream releasing a burst of windows scans each institution once a window). A reused
    connection gets the plan's lookup tables registered again (replacing the last plan's); the scans register
    and drop their own relations. At most `keep` idle connections are kept; the others are closed, and
    all idle ones before the process forks (a child cannot use, or even close, a DuckDB connection it inherits: its
    scheduler's threads stayed in the parent)."""

    def __init__(self, keep: int = 2) -> None:
        self._idle: list[duckdb.DuckDBPyConnection] = []
        self._keep = keep
        self._lock = threading.Lock()

    def close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def take(self, plan: ReleasePlan) -> duckdb.DuckDBPyConnection:
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            return scan_connection(plan, threads=SCAN_THREADS)
        register_rules(connection, plan.rules, plan.layout.metrics)
        return connection

    def give_back(self, connection: duckdb.DuckDBPyConnection) -> None:
        """Keep `connection` for the next scan, or close it: when `keep` are kept already, or when it no longer
        runs a query (a DuckDB internal error invalidates its database for good, and a scan that met one would
        hand its fault to every later scan that took the connection)."""
        if _usable(connection):
            with self._lock:
                if len(self._idle) < self._keep:
                    self._idle.append(connection)
                    return
        connection.close()


def _usable(connection: duckdb.DuckDBPyConnection) -> bool:
    """Whether the connection still runs a query."""
    try:
        connection.execute("SELECT 1").fetchall()
    except duckdb.Error:
        return False
    return True


#: As many as the stream's release run scans side by side (pipelines.stream_release.WINDOW_WORKERS): fewer would
#: open and close connections all through a burst.
_scan_connections = _ScanConnections(keep=4)
os.register_at_fork(before=_scan_connections.close_idle)


class _ScanningDoFn(beam.DoFn):
    """A DoFn that scans institutions' files: `sources` holds each one's files, listed once when the pipeline was
    built, so every element of a run reads the same ones; a worker keeps one DuckDB connection for all of them, taken
    when it first scans (a contribution whose scan was made ahead takes none)."""

    def __init__(self, plan: ReleasePlan, sources: dict[str, list[tuple[int, str]]]) -> None:
        self._plan = plan
        self._sources = sources

    def setup(self) -> None:
        self._connection: duckdb.DuckDBPyConnection | None = None  # taken when a scan first needs it

    def teardown(self) -> None:
        if self._connection is not None:
            _scan_connections.give_back(self._connection)
            self._connection = None

    def interrupt(self) -> None:
        """Stop the query this step is running, from another thread (its scan then fails with DuckDB's
        InterruptException): a run that fails, or is interrupted, while other steps scan does not wait for their
        scans to end. Harmless on an idle connection (the next query runs as usual)."""
        connection = getattr(self, "_connection", None)
        if connection is not None:
            connection.interrupt()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if self._connection is None:
            self._connection = _scan_connections.take(self._plan)
        return self._connection

    def _scanner(self, institution_id: str, staged: dict[int, str] | None = None) -> FeedScanner:
        institution = self._plan.config.institution(institution_id)
        sources = self._sources[institution_id]
        return FeedScanner(self._plan, institution, connect=self._connect, sources=sources, staged=staged)


class StageFeed(_ScanningDoFn):
    """(institution id, src, shards) -> ((institution id, src), staging prefix): one file scanned once for all of
    the institution's scan shards (fusion.feeds.scan.FeedScanner.stage), which then read their own encoded rows. Its
    rows read and rejects are counted here (a PartialAggregate without a vector, tagged PARTIAL; its tally tagged
    FILES) and its dead letters written from here as they are found (tagged DEAD); the shards count only the
    rows they accept."""

    def process(self, element: tuple[str, int, int]) -> Iterator[Any]:
        institution_id, src, shards = element
        scanner = self._scanner(institution_id)
        prefix = staging_prefix(self._plan, scanner.institution, src)
        counts = ShardScan()
        for name, letters in scanner.stage(src, prefix, shards, counts):
            yield TaggedOutput(DEAD, (institution_id, name, letters))
        totals = PartialAggregate(rows_read=counts.rows_read, rejected=counts.rejected)
        yield TaggedOutput(PARTIAL, (institution_id, totals))
        yield TaggedOutput(FILES, (institution_id, counts.files))
        yield (institution_id, src), prefix


class ContributeShard(_ScanningDoFn):
    """(institution id, scan shard, shards) -> (institution id, PartialAggregate of that shard): its feeds
    scanned and validated in DuckDB, exact duplicates removed, entity-level bounding, packed into the layout's
    slots. Dead letters (invalid rows, unparseable lines, duplicates) are tagged (institution id, name, table),
    and what each file held (institution id, {path: FileTally}) FILES. `staged` maps (institution id, src) to
    the staging prefix of a file already scanned for every shard."""

    def __init__(
        self,
        plan: ReleasePlan,
        sources: dict[str, list[tuple[int, str]]],
        scanned: Mapping[str, ShardScan] | None = None,
    ) -> None:
        """`scanned`: by institution id, the scan of an institution of one scan shard already made for this plan
        and these `sources` (`scan_together`), taken instead of scanning again (once: a scan is not reused)."""
        super().__init__(plan, sources)
        self._scanned = dict(scanned or {})

    def process(self, element: tuple[str, int, int], staged: dict[tuple[str, int], str] | None = None) -> Iterator[Any]:
        institution_id, shard, shards = element
        plan, privacy = self._plan, self._plan.config.privacy
        own = {src: prefix for (owner, src), prefix in (staged or {}).items() if owner == institution_id}
        scanner = self._scanner(institution_id, own)
        made = self._scanned.pop(institution_id, None) if shards == 1 else None
        scan = scanner.scan(shard, shards) if made is None else made
        encoded = scan.table(scanner.schema)
        duplicates = find_duplicates(
            encoded.column(KEY), encoded.column(SOURCE), encoded.column(ROW), scanner.readings_at
        )
        for name, letters in scan.dead_letters:
            yield TaggedOutput(DEAD, (institution_id, name, letters))
        rejected = Counter(scan.rejected)
        files = scan.files
        kept = np.ones(encoded.num_rows, dtype=bool)
        if duplicates.indices.size:
            kept[duplicates.indices] = False
            rejected[RejectReason.DUPLICATE.value] += int(duplicates.indices.size)
            paths = [scanner.sources[int(s)][1] for s in duplicates.sources]
            for path, n in Counter(paths).items():
                merge_tallies(files, {path: FileTally(rejected=Counter({RejectReason.DUPLICATE.value: n}))})
            letters = readings_as_dead_letters(
                duplicates.readings, RejectReason.DUPLICATE, source=pa.array(paths, pa.string()), rows=duplicates.rows
            )
            yield TaggedOutput(DEAD, (institution_id, f"duplicates-s{shard:04d}", letters))
        yield TaggedOutput(FILES, (institution_id, files))
        accepted = int(kept.sum())
        if privacy.unit is PrivacyUnit.ENTITY:
            assert privacy.max_partitions is not None and privacy.max_readings_per_partition is not None
            index = np.flatnonzero(kept) if duplicates.indices.size else slice(None)
            bounded = bound_contributions(
                encoded.column(ENTITY).to_numpy()[index].view(np.int64),
                encoded.column(CELL).to_numpy()[index],
                max_partitions=privacy.max_partitions,
                max_per_partition=privacy.max_readings_per_partition,
                generator=noise_generator(plan, institution_id, f"bounding-{shard}"),
            )
            kept[kept] = bounded  # of the rows still kept, those bounding keeps
        contributed = int(kept.sum())
        vector = pack_batches(encoded, None if contributed == encoded.num_rows else kept, plan)
        yield (
            institution_id,
            PartialAggregate(
                vector=vector,
                rows_read=scan.rows_read,
                rows_accepted=accepted,
                rows_bounded=accepted - contributed,
                rejected=rejected,
            ),
        )


def pack_batches(encoded: pa.Table, kept: np.ndarray | None, plan: ReleasePlan) -> np.ndarray:
    """The slots of the encoded rows that `kept` marks (all when None), packed batch by batch: the columns of
    one Arrow batch are NumPy views, so nothing is copied when every row is kept (the usual case at event level)."""
    vector = np.zeros(plan.layout.slots, dtype=np.int64)
    start = 0
    for batch in encoded.to_batches():
        mask = None if kept is None else kept[start : start + batch.num_rows]
        start += batch.num_rows

        def column(name: str, batch: pa.RecordBatch = batch, mask: np.ndarray | None = mask) -> np.ndarray:
            values: np.ndarray = batch.column(name).to_numpy(zero_copy_only=False)
            return values if mask is None else values[mask]

        sums = {SUM: column(SUM)}
        if plan.layout.has(SUMSQ):
            sums[SUMSQ] = column(SUMSQ)
        vector += pack_encoded(
            column(CELL),
            sums,
            layout=plan.layout,
            encodings=plan.params.encodings,
            bins=column(BIN) if plan.layout.bins else None,
        )
    return vector


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


class MergeFileTallies(beam.CombineFn):
    """Adds {file path: FileTally} dicts."""

    def create_accumulator(self) -> dict[str, FileTally]:
        return {}

    def add_input(self, accumulator: dict[str, FileTally], element: dict[str, FileTally]) -> dict[str, FileTally]:
        return merge_tallies(accumulator, element)

    def merge_accumulators(self, accumulators: Iterable[dict[str, FileTally]]) -> dict[str, FileTally]:
        total: dict[str, FileTally] = {}
        for accumulator in accumulators:
            merge_tallies(total, accumulator)
        return total

    def extract_output(self, accumulator: dict[str, FileTally]) -> dict[str, FileTally]:
        return accumulator


class WriteDeadLetters(beam.DoFn):
    """(institution id, name, table) -> a Parquet file in the institution's local dead-letter directory."""

    def __init__(self, plan: ReleasePlan) -> None:
        self._plan = plan

    def process(self, element: tuple[str, str, pa.Table]) -> Iterator[str]:
        institution_id, name, table = element
        directory = dead_letter_dir(self._plan, self._plan.config.institution(institution_id))
        path = join(directory, f"{name}.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_bytes(path, sink.getvalue().to_pybytes())
        yield path


def double_mask(plan: ReleasePlan, institution_id: str, vector: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """`vector` (int64, the release's slots) double-masked for the release, mod t in the centred range, and the
    contribution header's fields that let the unmask round take the masks off: pairwise masks with the
    institution's neighbours in the release's masking graph (they cancel in the sum of all institutions), a self
    mask, and Shamir shares of its seed and of every mask key, sealed to its closed neighbourhood, so that the
    envelope alone, and any sum the aggregator could form without the unmask round, is uniform mod t."""
    context = plan.key.release_id.encode()
    own_key = load_agreement_key(plan.config, institution_id)
    everyone = load_agreement_keys(plan.config)
    # Everyone in small federations, where the graph is complete; k = O(log n) neighbours in large ones.
    graph = masking_graph(plan)
    peers = {peer: everyone[peer] for peer in graph.closed(institution_id)}
    coordinates = None if graph.complete else share_coordinates(everyone)
    slots, modulus = vector.size, he.PLAIN_MODULUS
    mask = pairwise_mask(institution_id, own_key, peers, slots=slots, modulus=modulus, context=context)
    seed = new_seed()
    mask = (mask + self_mask(seed, slots=slots, modulus=modulus, context=context)) % modulus
    shares, share_digests = share_seed(
        seed,
        own_id=institution_id,
        own_private=own_key,
        peers=peers,
        threshold=graph.threshold,
        context=context,
        coordinates=coordinates,
    )
    # Its mask keys too, so that the masks with institutions declared absent can be removed from any `threshold`
    # answers of its neighbourhood (only ever for absent peers: an answer reveals no key between two included).
    pair_shares, pair_digests, pair_commitments = share_pair_keys(
        own_id=institution_id,
        own_private=own_key,
        peers=peers,
        threshold=graph.threshold,
        context=context,
        coordinates=coordinates,
    )
    fields = {
        "seed_commitment": commitment(seed, context=context),
        "seed_shares": shares,
        "share_digests": share_digests,
        "pair_commitments": pair_commitments,
        "pair_shares": pair_shares,
        "pair_share_digests": pair_digests,
    }
    return add_mod(vector, mask, modulus), fields


_PUBLIC_CONTEXTS: dict[str, Any] = {}  # SHA-256 of a public HE context -> the loaded context, per process


def _loaded_public_context(data: bytes, digest: str) -> Any:
    """The public HE context serialised as `data` (whose SHA-256 is `digest`), loaded once per process."""
    if digest not in _PUBLIC_CONTEXTS:
        _PUBLIC_CONTEXTS[digest] = he.load_public_context(data)
    return _PUBLIC_CONTEXTS[digest]


class SealContribution(beam.DoFn):
    """(institution id, its total) -> plus its Skellam share -> BFV-encrypted envelope in the exchange; and the
    institution's local run report (counts, files missing or refused whole, a warning). An institution that
    rejected more of the interval's rows than its `max_reject_rate` seals nothing (its report says why) unless
    `accept_rejects`. `files` (a side input) holds each institution's {file path: FileTally}; `missing` the
    paths of its feeds that matched no file."""

    def __init__(
        self,
        plan: ReleasePlan,
        *,
        missing: Mapping[str, Sequence[str]] | None = None,
        accept_rejects: bool = False,
    ) -> None:
        self._plan = plan
        self._missing = {k: list(v) for k, v in (missing or {}).items()}
        self._accept_rejects = accept_rejects

    def setup(self) -> None:
        # The public HE context (about 1 MB) is read once per worker and loaded once per process (by its digest):
        # a run that seals many intervals, such as the stream's burst of windows, does not deserialise it each time.
        self._public_context = read_bytes(public_context_path(self._plan.config.exchange_path))
        self._context_sha256 = hashlib.sha256(self._public_context).hexdigest()  # once, not per envelope
        check_he_context(self._plan.config, self._context_sha256)  # never seal under a context swapped in
        self._he_context = _loaded_public_context(self._public_context, self._context_sha256)

    def process(
        self, element: tuple[str, PartialAggregate], files: Mapping[str, dict[str, FileTally]] | None = None
    ) -> Iterator[EnvelopeHeader]:
        institution_id, total = element
        plan = self._plan
        institution = plan.config.institution(institution_id)
        if not total.reconciles():
            raise InternalError(f"row counts do not reconcile for {institution.id}: {total.counts()}")
        tallies = (files or {}).get(institution_id, {})
        report = run_report(total.counts(), tallies, self._missing.get(institution_id, []))
        verdict = judge_rejects(
            institution, read=total.rows_read, rejected=total.rejected, files=tallies,
            entity_level=plan.config.privacy.unit is PrivacyUnit.ENTITY,
        )
        if verdict.level is RejectLevel.STOP and not self._accept_rejects:
            report["withheld"] = (
                f"{verdict.message}; it seals nothing for {plan.key.interval_name}. Fix the feed, or run again "
                "with --accept-rejects to contribute the rows it accepted"
            )
            report["withheld_files"] = worst_files(tallies)
            write_json(join(dead_letter_dir(plan, institution), "report.json"), report)  # local only
            return
        if verdict.level is not RejectLevel.OK:
            accepted = " (contributed: --accept-rejects)" if verdict.level is RejectLevel.STOP else ""
            report["warning"] = verdict.message + accepted
        vector = total.vector if total.vector is not None else np.zeros(plan.layout.slots, dtype=np.int64)
        busiest = int(cell_reading_counts(vector, layout=plan.layout, encodings=plan.params.encodings).max())
        cap = plan.params.cell_caps[institution.id]
        if busiest > cap:  # only a configured cap can bind in practice: derived caps are ~10^12 readings
            raise FusionError(
                f"institution {institution.id}: a cell holds {busiest} readings, above its cap of {cap} "
                "(max_readings_per_cell); raise or remove it in the config",
                public=f"institution {institution.id}: a cell holds more readings than its cap of {cap} "
                "(max_readings_per_cell)",
            )
        # The published reasons' counts, each clamped to the cap (a clamped count moves by at most one row per
        # reading, so the sensitivity holds, and no tally can wrap): other reasons stay with the institution, and
        # never decide whether it contributes.
        rejected = Counter(total.rejected) + Counter(plan.carried_rejects.get(institution.id, {}))
        published = {reason.value: min(rejected[reason.value], cap) for reason in PUBLISHED_REASONS}
        vector = pack_reject_tallies(
            vector.copy(),
            layout=plan.layout,
            institution=institution.id,
            rejected=published,
            weight=plan.params.tally_weight,
        )
        layered = seal_noise_layers(plan, institution.id) if plan.params.noise else None
        if layered is not None:
            vector = vector + layered.noise
        crash_point("before_encrypt")
        masked, mask_fields = double_mask(plan, institution.id, vector)
        ciphertexts = he.encrypt_vector(self._he_context, masked, residues=True)
        header = plan.envelope_header(
            kind="contribution",
            contributors=(institution.id,),
            noise_variance=plan.params.share_variance if plan.params.noise else 0.0,
            context_sha256=self._context_sha256,
            reject_counts={},  # exact counts never leave the institution: they are noisy tallies of the vector
            **mask_fields,
            layer_commitments=layered.commitments if layered else {},
            layer_digests=layered.digests if layered else {},
        )
        path = contribution_path(plan.config.exchange_path, plan.key, institution.id)
        signing_key = load_signing_key(plan.config, institution.id)
        # The run report first (local only): once sealed, a rerun skips the institution and never writes it again.
        write_json(join(dead_letter_dir(plan, institution), "report.json"), report)
        envelope = record_sealed(
            plan,
            institution,
            pack_envelope(header, ciphertexts, signing_key=signing_key),
            layer_seed=layered.seed if layered else None,
        )
        crash_point("after_seal")
        write_bytes(path, envelope)
        crash_point("after_encrypt")
        yield header


def run_report(counts: dict[str, object], files: Mapping[str, FileTally], missing: Sequence[str]) -> dict[str, object]:
    """An institution's local run report: its row counts, the files refused whole (`files`: path -> tally with
    its fault) and the paths that matched no file (`missing`)."""
    report = dict(counts)
    refused = {path: tally.as_report() for path, tally in sorted(files.items()) if tally.reason}
    if refused:
        report["files"] = refused
    if missing:
        report["missing"] = list(missing)
    return report


@dataclass(frozen=True)
class ScanWork:
    """What one contribution run scans: every institution's files (listed once, here), its scan shards
    (institution id, shard, shards), the files to stage first (institution id, src, shards), and the paths of
    its feeds that matched no file. An institution without any file has no scan shards: it seals nothing."""

    sources: dict[str, list[tuple[int, str]]]
    shards: list[tuple[str, int, int]]
    staging: list[tuple[str, int, int]]
    missing: dict[str, list[str]] = field(default_factory=dict)


def scan_work(plan: ReleasePlan, institutions: Iterable[InstitutionConfig]) -> ScanWork:
    """The scan shards of every institution, and the files to stage (fusion.feeds.scan.staged_sources)."""
    sources: dict[str, list[tuple[int, str]]] = {}
    missing: dict[str, list[str]] = {}
    elements: list[tuple[str, int, int]] = []
    staging: list[tuple[str, int, int]] = []
    for institution in institutions:
        listing = list_sources(plan, institution)
        files = sources[institution.id] = listing.sources
        missing[institution.id] = listing.missing
        if not files:
            continue
        shards = scan_shards(plan, institution, files)
        elements += [(institution.id, shard, shards) for shard in range(shards)]
        staging += [(institution.id, src, shards) for src in staged_sources(plan, institution, shards, files)]
    return ScanWork(sources, elements, staging, missing)


#: An institution's scan made ahead of its contribution: the files it read (`ScanWork.sources`) and what it found.
Prescan = tuple[list[tuple[int, str]], ShardScan]

_prescanned: ContextVar[dict[tuple[str, str], Prescan] | None] = ContextVar("fusion_prescanned", default=None)


def scan_together(plans: Sequence[ReleasePlan], institution: InstitutionConfig) -> dict[str, Prescan]:
    """By release id, the institution's scan for each of `plans` (disjoint intervals of one federation, such as a
    burst of stream windows; each plan's own copy of the institution, whose feeds may differ) made in one DuckDB
    pass (fusion.feeds.scan.scan_windows), for as many of the plans as one scan shard holds (their readings
    together at most the config's `shard_rows`, as the scans are held until each plan's contribution takes its
    own; the others scan their own files); empty when they cannot be scanned together. Writes nothing: each plan's
    contribution then takes its own scan (`prescanned`) and goes on exactly as if it had scanned its files."""
    chosen, listed = [], []
    rows = 0
    for plan in plans:
        own = plan.config.institution(institution.id)  # its feeds as the plan reads them (a window's spool)
        files = list_sources(plan, own).sources
        estimate = estimated_rows(files, own.feeds) if files else 0
        if files and rows + estimate <= plan.config.shard_rows:
            rows += estimate
            chosen.append(plan)
            listed.append(files)
    if sum(len(files) for files in listed) < 2:  # one file: its own scan is one query already
        return {}
    connection = _scan_connections.take(chosen[0])
    try:
        scans = scan_windows(chosen, institution.id, listed, connection)
    finally:
        _scan_connections.give_back(connection)
    if scans is None:
        return {}
    return {plan.key.release_id: (files, scan) for plan, files, scan in zip(chosen, listed, scans, strict=True)}


@contextlib.contextmanager
def prescanned(scans: dict[tuple[str, str], Prescan]) -> Iterator[None]:
    """Within the block (this thread), an in-process contribution (pipelines.local.contribute_locally) to
    release id r takes institution i's scan out of `scans[(r, i)]` when it lists the same files, instead of
    scanning them again."""
    token = _prescanned.set(scans)
    try:
        yield
    finally:
        _prescanned.reset(token)


def prescanned_for(plan: ReleasePlan, work: ScanWork) -> dict[str, ShardScan]:
    """The scans made ahead (`prescanned`) for the plan's institutions whose files are those of `work`, taken
    out: each is handed out once (its contribution adds to its tallies)."""
    scans = _prescanned.get()
    if not scans:
        return {}
    made = {}
    for institution_id, files in work.sources.items():
        prescan = scans.pop((plan.key.release_id, institution_id), None)
        if prescan is not None and prescan[0] == files:
            made[institution_id] = prescan[1]
    return made


def _flat(pcollections: list[beam.PCollection], label: str) -> beam.PCollection:
    return pcollections[0] if len(pcollections) == 1 else pcollections | label >> beam.Flatten()


class Contribute(beam.PTransform):
    """The contributions of some institutions for one release, as one composite transform. Each institution's
    readings stay in its own scan shards: only packed vectors (one per shard) reach the combine."""

    def __init__(
        self,
        plan: ReleasePlan,
        institutions: Iterable[InstitutionConfig],
        *,
        spread: bool = True,
        accept_rejects: bool = False,
    ) -> None:
        """`spread` redistributes the scan shards so a distributed runner gives each its own worker; on the local
        DirectRunner, which runs them in one process anyway, the extra shuffle only costs time. `accept_rejects`:
        an institution above its max_reject_rate contributes all the same (SealContribution)."""
        institutions = tuple(institutions)
        super().__init__(label=f"Contribute[{','.join(i.id for i in institutions)}]")
        self._plan = plan
        self._institutions = institutions
        self._spread = spread
        self._accept_rejects = accept_rejects

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        plan = self._plan
        work = scan_work(plan, self._institutions)
        shards = pbegin | "ScanShards" >> beam.Create(work.shards, reshuffle=self._spread)
        dead, partials, files = [], [], []
        if work.staging:
            staged = (
                pbegin
                | "FilesToStage" >> beam.Create(work.staging, reshuffle=self._spread)
                | "Stage" >> beam.ParDo(StageFeed(plan, work.sources)).with_outputs(DEAD, PARTIAL, FILES, main="staged")
            )
            dead.append(staged[DEAD])
            partials.append(staged[PARTIAL])
            files.append(staged[FILES])
            # As a side input, every file to stage is staged before any shard is scanned.
            contribute = beam.ParDo(ContributeShard(plan, work.sources), staged=beam.pvalue.AsDict(staged.staged))
        else:
            contribute = beam.ParDo(ContributeShard(plan, work.sources))
        scanned = shards | "ContributeShards" >> contribute.with_outputs(DEAD, FILES, main=PARTIAL)
        dead.append(scanned[DEAD])
        partials.append(scanned[PARTIAL])
        files.append(scanned[FILES])
        _ = _flat(dead, "AllDeadLetters") | "WriteDeadLetters" >> beam.ParDo(WriteDeadLetters(plan))
        tallies = _flat(files, "AllFiles") | "FileTotals" >> beam.CombinePerKey(MergeFileTallies())
        seal = SealContribution(plan, missing=work.missing, accept_rejects=self._accept_rejects)
        return (
            _flat(partials, "AllPartials")
            | "Total" >> beam.CombinePerKey(MergePartials())
            | "Seal" >> beam.ParDo(seal, files=beam.pvalue.AsDict(tallies))
        )
