"""Signed releases: the key holder signs what it publishes; anyone holding the store and the registry checks it.

A release's signature (Ed25519, the key holder's registered key) covers its id, the SHA-256 of the aggregate
envelope it decrypted (itself signed by the registered aggregator), and a digest of its rows in `releases`
over the columns published at the time. It is kept in the release's `audit` row (event `<release_id>:released`),
so the tables' schemas stay as they are. `verify_releases` reads both tables (and the budget ledger's charged
release ids) and reports each release as verified, legacy (published before the key holder had a key, as
registered with its first key), tampered (a row changed, added or removed, its signature or audit record
removed, or a signature no registered key made) or missing (charged but not published).

Not detected: a whole release removed from `releases`, `audit` and the ledger together; and a retired key
still verifies what it signs (rotation is not revocation: a compromised key must be struck from the registry by
hand, and the releases it signed then read as tampered).

The rows digest is computed column by column on Arrow data (no Python loop over rows but text's join), in the
order of the release's cells (metric, region, window start), so it does not depend on how the store split or
compacted its files: floats by their IEEE-754 bits (every NaN alike), timestamps as microseconds since the
epoch, integers as 64-bit, text as UTF-8 with lengths, and each column's nulls.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
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
    table = rows.select(list(columns)).sort_by([(c, "ascending") for c in CELL_ORDER])
    digest = hashlib.sha256(f"{DIGEST_VERSION}|{json.dumps(list(columns))}|{table.num_rows}".encode())
    for name in columns:
        column = table.column(name).combine_chunks()
        digest.update(f"|{name}|".encode())
        digest.update(np.packbits(column.is_valid().to_numpy(zero_copy_only=False)).tobytes())
        digest.update(_canonical(column))
    return digest.hexdigest()


def _canonical(column: pa.Array) -> bytes:
    kind = column.type
    if pa.types.is_timestamp(kind):
        column = column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        kind = column.type
    if pa.types.is_integer(kind):
        return np.asarray(column.cast(pa.int64()).fill_null(0).to_numpy(), dtype="<i8").tobytes()
    if pa.types.is_floating(kind):
        values = np.asarray(column.cast(pa.float64()).fill_null(0.0).to_numpy(), dtype="<f8")
        return np.where(np.isnan(values), np.nan, values).astype("<f8").tobytes()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        text = column.cast(pa.string()).fill_null("")
        lengths = np.asarray(pc.binary_length(text).to_numpy(), dtype="<i8")
        return lengths.tobytes() + "".join(text.to_pylist()).encode()
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

    def message(self) -> bytes:
        doc = {
            "release_id": self.release_id,
            "aggregate_sha256": self.aggregate_sha256,
            "rows": self.rows,
            "rows_sha256": self.rows_sha256,
            "columns": list(self.columns),
        }
        return _MESSAGE + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def to_doc(self) -> dict[str, Any]:
        return {
            "release_id": self.release_id,
            "aggregate_sha256": self.aggregate_sha256,
            "rows": self.rows,
            "rows_sha256": self.rows_sha256,
            "columns": list(self.columns),
            "signature": self.signature,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ReleaseSignature:
        columns = doc["columns"]
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise TypeError("columns must be a list of names")
        return cls(
            release_id=str(doc["release_id"]),
            aggregate_sha256=str(doc["aggregate_sha256"]),
            rows=int(doc["rows"]),
            rows_sha256=str(doc["rows_sha256"]),
            columns=tuple(columns),
            signature=str(doc["signature"]),
        )


def sign_release(
    rows: pa.Table, *, release_id: str, aggregate_sha256: str, signing_key: bytes
) -> ReleaseSignature:
    """The key holder's signature on a release's rows (all of `rows`' columns), before they are committed."""
    unsigned = ReleaseSignature(
        release_id=release_id,
        aggregate_sha256=aggregate_sha256,
        rows=rows.num_rows,
        rows_sha256=rows_digest(rows, rows.column_names),
        columns=tuple(rows.column_names),
    )
    signature = sign(signing_key, unsigned.message()).hex()
    return ReleaseSignature(**{**unsigned.to_doc(), "columns": unsigned.columns, "signature": signature})


#: The audit detail field holding a release's signature.
SIGNATURE_FIELD = "signature"


@dataclass(frozen=True)
class ReleaseCheck:
    release_id: str
    rows: int  # rows in `releases` now
    status: str  # "verified" | "legacy" | "tampered" | "missing"
    reason: str


#: Statuses that mean the release is what was published.
GOOD = ("verified", "legacy")


def verify_releases(
    store: Store,
    public_keys: Sequence[bytes],
    *,
    unsigned: frozenset[str] = frozenset(),
    release_id: str | None = None,
) -> list[ReleaseCheck]:
    """Check every release in the store (or one) against the key holder's registered public keys. `unsigned`:
    the releases registered as published before the key holder had a key (`legacy` when they have no
    signature); any other release without a valid signature is `tampered`. A release the budget ledger charged
    but that has neither rows nor an audit record is `missing` (a pass that crashed before committing: re-run
    it; or the release was removed)."""
    releases = store.read("releases")
    releases = releases.take(pc.sort_indices(releases, [("release_id", "ascending")]))
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
    wanted = sorted(set(bounds) | set(records) | charged) if release_id is None else [release_id]
    checks = []
    for rid in wanted:
        start, end = bounds.get(rid, (0, 0))
        rows = releases.slice(start, end - start)
        status, reason = _check(rid, rows, records.get(rid, []), public_keys, unsigned, rid in charged)
        checks.append(ReleaseCheck(rid, rows.num_rows, status, reason))
    return checks


def _check(
    release_id: str,
    rows: pa.Table,
    records: list[dict[str, Any]],
    public_keys: Sequence[bytes],
    unsigned: frozenset[str],
    charged: bool,
) -> tuple[str, str]:
    own = [r for r in records if r["event_id"] == f"{release_id}:released"]
    if len(records) > len(own):
        return "tampered", "an audit record of its release that Fusion did not write"
    if not own:
        if rows.num_rows == 0:
            if charged:
                return "missing", (
                    "charged to the budget but not published: a pass that crashed before committing (re-run it), "
                    "or its rows and audit record were removed"
                )
            return "missing", "no such release"
        if release_id in unsigned:
            return "legacy", "published before the key holder had a signing key"
        return "tampered", "no audit record of its release (removed, or rows added without a release)"
    record = own[0]
    try:
        doc = json.loads(record["detail"] or "{}")
        if not isinstance(doc, dict) or SIGNATURE_FIELD not in doc:
            if release_id in unsigned:
                return "legacy", "published before the key holder had a signing key"
            return "tampered", "its audit record holds no signature (removed)"
        claim = ReleaseSignature.from_doc(doc[SIGNATURE_FIELD])
        signature = bytes.fromhex(claim.signature)
    except (ValueError, KeyError, TypeError) as exc:
        return "tampered", f"the signature record is unreadable: {exc}"
    if claim.release_id != release_id:
        return "tampered", f"the signature is for release {claim.release_id}"
    if not any(verify(key, claim.message(), signature) for key in public_keys):
        return "tampered", "the signature was not made by the registered key holder"
    if record["content_sha256"] != claim.aggregate_sha256:
        return "tampered", "the audit record names another aggregate envelope than the one signed"
    if rows.num_rows == 0:
        return "missing", (
            "signed but its rows are not committed: a pass that crashed (re-run it), or its rows were removed"
        )
    if rows.num_rows != claim.rows:
        return "tampered", f"{rows.num_rows} rows in `releases`, {claim.rows} signed"
    missing = [c for c in claim.columns if c not in rows.column_names]
    if missing:
        return "tampered", f"signed columns missing from `releases`: {missing}"
    if rows_digest(rows, claim.columns) != claim.rows_sha256:
        return "tampered", "the rows in `releases` differ from the rows signed"
    return "verified", ""
