"""Signed releases: the key holder signs what it publishes; anyone holding the store and the registry checks it.

A release's signature (Ed25519, the key holder's registered key) covers its id, the SHA-256 of the aggregate
envelope it decrypted (itself signed by the registered aggregator), and a digest of its rows in `releases`
over the columns published at the time. It is kept in the release's `audit` row (event `<release_id>:released`),
so the tables' schemas stay as they are. `verify_releases` reads both tables (and the budget ledger's charged
release ids) and reports each release as verified, legacy (published before the key holder had a key, as
registered with its first key), tampered (a row changed, added or removed, its signature or audit record
removed, or a signature no registered key made) or missing (charged but not published).

Each signature also holds the release's place in a chain: its sequence number among the key holder's signed
releases in this store, and the release(s) it follows. A whole release removed from `releases`, `audit` and the
ledger together is then reported `missing`, named by a later signature or by the sequence number nobody holds.
Not detected: the newest release(s), which no signature names yet, removed whole; and a retired key
still verifies what it signs (rotation is not revocation: a compromised key must be struck from the registry by
hand, and the releases it signed then read as tampered).

The rows digest is computed column by column on Arrow data (no Python loop over rows), in the
order of the release's cells (metric, region, window start), so it does not depend on how the store split or
compacted its files: floats by their IEEE-754 bits (every NaN alike), timestamps as microseconds since the
epoch, integers as 64-bit, text as UTF-8 with lengths, and each column's nulls.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion.store import Store
from privacy.signing import sign, verify

DIGEST_VERSION = "fusion/release-rows/v1"
_MESSAGE = b"fusion/release/v1\n"
#: A release's rows are its cells: one per metric, region and window.
CELL_ORDER = ("metric", "region", "window_start")


def rows_digest(rows: pa.Table, columns: Sequence[str]) -> str:
    """SHA-256 of a release's rows over `columns`, independent of row order and of file layout."""
    table = rows.sort_by([(c, "ascending") for c in CELL_ORDER])
    return _Canonical(table).digest(0, table.num_rows, columns)


class _Canonical:
    """A table's columns in canonical form, computed once per column and digested over any run of rows: so
    `verify_releases` pays for each column once, not once per release."""

    def __init__(self, table: pa.Table) -> None:
        self._table = table
        self._columns: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, bytes]] = {}

    def digest(self, start: int, end: int, columns: Sequence[str]) -> str:
        """The digest of rows [start, end) (already in cell order) over `columns`."""
        digest = hashlib.sha256(f"{DIGEST_VERSION}|{json.dumps(list(columns))}|{end - start}".encode())
        for name in columns:
            valid, values, offsets, text = self._column(name)
            digest.update(f"|{name}|".encode())
            digest.update(np.packbits(valid[start:end]).tobytes())
            digest.update(values[start:end].tobytes())
            if offsets is not None:  # text: its lengths above, its bytes here
                digest.update(text[offsets[start] : offsets[end]])
        return digest.hexdigest()

    def _column(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, bytes]:
        """(validity, fixed-width values: numbers or text lengths, text byte offsets or None, text bytes)."""
        if name not in self._columns:
            self._columns[name] = _canonical(self._table.column(name).combine_chunks())
        return self._columns[name]


def _canonical(column: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, bytes]:
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    kind = column.type
    if pa.types.is_timestamp(kind):
        column = column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        kind = column.type
    if pa.types.is_integer(kind):
        return valid, np.asarray(column.cast(pa.int64()).fill_null(0).to_numpy(), dtype="<i8"), None, b""
    if pa.types.is_floating(kind):
        values = np.asarray(column.cast(pa.float64()).fill_null(0.0).to_numpy(), dtype="<f8")
        return valid, np.where(np.isnan(values), np.nan, values).astype("<f8"), None, b""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        text = column.cast(pa.large_string()).fill_null("")
        lengths = np.asarray(pc.binary_length(text).to_numpy(), dtype="<i8")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        data = text.buffers()[2]
        first = int(np.frombuffer(text.buffers()[1], dtype="<i8", count=1, offset=8 * text.offset)[0])
        raw = b"" if data is None else data.to_pybytes()[first : first + int(offsets[-1])]
        return valid, lengths, offsets, raw
    raise TypeError(f"a release column of type {kind} has no canonical form")


