"""Symmetric Skellam noise from a cryptographically secure generator.

Skellam(mu) = Poisson(mu) - Poisson(mu): integer-valued, variance 2*mu, and closed under summation, so
q institutions each adding variance v/q give a total of exactly Skellam with variance v.
"""

from __future__ import annotations

import functools
import math
import secrets
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from randomgen import ChaCha

_CHACHA_ROUNDS = 20
#: NumPy's Poisson sampler keeps its variance (checked to 0.1% up to 1e12) for rates up to here; larger rates
#: are drawn as sums of independent Poissons of at most this rate (Poisson is closed under summation).
POISSON_RATE_LIMIT = 1e10
#: Beyond this rate a draw would take too many sub-draws: configs that need it are refused at load.
MAX_POISSON_RATE = 1e13


@functools.cache
def _simd_is_faster() -> bool:
    """Whether randomgen's SIMD ChaCha core outruns its portable one on this CPU (measured once per process).

    Both compute the same ChaCha20 stream (tests/privacy/test_skellam.py checks it), so the choice changes only
    the speed: on some CPUs (AMD EPYC with the released wheels) the SIMD core runs at half the portable one's
    speed, and the noise draws are most of their time in the cipher. The fastest of three short streams each.
    """
    if not ChaCha(seed=0, rounds=_CHACHA_ROUNDS).use_simd:
        return False  # not available on this CPU
    best = {True: float("inf"), False: float("inf")}
    for _ in range(3):
        for simd in (True, False):
            bit_generator = ChaCha(seed=0, rounds=_CHACHA_ROUNDS)
            bit_generator.use_simd = simd
            began = time.perf_counter()
            bit_generator.random_raw(1 << 14)
            best[simd] = min(best[simd], time.perf_counter() - began)
    return best[True] < best[False]


def chacha20(*, key: int | None = None, seed: int | None = None) -> ChaCha:
    """randomgen's ChaCha20 keyed with a 256-bit `key` (or, test mode only, expanded from `seed`), on the
    faster of its two implementations of the cipher on this CPU."""
    bit_generator = ChaCha(key=key, seed=seed, rounds=_CHACHA_ROUNDS)
    bit_generator.use_simd = _simd_is_faster()
    return bit_generator


def secure_generator() -> np.random.Generator:
    """A NumPy Generator driven by ChaCha20 keyed with 256 bits from the operating system's CSPRNG."""
    return np.random.Generator(chacha20(key=secrets.randbits(256)))


def seeded_generator(seed: int) -> np.random.Generator:
    """A reproducible ChaCha20 generator, for test mode only (callers must refuse seeds in production)."""
    return np.random.Generator(chacha20(seed=seed))


class SkellamNoise:
    """Skellam noise of a given variance (integer units squared), drawn from an injected generator."""

    def __init__(self, variance: float, *, generator: np.random.Generator) -> None:
        if not variance > 0:
            raise ValueError(f"Skellam variance must be positive, got {variance}")
        if variance / 2.0 > MAX_POISSON_RATE:
            raise ValueError(
                f"Skellam variance {variance:.3e} is beyond what Fusion samples exactly; coarsen the resolution"
            )
        self.variance = float(variance)
        self._generator = generator

    @property
    def mu(self) -> float:
        """Rate of each of the two Poisson variables."""
        return self.variance / 2.0

    def sample(self, size: int) -> np.ndarray:
        """`size` independent draws as int64."""
        if self.mu <= POISSON_RATE_LIMIT:
            # One draw for both Poisson vectors: the generator draws them in the same order as two calls would.
            both = poisson(self._generator, self.mu, 2 * size)
            return np.subtract(both[:size], both[size:], dtype=np.int64)
        return (self._poisson(size) - self._poisson(size)).astype(np.int64)

    def _poisson(self, size: int) -> np.ndarray:
        parts = max(1, int(np.ceil(self.mu / POISSON_RATE_LIMIT)))
        total = np.zeros(size, dtype=np.int64)
        for _ in range(parts):
            total += poisson(self._generator, self.mu / parts, size)
        return total


# --- Poisson draws from the ChaCha20 keystream in bulk ------------------------------------------------------------
#
# NumPy draws Poisson(lam >= 10) with PTRS (Hoermann 1993, `random_poisson_ptrs` in NumPy's distributions.c): each
# trial takes two doubles U, V from the generator and either yields a draw or is rejected, so the draws are the
# accepted trials in order. `poisson` below runs the same trials on whole arrays: the doubles come from the same
# ChaCha20 keystream (randomgen's ChaCha is the standard cipher: key = its key words, block counter = its position;
# OpenSSL computes it several times faster), every arithmetic step is NumPy's own IEEE operation in the same order
# (NumPy's baseline build has no fused multiply-add), and the one step that calls `log` (the rare acceptance test
# that needs log-gamma) is decided with NumPy's vectorised log unless it lies within `_CLOSE` of the boundary, where
# it is recomputed with the C library's log exactly as NumPy's C code does. So the draws, and the generator's state
# afterwards, are NumPy's own bit for bit: `_bulk_matches_numpy` checks it once per process, and
# tests/privacy/test_skellam.py over many rates, keys and positions. The keystream is the generator's own (its key
# and position, read from its state): a secure generator stays one, and no draw reuses its stream.

