"""Noise shares against every admissible coalition, and the removal of excess layers (privacy/noise_shares.py)."""

from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.config.federation import parse_config
from fusion.config.parameters import release_parameters
from fusion.release.planning import noise_comparisons
from privacy.accountant import skellam_epsilon
from privacy.gaussian import analytic_gaussian_sigma, gaussian_delta
from privacy.noise_shares import (
    NoiseLayers,
    chain_seeds,
    layer_commitment,
    layer_noise,
    noise_digest,
    unknown_shares,
)
from privacy.pld import SkellamMechanism
from tests.conftest import config_text

FIVE = [("a", "csv"), ("b", "csv"), ("c", "csv"), ("d", "csv"), ("e", "csv")]


def params_for(*, quorum: int, colluding: int = 0, institutions=FIVE, epsilon: float = 1.0):
    text = config_text(institutions=institutions, quorum=quorum, noise=True, epsilon=epsilon)
    text = text.replace(f"quorum = {quorum}", f"quorum = {quorum}\nmax_colluding = {colluding}")
    return release_parameters(parse_config(tomllib.loads(text)))


def coalition_unknown(layers: NoiseLayers, contributors: int) -> float:
    """The noise variance that the worst admissible coalition does not know when `contributors` contribute and
    reveal their removable layers: it holds one contributor's draws and those of up to c others (never the share
    of the institution whose reading is protected, which contributes)."""
    known = min(layers.max_colluding + 1, contributors - 1)
    return (contributors - known) * layers.kept(contributors)


@pytest.mark.parametrize(("quorum", "colluding"), [(3, 0), (2, 0), (4, 1), (5, 2), (3, 1)])
def test_the_epsilon_of_the_noise_a_coalition_does_not_know_is_the_reported_one(quorum, colluding):
    """A contributor that keeps its own draws, with `max_colluding` others, the aggregator and the key holder:
    the noise none of them knows must carry the calibrated variance, at the quorum and with everyone in."""
    params = params_for(quorum=quorum, colluding=colluding)
    s = params.sensitivity
    for n in range(quorum, 6):
        unknown = coalition_unknown(params.layers, n)
        assert unknown >= params.total_variance * (1 - 1e-12)
        true_epsilon = skellam_epsilon([SkellamMechanism(unknown, s.coordinates, s.shift)], delta=params.delta)
        assert true_epsilon <= params.epsilon * (1 + 1e-9), (n, true_epsilon, params.epsilon)


def test_shares_sized_for_honest_contributors_alone_would_understate_epsilon():
    """The rule before: v / quorum each. At the demo's quorum 3 a contributor that keeps its draws faces only
    2/3 of v, an epsilon of about 1.2 (PLD) where 1.00 is reported."""
    params = params_for(quorum=3)
    s = params.sensitivity
    old_unknown = 2 * params.total_variance / 3
    old = SkellamMechanism(old_unknown, s.coordinates, s.shift)
    assert skellam_epsilon([old], delta=params.delta) > 1.1 * params.epsilon
    assert params.share_variance == pytest.approx(params.total_variance / 2)


@settings(max_examples=60, deadline=None)
@given(
    institutions=st.integers(1, 40),
    data=st.data(),
)
def test_layers_add_up_to_each_share(institutions, data):
    quorum = data.draw(st.integers(1, institutions))
    colluding = data.draw(st.integers(0, institutions))
    layers = NoiseLayers(total_variance=1e6, quorum=quorum, institutions=institutions, max_colluding=colluding)
    assert layers.sealed == pytest.approx(layers.base + sum(layers.layer(m) for m in layers.levels))
    for n in range(quorum, institutions + 1):
        assert layers.kept(n) == pytest.approx(layers.share(n))
        assert layers.share(n) * unknown_shares(n, colluding) == pytest.approx(1e6)
        assert all(layers.layer(m) >= 0 for m in layers.levels)
        assert layers.total(n) == pytest.approx(1e6 * n / unknown_shares(n, colluding))


@pytest.mark.parametrize(("quorum", "colluding"), [(3, 0), (4, 1), (2, 0)])
def test_noise_is_at_the_floor_at_the_quorum_and_with_everyone(quorum, colluding):
    """Target: noise sd at most 1.10x sqrt(n / (n - 1 - c)) times the central analytic Gaussian's, at the quorum
    and with every institution contributing (the Skellam accounting's slack against the Gaussian is all that is
    left)."""
    params = params_for(quorum=quorum, colluding=colluding)
    comparisons = noise_comparisons(params, epsilon=1.0, institutions=5)
    assert [c.contributors for c in comparisons] == [quorum, 5]
    for c in comparisons:
        assert c.to_floor <= 1.10
        assert c.floor_sd == pytest.approx(c.central_sd * math.sqrt(c.contributors / unknown_shares(c.contributors,
                                                                                                      colluding)))
    # Shares sized for the quorum with nothing removed: the old 5-institution noise was far above the floor.
    sealed_sd = math.sqrt(5 * params.share_variance)
    assert sealed_sd / comparisons[-1].floor_sd > 1.2


def test_analytic_gaussian_matches_the_exact_delta():
    sigma = analytic_gaussian_sigma(epsilon=1.0, delta=1e-6, l2=1.0)
    assert gaussian_delta(sigma=sigma, l2=1.0, epsilon=1.0) <= 1e-6
    assert gaussian_delta(sigma=sigma * 0.999, l2=1.0, epsilon=1.0) > 1e-6
    assert 4.0 < sigma < 5.0  # Balle & Wang's Table: about 4.4 at (1, 1e-6)


def test_a_revealed_layer_gives_the_layers_below_it_and_none_above():
    top = bytes(range(32))
    seeds = chain_seeds(top, top=9, bottom=3)
    assert sorted(seeds) == list(range(3, 10))
    revealed = chain_seeds(seeds[6], top=6, bottom=3)
    assert revealed == {m: seeds[m] for m in range(3, 7)}
    assert all(seed not in revealed.values() for m, seed in seeds.items() if m > 6)
    assert len({*seeds.values()}) == len(seeds)
    context = b"release-1"
    assert layer_commitment(seeds[4], level=4, context=context) != layer_commitment(seeds[4], level=5,
                                                                                    context=context)


def test_a_layer_regenerates_exactly_from_its_seed_with_its_variance():
    seed, context = b"\x07" * 32, b"release-1"
    first = layer_noise(seed, variance=2.5e5, slots=20_000, context=context)
    again = layer_noise(seed, variance=2.5e5, slots=20_000, context=context)
    np.testing.assert_array_equal(first, again)
    assert noise_digest(first, seed=seed, level=3, context=context) == noise_digest(
        again, seed=seed, level=3, context=context
    )
    # Keyed by the layer's seed: without it, a guess of a hidden layer cannot be tested against its digest.
    assert noise_digest(first, seed=b"\x08" * 32, level=3, context=context) != noise_digest(
        first, seed=seed, level=3, context=context
    )
    other = layer_noise(seed, variance=2.5e5, slots=20_000, context=b"release-2")
    assert not np.array_equal(first, other)
    # Sample variance of 20,000 draws: sd of the estimate is sqrt(2/20000) = 1% relative; 5 sds.
    assert abs(first.var() / 2.5e5 - 1) < 0.05 and abs(first.mean()) < 5 * math.sqrt(2.5e5 / 20_000)
    assert not layer_noise(seed, variance=0.0, slots=5, context=context).any()
