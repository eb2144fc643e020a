"""Double masking (Bonawitz et al., CCS 2017): a self mask per contribution, its seed Shamir-shared.

Pairwise masks alone let a coalition of the aggregator and the key holder read one institution: decrypt the
full sum, then declare the victim absent and ask the survivors to remove their masks with it; the difference
of the two sums is the victim's contribution. With double masking every envelope also carries a self mask
PRG(b_i), and b_i is split into Shamir shares, one sealed to each institution. To decrypt anything the
aggregator must remove every self mask, so it needs `threshold` shares of b_i for each included institution.

Each institution also Shamir-shares every pairwise mask key it holds for the release (`share_pair_keys`). When
institutions are absent, the answers reveal shares of the keys each included institution holds with the absent
ones, never with another included one, so the aggregator removes the masks that no longer cancel itself, and
any `threshold` answers complete a release, even if a survivor drops out during the round. For an absent
institution nothing of its self mask is revealed. An honest institution answers one roster per release (it
remembers its answer), so it never reveals both kinds for the same institution: a sum with the victim and one
without it cannot both be unmasked unless `threshold` institutions collude.

On a sparse masking graph (privacy/masking_graph.py) the shares go to the dealer's closed neighbourhood only
(itself and its k neighbours), at the federation-wide x coordinates, with threshold k/2 + 1.

Shamir sharing is over the prime field GF(2^521 - 1), which holds a 256-bit seed; shares are sealed to their
recipient with ChaCha20-Poly1305 under a key from X25519 agreement (HKDF, bound to release, sender and
recipient).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.masking import agreement, mask_vector, pair_key

PRIME = 2**521 - 1  # a Mersenne prime: the field of the shares
SEED_BYTES = 32
_SHARE_INFO = b"fusion/seed-share/v1"
_SELF_MASK_INFO = b"fusion/self-mask/v1"

Share = tuple[int, int]  # (x, y) with 1 <= x and y in GF(PRIME)


class ShareError(ValueError):
    """A share cannot be opened, or the shares do not reconstruct the committed seed."""


def new_seed() -> bytes:
    """A fresh self-mask seed (32 bytes from the OS CSPRNG); never seeded, even in test mode."""
    return secrets.token_bytes(SEED_BYTES)


def commitment(seed: bytes, *, context: bytes) -> str:
    """SHA-256 commitment to a seed for one release: lets the aggregator check a reconstruction."""
    return hashlib.sha256(b"fusion/seed-commitment/v1|" + context + b"|" + seed).hexdigest()


def self_mask(seed: bytes, *, slots: int, modulus: int, context: bytes) -> np.ndarray:
    """The self mask PRG(seed): `slots` values uniform in [0, modulus)."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=context, info=_SELF_MASK_INFO).derive(seed)
    return mask_vector(key, slots, modulus)


def split(secret: bytes, *, shares: int, threshold: int) -> list[Share]:
    """Shamir shares (x = 1..shares) of `secret`; any `threshold` of them reconstruct it, fewer reveal nothing."""
    if not 1 <= threshold <= shares:
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares ({shares})")
    return split_at(secret, xs=range(1, shares + 1), threshold=threshold)


def split_at(secret: bytes, *, xs: Iterable[int], threshold: int) -> list[Share]:
    """Shamir shares of `secret` at the distinct, nonzero coordinates `xs`; any `threshold` reconstruct it."""
    points = list(xs)
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares ({len(points)})")
    if len(set(points)) != len(points) or min(points) < 1:
        raise ValueError("share coordinates must be distinct and at least 1")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("the secret is too large for the share field")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [(x, _evaluate(coefficients, x)) for x in points]


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def combine(shares: Iterable[Share], *, length: int = SEED_BYTES) -> bytes:
    """Lagrange interpolation at 0 of exactly the given shares (distinct x)."""
    points = list(shares)
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs) or not points:
        raise ShareError("shares must be non-empty with distinct x")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = numerator * (-xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise ShareError("the shares do not interpolate to a seed")
    return secret.to_bytes(length, "big")


def share_digest(share: Share, *, context: bytes, dealer: str, recipient: str) -> str:
    """SHA-256 of one recipient's share, published (signed) by its dealer: a revealed share is checked on its
    own, so a wrong one is discarded without searching subsets of shares."""
    doc = f"fusion/share-digest/v1|{dealer}|{recipient}|{share[0]}|{share[1]:x}".encode()
    return hashlib.sha256(context + b"|" + doc).hexdigest()


def reconstruct(shares: Mapping[int, int], *, threshold: int, expected: str, context: bytes) -> bytes:
    """The seed from `threshold` of `shares` (already checked against their digests), verified against its
    commitment `expected`; raises ShareError if there are too few or they do not match."""
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} valid share(s), {threshold} needed")
    seed = combine(sorted(shares.items())[:threshold])
    if not secrets.compare_digest(commitment(seed, context=context), expected):
        raise ShareError("the shares do not reconstruct the committed seed")
    return seed


def _share_key(own_private: bytes, peer_public: bytes, *, context: bytes, sender: str, recipient: str) -> bytes:
    return _derived_share_key(agreement(own_private, peer_public), context=context, sender=sender, recipient=recipient)


def _derived_share_key(shared: bytes, *, context: bytes, sender: str, recipient: str) -> bytes:
    info = _SHARE_INFO + f"|{sender}|{recipient}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=context, info=info).derive(shared)


