"""TenSEAL BFV: key generation, packing int64 vectors into ciphertexts, homomorphic sums, decryption.

Parameters (DESIGN.md): poly_modulus_degree 8192 (8192 slots per ciphertext), coefficient primes of 60 bits,
and a batching plain modulus t: the largest prime below 2^59 with t = 1 mod 16384. Addition is exact mod t and
decryption decodes to the centred range (-t/2, t/2), so every total must stay below t/2 in absolute value;
`check_no_wrap` enforces that when a config is loaded.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import tenseal as ts

POLY_MODULUS_DEGREE = 8192
SLOTS_PER_CIPHERTEXT = POLY_MODULUS_DEGREE
COEFF_MOD_BIT_SIZES = (60, 60, 60)
PLAIN_MODULUS = 576460752303210497  # prime, = 1 mod 2*8192, < 2^59 (checked in tests)
MAX_ABS_TOTAL = (PLAIN_MODULUS - 1) // 2


class WrapRisk(ValueError):
    """A total could reach t/2 and wrap silently mod t."""


def check_no_wrap(largest_total: float) -> None:
    """Refuse a configuration whose largest possible |total| could wrap mod t."""
    if not largest_total < MAX_ABS_TOTAL:
        raise WrapRisk(
            f"the largest possible encrypted total ({largest_total:.3e}) is not below t/2 ({MAX_ABS_TOTAL:.3e}): "
            "lower max_readings_per_cell, coarsen a metric's resolution or narrow its clamp bounds"
        )


def generate_keys() -> tuple[bytes, bytes]:
    """(secret context, public context) bytes; the secret one must stay with the key holder."""
    context = ts.context(
        ts.SCHEME_TYPE.BFV,
        poly_modulus_degree=POLY_MODULUS_DEGREE,
        plain_modulus=PLAIN_MODULUS,
        coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
    )
    return context.serialize(save_secret_key=True), context.serialize(save_secret_key=False)


#: Public contexts loaded by this process, by the SHA-256 of their bytes (the most recent few): a process that
#: seals contributions and then sums them (`fusion batch`) loads the federation's public context once, not per role.
_PUBLIC_CONTEXTS: OrderedDict[bytes, ts.Context] = OrderedDict()
_PUBLIC_CONTEXTS_KEPT = 4
_PUBLIC_CONTEXTS_LOCK = threading.Lock()


def load_public_context(data: bytes) -> ts.Context:
    """A context that can encrypt and add but not decrypt; refuses bytes that carry a secret key. Loaded once per
    process for the same bytes (callers use it to encrypt, add and check ciphertexts, which leave it unchanged)."""
    digest = hashlib.sha256(data).digest()
    with _PUBLIC_CONTEXTS_LOCK:
        cached = _PUBLIC_CONTEXTS.get(digest)
        if cached is not None:
            _PUBLIC_CONTEXTS.move_to_end(digest)
            return cached
    context = ts.context_from(data)
    if context.is_private():
        raise ValueError("expected a public context, but these bytes contain the HE secret key")
    with _PUBLIC_CONTEXTS_LOCK:
        _PUBLIC_CONTEXTS[digest] = context
        while len(_PUBLIC_CONTEXTS) > _PUBLIC_CONTEXTS_KEPT:
            _PUBLIC_CONTEXTS.popitem(last=False)
    return context


def load_secret_context(data: bytes) -> ts.Context:
    context = ts.context_from(data)
    if not context.is_private():
        raise ValueError("expected the key holder's secret context, got a public one")
    return context


def encrypt_vector(context: ts.Context, vector: np.ndarray, *, residues: bool = False) -> list[bytes]:
    """Encrypt an integer vector as ceil(len / 8192) serialized BFV ciphertexts (the last one may be shorter)."""
    vector = np.asarray(vector)
    if vector.dtype.kind not in "iu":
        raise TypeError(f"only integer vectors can be encrypted, got dtype {vector.dtype}")
    if vector.size == 0:
        raise ValueError("nothing to encrypt: the vector is empty")
    # Masked vectors are residues mod t in the centred range, whose largest magnitude is (t - 1) / 2 itself.
    limit = MAX_ABS_TOTAL + 1 if residues else MAX_ABS_TOTAL
    if int(vector.max()) >= limit or int(vector.min()) <= -limit:
        raise WrapRisk("a vector entry is not below t/2 in absolute value")
    vector = vector.astype(np.int64)
    chunks = []
    for offset in range(0, vector.size, SLOTS_PER_CIPHERTEXT):
        chunk = vector[offset : offset + SLOTS_PER_CIPHERTEXT]
        chunks.append(ts.bfv_vector(context, chunk).serialize())
    return chunks


def add_encrypted(context: ts.Context, vectors: Sequence[Sequence[bytes]]) -> list[bytes]:
    """Slot-wise homomorphic sum of several encrypted vectors of the same length."""
    if not vectors:
        raise ValueError("nothing to add")
    lengths = {len(v) for v in vectors}
    if len(lengths) != 1:
        raise ValueError(f"encrypted vectors have different numbers of ciphertexts: {sorted(lengths)}")
    totals = []
    for parts in zip(*vectors, strict=True):
        total = ts.bfv_vector_from(context, parts[0])
        for part in parts[1:]:
            total += ts.bfv_vector_from(context, part)
        totals.append(total.serialize())
    return totals


def add_plain(context: ts.Context, ciphertexts: Sequence[bytes], vector: np.ndarray) -> list[bytes]:
    """Slot-wise ciphertext + plaintext (entries in the centred range mod t); deterministic, unlike encrypting
    the vector and adding, so re-running a sum gives the same bytes."""
    vector = np.asarray(vector, dtype=np.int64)
    if int(np.abs(vector).max(initial=0)) > MAX_ABS_TOTAL:
        raise WrapRisk("a plaintext entry is not in the centred range mod t")
    if ciphertexts_for(vector.size) != len(ciphertexts):
        raise ValueError(f"a {vector.size}-slot vector does not match {len(ciphertexts)} ciphertexts")
    out = []
    for index, data in enumerate(ciphertexts):
        chunk = vector[index * SLOTS_PER_CIPHERTEXT : (index + 1) * SLOTS_PER_CIPHERTEXT]
        out.append((ts.bfv_vector_from(context, data) + chunk.tolist()).serialize())
    return out


def ciphertexts_for(slots: int) -> int:
    """How many ciphertexts a vector of `slots` slots takes."""
    return -(-slots // SLOTS_PER_CIPHERTEXT)


def check_ciphertext(context: ts.Context, data: bytes) -> int:
    """The slots of `data`, a BFV vector ciphertext under `context`'s parameters; ValueError if it is not one. (One
    of another size than its place loads, and fails only when the aggregator adds it to the others.)"""
    try:
        return int(ts.bfv_vector_from(context, data).size())
    except Exception as exc:  # TenSEAL raises bare ValueErrors/RuntimeErrors from its C++ core
        raise ValueError(f"not a ciphertext of this federation: {exc}") from None


def ciphertext_sizes(slots: int) -> list[int]:
    """The slots of each ciphertext of a `slots`-slot vector, in order."""
    return [min(SLOTS_PER_CIPHERTEXT, slots - start) for start in range(0, slots, SLOTS_PER_CIPHERTEXT)]


def decrypt_vector(context: ts.Context, ciphertexts: Sequence[bytes], length: int) -> np.ndarray:
    """Decrypt serialized ciphertexts with the secret context into an int64 vector of `length` slots."""
    values: list[int] = []
    for data in ciphertexts:
        values.extend(ts.bfv_vector_from(context, data).decrypt())
    if len(values) < length:
        raise ValueError(f"ciphertexts hold {len(values)} slots, expected at least {length}")
    return np.asarray(values[:length], dtype=np.int64)
