"""`header_signer`, the remembered check of who signed an envelope, against the obvious reference (parse the
header, verify its contributor's signature): the same verdict for valid, altered, re-signed, unregistered and
damaged envelopes, also once a valid one has been remembered."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace

import pytest

from privacy.envelope import (
    MAGIC,
    EnvelopeError,
    EnvelopeHeader,
    envelope_header,
    header_signer,
    pack_envelope,
    signature_valid,
)
from privacy.signing import generate_signing_key
from tests.privacy.test_signing import HEADER

ALPHA = generate_signing_key()
BETA = generate_signing_key()
REGISTRY = {"alpha": ALPHA[1], "beta": BETA[1]}


def reference(data: bytes, registry: dict[str, bytes]) -> tuple[EnvelopeHeader, str | None]:
    header = envelope_header(data)
    if len(header.contributors) != 1 or header.contributors[0] not in registry:
        return header, None
    signer = header.contributors[0]
    return header, signer if signature_valid(header, registry[signer]) else None


def with_header_json(data: bytes, edit: bytes, into: bytes) -> bytes:
    """The envelope with one byte string of its header JSON replaced (the signature left as it was)."""
    (head_len,) = struct.unpack_from(">I", data, len(MAGIC))
    start = len(MAGIC) + 4
    doc = zlib.decompress(data[start : start + head_len]).replace(edit, into)
    head = zlib.compress(doc)
    return MAGIC + struct.pack(">I", len(head)) + head + data[start + head_len :]


def variants() -> dict[str, bytes]:
    valid = pack_envelope(HEADER, [b"ciphertext"], signing_key=ALPHA[0])
    return {
        "valid": valid,
        "altered_after_signing": with_header_json(valid, b'"slots":3', b'"slots":4'),
        "signed_by_another_key": pack_envelope(HEADER, [b"ciphertext"], signing_key=BETA[0]),
        "claims_another_institution": pack_envelope(
            replace(HEADER, contributors=("beta",)), [b"ciphertext"], signing_key=ALPHA[0]
        ),
        "unregistered": pack_envelope(replace(HEADER, contributors=("gamma",)), [], signing_key=ALPHA[0]),
        "unsigned": pack_envelope(HEADER, [b"ciphertext"]),
        "two_contributors": pack_envelope(
            replace(HEADER, contributors=("alpha", "beta")), [], signing_key=ALPHA[0]
        ),
    }


def test_the_remembered_verdict_is_the_reference_verdict_for_every_variant_and_every_order() -> None:
    cases = variants()
    expected = {name: reference(data, REGISTRY) for name, data in cases.items()}
    assert expected["valid"][1] == "alpha" and expected["claims_another_institution"][1] is None
    assert [name for name, (_, signer) in expected.items() if signer is not None] == ["valid"]
    for order in (list(cases), list(reversed(cases)), list(cases) * 2):  # remembered ones asked again
        for name in order:
            assert header_signer(cases[name], REGISTRY) == expected[name], name


def test_a_key_not_the_one_registered_for_the_signer_is_no_signer_even_after_the_valid_check() -> None:
    data = variants()["valid"]
    assert header_signer(data, REGISTRY)[1] == "alpha"
    assert header_signer(data, {"alpha": BETA[1]})[1] is None  # the verdict is remembered per key
    assert header_signer(data, {"beta": BETA[1]})[1] is None


def test_damaged_envelopes_are_unreadable_as_before() -> None:
    data = variants()["valid"]
    for damaged in (data[: len(MAGIC) + 2], data[: len(MAGIC) + 10], b"PNG" + data[3:]):
        with pytest.raises(EnvelopeError):
            header_signer(damaged, REGISTRY)
        with pytest.raises(EnvelopeError):
            envelope_header(damaged)