def seal_share(
    share: Share, own_private: bytes, peer_public: bytes, *, context: bytes, sender: str, recipient: str
) -> str:
    """Encrypt a share so only `recipient` (holder of the peer key) can open it; hex of nonce | ciphertext."""
    return _seal(share, agreement(own_private, peer_public), context=context, sender=sender, recipient=recipient)


def _seal(share: Share, shared: bytes, *, context: bytes, sender: str, recipient: str) -> str:
    key = _derived_share_key(shared, context=context, sender=sender, recipient=recipient)
    nonce = secrets.token_bytes(12)
    plain = share[0].to_bytes(4, "big") + share[1].to_bytes(66, "big")
    aad = context + f"|{sender}|{recipient}".encode()
    return (nonce + ChaCha20Poly1305(key).encrypt(nonce, plain, aad)).hex()


def open_share(
    sealed: str, own_private: bytes, sender_public: bytes, *, context: bytes, sender: str, recipient: str
) -> Share:
    """Decrypt a share sealed to `recipient` (this party) by `sender`; raises ShareError if it was tampered."""
    try:
        data = bytes.fromhex(sealed)
        key = _share_key(own_private, sender_public, context=context, sender=sender, recipient=recipient)
        aad = context + f"|{sender}|{recipient}".encode()
        plain = ChaCha20Poly1305(key).decrypt(data[:12], data[12:], aad)
    except (ValueError, InvalidTag):
        raise ShareError(f"the share {sender} sealed for {recipient} cannot be opened") from None
    return int.from_bytes(plain[:4], "big"), int.from_bytes(plain[4:], "big")


def share_coordinates(institutions: Iterable[str]) -> dict[str, int]:
    """Each institution's Shamir x coordinate: its 1-based rank among the federation's sorted ids."""
    return {institution: x for x, institution in enumerate(sorted(institutions), start=1)}


def share_seed(
    seed: bytes,
    *,
    own_id: str,
    own_private: bytes,
    peers: Mapping[str, bytes],
    threshold: int,
    context: bytes,
    coordinates: Mapping[str, int] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Split `seed` among `peers` (id -> X25519 public key, the sender included): (recipient -> share sealed to
    it, recipient -> digest of its share). `coordinates` gives each recipient's x (default: its rank among
    `peers`); a sparse masking graph passes the federation-wide ranks, so an institution's x is the same for
    every dealer."""
    shared = {peer: agreement(own_private, public) for peer, public in peers.items()}
    return _share(seed, own_id=own_id, shared=shared, threshold=threshold, context=context, coordinates=coordinates)


def _share(
    secret: bytes,
    *,
    own_id: str,
    shared: Mapping[str, bytes],
    threshold: int,
    context: bytes,
    coordinates: Mapping[str, int] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """`share_seed` with the X25519 secrets shared with each recipient already agreed (once per peer, however
    many secrets are shared)."""
    xs = share_coordinates(shared) if coordinates is None else {peer: coordinates[peer] for peer in shared}
    shares = dict(split_at(secret, xs=sorted(xs.values()), threshold=threshold))
    sealed, digests = {}, {}
    for peer in sorted(shared):
        share = (xs[peer], shares[xs[peer]])
        sealed[peer] = _seal(share, shared[peer], context=context, sender=own_id, recipient=peer)
        digests[peer] = share_digest(share, context=context, dealer=own_id, recipient=peer)
    return sealed, digests


def encode_share(share: Share) -> str:
    """A revealed share as text for an envelope header: 'x:y' with y in hex."""
    return f"{share[0]}:{share[1]:x}"


def decode_share(text: str) -> Share:
    try:
        x, y = text.split(":")
        return int(x), int(y, 16)
    except ValueError:
        raise ShareError(f"malformed share '{text[:40]}'") from None


def pair_key_context(context: bytes, *, dealer: str, peer: str) -> bytes:
    """The release context for the shares of the mask key `dealer` holds with `peer`: their sealing keys,
    digests and commitment are bound to the pair, so a share of one key never passes for a share of another, or
    for a share of a self-mask seed."""
    return context + f"|pair-key|{dealer}|{peer}".encode()


def pair_entry(peer: str, recipient: str) -> str:
    """The header key of one share of a pair key: 'peer/recipient' ('/' is not allowed in institution ids)."""
    return f"{peer}/{recipient}"


def share_pair_keys(
    *,
    own_id: str,
    own_private: bytes,
    peers: Mapping[str, bytes],
    threshold: int,
    context: bytes,
    coordinates: Mapping[str, int] | None = None,
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Shamir-share the mask key `own_id` holds with each other institution of `peers` (id -> X25519 public
    key, the sender included) among all of `peers`: (pair_entry(peer, recipient) -> share sealed to the
    recipient, pair_entry(peer, recipient) -> digest of that share, peer -> commitment to the key). On a sparse
    masking graph `peers` is the sender's closed neighbourhood and `coordinates` the federation-wide x's."""
    sealed: dict[str, str] = {}
    digests: dict[str, str] = {}
    commitments: dict[str, str] = {}
    shared = {peer: agreement(own_private, public) for peer, public in peers.items()}
    for peer, public in sorted(peers.items()):
        if peer == own_id:
            continue
        bound = pair_key_context(context, dealer=own_id, peer=peer)
        key = pair_key(own_private, public, context=context)
        commitments[peer] = commitment(key, context=bound)
        shares, share_digests = _share(
            key, own_id=own_id, shared=shared, threshold=threshold, context=bound, coordinates=coordinates
        )
        for recipient in shares:
            sealed[pair_entry(peer, recipient)] = shares[recipient]
            digests[pair_entry(peer, recipient)] = share_digests[recipient]
    return sealed, digests, commitments
