"""Signed releases: the key holder signs what it publishes; anyone holding the store and the registry checks it.

A release's signature (Ed25519, the key holder's registered key) covers its id, the SHA-256 of the aggregate
envelope it decrypted (itself signed by the registered aggregator), and a digest of its rows in `releases`
over the columns published at the time. It is kept in the release's `audit` row (event `<release_id>:released`),
so the tables' schemas stay as they are. `verify_releases` (fusion/store/verification.py) reads both tables
(and the budget ledger's charged release ids) and reports each release as verified, legacy (published before the
key holder had a key, as registered with its first key), tampered (a row changed, added or removed, its signature
or audit record removed, or a signature no registered key made), missing (charged but not published) or, in a
production store, a violation (test-mode cells: noise off or seeded, charged nothing to the budget;
fusion/store/mode.py).

Each signature also holds the release's place in a chain: its sequence number and the release it follows, both
from the key holder's own record (`next_link`), not from the store. A whole release removed from `releases`,
`audit` and the ledger together is then reported `missing`, named by a later signature or as a sequence number
nobody holds. Not detected: the newest releases removed whole (the newest one, or the newest several together: the
chain then ends earlier), until the next one is signed or unless the reader passes the highest number it saw before
(`seen`); and a retired key still verifies what it signs (rotation is not revocation: a compromised key must be
struck from the registry by hand, and the releases it signed then read as tampered).

From format v2 (message `fusion/release/v2`), a signature also covers the release's budget claim: its period, its
charge and the period's spend after it (fusion/store/signed_budget.py), so `verify_releases` can recompose each
period from the signed releases alone, and the digest and count of the release's `rejects` rows (its noisy reject
tallies, over every column but `recorded_at`). Signatures without them keep the v1 message and verify as before.

The rows digest is computed column by column on Arrow data (no Python loop over rows), in the
order of the release's cells (metric, region, window start), so it does not depend on how the store split or
compacted its files: floats by their IEEE-754 bits (every NaN alike), timestamps as microseconds since the
epoch, integers as 64-bit, text as UTF-8 with lengths, and each column's nulls.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion.errors import FusionError
from fusion.store.delta import Store
from privacy.signing import sign, verify

DIGEST_VERSION = "fusion/release-rows/v1"
_MESSAGE = b"fusion/release/v1\n"
#: Signatures that also cover the release's budget claim (fusion/store/signed_budget.py).
_MESSAGE_V2 = b"fusion/release/v2\n"
#: A training round's signature: its row in `models` (`record_digest`), its budget claim and the earlier attempts
#: at the same round it supersedes (charged, then lost in a crash before they were committed).
_MESSAGE_ROUND = b"fusion/training-round/v1\n"
#: The table a training round's signed row is in.
ROUNDS_TABLE = "models"
#: A release's rows are its cells: one per metric, region and window.
CELL_ORDER = ("metric", "region", "window_start")
#: A release's `rejects` rows: one per institution and reason.
REJECT_ORDER = ("institution", "reason")
#: The `rejects` columns a signature covers: all but `recorded_at` (two passes racing to publish one release may
#: each record its own time; the store keeps the first pass's rows, perhaps beside the other's audit record).
REJECT_COLUMNS = (
    "release_id", "institution", "interval_start", "interval_end", "reason", "count", "count_sd", "count_ci_low",
    "count_ci_high",
)  # fmt: skip


def rows_digest(rows: pa.Table, columns: Sequence[str]) -> str:
    """SHA-256 of a release's rows over `columns`, independent of row order and of file layout."""
    table = rows if in_cell_order(rows) else rows.sort_by([(c, "ascending") for c in CELL_ORDER])
    return _Canonical(table).digest(0, table.num_rows, columns)


def rejects_digest(rows: pa.Table) -> str:
    """SHA-256 of a release's `rejects` rows over REJECT_COLUMNS, independent of row order and of file layout."""
    table = rows.sort_by([(c, "ascending") for c in REJECT_ORDER])
    return _Canonical(table).digest(0, table.num_rows, REJECT_COLUMNS)


