"""Pairwise masking on top of BFV (in the spirit of Bonawitz et al., CCS 2017).

Every pair of institutions (i, j) derives a shared secret by X25519 key agreement, expands it with HKDF-SHA256
(bound to the federation and the release, so masks are fresh for every release) into a ChaCha20 key, and draws
a mask vector uniform mod t from the keystream. Institution i adds m_ij for every j > i and subtracts it for
every j < i, so the masks cancel in the sum of all contributions, while a single envelope, even decrypted,
is uniformly distributed mod t. Each institution also Shamir-shares its mask keys for the release
(privacy/sharing.py): if institutions drop out, the unmask round reveals the keys the included institutions
hold with the absent ones (and only those), and the aggregator removes the masks that no longer cancel
(`pair_term`). Pairwise masks alone do not stop an aggregator and key holder who collude; the self masks of
privacy/sharing.py do. "Every pair" is every edge of the release's masking graph (privacy/masking_graph.py):
all pairs in small federations, each institution's k = O(log n) neighbours in large ones (`peers` is then the
institution's closed neighbourhood).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_RAW = serialization.Encoding.Raw
_INFO = b"fusion/pairwise-mask/v1"


def generate_agreement_key() -> tuple[bytes, bytes]:
    """(private key, public key) for X25519, 32 raw bytes each."""
    private = X25519PrivateKey.generate()
    private_raw = private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return private_raw, private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def pair_key(own_private: bytes, peer_public: bytes, *, context: bytes) -> bytes:
    """The 32-byte ChaCha20 key two institutions share for one release (`context` names the release)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=context, info=_INFO).derive(
        agreement(own_private, peer_public)
    )


@lru_cache(maxsize=1024)
def agreement(own_private: bytes, peer_public: bytes) -> bytes:
    """The X25519 shared secret of two keys (every key derived from it is bound to its use by HKDF), kept for the
    process: a party masks, seals and opens shares for every window with the same few peers (in memory only, beside
    the private keys the process already holds)."""
    return X25519PrivateKey.from_private_bytes(own_private).exchange(X25519PublicKey.from_public_bytes(peer_public))


def mask_vector(key: bytes, slots: int, modulus: int) -> np.ndarray:
    """`slots` values uniform in [0, modulus) from the ChaCha20 keystream (rejection sampling on 64-bit words
    reduced to the modulus's bit length, so there is no modulo bias): the first `slots` words of the stream that
    fall below the modulus, in order, however many words each read takes."""
    bits = modulus.bit_length()
    keep = np.uint64((1 << bits) - 1)
    kept_share = modulus / (1 << bits)  # the chance a word is kept: above a half (t keeps all but 4 in 10^7)
    parts: list[np.ndarray] = []
    have = 0
    # One keystream, read on: every word is fresh (restarting at another block counter would repeat words).
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    while have < slots:
        # Enough words for the rest in one read, almost always (a word it reads past the last one kept is unused).
        need = int((slots - have) / kept_share * 1.001) + 64
        words = np.frombuffer(stream.update(bytes(8 * need)), dtype="<u8") & keep
        kept = words[words < np.uint64(modulus)]
        parts.append(kept)
        have += kept.size
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out[:slots].astype(np.int64)


def pair_term(own_id: str, peer: str, key: bytes, *, slots: int, modulus: int) -> np.ndarray:
    """What `own_id` adds (mod t) for its pair with `peer`, whose mask key is `key`: +m below the peer, -m above."""
    mask = mask_vector(key, slots, modulus)
    return mask if own_id < peer else (modulus - mask) % modulus


def pairwise_mask(
    own_id: str, own_private: bytes, peers: Mapping[str, bytes], *, slots: int, modulus: int, context: bytes
) -> np.ndarray:
    """The mask institution `own_id` adds (mod t) so that all masks of `peers` cancel in the sum."""
    total = np.zeros(slots, dtype=np.int64)
    for peer, public in sorted(peers.items()):
        if peer != own_id:
            key = pair_key(own_private, public, context=context)
            total = (total + pair_term(own_id, peer, key, slots=slots, modulus=modulus)) % modulus
    return total


def centred(residues: np.ndarray, modulus: int) -> np.ndarray:
    """Residues in [0, t) mapped to the centred range (-t/2, t/2] that BFV encodes and decodes."""
    residues = np.asarray(residues, dtype=np.int64) % modulus
    return np.where(residues > modulus // 2, residues - modulus, residues)


def add_mod(vector: np.ndarray, mask: np.ndarray, modulus: int) -> np.ndarray:
    """(vector + mask) mod t, in the centred range."""
    return centred((np.asarray(vector, dtype=np.int64) % modulus + mask) % modulus, modulus)