@dataclass(frozen=True)
class ReleaseSignature:
    """What the key holder signs for one release."""

    release_id: str
    aggregate_sha256: str  # the aggregate envelope it decrypted
    rows: int
    rows_sha256: str
    columns: tuple[str, ...]
    signature: str = ""  # hex Ed25519 over the message below
    # The chain (None in signatures made before it): this release's place among the key holder's signed
    # releases in this store, and the releases it follows (the head(s) of the chain when it was signed).
    sequence: int | None = None
    previous: tuple[str, ...] | None = None

    def _signed(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "release_id": self.release_id,
            "aggregate_sha256": self.aggregate_sha256,
            "rows": self.rows,
            "rows_sha256": self.rows_sha256,
            "columns": list(self.columns),
        }
        if self.sequence is not None:
            doc["sequence"] = self.sequence
            doc["previous"] = list(self.previous or ())
        return doc

    def message(self) -> bytes:
        return _MESSAGE + json.dumps(self._signed(), sort_keys=True, separators=(",", ":")).encode()

    def to_doc(self) -> dict[str, Any]:
        return {**self._signed(), "signature": self.signature}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ReleaseSignature:
        columns = doc["columns"]
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise TypeError("columns must be a list of names")
        sequence, previous = doc.get("sequence"), doc.get("previous")
        if sequence is not None:
            if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 1:
                raise TypeError("sequence must be a positive integer")
            if not isinstance(previous, list) or not all(isinstance(p, str) for p in previous):
                raise TypeError("previous must be a list of release ids")
        return cls(
            release_id=str(doc["release_id"]),
            aggregate_sha256=str(doc["aggregate_sha256"]),
            rows=int(doc["rows"]),
            rows_sha256=str(doc["rows_sha256"]),
            columns=tuple(columns),
            signature=str(doc["signature"]),
            sequence=sequence,
            previous=None if sequence is None else tuple(previous),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class ChainLink:
    """Where a new release goes in the chain of signed releases: its sequence number and the releases it
    follows."""

    sequence: int
    previous: tuple[str, ...]


def sign_release(
    rows: pa.Table, *, release_id: str, aggregate_sha256: str, signing_key: bytes, link: ChainLink | None = None
) -> ReleaseSignature:
    """The key holder's signature on a release's rows (all of `rows`' columns), before they are committed, and
    on its place in the chain (`link`, from `next_link`)."""
    unsigned = ReleaseSignature(
        release_id=release_id,
        aggregate_sha256=aggregate_sha256,
        rows=rows.num_rows,
        rows_sha256=rows_digest(rows, rows.column_names),
        columns=tuple(rows.column_names),
        sequence=None if link is None else link.sequence,
        previous=None if link is None else link.previous,
    )
    return replace(unsigned, signature=sign(signing_key, unsigned.message()).hex())


#: Release records read, newest first, to find the head(s) of the chain. Two passes that sign at the same moment
#: both follow the same head and take the same sequence number; the next release follows every record at the top
#: sequence among these, so such twins stay covered.
CHAIN_WINDOW = 16


def next_link(store: Store, release_id: str) -> ChainLink:
    """The chain link for `release_id` (a release not yet recorded): one past the highest sequence among the
    newest release records, following every record at that sequence. The first chained release of a store
    that has releases signed before the chain follows the newest of them (sequence 1)."""
    dataset = store.dataset("audit", string_view=None)
    index = dataset.to_table(columns=["event_id", "action", "at"])
    events = pc.cast(index.column("event_id"), pa.string())
    mine = pc.and_(pc.equal(pc.cast(index.column("action"), pa.string()), "release"),
                   pc.not_equal(events, f"{release_id}:released"))
    index = pa.table({"event_id": events, "at": index.column("at")}).filter(mine)
    if index.num_rows == 0:
        return ChainLink(1, ())
    recent = index.sort_by([("at", "descending"), ("event_id", "descending")]).slice(0, CHAIN_WINDOW)
    wanted = recent.column("event_id")
    try:  # pushed down: only the rows of these events
        details = dataset.to_table(columns=["event_id", "detail"], filter=pc.field("event_id").isin(wanted))
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):  # string_view files of old stores
        details = dataset.to_table(columns=["event_id", "detail"])
    by_event = {
        str(e): d for e, d in zip(details.column("event_id").to_pylist(), details.column("detail").to_pylist(),
                                  strict=True)
    }
    links = []  # (sequence, release id), newest first
    for event in wanted.to_pylist():
        try:
            claim = ReleaseSignature.from_doc(json.loads(by_event.get(event) or "{}")[SIGNATURE_FIELD])
        except (ValueError, KeyError, TypeError):  # a release recorded before signatures: not part of the chain
            claim = None
        links.append((0 if claim is None or claim.sequence is None else claim.sequence,
                      event.removesuffix(":released")))
    top = max(sequence for sequence, _ in links)
    if top == 0:
        return ChainLink(1, (links[0][1],))
    return ChainLink(top + 1, tuple(sorted(rid for sequence, rid in links if sequence == top)))


