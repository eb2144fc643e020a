"""Ed25519 envelope signatures: valid ones verify, anything altered or signed by another key does not."""

from __future__ import annotations

from dataclasses import replace

from privacy.envelope import EnvelopeHeader, pack_envelope, signature_valid, unpack_envelope
from privacy.signing import generate_signing_key, sign, verify

HEADER = EnvelopeHeader(
    kind="contribution",
    federation="f",
    interval_start="2026-01-01T00:00:00+00:00",
    interval_end="2026-01-01T06:00:00+00:00",
    layout_digest="l",
    parameters_digest="p",
    slots=3,
    contributors=("alpha",),
    noise_variance=1.0,
    context_sha256="c",
    nonce="n" * 32,
    created_at="now",
)


def test_a_signature_verifies_only_for_its_message_and_key() -> None:
    private, public = generate_signing_key()
    other_private, other_public = generate_signing_key()
    signature = sign(private, b"message")
    assert len(private) == len(public) == 32 and len(signature) == 64
    assert verify(public, b"message", signature)
    assert not verify(public, b"messagE", signature)
    assert not verify(other_public, b"message", signature)
    assert not verify(public, b"message", sign(other_private, b"message"))
    assert not verify(public, b"message", b"\x00" * 64)
    assert not verify(b"short", b"message", signature)


def test_a_signed_envelope_binds_its_header_and_payload() -> None:
    private, public = generate_signing_key()
    header, _ = unpack_envelope(pack_envelope(HEADER, [b"ct-1", b"ct-2"], signing_key=private))
    assert signature_valid(header, public)
    for field, value in (
        ("nonce", "m" * 32),
        ("noise_variance", 2.0),
        ("contributors", ("beta",)),
        ("payload_sha256", "0" * 64),
        ("interval_end", "2026-01-02T00:00:00+00:00"),
    ):
        assert not signature_valid(replace(header, **{field: value}), public), field
    assert not signature_valid(replace(header, signature=""), public)
    assert not signature_valid(replace(header, signature="zz"), public)
    unsigned, _ = unpack_envelope(pack_envelope(HEADER, [b"ct-1"]))
    assert unsigned.signature == "" and not signature_valid(unsigned, public)