#: NumPy switches from multiplication to PTRS at this rate.
_PTRS_MIN_RATE = 10.0
_WORDS_PER_BLOCK = 8  # 64-bit words per 64-byte ChaCha20 block
_MAX_BLOCKS = 1 << 32  # OpenSSL's ChaCha20 block counter is 32 bits (randomgen's carries on: never reached here)
_TO_DOUBLE = 1.0 / 9007199254740992.0  # randomgen's next_double: (word >> 11) * 2^-53
#: random_loggam's series coefficients and log(2 pi), as NumPy's distributions.c writes them.
_LOGGAM_A = (
    8.333333333333333e-02, -2.777777777777778e-03, 7.936507936507937e-04, -5.952380952380952e-04,
    8.417508417508418e-04, -1.917526917526918e-03, 6.410256410256410e-03, -2.955065359477124e-02,
    1.796443723688307e-01, -1.39243221690590e00,
)  # fmt: skip
_LG2PI = 1.8378770664093453e00
#: Acceptance tests whose two sides differ by less than this, relative to the sum of their terms' magnitudes, are
#: recomputed with the C library's log. NumPy's vectorised log is within a few ulp of it (4 would move either side
#: by about 15 ulp of that sum, 3e-15 of it; dropping the Stirling terms beyond the third from x = 30 on moves it
#: by less than 1e-13 absolute, against a sum of at least 50): 225 ulp leaves a wide margin.
_CLOSE = 5e-14


def poisson(generator: np.random.Generator, lam: float, size: int) -> np.ndarray:
    """`generator.poisson(lam, size)`: the same int64 draws, and the generator's state after them the same. On a
    ChaCha20 generator with lam in [10, POISSON_RATE_LIMIT] they are computed in bulk (see above), 2-3x faster."""
    drawn = _bulk_poisson(generator.bit_generator, lam, size) if _bulk_applies(lam, size) else None
    return drawn if drawn is not None else generator.poisson(lam, size=size)


def _bulk_applies(lam: float, size: int) -> bool:
    return size > 0 and _PTRS_MIN_RATE <= lam <= POISSON_RATE_LIMIT and _bulk_matches_numpy()


@functools.cache
def _bulk_matches_numpy() -> bool:
    """Whether the bulk draws are NumPy's on this installation (once per process, about a millisecond): a
    thousand draws at a low, a middle and a high rate, from a fresh and from advanced generators."""
    try:
        for lam, skip in ((10.5, 0), (2.5e5, 3), (4.0e9, 1)):
            ours, theirs = ChaCha(key=2026, rounds=_CHACHA_ROUNDS), ChaCha(key=2026, rounds=_CHACHA_ROUNDS)
            ours.random_raw(skip)
            theirs.random_raw(skip)
            drawn = _bulk_poisson(ours, lam, 1024)
            expected = np.random.Generator(theirs).poisson(lam, size=1024)
            if drawn is None or not np.array_equal(drawn, expected) or not _same_state(ours, theirs):
                return False
    except Exception:  # e.g. an OpenSSL without ChaCha20 (FIPS builds): NumPy's own sampler then
        return False
    return True


def _same_state(a: ChaCha, b: ChaCha) -> bool:
    sa, sb = a.state["state"], b.state["state"]
    return all(np.array_equal(sa[k], sb[k]) for k in ("block", "keysetup", "ctr")) and sa["rounds"] == sb["rounds"]


def _bulk_poisson(bit_generator: object, lam: float, size: int) -> np.ndarray | None:
    """The draws of NumPy's PTRS from `bit_generator`'s ChaCha20 stream, advancing it past the doubles they used;
    None (nothing drawn) when the generator is not ChaCha20 at a 64-bit boundary of its stream."""
    if not isinstance(bit_generator, ChaCha):
        return None
    with bit_generator.lock:  # as NumPy's own draws hold it: no other thread draws the same stretch of stream
        return _bulk_poisson_locked(bit_generator, lam, size)