def in_cell_order(rows: pa.Table) -> bool:
    """Whether the rows are already in CELL_ORDER (ascending, no NULLs in its columns): a release's rows are
    written in that order, and the sort (stable) would then leave them as they are, for 0.02-0.04 s a release."""
    if rows.num_rows < 2:
        return True
    if any(rows.column(c).null_count for c in CELL_ORDER):
        return False
    before = after = None  # rows i-1 and i ordered so far: strictly (before), or equal up to this column (after)
    for name in CELL_ORDER:
        column = rows.column(name)
        previous, current = column.slice(0, rows.num_rows - 1), column.slice(1)
        less, equal = pc.less(previous, current), pc.equal(previous, current)
        if before is None:
            before, after = less, equal
        else:
            before = pc.or_(before, pc.and_(after, less))
            after = pc.and_(after, equal)
    assert before is not None and after is not None
    return bool(pc.all(pc.or_(before, after)).as_py())


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
    # releases in this store, and the release it follows (empty for the first; a tuple, so a format that names
    # several can be read by the same code).
    sequence: int | None = None
    previous: tuple[str, ...] | None = None
    # From v2 on: the period it was charged to, its charge and the period's spend after it (signed_budget.py).
    budget: dict[str, Any] | None = None
    # From v2 on: the release's `rejects` rows, {"rows": count, "sha256": rejects_digest} (None: not covered).
    rejects: dict[str, Any] | None = None
    # Where its rows are: `releases`, or `models` for a training round (`sign_round`: rows digested by
    # `record_digest`, and the ids of the attempts at the same round that it supersedes).
    table: str = "releases"
    supersedes: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        """The signed message's format: 1 (neither a budget claim nor rejects), 2."""
        return 1 if self.budget is None and self.rejects is None else 2

    @property
    def is_round(self) -> bool:
        return self.table == ROUNDS_TABLE

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
        if self.budget is not None:
            doc["budget"] = self.budget
        if self.rejects is not None:
            doc["rejects"] = self.rejects
        if self.is_round:
            doc["table"] = self.table
            doc["supersedes"] = list(self.supersedes)
        return doc

    def message(self) -> bytes:
        prefix = _MESSAGE_ROUND if self.is_round else _MESSAGE if self.version == 1 else _MESSAGE_V2
        return prefix + json.dumps(self._signed(), sort_keys=True, separators=(",", ":")).encode()

    def to_doc(self) -> dict[str, Any]:
        return {**self._signed(), "signature": self.signature}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ReleaseSignature:
        """The signature a record holds; TypeError (or KeyError) for anything but the exact types it signs."""
        if not isinstance(doc, dict):
            raise TypeError("a signature record is an object")
        columns = doc["columns"]
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise TypeError("columns must be a list of names")
        for name in ("release_id", "aggregate_sha256", "rows_sha256", "signature"):
            if not isinstance(doc[name], str):
                raise TypeError(f"{name} must be text")
        if isinstance(doc["rows"], bool) or not isinstance(doc["rows"], int) or doc["rows"] < 0:
            raise TypeError("rows must be a count")
        sequence, previous = doc.get("sequence"), doc.get("previous")
        if sequence is not None:
            if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 1:
                raise TypeError("sequence must be a positive integer")
            if not isinstance(previous, list) or not all(isinstance(p, str) for p in previous):
                raise TypeError("previous must be a list of release ids")
        budget = doc.get("budget")
        if budget is not None and not isinstance(budget, dict):
            raise TypeError("budget must be an object")
        rejects = doc.get("rejects")
        if rejects is not None:
            count, digest = rejects["rows"], rejects["sha256"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 0 or not isinstance(digest, str):
                raise TypeError("rejects must hold a row count and a digest")
        table, supersedes = doc.get("table", "releases"), doc.get("supersedes", [])
        if table not in ("releases", ROUNDS_TABLE):
            raise TypeError("table must be releases or models")
        if not isinstance(supersedes, list) or not all(isinstance(s, str) for s in supersedes):
            raise TypeError("supersedes must be a list of release ids")
        return cls(
            release_id=doc["release_id"],
            aggregate_sha256=doc["aggregate_sha256"],
            rows=doc["rows"],
            rows_sha256=doc["rows_sha256"],
            columns=tuple(columns),
            signature=doc["signature"],
            sequence=sequence,
            previous=None if sequence is None else tuple(previous),  # type: ignore[arg-type]
            budget=budget,
            rejects=rejects,
            table=table,
            supersedes=tuple(supersedes),
        )


@dataclass(frozen=True)
class ChainLink:
    """Where a new release goes in the chain of signed releases: its sequence number and the release it follows
    (none for the first)."""

    sequence: int
    previous: tuple[str, ...]


def sign_release(
    rows: pa.Table,
    *,
    release_id: str,
    aggregate_sha256: str,
    signing_key: bytes,
    link: ChainLink | None = None,
    budget: dict[str, Any] | None = None,
    rejects: pa.Table | None = None,
) -> ReleaseSignature:
    """The key holder's signature on a release's rows (all of `rows`' columns), before they are committed, on
    its place in the chain (`link`, from `next_link`), on its budget claim (`budget`, signed_budget.py) and on its
    `rejects` rows (`rejects`)."""
    unsigned = ReleaseSignature(
        release_id=release_id,
        aggregate_sha256=aggregate_sha256,
        rows=rows.num_rows,
        rows_sha256=rows_digest(rows, rows.column_names),
        columns=tuple(rows.column_names),
        sequence=None if link is None else link.sequence,
        previous=None if link is None else link.previous,
        budget=budget,
        rejects=None if rejects is None else {"rows": rejects.num_rows, "sha256": rejects_digest(rejects)},
    )
    return replace(unsigned, signature=sign(signing_key, unsigned.message()).hex())


def record_digest(rows: pa.Table, columns: Sequence[str]) -> str:
    """SHA-256 of a few rows (a training round's row in `models`, lists of parameters included) over `columns`,
    in the rows' order: each row's values as Arrow gives them to Python, in canonical JSON (floats by their
    shortest exact repr, times in ISO form with their offset)."""
    values = rows.select(list(columns)).to_pylist()
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)
    return hashlib.sha256(f"fusion/record-rows/v1|{json.dumps(list(columns))}|{text}".encode()).hexdigest()


