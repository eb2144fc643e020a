"""The masking graph: which institutions mask with, and share their secrets among, which others in a release.

With n institutions the complete graph costs every envelope O(n^2) mask-key shares. Large federations use a
sparse graph instead, as SecAgg+ does (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020): each institution masks with k = O(log n) neighbours only, and sends the shares of its
self-mask seed and of its k mask keys to its closed neighbourhood (itself and its neighbours), threshold t.

The graph is a Harary graph (the circulant C_n(1..k/2)) over a ring order drawn from the release context: public,
deterministic from the federation's institutions and the release, k-regular, and k-vertex-connected. On a ring a
set of survivors is connected unless two runs of at least k/2 consecutive positions hold none, which every party
checks in O(n^2) at most (`colluders_to_split`). The coalition guarded against is the one the privacy guarantee
names: one institution (which knows its own contribution and noise) and up to c = max_colluding others, with the
aggregator and the key holder: c + 1 institutions. Guarantees, with t = k/2 + 1 and k >= 2 (c + 1):
- no coalition of at most c + 1 institutions holds t shares of anyone else's secret (c + 1 <= k/2 = t - 1);
- a roster is answered only if no c + 1 included institutions, together with the absent ones, split the included
  rest into groups without an edge between them: then the unmasked sums of any such coalition are exactly those
  of the complete graph (the honest included total);
- an included institution's masks are removable while at least t of its closed neighbourhood answer: up to
  k/2 of its k + 1 are tolerated to be absent or silent.
Small federations (k >= n - 1) use the complete graph, threshold the quorum, exactly as before.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

_RING_INFO = b"fusion/masking-ring/v1|"


#: The most neighbours an institution may mask with: its envelope's header carries k (k + 1) Shamir shares (its
#: seed and each mask key, to each neighbour) of about 300 bytes, 12 MB at k = 200, and an envelope header holds at
#: most 16 MiB (privacy/envelope.py MAX_HEADER_BYTES, a bound that keeps junk files cheap to refuse). A
#: `max_colluding` whose k would pass it is refused at load.
MAX_NEIGHBOURS = 200


def neighbour_count(institutions: int, *, max_colluding: int = 0) -> int:
    """k for a federation of `institutions`: 2 * ceil(log2 n), raised to 2 * (max_colluding + 1) so that t = k/2 + 1
    exceeds the c + 1 institutions of the coalition (one institution and max_colluding others); n - 1 (the
    complete graph) once that is no fewer."""
    if institutions < 2:
        return max(institutions - 1, 0)
    k = max(2 * math.ceil(math.log2(institutions)), 2 * (max_colluding + 1))
    return institutions - 1 if k >= institutions - 1 else k


@dataclass(frozen=True)
class MaskingGraph:
    """The public masking graph of one release: `ring` (the institutions in ring order) and `degree` k; complete
    when k >= n - 1. `threshold` is the Shamir threshold of every secret shared on it."""

    ring: tuple[str, ...]
    degree: int
    threshold: int

    @classmethod
    def build(
        cls,
        institutions: Iterable[str],
        *,
        context: bytes,
        quorum: int,
        max_colluding: int = 0,
        degree: int | None = None,
    ) -> MaskingGraph:
        """The graph for `institutions` and the release named by `context`. `degree` (even, >= 2 * (max_colluding + 1))
        overrides the k of `neighbour_count`; the complete graph keeps the quorum as its threshold."""
        ids = sorted(set(institutions))
        n = len(ids)
        k = neighbour_count(n, max_colluding=max_colluding) if degree is None else min(degree, n - 1)
        if k >= n - 1:
            return cls(tuple(ids), n - 1, quorum)
        if k % 2 or k < 2 * (max_colluding + 1):
            raise ValueError(
                f"the neighbour count {k} must be even and at least 2 * (max_colluding + 1) = {2 * (max_colluding + 1)}"
                ": else the threshold k/2 + 1 is within reach of one institution and max_colluding others"
            )
        # The ring order: institutions sorted by a hash bound to the release, so neighbourhoods change per release.
        ring = sorted(ids, key=lambda i: hashlib.sha256(_RING_INFO + context + b"|" + i.encode()).digest())
        return cls(tuple(ring), k, k // 2 + 1)

    @property
    def complete(self) -> bool:
        return self.degree >= len(self.ring) - 1

    @cached_property
    def _position(self) -> dict[str, int]:
        return {institution: p for p, institution in enumerate(self.ring)}

    @cached_property
    def _neighbours(self) -> dict[str, tuple[str, ...]]:
        n, half = len(self.ring), self.degree // 2
        if self.complete:
            everyone = tuple(sorted(self.ring))
            return {i: tuple(j for j in everyone if j != i) for i in self.ring}
        return {
            i: tuple(sorted(self.ring[(p + d) % n] for d in range(-half, half + 1) if d))
            for p, i in enumerate(self.ring)
        }

    def neighbours(self, institution: str) -> tuple[str, ...]:
        """Those `institution` masks with (sorted ids, itself excluded)."""
        return self._neighbours[institution]

    def closed(self, institution: str) -> tuple[str, ...]:
        """Those that hold shares of `institution`'s secrets: itself and its neighbours (sorted ids)."""
        return tuple(sorted((*self._neighbours[institution], institution)))

    def adjacent(self, a: str, b: str) -> bool:
        if self.complete:
            return a != b
        n = len(self.ring)
        gap = abs(self._position[a] - self._position[b])
        return 0 < min(gap, n - gap) <= self.degree // 2

    def short_of_shares(self, included: Collection[str]) -> dict[str, int]:
        """{included institution: members of its closed neighbourhood included} for those with fewer than the
        threshold, whose masks no answers could remove."""
        chosen = set(included)
        counts = {i: sum(j in chosen for j in self.closed(i)) for i in sorted(chosen)}
        return {i: m for i, m in counts.items() if m < self.threshold}

    def colluders_to_split(self, included: Collection[str]) -> int | None:
        """The fewest included institutions that, with the absent ones, would leave the other included ones in
        two groups with no edge between them (so a coalition holding them could unmask each group's sum), or
        None if no choice does (always so for the complete graph)."""
        if self.complete:
            return None
        n, half = len(self.ring), self.degree // 2
        chosen = set(included)
        inside = np.array([i in chosen for i in self.ring], dtype=np.int64)
        prefix = np.concatenate([[0], np.cumsum(np.concatenate([inside, inside]))])  # over the ring twice

        def count(start: np.ndarray, length: np.ndarray | int) -> np.ndarray:
            return prefix[start + length] - prefix[start]

        # Two windows of k/2 consecutive positions, starting at s1 < s2, disjoint, with an included institution
        # in each of the two arcs between them; the colluders needed are the included inside the windows.
        s1, s2 = np.triu_indices(n, k=half)
        keep = s2 - s1 <= n - half
        s1, s2 = s1[keep], s2[keep]
        arc_a = count(s1 + half, s2 - s1 - half)
        arc_b = count(s2 + half, n - (s2 - s1) - half)
        valid = (arc_a > 0) & (arc_b > 0)
        if not valid.any():
            return None
        cost = count(s1, half) + count(s2, half)
        return int(cost[valid].min())


def dropout_failure_bound(graph: MaskingGraph, *, present: float) -> float:
    """An upper bound on the chance that some institution's masks cannot be removed when each institution
    answers independently with probability `present`: n * P[Binomial(k, present) < t - 1] (union bound over the
    institutions, each counting itself)."""
    n, k, t = len(graph.ring), graph.degree, graph.threshold
    if graph.complete:
        k, t = n - 1, graph.threshold
    tail = sum(math.comb(k, m) * present**m * (1 - present) ** (k - m) for m in range(max(t - 1, 0)))
    return min(1.0, n * tail)
