"""The Pareto frontier: monotone, each point equal to a direct (PTDF) solve under its cap, the carbon price a
slope of the frontier, and the proposal rule."""

from __future__ import annotations

import numpy as np
import pytest

from mechanisms.network import load_network, network_path
from mechanisms.opf import Grid, Infeasible, solve_dispatch
from mechanisms.pareto import Frontier, least_emissions, sweep
from tests.mechanisms import reference

Case = tuple[Grid, np.ndarray, Frontier]


@pytest.fixture(scope="module")
def frontier() -> Case:
    case5 = load_network(network_path("case5"))
    grid = Grid.from_network(case5)
    return grid, case5.fixed_loads(), sweep(grid, case5.fixed_loads(), points=41)


def test_the_frontier_spans_least_cost_to_least_emissions_and_is_monotone(frontier: Case) -> None:
    grid, loads, f = frontier
    assert len(f.points) == 41
    cost = np.array([p.cost for p in f.points])
    co2 = np.array([p.co2 for p in f.points])
    assert cost[0] == pytest.approx(17_479.90, abs=0.01)  # the least-cost dispatch
    assert co2[-1] == pytest.approx(least_emissions(grid, loads), rel=1e-6)
    assert np.all(np.diff(co2) < 0) and np.all(np.diff(cost) >= -1e-6)
    prices = np.array([p.carbon_price for p in f.points])
    assert np.all(np.diff(prices) >= -1e-6)  # cutting deeper never gets cheaper per t


def test_every_frontier_point_equals_a_direct_solve_under_its_cap(frontier: Case) -> None:
    _, loads, f = frontier
    case5 = load_network(network_path("case5"))
    for point in f.points:
        direct = reference.solve(case5, loads, co2_cap=point.co2_cap)
        assert point.cost == pytest.approx(direct.cost, rel=1e-6, abs=1e-6), point.index


def test_the_carbon_price_is_the_frontiers_slope(frontier: Case) -> None:
    _, _, f = frontier
    for a, b in zip(f.points[1:-1], f.points[2:], strict=False):
        slope = (b.cost - a.cost) / (a.co2 - b.co2)
        # The dual at each end bounds the chord's slope (the frontier is convex and piecewise linear).
        assert a.carbon_price - 1e-6 <= slope <= b.carbon_price + 1e-6


def test_the_proposal_is_the_knee_or_the_cheapest_at_a_carbon_price(frontier: Case) -> None:
    grid, loads, f = frontier
    assert 0 < f.proposed < 40 and "knee" in f.rationale
    priced = sweep(grid, loads, points=41, carbon_price=100.0)
    totals = [p.cost + 100.0 * p.co2 for p in priced.points]
    assert priced.proposed == int(np.argmin(totals)) and "at 100 $/t" in priced.rationale
    assert priced.points[priced.proposed].co2 == pytest.approx(priced.points[-1].co2)  # 100 $/t: cut all


def test_a_loading_cap_adds_a_reliability_axis(frontier: Case) -> None:
    grid, loads, _ = frontier
    f = sweep(grid, loads, points=5, loading_caps=(1.0, 0.8))
    assert len(f.points) == 10
    capped = [p for p in f.points if p.loading_cap == 0.8]
    assert all(p.dispatch.max_loading <= 0.8 + 1e-9 for p in capped)
    assert capped[0].cost > f.points[0].cost  # headroom on the lines costs money


def test_a_value_of_lost_load_lets_the_frontier_shed_as_a_dispatch_does(frontier: Case) -> None:
    grid, loads, _ = frontier
    # Twice case5's load: 470 MW more than its 1,530 MW of capacity.
    with pytest.raises(Infeasible, match=r"no loading cap of \[1.0\] leaves a feasible dispatch: under 1, network "
                       r"case5 is infeasible: energy balance: load that cannot be served"):
        sweep(grid, loads * 2, points=3)
    f = sweep(grid, loads * 2, points=3, voll=1000.0)
    shed = solve_dispatch(grid, loads * 2, voll=1000.0).shed.sum()  # 479.35 MW: the lines hold some back too
    assert shed > 470.0 and [p.dispatch.shed.sum() for p in f.points] == pytest.approx([shed] * 3)


def test_a_loading_cap_that_leaves_no_dispatch_is_skipped_with_its_reason(frontier: Case) -> None:
    grid, loads, _ = frontier
    f = sweep(grid, loads, points=3, loading_caps=(1.0, 0.05))
    assert {p.loading_cap for p in f.points} == {1.0}
    assert [alpha for alpha, _ in f.skipped] == [0.05]
    assert f.skipped[0][1].startswith("network case5 is infeasible: line A-B: its limit 20 MW would need")
