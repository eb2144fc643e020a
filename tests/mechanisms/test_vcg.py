"""VCG procurement: Clarke-pivot payments against independent re-solves, the case5 figures of the research note,
and hypothesis property tests on random instances of 5-20 bidders: individual rationality, and no bidder gains by
misreporting its price or capacity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechanisms.network import Network, load_network, network_path, parse_network
from mechanisms.opf import Grid
from mechanisms.vcg import Bid, run_auction
from tests.mechanisms import reference

VOLL = 1000.0


@pytest.fixture(scope="module")
def case5() -> Network:
    return load_network(network_path("case5"))


def _as_bids(network: Network) -> list[Bid]:
    return [Bid(g.id, g.bus, g.capacity_mw, g.cost) for g in network.generators]


def test_case5_vcg_against_lmp_settlement_as_measured(case5: Network) -> None:
    """The research note's figures (wave2.md, 2b): Brighton and Solitude pivotal at full load, nobody at 70%."""
    grid = Grid.from_network(case5)
    full = run_auction(grid, case5.fixed_loads(), _as_bids(case5), voll=VOLL)
    assert full.vcg_total == pytest.approx(112_610.27, abs=0.01)
    assert full.lmp_total == pytest.approx(17_935.14, abs=0.01)
    assert {o.bidder for o in full.outcomes if o.pivotal} == {"Solitude", "Brighton"}
    light = run_auction(grid, case5.fixed_loads() * 0.7, _as_bids(case5), voll=VOLL)
    assert light.vcg_total == pytest.approx(18_485.09, abs=0.01)
    assert light.lmp_total == pytest.approx(7_764.91, abs=0.01)
    assert not any(o.pivotal for o in light.outcomes)


def test_clarke_pivots_equal_independent_re_solves_without_each_bidder(case5: Network) -> None:
    loads = case5.fixed_loads() * 0.7
    auction = run_auction(Grid.from_network(case5), loads, _as_bids(case5), voll=VOLL)
    everyone = reference.solve(case5, loads)
    for outcome in auction.outcomes:
        without = case5.model_copy(update={"generators": tuple(g for g in case5.generators if g.id != outcome.bidder)})
        others = reference.solve(without, loads).cost
        assert outcome.vcg_payment == pytest.approx(others - (everyone.cost - outcome.bid_cost), abs=1e-6)


def test_pivotal_means_more_load_unserved_than_with_every_bid() -> None:
    """50 MW of load, 20 MW offered: 30 MW goes unserved with every bid. Without x or y 10 MW more does (each is
    pivotal, paid off the value of lost load); without z, who offers 0 MW, no more does."""
    one = parse_network({"network": {"name": "one"}, "buses": [{"id": "A", "load_mw": 50.0}]})
    auction = run_auction(Grid.from_network(one), one.fixed_loads(), [Bid("x", "A", 10.0, 5.0),
                          Bid("y", "A", 10.0, 6.0), Bid("z", "A", 0.0, 7.0)], voll=VOLL)
    assert auction.dispatch.shed.sum() == pytest.approx(30.0)
    assert {o.bidder: o.pivotal for o in auction.outcomes} == {"x": True, "y": True, "z": False}
    assert {o.bidder: o.vcg_payment for o in auction.outcomes} == pytest.approx({"x": 10_000.0, "y": 10_000.0,
                                                                                 "z": 0.0})


def test_without_a_value_of_lost_load_a_pivotal_bidder_is_refused_by_name(case5: Network) -> None:
    from mechanisms.opf import Infeasible

    with pytest.raises(Infeasible, match="without bidder Solitude the load cannot be served"):
        run_auction(Grid.from_network(case5), case5.fixed_loads(), _as_bids(case5), voll=None)


@st.composite
def instances(draw: st.DrawFn) -> tuple[list[Bid], np.ndarray]:
    n = draw(st.integers(5, 20))
    buses = "ABCDE"
    bids = [
        Bid(f"b{i}", buses[draw(st.integers(0, 4))], draw(st.floats(20, 300)), draw(st.floats(5, 80)))
        for i in range(n)
    ]
    scale = draw(st.floats(0.2, 0.9))
    return bids, np.array([0.0, 300.0, 300.0, 400.0, 0.0]) * scale


def _tolerance(cost: float) -> float:
    return 1e-6 * max(1.0, abs(cost))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instance=instances())
def test_vcg_is_individually_rational(case5: Network, instance: tuple[list[Bid], np.ndarray]) -> None:
    bids, loads = instance
    auction = run_auction(Grid.from_network(case5), loads, bids, voll=VOLL)
    for outcome in auction.outcomes:
        assert outcome.vcg_payment >= outcome.bid_cost - _tolerance(auction.dispatch.cost)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instance=instances(), liar=st.integers(0, 19), price=st.floats(0.3, 3.0), capacity=st.floats(0.3, 1.0))
def test_no_bidder_gains_by_misreporting(case5: Network, instance: tuple[list[Bid], np.ndarray], liar: int,
                                        price: float, capacity: float) -> None:
    bids, loads = instance
    liar %= len(bids)
    grid = Grid.from_network(case5)
    true = bids[liar]

    def utility(reported: list[Bid]) -> tuple[float, float]:
        auction = run_auction(grid, loads, reported, voll=VOLL)
        mine = next(o for o in auction.outcomes if o.bidder == true.bidder)
        return mine.vcg_payment - true.price * mine.allocation_mw, auction.dispatch.cost

    honest, cost = utility(bids)
    lie = Bid(true.bidder, true.bus, true.mw * capacity, true.price * price)
    dishonest, _ = utility([lie if i == liar else b for i, b in enumerate(bids)])
    assert dishonest <= honest + _tolerance(cost)
