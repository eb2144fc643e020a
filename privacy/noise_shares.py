"""How much Skellam noise each contributor adds, so that the guarantee holds against every admissible coalition,
and how the excess is removed once the number of contributors is known.

The coalition: the aggregator, the key holder, one contributing institution that keeps its own noise draws, and
up to c = `max_colluding` other institutions. The noise no such coalition knows must have variance at least v
(the variance the accountant calibrated). With n contributors each adding share s_n, a coalition knows at most
c + 1 of the shares (and never the share of the institution whose reading it is after), so

    s_n = v / h(n),   h(n) = max(n - 1 - c, 1)

leaves (n - 1 - c) s_n = v unknown. The total noise is then n s_n = v n / (n - 1 - c): sqrt(n / (n - 1 - c)) times
the central mechanism's sd, which is the floor for any scheme in which each contributor knows its own share.

A contributor does not know n when it seals (institutions may drop out), so it adds s_q for the quorum q, as a sum
of independent layers: layer N (N = the federation's institutions) of variance s_N and, for each m in q..N-1, a
layer of variance d_m = s_m - s_{m+1}; layers N..m add up to s_m. Layers below N are drawn from seeds on a hash
chain (seed_{m-1} = H(seed_m)): once the roster fixes n, the institution reveals seed_{n-1}, from which anyone
derives the seeds of layers q..n-1 (never those of layers n and above), and the aggregator removes those layers.
What stays is s_n per contributor, exactly the share above, so the noise is at the floor whether the quorum or
every institution contributes. (This is the "add excess noise, remove it once dropouts are known" idea of
Dordis/XNoise, Jiang et al., EuroSys 2024, with the layers revealed by their owner.) A contributor that does not
reveal keeps its whole share: more noise, never less.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.skellam import SkellamNoise, chacha20

SEED_BYTES = 32
_CHAIN = b"fusion/noise-layer-chain/v1|"
_COMMIT = b"fusion/noise-layer-commitment/v1|"
_STREAM = b"fusion/noise-layer-stream/v1"
_DIGEST = b"fusion/noise-layer-digest/v1"


def unknown_shares(contributors: int, max_colluding: int) -> int:
    """h(n): how many contributors' shares the worst admissible coalition does not know (at least one: the
    institution whose reading is protected contributes, and the coalition does not hold its share)."""
    if contributors < 1 or max_colluding < 0:
        raise ValueError(f"need contributors >= 1 and max_colluding >= 0, got {contributors}, {max_colluding}")
    return max(contributors - 1 - max_colluding, 1)


def roster_signatures_needed(institutions: int, *, quorum: int, max_colluding: int) -> int:
    """Signatures on one roster an institution must see before it answers it (pipelines/unmask.py). Two rosters
    both answered (a split view) let the coalition isolate one included institution's contribution with only its
    own sealed share s_q = v / (q - 1 - c) on it, and c + 1 signers may sign both: the c colluders and the
    contributor that keeps its own draws. Below v (q >= c + 3) only more than (n + c + 1) / 2 signatures make an
    answered roster unique. At q = c + 2, s_q = v: an isolated contribution keeps the calibrated noise, and more
    than (n + c) / 2 (unique against the colluders alone) suffices. Below c + 2 (test mode only) a roster of one
    honest institution and the colluders isolates it anyway: its own signature is enough.

    >>> [roster_signatures_needed(5, quorum=q, max_colluding=0) for q in (1, 2, 3)]
    [1, 3, 4]
    """
    if quorum < max_colluding + 2:
        return 1
    if quorum == max_colluding + 2:
        return (institutions + max_colluding) // 2 + 1
    return (institutions + max_colluding + 1) // 2 + 1


@dataclass(frozen=True)
class NoiseLayers:
    """The noise shares of one federation: total variance v, quorum q, N institutions, c colluders."""

    total_variance: float
    quorum: int
    institutions: int
    max_colluding: int

    def __post_init__(self) -> None:
        if not 1 <= self.quorum <= self.institutions:
            raise ValueError(f"quorum {self.quorum} must be between 1 and the {self.institutions} institutions")

    def share(self, contributors: int) -> float:
        """s_n: the variance each of `contributors` institutions must hold for the coalition to miss v."""
        return self.total_variance / unknown_shares(contributors, self.max_colluding)

    @property
    def sealed(self) -> float:
        """What each contribution carries when sealed: s_q (the sum of every layer)."""
        return self.share(self.quorum)

    @property
    def base(self) -> float:
        """Layer N, never removed: s_N."""
        return self.share(self.institutions)

    @property
    def levels(self) -> tuple[int, ...]:
        """The removable layers q..N-1, in order."""
        return tuple(range(self.quorum, self.institutions))

    def layer(self, level: int) -> float:
        """d_m = s_m - s_{m+1}: the variance of removable layer m (0 when both shares are v)."""
        if level not in self.levels:
            raise ValueError(f"layer {level} is not removable (layers {self.quorum}..{self.institutions - 1})")
        return self.share(level) - self.share(level + 1)

    def removable(self, contributors: int) -> tuple[int, ...]:
        """The layers every contributor reveals once `contributors` are included: q..n-1."""
        return tuple(m for m in self.levels if m < contributors)

    def kept(self, contributors: int) -> float:
        """The variance each contributor keeps after revealing its removable layers (= s_n)."""
        return self.sealed - sum(self.layer(m) for m in self.removable(contributors))

    def total(self, contributors: int) -> float:
        """Total noise variance in a release with `contributors` contributors, all layers revealed."""
        return contributors * self.kept(contributors)


#: The most layers one seed chain spans (one a federation size above the quorum: far more than any federation).
MAX_LAYERS = 100_000


def chain_seeds(seed: bytes, *, top: int, bottom: int) -> dict[int, bytes]:
    """Seeds of layers top, top-1, ..., bottom from the seed of layer `top` (seed_{m-1} = SHA-256 of seed_m)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a layer seed is {SEED_BYTES} bytes, got {len(seed)}")
    if not 0 <= top - bottom <= MAX_LAYERS:
        raise ValueError(f"layers {bottom}..{top}: at most {MAX_LAYERS} layers are chained")
    seeds = {top: seed}
    for level in range(top, bottom, -1):
        seeds[level - 1] = hashlib.sha256(_CHAIN + seeds[level]).digest()
    return seeds


