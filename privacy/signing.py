"""Ed25519 signatures for envelopes (the `cryptography` package): raw 32-byte keys, domain-separated messages."""

from __future__ import annotations

import hashlib
import threading

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_DOMAIN = b"fusion/envelope/v1\n"  # a signature over an envelope can never be replayed as another message
_RAW = serialization.Encoding.Raw
#: Signatures found valid in this process (digests, oldest first), and how many are kept.
_valid: dict[bytes, None] = {}
_valid_lock = threading.Lock()
_VALID_KEPT = 65536


def generate_signing_key() -> tuple[bytes, bytes]:
    """(private key, public key), 32 raw bytes each."""
    private = Ed25519PrivateKey.generate()
    private_raw = private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public_raw = private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
    return private_raw, public_raw


def sign(private_key: bytes, message: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private_key).sign(_DOMAIN + message)


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True only for a valid signature of `message` under `public_key`.

    A release checks one envelope's signature at each step that reads it (aggregator, unmask round, key holder):
    a signature found valid is remembered for the process by the SHA-256 of (key, message, signature), so each
    is checked once. Only valid ones are remembered; a different key, message or signature is checked again."""
    seen = hashlib.sha256(b"%d|%d|" % (len(public_key), len(signature)) + public_key + signature + message).digest()
    if seen in _valid:
        return True
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, _DOMAIN + message)
    except (InvalidSignature, ValueError):
        return False
    with _valid_lock:
        _valid[seen] = None
        if len(_valid) > _VALID_KEPT:
            del _valid[next(iter(_valid))]
    return True


def public_key(private_key: bytes) -> bytes:
    """The raw public half of a raw Ed25519 private key."""
    return (
        Ed25519PrivateKey.from_private_bytes(private_key)
        .public_key()
        .public_bytes(_RAW, serialization.PublicFormat.Raw)
    )
