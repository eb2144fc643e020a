"""Pairwise masks: they cancel exactly in the sum, a single masked vector is uniform, and the keys with absent
institutions remove the masks that no longer cancel."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privacy import he
from privacy.masking import (
    add_mod,
    generate_agreement_key,
    mask_vector,
    pair_key,
    pair_term,
    pairwise_mask,
)

T = he.PLAIN_MODULUS
NAMES = ("alpha", "beta", "delta", "gamma", "omega")
KEYS = {n: generate_agreement_key() for n in NAMES}
PUBLIC = {n: k[1] for n, k in KEYS.items()}


def centred_sum(vectors: list[np.ndarray]) -> list[int]:
    """Exact sum of centred residues, reduced mod t into the centred range (what BFV decryption returns)."""
    total = [sum(int(v[i]) for v in vectors) % T for i in range(len(vectors[0]))]
    return [x - T if x > T // 2 else x for x in total]


def test_both_sides_of_a_pair_derive_the_same_key_and_different_releases_differ() -> None:
    a, b = KEYS["alpha"], KEYS["beta"]
    assert pair_key(a[0], b[1], context=b"r1") == pair_key(b[0], a[1], context=b"r1")
    assert pair_key(a[0], b[1], context=b"r1") != pair_key(a[0], b[1], context=b"r2")
    assert pair_key(a[0], b[1], context=b"r1") != pair_key(a[0], KEYS["gamma"][1], context=b"r1")


@settings(max_examples=25, deadline=None)
@given(
    members=st.integers(min_value=2, max_value=5),
    values=st.lists(st.integers(min_value=-(10**15), max_value=10**15), min_size=1, max_size=40),
)
def test_masked_vectors_sum_to_the_plain_sum(members: int, values: list[int]) -> None:
    names = NAMES[:members]
    peers = {n: PUBLIC[n] for n in names}
    plain = [np.array(values, dtype=np.int64) * (k + 1) for k in range(members)]
    masked = [
        add_mod(plain[k], pairwise_mask(n, KEYS[n][0], peers, slots=len(values), modulus=T, context=b"r"), T)
        for k, n in enumerate(names)
    ]
    assert centred_sum(masked) == centred_sum(plain)
    assert all(abs(int(x)) <= T // 2 for m in masked for x in m)


def test_a_single_masked_vector_is_uniform_mod_t() -> None:
    """Even decrypted, one institution's envelope (here: all zeros plus its masks) looks uniform mod t."""
    slots = 20_000
    mask = pairwise_mask("beta", KEYS["beta"][0], PUBLIC, slots=slots, modulus=T, context=b"release")
    masked = add_mod(np.zeros(slots, dtype=np.int64), mask, T)
    residues = (masked.astype(np.float64) % T) / T
    assert stats.kstest(residues, "uniform").pvalue > 1e-4
    counts, _ = np.histogram(residues, bins=20, range=(0, 1))
    assert stats.chisquare(counts).pvalue > 1e-4


@pytest.mark.parametrize("modulus", [T, 2**40 + 1, 3, 2**62 + 3])
def test_a_mask_is_the_first_words_below_the_modulus_however_the_stream_is_read(modulus: int) -> None:
    """mask_vector reads as many keystream words as it needs in as few reads as it can; the mask is always the
    first `slots` words (cut to the modulus's bit length) below the modulus, in stream order."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    key, slots = bytes(range(32)), 20_000
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * 4 * slots))
    words = np.frombuffer(stream, dtype="<u8") & np.uint64((1 << modulus.bit_length()) - 1)
    expected = words[words < np.uint64(modulus)][:slots].astype(np.int64)
    np.testing.assert_array_equal(mask_vector(key, slots, modulus), expected)
    np.testing.assert_array_equal(mask_vector(key, 7, modulus), expected[:7])


def test_mask_words_cover_the_whole_range_without_bias() -> None:
    draws = mask_vector(b"k" * 32, 50_000, T).astype(np.float64) / T
    assert draws.min() >= 0 and draws.max() < 1
    assert stats.kstest(draws, "uniform").pvalue > 1e-4


@pytest.mark.parametrize("absent", [("gamma",), ("beta", "omega")])
def test_the_recovery_round_gives_the_exact_sum_with_institutions_missing(absent: tuple[str, ...]) -> None:
    slots = 64
    rng = np.random.default_rng(3)
    plain = {n: rng.integers(-(10**12), 10**12, size=slots) for n in NAMES}
    masked = {
        n: add_mod(plain[n], pairwise_mask(n, KEYS[n][0], PUBLIC, slots=slots, modulus=T, context=b"r"), T)
        for n in NAMES
    }
    survivors = [n for n in NAMES if n not in absent]
    # What the aggregator removes, from the keys each survivor holds with each absent institution.
    leftover = np.zeros(slots, dtype=np.int64)
    for n in survivors:
        for a in absent:
            key = pair_key(KEYS[n][0], PUBLIC[a], context=b"r")
            leftover = (leftover + pair_term(n, a, key, slots=slots, modulus=T)) % T
    removal = add_mod(np.zeros(slots, dtype=np.int64), (T - leftover) % T, T)
    assert centred_sum([masked[n] for n in survivors] + [removal]) == centred_sum([plain[n] for n in survivors])
    # Without the removal the survivors' sum is garbage: the absent ones' masks do not cancel.
    assert centred_sum([masked[n] for n in survivors]) != centred_sum([plain[n] for n in survivors])