def layer_commitment(seed: bytes, *, level: int, context: bytes) -> str:
    """SHA-256 commitment to one layer's seed, bound to the release (`context`) and the layer."""
    return hashlib.sha256(_COMMIT + context + f"|{level}|".encode() + seed).hexdigest()


def layer_noise(seed: bytes, *, variance: float, slots: int, context: bytes) -> np.ndarray:
    """The layer's Skellam noise (int64, `slots`): ChaCha20 keyed by HKDF(seed), so whoever holds the seed draws
    exactly the same vector (with the same NumPy; `noise_digest` checks that)."""
    if variance <= 0:
        return np.zeros(slots, dtype=np.int64)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=context, info=_STREAM).derive(seed)
    generator = np.random.Generator(chacha20(key=int.from_bytes(key, "big")))
    return SkellamNoise(variance, generator=generator).sample(slots)


def noise_digest(noise: np.ndarray, *, seed: bytes, level: int, context: bytes) -> str:
    """HMAC-SHA-256 of a layer's noise vector under a key derived from the layer's seed: the aggregator checks that
    it regenerated what the institution added, and nobody can test a guess of a layer that stays hidden."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=context, info=_DIGEST).derive(seed)
    data = np.ascontiguousarray(noise, dtype="<i8").tobytes()
    return hmac.new(key, f"{level}|".encode() + data, hashlib.sha256).hexdigest()