def _bulk_poisson_locked(bit_generator: ChaCha, lam: float, size: int) -> np.ndarray | None:
    state = bit_generator.state
    inner = state["state"]
    low, high = (int(x) for x in inner["ctr"])  # the position, in 32-bit words
    if int(inner["rounds"]) != 20 or high or low % 2:
        return None
    key = np.asarray(inner["keysetup"], dtype="<u4").tobytes()
    constants = _ptrs_constants(lam)
    stream = _Keystream(key, low // 2, min(2 * _CHUNK_TRIALS, 2 * (size * 4 // 3 + 64)))
    parts: list[np.ndarray] = []
    needed = size
    trials_before = 0  # trials taken before this chunk
    while needed:
        trials = min(_CHUNK_TRIALS, needed * 4 // 3 + 64)  # at least 3 draws in 4 trials on average from lam = 10
        if (low // 2 + 2 * (trials_before + trials)) // _WORDS_PER_BLOCK + 1 >= _MAX_BLOCKS:
            return None  # nothing drawn yet from the generator itself: NumPy draws them
        doubles = stream.doubles(2 * trials)
        draws, at = _ptrs(doubles[0::2], doubles[1::2], lam, constants)
        if draws.size >= needed:
            parts.append(draws[:needed])
            trials_before += int(at[needed - 1]) + 1
            needed = 0
        else:
            parts.append(draws)
            trials_before += trials
            needed -= draws.size
    ctr = low + 4 * trials_before  # two 64-bit words per trial
    # randomgen keeps the block its last word came from (block 0 before any).
    last = _Keystream(key, max(ctr - 1, 0) // 16 * _WORDS_PER_BLOCK, _WORDS_PER_BLOCK)
    block = last.words(_WORDS_PER_BLOCK).view("<u4")
    inner = {**inner, "block": block.astype(np.uint32), "ctr": np.array([ctr, 0], dtype=np.uint64)}
    bit_generator.state = {**state, "state": inner}
    return np.concatenate(parts).astype(np.int64, copy=False)


#: Trials per chunk: its arrays (16,384 words of keystream, 128 KiB) stay in cache, and below the size at which
#: every temporary would be a fresh mapping of zeroed pages.
_CHUNK_TRIALS = 8192
_ZEROS = memoryview(bytes(8 * 2 * _CHUNK_TRIALS))  # what the keystream is XORed onto (read only)


class _Keystream:
    """The ChaCha20 keystream of `key` (zero nonce) from 64-bit word `word` on, read in order, at most `capacity`
    words at a time into one reused buffer (fresh 128 KiB buffers would each be a new mapping of zeroed pages)."""

    def __init__(self, key: bytes, word: int, capacity: int = 2 * _CHUNK_TRIALS) -> None:
        block, skip = divmod(word, _WORDS_PER_BLOCK)
        cipher = Cipher(algorithms.ChaCha20(key, block.to_bytes(4, "little") + bytes(12)), mode=None)
        self._encryptor = cipher.encryptor()
        self._buffer = bytearray(8 * max(capacity, _WORDS_PER_BLOCK))
        self.words(skip)

    def words(self, count: int) -> np.ndarray:
        """The next `count` words (a view of the buffer, valid until the next call)."""
        self._encryptor.update_into(_ZEROS[: 8 * count], self._buffer)
        return np.frombuffer(self._buffer, dtype="<u8", count=count)

    def doubles(self, count: int) -> np.ndarray:
        """randomgen's next_double of each of the next `count` words: (word >> 11) * 2^-53 (exact in float64)."""
        doubles = (self.words(count) >> np.uint64(11)).view(np.int64).astype(np.float64)
        doubles *= _TO_DOUBLE
        return doubles


def _ptrs_constants(lam: float) -> tuple[float, float, float, float, float, float]:
    """(slam, loglam, a, b, log(invalpha), vr) as random_poisson_ptrs computes them."""
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    return slam, loglam, a, b, math.log(invalpha), vr


def _ptrs(
    u_raw: np.ndarray, v: np.ndarray, lam: float, constants: tuple[float, float, float, float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """(the accepted trials' draws, their trial indices) for trials of doubles (u_raw, v), in order. The same
    operations as random_poisson_ptrs, in its order, most of them in place."""
    _slam, loglam, a, b, log_invalpha, vr = constants
    u = u_raw - 0.5
    us = np.abs(u)
    np.subtract(0.5, us, out=us)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.divide(2 * a, us)  # us = 0 (U = -0.5): inf, then k = -inf, rejected below
    k += b
    k *= u
    k += lam
    k += 0.43
    np.floor(k, out=k)
    accept = us >= 0.07
    accept &= v <= vr
    rest = (~accept).nonzero()[0]
    # Of the rest: C casts k to int64 (2^63 and beyond become INT64_MIN on x86-64, negative), rejects k < 0 and
    # (us < 0.013 and V > us), and decides the others by the final test.
    k_rest, us_rest, v_rest = k[rest], us[rest], v[rest]
    open_ = (k_rest >= 0) & (k_rest < 2.0**63) & ~((us_rest < 0.013) & (v_rest > us_rest))
    slow = rest[open_]
    if slow.size:
        accept[slow] = _slow_accept(k_rest[open_], us_rest[open_], v_rest[open_], lam, loglam, a, b, log_invalpha)
    at = accept.nonzero()[0]
    return k[at].astype(np.int64), at


def _slow_accept(
    k: np.ndarray, us: np.ndarray, v: np.ndarray, lam: float, loglam: float, a: float, b: float, log_invalpha: float
) -> np.ndarray:
    """PTRS's final test, log(V) + log(invalpha) - log(a / us^2 + b) <= -lam + k log(lam) - loggam(k + 1): with
    NumPy's log, then, where that lies within `_CLOSE` of the boundary, with the C library's log exactly as NumPy's
    C code computes it."""
    with np.errstate(divide="ignore"):
        left = np.log(v) + log_invalpha - np.log(a / (us * us) + b)
    gamma, scale = _loggam(k + 1.0)
    right = -lam + k * loglam - gamma
    accept = left <= right
    close = (np.abs(left - right) <= _CLOSE * (np.abs(k * loglam) + lam + scale + np.abs(left) + 1.0)).nonzero()[0]
    if close.size:  # V > 0 here: log(0) = -inf is never close
        kc, uc = k[close], us[close]
        exact_left = _libm_log(v[close]) + log_invalpha - _libm_log(a / (uc * uc) + b)
        accept[close] = exact_left <= -lam + kc * loglam - _loggam_exact(kc + 1.0)
    return accept


def _loggam(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(random_loggam(x) to well within the margin of `_slow_accept`, the magnitude of its terms), for x >= 1.

    From x = 30 on, three terms of its Stirling series (the rest add less than 1e-13 there, a hundredth of the
    margin); below, its ten terms and its recurrence, with NumPy's log."""
    if x.size and float(x.min()) >= 30.0:
        r2 = (1.0 / x) * (1.0 / x)
        gl0 = _LOGGAM_A[2] * r2
        gl0 += _LOGGAM_A[1]
        gl0 *= r2
        gl0 += _LOGGAM_A[0]
        series = (x - 0.5) * np.log(x)
        return gl0 / x + 0.5 * _LG2PI + series - x, np.abs(series) + x + 20.0
    n = np.where(x < 7.0, np.floor(7.0 - x), 0.0)
    x0 = x + n
    x2 = (1.0 / x0) * (1.0 / x0)
    gl0 = np.full_like(x0, _LOGGAM_A[9])
    for coefficient in _LOGGAM_A[8::-1]:
        gl0 *= x2
        gl0 += coefficient
    series = (x0 - 0.5) * np.log(x0)
    gl = gl0 / x0 + 0.5 * _LG2PI + series - x0
    for step in range(1, 7):  # x < 7: gl -= log(x0 - 1), x0 -= 1, n times
        more = n >= step
        if not more.any():
            break
        gl[more] -= np.log(x0[more] - step)
    gl[(x == 1.0) | (x == 2.0)] = 0.0
    return gl, np.abs(series) + x0 + 20.0


def _libm_log(x: np.ndarray) -> np.ndarray:
    """The C library's log of each element (what NumPy's C code and Python's math.log call)."""
    return np.asarray(_LIBM_LOG(x), dtype=np.float64)


_LIBM_LOG = np.frompyfunc(math.log, 1, 1)


def _loggam_exact(x: np.ndarray) -> np.ndarray:
    """NumPy's random_loggam, step for step (the same IEEE operations in the same order), with the C library's log."""
    n = np.where(x < 7.0, np.floor(7.0 - x), 0.0)  # (int)(7 - x) below 7: x is a whole number here
    x0 = x + n
    x2 = (1.0 / x0) * (1.0 / x0)
    gl0 = np.full_like(x0, _LOGGAM_A[9])
    for coefficient in _LOGGAM_A[8::-1]:
        gl0 *= x2
        gl0 += coefficient
    gl = gl0 / x0 + 0.5 * _LG2PI + (x0 - 0.5) * _libm_log(x0) - x0
    for step in range(1, 7):  # x < 7: gl -= log(x0 - 1), x0 -= 1, n times
        more = np.flatnonzero(n >= step)
        if not more.size:
            break
        x0[more] -= 1.0
        gl[more] -= _libm_log(x0[more])
    gl[(x == 1.0) | (x == 2.0)] = 0.0
    return gl
