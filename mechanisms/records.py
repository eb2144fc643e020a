"""Recommendations and decisions as immutable records: their content digests, signatures and table rows.

A recommendation's digest is the SHA-256 of its content in canonical JSON: kind, mechanism and version, validity,
regions, inputs (store versions, release and forecast ids, the network's digest), parameters, summary, outcome
and every item (sorted, values rounded to 1e-6 so that a replay on another machine gives the same bits). Its id is
the digest's first 32 hex digits; `fusion recommend --replay` recomputes the digest. The operator's signature
covers the id, the digest, what it supersedes, when it was made and by which key. A decision's id is the hash of
its content (all but signer, time and signature), so the k signers of a k-of-n decision sign one id.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import pyarrow as pa

from fusion.errors import InternalError
from privacy.signing import sign, verify
from schemas.tables import DECISIONS_SCHEMA, RECOMMENDATIONS_SCHEMA

RECOMMENDATION_MESSAGE = b"fusion/recommendation/v1\n"
DECISION_MESSAGE = b"fusion/decision/v1\n"
DIGITS = 6  # items are rounded to 1e-6 of their unit


class Kind(StrEnum):
    DISPATCH = "dispatch"
    PARETO = "pareto"
    AUCTION = "auction"


class Action(StrEnum):
    RATIFY = "ratify"
    OVERRIDE = "override"
    REJECT = "reject"


class ReasonCode(StrEnum):
    """Why an authority overrode or rejected a recommendation (FERC Order 844 and CAISO's exceptional-dispatch
    reports ask for the reason of every out-of-market action)."""

    RELIABILITY = "reliability"
    DATA_ERROR = "data_error"
    POLICY = "policy"
    EMERGENCY = "emergency"
    TEST = "test"
    OTHER = "other"


RECORDED, REFUSED = "recorded", "refused"


def canonical(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def timestamp(moment: datetime) -> str:
    """A UTC time in one spelling, to microseconds (the store's resolution)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, order=True)
class Item:
    """One value of a recommendation in long form: e.g. ("lmp", "B", 26.384460, "$/MWh")."""

    item_type: str
    item_key: str
    value: float | None
    unit: str | None

    @classmethod
    def of(cls, item_type: str, item_key: str, value: float | None, unit: str | None) -> Item:
        if value is not None:
            if not math.isfinite(value):
                raise InternalError(f"item {item_type}/{item_key} is {value}; this is probably a bug")
            value = round(float(value), DIGITS) + 0.0  # + 0.0: no negative zero
        return cls(item_type, item_key, value, unit)


@dataclass(frozen=True)
class Recommendation:
    kind: str
    mechanism: str
    mechanism_version: str
    valid_from: datetime
    valid_to: datetime
    regions: tuple[str, ...]
    inputs: dict[str, Any]
    parameters: dict[str, Any]
    summary: str
    items: tuple[Item, ...]
    outcome: str = RECORDED
    refusal: str | None = None
    supersedes: str | None = None
    created_at: datetime | None = None
    signer: str = ""
    signature: str = ""
    # As read back from the store (from_rows): the id and digest its rows carry, which a check compares with the
    # digest of what they hold now. Empty for a recommendation made in this process.
    recorded_id: str = field(default="", compare=False)
    recorded_digest: str = field(default="", compare=False)

    def content(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "mechanism": self.mechanism, "mechanism_version": self.mechanism_version,
            "valid_from": timestamp(self.valid_from), "valid_to": timestamp(self.valid_to),
            "regions": list(self.regions), "inputs": canonical(self.inputs), "parameters": canonical(self.parameters),
            "summary": self.summary, "outcome": self.outcome, "refusal": self.refusal,
            "items": [[i.item_type, i.item_key, i.value, i.unit] for i in sorted(self.items, key=_item_order)],
        }

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical(self.content()).encode()).hexdigest()

    @property
    def recommendation_id(self) -> str:
        return self.digest[:32]

    def message(self) -> bytes:
        signed = {"recommendation_id": self.recommendation_id, "digest": self.digest, "supersedes": self.supersedes,
                  "created_at": timestamp(self.created_at) if self.created_at else None, "signer": self.signer}
        return RECOMMENDATION_MESSAGE + canonical(signed).encode()

    def signed(self, private_key: bytes, public_key: bytes, *, supersedes: str | None,
               created_at: datetime) -> Recommendation:
        unsigned = replace(self, supersedes=supersedes, created_at=created_at, signer=public_key.hex(), signature="")
        return replace(unsigned, signature=sign(private_key, unsigned.message()).hex())

    def signature_valid(self, keys: Iterable[bytes]) -> bool:
        try:
            signature, signer = bytes.fromhex(self.signature), bytes.fromhex(self.signer)
        except ValueError:
            return False
        return signer in set(keys) and verify(signer, self.message(), signature)

    def item(self, item_type: str, item_key: str) -> float | None:
        for i in self.items:
            if i.item_type == item_type and i.item_key == item_key:
                return i.value
        raise KeyError(f"{item_type}/{item_key}")

    def items_of(self, item_type: str) -> dict[str, float | None]:
        return {i.item_key: i.value for i in self.items if i.item_type == item_type}

    def rows(self) -> pa.Table:
        if self.created_at is None:
            raise InternalError("an unsigned recommendation has no rows; this is probably a bug")
        header = {
            "recommendation_id": self.recommendation_id, "digest": self.digest, "kind": self.kind,
            "mechanism": self.mechanism, "mechanism_version": self.mechanism_version, "created_at": self.created_at,
            "valid_from": self.valid_from, "valid_to": self.valid_to, "regions": list(self.regions),
            "inputs": canonical(self.inputs), "parameters": canonical(self.parameters), "summary": self.summary,
            "outcome": self.outcome, "refusal": self.refusal, "supersedes": self.supersedes, "binding": False,
            "signer": self.signer, "signature": self.signature,
        }
        rows = [{**header, "item_type": i.item_type, "item_key": i.item_key, "value": i.value, "unit": i.unit}
                for i in sorted(self.items, key=_item_order)]
        return pa.Table.from_pylist(rows, schema=RECOMMENDATIONS_SCHEMA)

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> Recommendation:
        """One recommendation from its rows as read back (header columns taken from the first). Raises ValueError
        for rows that do not share one header, or inputs and parameters that are not JSON."""
        first = rows[0]
        for name in ("recommendation_id", "digest", "kind", "mechanism", "mechanism_version", "created_at",
                     "valid_from", "valid_to", "regions", "inputs", "parameters", "summary", "outcome", "refusal",
                     "supersedes", "signer", "signature", "binding"):
            if any(r[name] != first[name] for r in rows):
                raise ValueError(f"its rows disagree on {name}")
        if first["binding"]:
            raise ValueError("it claims to be binding; Fusion's recommendations never are")
        return cls(
            kind=first["kind"], mechanism=first["mechanism"], mechanism_version=first["mechanism_version"],
            valid_from=first["valid_from"], valid_to=first["valid_to"], regions=tuple(first["regions"] or ()),
            inputs=json.loads(first["inputs"]), parameters=json.loads(first["parameters"]), summary=first["summary"],
            items=tuple(Item(r["item_type"], r["item_key"], r["value"], r["unit"]) for r in rows),
            outcome=first["outcome"], refusal=first["refusal"], supersedes=first["supersedes"],
            created_at=first["created_at"], signer=first["signer"], signature=first["signature"],
            recorded_id=first["recommendation_id"], recorded_digest=first["digest"],
        )

    def non_finite(self) -> str | None:
        """Where a recommendation read back holds NaN or an infinity, or None: Fusion records finite numbers only,
        and no digest can be computed over another (canonical JSON has none)."""
        for i in self.items:
            if i.value is not None and not math.isfinite(i.value):
                return f"item {i.item_type}/{i.item_key} is {i.value}"
        return _non_finite_json({"inputs": self.inputs, "parameters": self.parameters})

    def tampered(self, operator_keys: Iterable[bytes]) -> str | None:
        """Why a recommendation read back from the store is not what its operator signed, or None."""
        strange = self.non_finite()
        if strange:
            return f"it holds a non-finite value ({strange}), which Fusion never records"
        if self.recorded_digest != self.digest or self.recorded_id != self.recommendation_id:
            return "its rows no longer match the digest they carry (a row changed, added or removed)"
        if not self.signature_valid(operator_keys):
            return "its signature is not the registered mechanisms operator's (altered, or signed by another key)"
        return None


