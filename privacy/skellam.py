"""Symmetric Skellam noise from a cryptographically secure generator.

Skellam(mu) = Poisson(mu) - Poisson(mu): integer-valued, variance 2*mu, and closed under summation, so
q institutions each adding variance v/q give a total of exactly Skellam with variance v.
"""

from __future__ import annotations

import secrets

import numpy as np
from randomgen import ChaCha

_CHACHA_ROUNDS = 20
#: NumPy's Poisson sampler keeps its variance (checked to 0.1% up to 1e12) for rates up to here; larger rates
#: are drawn as sums of independent Poissons of at most this rate (Poisson is closed under summation).
POISSON_RATE_LIMIT = 1e10
#: Beyond this rate a draw would take too many sub-draws: configs that need it are refused at load.
MAX_POISSON_RATE = 1e13


def secure_generator() -> np.random.Generator:
    """A NumPy Generator driven by ChaCha20 keyed with 256 bits from the operating system's CSPRNG."""
    return np.random.Generator(ChaCha(key=secrets.randbits(256), rounds=_CHACHA_ROUNDS))


def seeded_generator(seed: int) -> np.random.Generator:
    """A reproducible ChaCha20 generator, for test mode only (callers must refuse seeds in production)."""
    return np.random.Generator(ChaCha(seed=seed, rounds=_CHACHA_ROUNDS))


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
        return (self._poisson(size) - self._poisson(size)).astype(np.int64)

    def _poisson(self, size: int) -> np.ndarray:
        parts = max(1, int(np.ceil(self.mu / POISSON_RATE_LIMIT)))
        total = np.zeros(size, dtype=np.int64)
        for _ in range(parts):
            total += self._generator.poisson(self.mu / parts, size=size)
        return total
