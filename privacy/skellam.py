"""Symmetric Skellam noise from a cryptographically secure generator.

Skellam(mu) = Poisson(mu) - Poisson(mu): integer-valued, variance 2*mu, and closed under summation, so
q institutions each adding variance v/q give a total of exactly Skellam with variance v.
"""

from __future__ import annotations

import functools
import secrets
import time

import numpy as np
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
            # One call for both Poisson vectors: the generator draws them in the same order as two calls would.
            both = self._generator.poisson(self.mu, size=(2, size))
            return np.subtract(both[0], both[1], dtype=np.int64)
        return (self._poisson(size) - self._poisson(size)).astype(np.int64)

    def _poisson(self, size: int) -> np.ndarray:
        parts = max(1, int(np.ceil(self.mu / POISSON_RATE_LIMIT)))
        total = np.zeros(size, dtype=np.int64)
        for _ in range(parts):
            total += self._generator.poisson(self.mu / parts, size=size)
        return total