def _non_finite_json(fields: dict[str, Any]) -> str | None:
    """The first of `fields` that canonical JSON cannot hold (a NaN or an infinity in it), or None."""
    for name, value in fields.items():
        try:
            canonical(value)
        except ValueError:
            return f"{name} is {value}" if isinstance(value, float) else f"{name} hold a NaN or an infinity"
    return None


def _item_order(item: Item) -> tuple[str, str]:
    return (item.item_type, item.item_key)


@dataclass(frozen=True)
class Adopted:
    """What a decision adopts: a unit's MW (an override), or the frontier point chosen."""

    item_key: str
    value: float
    unit: str


@dataclass(frozen=True)
class Decision:
    recommendation_id: str
    recommendation_sha256: str
    action: str
    authority: str
    effective_from: datetime | None
    effective_to: datetime | None
    reason_code: str | None
    reason: str | None
    adopted: tuple[Adopted, ...] = ()
    deviation_mw: float | None = None
    cost_impact: float | None = None
    outcome: str = RECORDED
    refusal: str | None = None
    previous_decision_id: str | None = None
    signer: str = ""
    signer_key: str = ""
    decided_at: datetime | None = None
    signature: str = ""
    recorded_id: str = field(default="", compare=False)  # the id its row carries (from_row)

    def content(self) -> dict[str, Any]:
        return {
            "recommendation_id": self.recommendation_id, "recommendation_sha256": self.recommendation_sha256,
            "action": self.action, "authority": self.authority,
            "effective_from": timestamp(self.effective_from) if self.effective_from else None,
            "effective_to": timestamp(self.effective_to) if self.effective_to else None,
            "reason_code": self.reason_code, "reason": self.reason,
            "adopted": [[a.item_key, a.value, a.unit] for a in self.adopted],
            "deviation_mw": self.deviation_mw, "cost_impact": self.cost_impact,
            "outcome": self.outcome, "refusal": self.refusal,
        }

    @property
    def decision_id(self) -> str:
        return hashlib.sha256(canonical(self.content()).encode()).hexdigest()[:32]

    def message(self) -> bytes:
        signed = {"decision_id": self.decision_id, **self.content(), "previous_decision_id": self.previous_decision_id,
                  "signer": self.signer, "signer_key": self.signer_key,
                  "decided_at": timestamp(self.decided_at) if self.decided_at else None}
        return DECISION_MESSAGE + canonical(signed).encode()

    def signed(self, private_key: bytes | None, public_key: bytes | None, *, signer: str,
               decided_at: datetime) -> Decision:
        """Signed by `private_key`; without one (a refusal before any key could be read), unsigned."""
        unsigned = replace(self, signer=signer, signer_key=public_key.hex() if public_key else "",
                           decided_at=decided_at, signature="")
        if private_key is None:
            return unsigned
        return replace(unsigned, signature=sign(private_key, unsigned.message()).hex())

    def non_finite(self) -> str | None:
        """Where a decision read back holds NaN or an infinity, or None: Fusion records finite numbers only, and no
        id can be computed over another."""
        return _non_finite_json({"deviation_mw": self.deviation_mw, "cost_impact": self.cost_impact,
                                 **{f"adopted {a.item_key}": a.value for a in self.adopted}})

    def signature_valid(self) -> bool:
        """Whether `signature` is valid under `signer_key` (whether that key is registered is the caller's)."""
        try:
            signature, key = bytes.fromhex(self.signature), bytes.fromhex(self.signer_key)
        except ValueError:
            return False
        return bool(signature) and verify(key, self.message(), signature)

    def rows(self) -> pa.Table:
        row = {**self.content(), "decision_id": self.decision_id, "effective_from": self.effective_from,
               "effective_to": self.effective_to, "previous_decision_id": self.previous_decision_id,
               "signer": self.signer, "signer_key": self.signer_key, "decided_at": self.decided_at,
               "signature": self.signature,
               "adopted": [{"item_key": a.item_key, "value": a.value, "unit": a.unit} for a in self.adopted]}
        return pa.Table.from_pylist([row], schema=DECISIONS_SCHEMA)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Decision:
        return cls(
            recommendation_id=row["recommendation_id"], recommendation_sha256=row["recommendation_sha256"],
            action=row["action"], authority=row["authority"], effective_from=row["effective_from"],
            effective_to=row["effective_to"], reason_code=row["reason_code"], reason=row["reason"],
            adopted=tuple(Adopted(a["item_key"], a["value"], a["unit"]) for a in row["adopted"] or ()),
            deviation_mw=row["deviation_mw"], cost_impact=row["cost_impact"], outcome=row["outcome"],
            refusal=row["refusal"], previous_decision_id=row["previous_decision_id"], signer=row["signer"],
            signer_key=row["signer_key"], decided_at=row["decided_at"], signature=row["signature"],
            recorded_id=row["decision_id"],
        )


__all__ = [
    "Action",
    "Adopted",
    "Decision",
    "Item",
    "Kind",
    "ReasonCode",
    "Recommendation",
    "canonical",
    "timestamp",
]