#: The audit detail field holding a release's signature.
SIGNATURE_FIELD = "signature"


@dataclass(frozen=True)
class ReleaseCheck:
    release_id: str
    rows: int  # rows in `releases` now
    status: str  # "verified" | "legacy" | "tampered" | "missing"
    reason: str
    sequence: int | None = None  # its place in the chain of signed releases (None: signed before the chain)


#: Statuses that mean the release is what was published.
GOOD = ("verified", "legacy")


def verify_releases(
    store: Store,
    public_keys: Sequence[bytes],
    *,
    unsigned: frozenset[str] = frozenset(),
    release_id: str | None = None,
    seen: int = 0,
) -> list[ReleaseCheck]:
    """Check every release in the store (or one) against the key holder's registered public keys. `unsigned`:
    the releases registered as published before the key holder had a key (`legacy` when they have no
    signature); any other release without a valid signature is `tampered`. A release the budget ledger charged
    but that has neither rows nor an audit record is `missing` (a pass that crashed before committing: re-run
    it; or the release was removed). A release removed whole is `missing` too, found through the chain of
    signatures; `seen`: the highest sequence number the caller saw before, so the newest releases are covered."""
    releases = store.read("releases")
    releases = releases.sort_by([("release_id", "ascending"), *((c, "ascending") for c in CELL_ORDER)])
    canonical = _Canonical(releases)
    ids = releases.column("release_id").to_numpy(zero_copy_only=False)
    bounds: dict[str, tuple[int, int]] = {}
    if len(ids):
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], len(ids)]
        bounds = {str(ids[a]): (int(a), int(b)) for a, b in zip(starts, ends, strict=True)}
    audit = store.read("audit")
    audit = audit.filter(pc.equal(audit.column("action"), "release"))
    records: dict[str, list[dict[str, Any]]] = {}
    for row in audit.select(["event_id", "release_id", "detail", "content_sha256"]).to_pylist():
        records.setdefault(row["release_id"], []).append(row)
    charged = {r for ids_ in store.read("budget").column("release_ids").to_pylist() for r in ids_}
    known = set(bounds) | set(records) | charged
    checks, claims = [], {}
    for rid in sorted(known):
        start, end = bounds.get(rid, (0, 0))

        def digest(columns: Sequence[str], start: int = start, end: int = end) -> str:
            return canonical.digest(start, end, columns)

        status, reason, claim = _check(
            rid, end - start, releases.column_names, digest, records.get(rid, []), public_keys, unsigned, rid in charged
        )
        checks.append(ReleaseCheck(rid, end - start, status, reason, None if claim is None else claim.sequence))
        if claim is not None and claim.sequence is not None:
            claims[rid] = claim
    checks += _chain_gaps(claims, known | unsigned, seen)
    if release_id is None:
        return checks
    return [c for c in checks if c.release_id == release_id] or [
        ReleaseCheck(release_id, 0, "missing", "no such release")
    ]


