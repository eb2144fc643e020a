"""BFV parameters, exact encrypted sums, key separation and the wrap checks (real TenSEAL, no mocks)."""

from __future__ import annotations

import math
import re
import tomllib

import numpy as np
import pytest
import sympy
import tenseal as ts
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fusion.config.federation import parse_config
from fusion.config.parameters import release_parameters
from fusion.errors import ConfigError
from privacy.he import (
    COEFF_MOD_BIT_SIZES,
    MAX_ABS_TOTAL,
    PLAIN_MODULUS,
    POLY_MODULUS_DEGREE,
    SLOTS_PER_CIPHERTEXT,
    WrapRisk,
    add_encrypted,
    check_no_wrap,
    decrypt_vector,
    encrypt_vector,
    generate_keys,
    load_public_context,
    load_secret_context,
)
from tests.conftest import config_text

# --- helpers ------------------------------------------------------------------------------------------------------

_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # deterministic for n < 3.3e24 (Sorenson & Webster)


def is_prime_miller_rabin(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24: a slow, obvious reference independent of sympy."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_keys()


@pytest.fixture(scope="module")
def public(keys: tuple[bytes, bytes]) -> ts.Context:
    return load_public_context(keys[1])


@pytest.fixture(scope="module")
def secret(keys: tuple[bytes, bytes]) -> ts.Context:
    return load_secret_context(keys[0])


def _with_institution_line(text: str, institution: str, line: str) -> str:
    """Insert `line` right after the `id = "<institution>"` line of that [[institutions]] table."""
    marker = f'id = "{institution}"\n'
    assert text.count(marker) == 1
    return text.replace(marker, marker + line + "\n")


# --- the plain modulus and the coefficient primes -----------------------------------------------------------------


def test_miller_rabin_reference_agrees_with_sympy() -> None:
    candidates = [*range(2, 2000), 2**61 - 1, 2**61 + 1, 561, 3215031751, 3825123056546413051, 2**59 - 55]
    for n in candidates:
        assert is_prime_miller_rabin(n) == sympy.isprime(n), n


def test_plain_modulus_is_a_batching_prime_below_2_pow_59() -> None:
    t = PLAIN_MODULUS
    assert is_prime_miller_rabin(t)
    assert sympy.isprime(t)
    assert t % (2 * POLY_MODULUS_DEGREE) == 1  # = 1 mod 16384: batching (SIMD slots) needs t = 1 mod 2N
    assert 2 * POLY_MODULUS_DEGREE == 16384
    assert 2**58 < t < 2**59
    assert (t - 1) // 2 == MAX_ABS_TOTAL


def test_plain_modulus_is_the_largest_such_prime_below_2_pow_59() -> None:
    """The module docstring says 'the largest prime below 2^59 with t = 1 mod 16384': no larger candidate exists."""
    larger = range(PLAIN_MODULUS + 16384, 2**59, 16384)
    assert len(larger) > 0
    assert not any(sympy.isprime(n) for n in larger)


def test_context_uses_the_declared_parameters_and_coefficient_primes_exceed_t(public: ts.Context) -> None:
    """Read the generated context's moduli back from SEAL.

    The modulus chain is (q0 q1 q2) at the key level, (q0 q1) and (q0) below it. Bit counts 60/120/180 alone prove
    every prime is >= 2^59 > t: q0 >= 2^59; q0 q1 >= 2^119 with q0 < 2^60 gives q1 > 2^59; likewise q2.
    The binding also exposes each level's product modulo 2^64, from which the primes are recovered exactly
    (q_i < 2^64 and odd) and checked against SEAL's own (q0 q1 q2 mod t).
    """
    seal = public.seal_context().data
    levels = []
    data = seal.key_context_data()
    while data is not None:
        levels.append(data)
        data = data.next_context_data()
    assert [d.chain_index() for d in levels] == [2, 1, 0]
    assert [d.total_coeff_modulus_bit_count() for d in levels] == [180, 120, 60]
    assert sum(COEFF_MOD_BIT_SIZES) == 180
    for d in levels:  # SEAL stores (t + 1) / 2 as the threshold of the upper half
        assert 2 * d.plain_upper_half_threshold() - 1 == PLAIN_MODULUS

    primes: list[int] = []
    product = 1
    for d in reversed(levels):  # (q0), (q0 q1), (q0 q1 q2): low 64-bit limb of each product
        q = d.total_coeff_modulus() * pow(product, -1, 2**64) % 2**64
        primes.append(q)
        product *= q
    assert product % PLAIN_MODULUS == levels[0].coeff_modulus_mod_plain_modulus()
    for q in primes:
        assert q.bit_length() == 60
        assert sympy.isprime(q)
        assert q % (2 * POLY_MODULUS_DEGREE) == 1  # NTT-friendly
        assert PLAIN_MODULUS < 2**59 <= q


# --- exact encrypted sums -----------------------------------------------------------------------------------------


@st.composite
def bounded_vectors(draw: st.DrawFn) -> list[list[int]]:
    """2..6 vectors whose slot-wise sums stay strictly inside (-MAX_ABS_TOTAL, MAX_ABS_TOTAL)."""
    k = draw(st.integers(min_value=2, max_value=6))
    bound = MAX_ABS_TOTAL // k - 1  # k * bound < MAX_ABS_TOTAL
    length = draw(st.integers(min_value=1, max_value=48))
    near = st.sampled_from([bound, -bound, bound - 1, -bound + 1, bound - 7, -bound + 7, 0, 1, -1])
    entry = st.one_of(st.integers(min_value=-bound, max_value=bound), near)
    return [draw(st.lists(entry, min_size=length, max_size=length)) for _ in range(k)]


@settings(max_examples=15, deadline=None)
@given(vectors=bounded_vectors())
@example(vectors=[[MAX_ABS_TOTAL // 6 - 1] * 3] * 6)  # all at the largest allowed positive total
@example(vectors=[[-(MAX_ABS_TOTAL // 6 - 1)] * 3] * 6)
@example(vectors=[[MAX_ABS_TOTAL // 2 - 1, -(MAX_ABS_TOTAL // 2 - 1), 5], [MAX_ABS_TOTAL // 2 - 1, 3, -5]])
def test_encrypt_add_decrypt_equals_plaintext_sum(
    vectors: list[list[int]], public: ts.Context, secret: ts.Context
) -> None:
    length = len(vectors[0])
    expected = [sum(v[i] for v in vectors) for i in range(length)]  # Python ints: no overflow
    assert all(abs(x) < MAX_ABS_TOTAL for x in expected)
    encrypted = [encrypt_vector(public, np.array(v, dtype=np.int64)) for v in vectors]
    total = add_encrypted(public, encrypted)
    decrypted = decrypt_vector(secret, total, length)
    assert decrypted.dtype == np.int64
    assert [int(x) for x in decrypted] == expected


def test_totals_at_the_edge_of_the_centred_range_decode_exactly(public: ts.Context, secret: ts.Context) -> None:
    edge = MAX_ABS_TOTAL - 1
    parts = [encrypt_vector(public, np.array([edge, -edge, 0])), encrypt_vector(public, np.array([0, 0, -edge]))]
    assert decrypt_vector(secret, add_encrypted(public, parts), 3).tolist() == [edge, -edge, -edge]


def test_a_total_past_t_half_wraps_silently(public: ts.Context, secret: ts.Context) -> None:
    """Why the wrap checks exist: BFV adds mod t, so 2 * (t/2 - 1) decrypts as -3, with no error."""
    edge = MAX_ABS_TOTAL - 1
    part = encrypt_vector(public, np.array([edge]))
    wrapped = decrypt_vector(secret, add_encrypted(public, [part, part]), 1)
    assert int(wrapped[0]) == 2 * edge - PLAIN_MODULUS == -3


@pytest.mark.parametrize(
    ("length", "ciphertexts"),
    [(7, 1), (SLOTS_PER_CIPHERTEXT, 1), (SLOTS_PER_CIPHERTEXT + 1, 2), (2 * SLOTS_PER_CIPHERTEXT + 5, 3)],
)
def test_vectors_of_several_ciphertexts_round_trip(
    length: int, ciphertexts: int, public: ts.Context, secret: ts.Context
) -> None:
    rng = np.random.default_rng(length)
    bound = MAX_ABS_TOTAL // 3 - 1
    first = rng.integers(-bound, bound, size=length, endpoint=True)
    second = rng.integers(-bound, bound, size=length, endpoint=True)
    first[:2], second[:2] = (bound, -bound), (bound, -bound)  # extreme totals in the first ciphertext...
    first[-2:], second[-2:] = (bound, -bound), (bound, -bound)  # ...and in the last (partial) one
    enc_first, enc_second = encrypt_vector(public, first), encrypt_vector(public, second)
    assert len(enc_first) == len(enc_second) == ciphertexts
    assert decrypt_vector(secret, enc_first, length).tolist() == first.tolist()
    total = decrypt_vector(secret, add_encrypted(public, [enc_first, enc_second]), length)
    assert [int(x) for x in total] == [int(a) + int(b) for a, b in zip(first, second, strict=True)]


def test_decrypt_refuses_more_slots_than_the_ciphertexts_hold(public: ts.Context, secret: ts.Context) -> None:
    encrypted = encrypt_vector(public, np.arange(10))
    with pytest.raises(ValueError, match="expected at least 8193"):
        decrypt_vector(secret, encrypted, SLOTS_PER_CIPHERTEXT + 1)


def test_add_refuses_mismatched_or_empty_input(public: ts.Context) -> None:
    one = encrypt_vector(public, np.arange(3))
    two = encrypt_vector(public, np.arange(SLOTS_PER_CIPHERTEXT + 3))
    with pytest.raises(ValueError, match="different numbers of ciphertexts"):
        add_encrypted(public, [one, two])
    with pytest.raises(ValueError, match="nothing to add"):
        add_encrypted(public, [])
    with pytest.raises(ValueError, match="different sizes"):  # same ciphertext count, different lengths
        add_encrypted(public, [one, encrypt_vector(public, np.arange(2))])


# --- key separation -----------------------------------------------------------------------------------------------


def test_public_and_secret_contexts_are_not_interchangeable(keys: tuple[bytes, bytes]) -> None:
    secret_bytes, public_bytes = keys
    with pytest.raises(ValueError, match="secret key"):
        load_public_context(secret_bytes)
    with pytest.raises(ValueError, match="public one"):
        load_secret_context(public_bytes)
    public = load_public_context(public_bytes)
    assert not public.is_private()
    assert not public.has_secret_key()
    assert load_secret_context(secret_bytes).has_secret_key()


def test_a_public_context_is_loaded_once_per_process_and_a_secret_one_never_kept(keys: tuple[bytes, bytes]) -> None:
    secret_bytes, public_bytes = keys
    first = load_public_context(public_bytes)
    assert load_public_context(bytes(bytearray(public_bytes))) is first  # the same bytes: the same context
    other_secret, other_public = generate_keys()
    assert load_public_context(other_public) is not first
    for _ in range(2):  # refused each time: secret bytes are never kept as a public context
        with pytest.raises(ValueError, match="secret key"):
            load_public_context(secret_bytes)
    encrypted = encrypt_vector(load_public_context(other_public), np.array([5, -7]))
    assert decrypt_vector(load_secret_context(other_secret), encrypted, 2).tolist() == [5, -7]


def test_a_public_context_cannot_decrypt(public: ts.Context, secret: ts.Context) -> None:
    encrypted = encrypt_vector(public, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="secret_key"):
        ts.bfv_vector_from(public, encrypted[0]).decrypt()
    with pytest.raises(ValueError, match="secret_key"):
        decrypt_vector(public, encrypted, 3)
    assert decrypt_vector(secret, encrypted, 3).tolist() == [1, 2, 3]  # the same bytes, the right key


# --- the wrap checks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [MAX_ABS_TOTAL, -MAX_ABS_TOTAL, MAX_ABS_TOTAL + 1, 2**62, -(2**62)])
def test_encrypt_refuses_entries_not_below_t_half(entry: int, public: ts.Context) -> None:
    with pytest.raises(WrapRisk):
        encrypt_vector(public, np.array([0, entry, 0], dtype=np.int64))


def test_encrypt_accepts_the_largest_allowed_entries(public: ts.Context) -> None:
    assert len(encrypt_vector(public, np.array([MAX_ABS_TOTAL - 1, -(MAX_ABS_TOTAL - 1)]))) == 1


def test_encrypt_refuses_int64_min(public: ts.Context) -> None:
    with pytest.raises(WrapRisk):
        encrypt_vector(public, np.array([-(2**63), 5], dtype=np.int64))


def test_check_no_wrap_boundary() -> None:
    check_no_wrap(MAX_ABS_TOTAL - 1)
    check_no_wrap(float(MAX_ABS_TOTAL - 64))  # the closest double below t/2 (spacing 64 near 2^58)
    for largest in (MAX_ABS_TOTAL, float(MAX_ABS_TOTAL), 1e30, math.inf, math.nan):
        with pytest.raises(WrapRisk, match="max_readings_per_cell"):
            check_no_wrap(largest)


def test_a_config_that_could_wrap_is_refused_at_load() -> None:
    base = config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2)
    small = _with_institution_line(base, "beta", "max_readings_per_cell = 1000")
    config = parse_config(tomllib.loads(small))
    assert config.institution("beta").max_readings_per_cell == 1000

    huge = _with_institution_line(base, "beta", "max_readings_per_cell = 1_000_000_000_000_000")
    with pytest.raises(ConfigError, match="max_readings_per_cell"):
        parse_config(tomllib.loads(huge))


def test_wrap_check_boundary_on_the_reading_cap() -> None:
    """One institution, noise off: the largest total is exactly cap * worst weight, refused iff >= t/2."""
    base = config_text(institutions=[("alpha", "parquet")], quorum=1, noise=False)
    params = release_parameters(parse_config(tomllib.loads(base)))
    worst = max(max(e.count_weight, e.sum_bound) for e in params.encodings)
    first_refused = -(-MAX_ABS_TOTAL // worst)  # ceil(t/2 / worst)
    assert worst * first_refused >= MAX_ABS_TOTAL > worst * (first_refused - 1)

    loads = _with_institution_line(base, "alpha", f"max_readings_per_cell = {first_refused - 1}")
    assert parse_config(tomllib.loads(loads)).institution("alpha").max_readings_per_cell == first_refused - 1
    refused = _with_institution_line(base, "alpha", f"max_readings_per_cell = {first_refused}")
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(refused))
    assert re.search(r"max_readings_per_cell", str(info.value))
