"""Double masking's parts: Shamir shares of the self-mask seed and of the pairwise mask keys, sealed shares, the
self mask itself."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privacy.masking import generate_agreement_key, pair_key
from privacy.sharing import (
    PRIME,
    ShareError,
    combine,
    commitment,
    decode_share,
    encode_share,
    new_seed,
    open_share,
    pair_entry,
    pair_key_context,
    reconstruct,
    seal_share,
    self_mask,
    share_coordinates,
    share_digest,
    share_pair_keys,
    share_seed,
    split,
)

T = 576460752303210497
CONTEXT = b"r-test"


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(1, 7), data=st.data())
def test_any_threshold_of_the_shares_reconstructs_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(1, n))
    shares = split(secret, shares=n, threshold=threshold)
    subset = data.draw(st.permutations(shares)).__getitem__(slice(0, threshold))
    assert combine(subset) == secret


def test_fewer_than_threshold_shares_are_uniform_whatever_the_secret() -> None:
    """With threshold 3, any two shares of a fixed secret are uniform and independent over the field: so they
    are distributed the same for every secret and reveal nothing about it."""
    for secret in (b"\x00" * 32, b"\xff" * 32):
        pairs = np.array([[y / PRIME for _, y in split(secret, shares=5, threshold=3)[1:3]] for _ in range(2000)])
        for column in pairs.T:
            assert stats.kstest(column, "uniform").pvalue > 1e-4
        assert abs(stats.pearsonr(pairs[:, 0], pairs[:, 1]).statistic) < 0.1


def test_a_wrong_share_fails_its_digest_and_reconstruction_checks_the_commitment() -> None:
    seed = new_seed()
    expected = commitment(seed, context=CONTEXT)
    shares = dict(split(seed, shares=4, threshold=2))
    digests = {x: share_digest((x, y), context=CONTEXT, dealer="d", recipient=f"r{x}") for x, y in shares.items()}
    lie = (shares[1] + 1) % PRIME  # one institution lies about its share
    assert share_digest((1, lie), context=CONTEXT, dealer="d", recipient="r1") != digests[1]
    assert share_digest((1, shares[1]), context=b"r-other", dealer="d", recipient="r1") != digests[1]
    assert reconstruct({2: shares[2], 3: shares[3]}, threshold=2, expected=expected, context=CONTEXT) == seed
    with pytest.raises(ShareError, match="needed"):
        reconstruct({2: shares[2]}, threshold=2, expected=expected, context=CONTEXT)
    with pytest.raises(ShareError, match="committed seed"):
        reconstruct({1: lie, 2: shares[2]}, threshold=2, expected=expected, context=CONTEXT)
    with pytest.raises(ShareError):  # a commitment for another release does not match the same seed
        reconstruct(shares, threshold=2, expected=commitment(seed, context=b"other"), context=CONTEXT)


def test_a_sealed_share_opens_only_for_its_recipient_and_only_untampered() -> None:
    alice, bob, carol = (generate_agreement_key() for _ in range(3))
    share = (2, 12345678901234567890)
    sealed = seal_share(share, alice[0], bob[1], context=CONTEXT, sender="alice", recipient="bob")
    assert open_share(sealed, bob[0], alice[1], context=CONTEXT, sender="alice", recipient="bob") == share
    with pytest.raises(ShareError):
        open_share(sealed, carol[0], alice[1], context=CONTEXT, sender="alice", recipient="bob")
    with pytest.raises(ShareError):  # relabelled for another recipient, or another release
        open_share(sealed, bob[0], alice[1], context=CONTEXT, sender="alice", recipient="carol")
    with pytest.raises(ShareError):
        open_share(sealed, bob[0], alice[1], context=b"r-other", sender="alice", recipient="bob")
    flipped = sealed[:-2] + ("00" if sealed[-2:] != "00" else "01")
    with pytest.raises(ShareError):
        open_share(flipped, bob[0], alice[1], context=CONTEXT, sender="alice", recipient="bob")


def test_share_seed_gives_each_institution_its_coordinate_and_any_quorum_reconstructs() -> None:
    keys = {name: generate_agreement_key() for name in ("alpha", "beta", "gamma", "delta")}
    publics = {name: pair[1] for name, pair in keys.items()}
    seed = new_seed()
    sealed, digests = share_seed(
        seed, own_id="beta", own_private=keys["beta"][0], peers=publics, threshold=3, context=CONTEXT
    )
    xs = share_coordinates(publics)
    opened = {
        name: open_share(sealed[name], keys[name][0], publics["beta"], context=CONTEXT, sender="beta", recipient=name)
        for name in publics
    }
    assert {name: share[0] for name, share in opened.items()} == xs
    for name, share in opened.items():
        assert share_digest(share, context=CONTEXT, dealer="beta", recipient=name) == digests[name]
    for trio in itertools.combinations(opened.values(), 3):
        assert combine(trio) == seed
    assert decode_share(encode_share(opened["alpha"])) == opened["alpha"]


def test_each_mask_key_is_shared_so_any_quorum_rebuilds_it_and_no_share_passes_for_another() -> None:
    names = ("alpha", "beta", "gamma", "delta")
    keys = {name: generate_agreement_key() for name in names}
    publics = {name: pair[1] for name, pair in keys.items()}
    sealed, digests, commitments = share_pair_keys(
        own_id="beta", own_private=keys["beta"][0], peers=publics, threshold=3, context=CONTEXT
    )
    assert sorted(commitments) == ["alpha", "delta", "gamma"]  # one key per other institution
    assert sorted(sealed) == sorted(digests) == sorted(pair_entry(p, r) for p in commitments for r in names)
    xs = share_coordinates(publics)
    for peer in commitments:
        bound = pair_key_context(CONTEXT, dealer="beta", peer=peer)
        opened = {
            r: open_share(sealed[pair_entry(peer, r)], keys[r][0], publics["beta"], context=bound, sender="beta",
                          recipient=r)
            for r in names
        }
        assert {r: share[0] for r, share in opened.items()} == xs
        for r, share in opened.items():
            assert share_digest(share, context=bound, dealer="beta", recipient=r) == digests[pair_entry(peer, r)]
        # Both sides of the pair hold the same key: the one the dealer's masks were drawn from.
        key = pair_key(keys[peer][0], publics["beta"], context=CONTEXT)
        for trio in itertools.combinations(names, 3):
            shares = {opened[r][0]: opened[r][1] for r in trio}
            assert reconstruct(shares, threshold=3, expected=commitments[peer], context=bound) == key
    # A share of one key opens under no other key's context, nor as a seed share.
    other = pair_key_context(CONTEXT, dealer="beta", peer="gamma")
    for context in (other, CONTEXT):
        with pytest.raises(ShareError):
            open_share(sealed[pair_entry("alpha", "delta")], keys["delta"][0], publics["beta"], context=context,
                       sender="beta", recipient="delta")


def test_the_self_mask_is_uniform_and_a_function_of_seed_and_release() -> None:
    seed = new_seed()
    mask = self_mask(seed, slots=20_000, modulus=T, context=CONTEXT)
    assert np.array_equal(mask, self_mask(seed, slots=20_000, modulus=T, context=CONTEXT))
    assert not np.array_equal(mask[:100], self_mask(seed, slots=100, modulus=T, context=b"r-other"))
    assert mask.min() >= 0 and mask.max() < T
    assert stats.kstest(mask / T, "uniform").pvalue > 1e-4
