"""Symmetric Skellam noise from a cryptographically secure generator.

Skellam(mu) = Poisson(mu) - Poisson(mu): integer-valued, variance 2*mu, and closed under summation, so
q institutions each adding variance v/q give a total of exactly Skellam with variance v.
"""

from __future__ import annotations

import secrets

import numpy as np
from randomgen import ChaCha

_CHACHA_ROUNDS = 20


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
        self.variance = float(variance)
        self._generator = generator

    @property
    def mu(self) -> float:
        """Rate of each of the two Poisson variables."""
        return self.variance / 2.0

    def sample(self, size: int) -> np.ndarray:
        """`size` independent draws as int64."""
        first = self._generator.poisson(self.mu, size=size)
        second = self._generator.poisson(self.mu, size=size)
        return (first - second).astype(np.int64)