def _chain_gaps(claims: dict[str, ReleaseSignature], known: set[str], seen: int) -> list[ReleaseCheck]:
    """Releases removed whole (rows, audit record and budget charge): named as a predecessor by an authentic
    signature but found nowhere, or a sequence number no authentic signature holds up to the highest one (or
    up to `seen`, the highest a reader saw before)."""
    gaps: dict[str, ReleaseCheck] = {}
    accounted = {claim.sequence for claim in claims.values() if claim.sequence is not None}
    for rid, claim in sorted(claims.items()):
        for predecessor in claim.previous or ():
            if predecessor not in known and predecessor not in gaps:
                gaps[predecessor] = ReleaseCheck(
                    predecessor, 0, "missing",
                    f"removed: the signature of release {rid} names it as a release it follows, and its rows, audit "
                    "record and budget charge are gone",
                    None if claim.sequence is None else claim.sequence - 1,
                )
                if claim.sequence is not None and claim.sequence > 1:
                    accounted.add(claim.sequence - 1)
    top = max(accounted, default=0)
    for sequence in range(1, max(top, seen) + 1):
        if sequence not in accounted:
            reason = (
                f"removed: no signed release holds sequence number {sequence} of the {top} signed so far (its rows, "
                "audit record and budget charge are gone)"
                if sequence < top
                else f"removed: a reader saw sequence number {seen} before; the highest in the store is {top}"
            )
            gaps[f"(sequence {sequence})"] = ReleaseCheck(f"(sequence {sequence})", 0, "missing", reason, sequence)
    return list(gaps.values())


def _check(
    release_id: str,
    rows: int,
    published: Sequence[str],
    digest: Callable[[Sequence[str]], str],
    records: list[dict[str, Any]],
    public_keys: Sequence[bytes],
    unsigned: frozenset[str],
    charged: bool,
) -> tuple[str, str, ReleaseSignature | None]:
    """(status, reason, the signature once it is authentic: its chain links can then be trusted)."""
    own = [r for r in records if r["event_id"] == f"{release_id}:released"]
    if len(records) > len(own):
        return "tampered", "an audit record of its release that Fusion did not write", None
    if not own:
        if rows == 0:
            if charged:
                return "missing", (
                    "charged to the budget but not published: a pass that crashed before committing (re-run it), "
                    "or its rows and audit record were removed"
                ), None
            return "missing", "no such release", None
        if release_id in unsigned:
            return "legacy", "published before the key holder had a signing key", None
        return "tampered", "no audit record of its release (removed, or rows added without a release)", None
    record = own[0]
    try:
        doc = json.loads(record["detail"] or "{}")
        if not isinstance(doc, dict) or SIGNATURE_FIELD not in doc:
            if release_id in unsigned:
                return "legacy", "published before the key holder had a signing key", None
            return "tampered", "its audit record holds no signature (removed)", None
        claim = ReleaseSignature.from_doc(doc[SIGNATURE_FIELD])
        signature = bytes.fromhex(claim.signature)
    except (ValueError, KeyError, TypeError) as exc:
        return "tampered", f"the signature record is unreadable: {exc}", None
    if claim.release_id != release_id:
        return "tampered", f"the signature is for release {claim.release_id}", None
    if not any(verify(key, claim.message(), signature) for key in public_keys):
        return "tampered", "the signature was not made by the registered key holder", None
    if record["content_sha256"] != claim.aggregate_sha256:
        return "tampered", "the audit record names another aggregate envelope than the one signed", claim
    if rows == 0:
        return "missing", (
            "signed but its rows are not committed: a pass that crashed (re-run it), or its rows were removed"
        ), claim
    if rows != claim.rows:
        return "tampered", f"{rows} rows in `releases`, {claim.rows} signed", claim
    missing = [c for c in claim.columns if c not in published]
    if missing:
        return "tampered", f"signed columns missing from `releases`: {missing}", claim
    if digest(claim.columns) != claim.rows_sha256:
        return "tampered", "the rows in `releases` differ from the rows signed", claim
    return "verified", "", claim
