"""Double masking on a sparse masking graph: masks cancel, neighbours' shares recover the dropped, and a coalition
below the threshold learns nothing of an honest institution's secrets."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.masking import add_mod, centred, generate_agreement_key, pair_key, pair_term, pairwise_mask
from privacy.masking_graph import MaskingGraph
from privacy.sharing import (
    ShareError,
    combine,
    commitment,
    new_seed,
    open_share,
    pair_entry,
    pair_key_context,
    reconstruct,
    self_mask,
    share_coordinates,
    share_pair_keys,
    share_seed,
)

T = 576460752303489025  # a BFV plain modulus near 2^59 (any odd modulus does for masking)
IDS = [f"inst-{i:02d}" for i in range(12)]
KEYS = {i: generate_agreement_key() for i in IDS}
PUBLIC = {i: KEYS[i][1] for i in IDS}
CONTEXT = b"release"
GRAPH = MaskingGraph.build(IDS, context=CONTEXT, quorum=7, degree=4)  # t = 3 of each closed neighbourhood of 5
XS = share_coordinates(IDS)
SLOTS = 16


def closed_keys(institution: str) -> dict[str, bytes]:
    return {peer: PUBLIC[peer] for peer in GRAPH.closed(institution)}


def sparse_mask(institution: str) -> np.ndarray:
    return pairwise_mask(
        institution, KEYS[institution][0], closed_keys(institution), slots=SLOTS, modulus=T, context=CONTEXT
    )


def test_the_graph_is_sparse() -> None:
    assert not GRAPH.complete and (GRAPH.degree, GRAPH.threshold) == (4, 3)


def test_pairwise_masks_over_neighbours_cancel_in_the_sum_of_everyone() -> None:
    rng = np.random.default_rng(1)
    plain = {i: rng.integers(-1000, 1000, SLOTS) for i in IDS}
    masked = {i: add_mod(plain[i], sparse_mask(i), T) for i in IDS}
    assert all(not np.array_equal(masked[i], plain[i]) for i in IDS)
    total = centred(np.sum([m % T for m in masked.values()], axis=0) % T, T)
    assert np.array_equal(total, sum(plain.values()))


def test_an_absent_institutions_masks_come_back_from_its_neighbours_shares_alone() -> None:
    """inst-?? (the ring's first) drops out. For each included neighbour, the mask key it holds with the absent one
    is rebuilt from `threshold` shares its own closed neighbourhood opens (never the whole federation's), and the
    sum of the included is exact."""
    rng = np.random.default_rng(2)
    absent = GRAPH.ring[0]
    included = [i for i in IDS if i != absent]
    plain = {i: rng.integers(-1000, 1000, SLOTS) for i in included}
    total = np.sum([add_mod(plain[i], sparse_mask(i), T) % T for i in included], axis=0) % T
    for dealer in GRAPH.neighbours(absent):
        sealed, _, commitments = share_pair_keys(
            own_id=dealer,
            own_private=KEYS[dealer][0],
            peers=closed_keys(dealer),
            threshold=GRAPH.threshold,
            context=CONTEXT,
            coordinates=XS,
        )
        assert {entry.split("/")[1] for entry in sealed} == set(GRAPH.closed(dealer))  # neighbours only
        bound = pair_key_context(CONTEXT, dealer=dealer, peer=absent)
        holders = [h for h in GRAPH.closed(dealer) if h != absent][: GRAPH.threshold]
        shares = {}
        for holder in holders:
            x, y = open_share(
                sealed[pair_entry(absent, holder)],
                KEYS[holder][0],
                PUBLIC[dealer],
                context=bound,
                sender=dealer,
                recipient=holder,
            )
            assert x == XS[holder]  # the federation-wide coordinate
            shares[x] = y
        key = reconstruct(shares, threshold=GRAPH.threshold, expected=commitments[absent], context=bound)
        total = (total - pair_term(dealer, absent, key, slots=SLOTS, modulus=T)) % T
    assert np.array_equal(centred(total, T), sum(plain.values()))


def test_a_self_mask_seed_shared_with_neighbours_is_rebuilt_by_threshold_of_them() -> None:
    dealer = GRAPH.ring[3]
    seed = new_seed()
    sealed, _ = share_seed(
        seed,
        own_id=dealer,
        own_private=KEYS[dealer][0],
        peers=closed_keys(dealer),
        threshold=GRAPH.threshold,
        context=CONTEXT,
        coordinates=XS,
    )
    assert set(sealed) == set(GRAPH.closed(dealer))
    opened = {}
    for holder in sorted(sealed)[-GRAPH.threshold :]:
        x, y = open_share(
            sealed[holder], KEYS[holder][0], PUBLIC[dealer], context=CONTEXT, sender=dealer, recipient=holder
        )
        opened[x] = y
    rebuilt = reconstruct(
        opened, threshold=GRAPH.threshold, expected=commitment(seed, context=CONTEXT), context=CONTEXT
    )
    assert rebuilt == seed
    mask = self_mask(rebuilt, slots=SLOTS, modulus=T, context=CONTEXT)
    assert np.array_equal(mask, self_mask(seed, slots=SLOTS, modulus=T, context=CONTEXT))


def test_a_coalition_below_the_threshold_cannot_rebuild_an_honest_neighbours_secrets() -> None:
    """Every coalition of max_colluding = t - 1 = 2 institutions holds at most 2 shares of any secret, and shares
    of no key between two institutions outside it. With its 2 shares, interpolation gives a value unrelated to the
    seed (any seed is equally consistent with t - 1 shares), and the commitment check refuses it."""
    honest = GRAPH.ring[6]
    coalition = list(GRAPH.neighbours(honest))[:2]
    seed = new_seed()
    sealed, _ = share_seed(
        seed,
        own_id=honest,
        own_private=KEYS[honest][0],
        peers=closed_keys(honest),
        threshold=GRAPH.threshold,
        context=CONTEXT,
        coordinates=XS,
    )
    held = {}
    for member in coalition:
        x, y = open_share(
            sealed[member], KEYS[member][0], PUBLIC[honest], context=CONTEXT, sender=honest, recipient=member
        )
        held[x] = y
    with pytest.raises(ShareError, match="2 valid share"):
        reconstruct(held, threshold=GRAPH.threshold, expected=commitment(seed, context=CONTEXT), context=CONTEXT)
    with pytest.raises(ShareError, match="do not interpolate to a seed"):
        combine(sorted(held.items()))  # two points fix no seed: they interpolate to a random field element
    # A share sealed to someone outside the coalition does not open with a coalition member's key.
    outsider = next(h for h in GRAPH.closed(honest) if h not in coalition and h != honest)
    with pytest.raises(ShareError):
        open_share(
            sealed[outsider], KEYS[coalition[0]][0], PUBLIC[honest], context=CONTEXT, sender=honest, recipient=outsider
        )
    # The coalition's members hold no share of the keys an honest institution holds with its other neighbours
    # unless they are in that dealer's closed neighbourhood, and never t of them.
    for dealer in IDS:
        held_by_coalition = sum(member in GRAPH.closed(dealer) for member in coalition)
        assert held_by_coalition < GRAPH.threshold


def test_non_neighbours_share_no_mask() -> None:
    a = GRAPH.ring[0]
    b = next(i for i in IDS if i != a and not GRAPH.adjacent(a, i))
    only_pair = {a: PUBLIC[a], b: PUBLIC[b]}
    assert b not in GRAPH.neighbours(a)
    # a's sparse mask is exactly the sum of its terms with its neighbours: b contributes nothing to it.
    expected = np.zeros(SLOTS, dtype=np.int64)
    for peer in GRAPH.neighbours(a):
        key = pair_key(KEYS[a][0], PUBLIC[peer], context=CONTEXT)
        expected = (expected + pair_term(a, peer, key, slots=SLOTS, modulus=T)) % T
    assert np.array_equal(sparse_mask(a), expected)
    assert not np.array_equal(
        pairwise_mask(a, KEYS[a][0], only_pair, slots=SLOTS, modulus=T, context=CONTEXT), np.zeros(SLOTS)
    )