def sign_round(
    row: pa.Table,
    *,
    release_id: str,
    aggregate_sha256: str,
    signing_key: bytes,
    budget: dict[str, Any],
    supersedes: Sequence[str] = (),
) -> ReleaseSignature:
    """The key holder's signature on a training round: its row in `models` (all of `row`'s columns), the aggregate
    it decrypted, its budget claim, and the earlier attempts at the same round that it supersedes. Rounds are not
    chained (a round lost in a crash that cannot be resumed is drawn again under another id, which would leave a
    gap): a round removed
    whole is found through its charge in the ledger, unless a later attempt supersedes it."""
    unsigned = ReleaseSignature(
        release_id=release_id,
        aggregate_sha256=aggregate_sha256,
        rows=row.num_rows,
        rows_sha256=record_digest(row, row.column_names),
        columns=tuple(row.column_names),
        budget=budget,
        table=ROUNDS_TABLE,
        supersedes=tuple(supersedes),
    )
    return replace(unsigned, signature=sign(signing_key, unsigned.message()).hex())


#: The key holder's memory of the chain, in its keys directory: the last sequence number it gave out, the release
#: that got it, and the recent links (a pass re-run after a crash signs the same place again).
CHAIN_STATE = "release-chain.json"
_CHAIN_LOCK = "release-chain.lock"
_KEPT_LINKS = 256


