"""An envelope header's JSON (what is signed) is the plain dataclasses.asdict serialisation of every field."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

from privacy.envelope import EnvelopeHeader, sign_header, signature_valid
from privacy.signing import generate_signing_key
from tests.privacy.test_signing import HEADER


def reference_json(header: EnvelopeHeader) -> bytes:
    """The slow, obvious serialisation: a deep copy of every field, tuples as lists."""
    doc = asdict(header)
    for name in ("contributors", "refused", "absent", "included"):
        doc[name] = list(doc[name])
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


FULL = replace(
    HEADER,
    reject_counts={"inst-a": {"out_of_range": 3}},
    refused=({"source": "x.fenv", "institution": "inst-b", "reason": "late"},),
    absent=("inst-c",),
    included=("inst-a", "inst-b"),
    seed_commitment="c0",
    seed_shares={"inst-b": "s1"},
    share_digests={"inst-b": "d1"},
    revealed_shares={"inst-a": "1:ff"},
    pair_commitments={"inst-b": "p"},
    pair_shares={"inst-b/inst-a": "ps"},
    pair_share_digests={"inst-b/inst-a": "pd"},
    revealed_pair_shares={"inst-a/inst-c": "r"},
    layer_commitments={"3": "lc"},
    layer_digests={"3": "ld"},
    revealed_layers={"inst-a": "3:00"},
)


def test_header_json_is_the_asdict_serialisation_of_every_field() -> None:
    for header in (HEADER, FULL):
        assert header.to_json() == reference_json(header)
        assert EnvelopeHeader.from_json(header.to_json()) == header


def test_a_signed_header_verifies_and_any_changed_field_breaks_it() -> None:
    key, public = generate_signing_key()
    signed = sign_header(FULL, key)
    assert signature_valid(signed, public)
    assert not signature_valid(replace(signed, pair_shares={"inst-b/inst-a": "other"}), public)
    assert not signature_valid(replace(signed, refused=()), public)