@contextmanager
def _chain_lock(directory: Path) -> Iterator[None]:
    """One key-holder pass at a time gives out sequence numbers (an advisory lock on a file beside the state)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / _CHAIN_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def next_link(store: Store, release_id: str, *, state_dir: Path, public_keys: Sequence[bytes]) -> ChainLink:
    """The chain link for `release_id`: one past the last sequence number the key holder gave out, following the
    release that got it. The numbers come from the key holder's own state (`state_dir`/release-chain.json, kept
    with its keys), not from the store, so a release removed from the store is still named by the next one, and
    no number is given out twice. Without a state (the first chained release, or a state lost), it starts from
    the highest sequence an authentic signature in the store holds, or after the newest release signed before
    the chain."""
    path = state_dir / CHAIN_STATE
    owner = store_id(store)
    with _chain_lock(state_dir):
        state = _read_chain_state(path, owner) if path.exists() else _chain_state_from_store(store, public_keys)
        links: dict[str, list[Any]] = state["links"]
        if release_id in links:
            sequence, previous = links[release_id]
            return ChainLink(int(sequence), tuple(previous))
        link = ChainLink(int(state["sequence"]) + 1, (state["head"],) if state["head"] else ())
        links[release_id] = [link.sequence, list(link.previous)]
        kept = dict(sorted(links.items(), key=lambda item: item[1][0])[-_KEPT_LINKS:])
        doc = {"store": owner, "sequence": link.sequence, "head": release_id, "links": kept}
        pending = path.with_name(f".{path.name}.{os.getpid()}")
        descriptor = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(doc, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(pending, path)
        directory = os.open(state_dir, os.O_RDONLY)
        try:  # the rename itself survives a power loss: a number is never given out twice
            os.fsync(directory)
        finally:
            os.close(directory)
        return link


def store_id(store: Store) -> str:
    """The store the chain belongs to: the id Delta gave its audit table when it was created (a store recreated
    at the same place has another)."""
    return str(store.delta_table("audit").metadata().id)


def _read_chain_state(path: Path, store_id: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
        sequence, head, links, owner = doc["sequence"], doc["head"], doc["links"], doc["store"]
        valid = (
            isinstance(sequence, int)
            and sequence >= 0
            and (head is None or isinstance(head, str))
            and isinstance(links, dict)
            and all(
                isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], list)
                for v in links.values()
            )
        )
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        valid = False
    if not valid:
        raise FusionError(
            f"the key holder's chain state {path} is unreadable; move it away to rebuild it from the store (the "
            "chain then resumes from the store's highest authentic sequence number)"
        )
    if owner != store_id:
        raise FusionError(
            f"the key holder's chain state {path} belongs to another store (its audit table was created anew): if "
            "the store was recreated on purpose, move the state away and the chain starts again from this store; "
            "otherwise find out who replaced the audit table"
        )
    return {"sequence": sequence, "head": head, "links": links}


def _chain_state_from_store(store: Store, public_keys: Sequence[bytes]) -> dict[str, Any]:
    """The chain as the store shows it: its highest sequence number under an authentic signature, or none (the
    newest release record, signed before the chain or not at all, is then the first link's predecessor)."""
    audit = store.dataset("audit", string_view=None).to_table(columns=["event_id", "action", "at", "detail"])
    audit = audit.filter(pc.equal(pc.cast(audit.column("action"), pa.string()), "release"))
    newest: tuple[Any, str] | None = None
    chained = []
    for event, at, detail in zip(
        audit.column("event_id").to_pylist(), audit.column("at").to_pylist(), audit.column("detail").to_pylist(),
        strict=True,
    ):
        release_id = str(event).removesuffix(":released")
        if newest is None or (at, release_id) > newest:
            newest = (at, release_id)
        claim = _parse_claim(detail)
        if claim is not None and claim.sequence is not None and claim.release_id == release_id:
            chained.append(claim)
    for claim in sorted(chained, key=lambda c: (c.sequence or 0, c.release_id), reverse=True):
        if _authentic(claim, public_keys):
            return {"sequence": claim.sequence, "head": claim.release_id, "links": {}}
    return {"sequence": 0, "head": None if newest is None else newest[1], "links": {}}


def _parse_claim(detail: str | None) -> ReleaseSignature | None:
    """The signature an audit detail holds, or None if it holds none or an unreadable one."""
    try:
        doc = json.loads(detail or "{}")
        return ReleaseSignature.from_doc(doc[SIGNATURE_FIELD]) if isinstance(doc, dict) else None
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return None


def _authentic(claim: ReleaseSignature, public_keys: Sequence[bytes]) -> bool:
    try:
        signature = bytes.fromhex(claim.signature)
    except ValueError:
        return False
    return any(verify(key, claim.message(), signature) for key in public_keys)


#: The audit detail field holding a release's signature.
SIGNATURE_FIELD = "signature"
