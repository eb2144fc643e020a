"""DC-OPF: published case5 values, an independent PTDF formulation (tests/mechanisms/reference.py), the LMP split,
binding constraints, and infeasibility messages that name the constraint."""

from __future__ import annotations

import numpy as np
import pytest

from bench.mechanisms import synthetic_network
from fusion.errors import FusionError
from mechanisms.network import Network, load_network, network_path, parse_network
from mechanisms.opf import Grid, Infeasible, solve_dispatch
from tests.mechanisms import reference

#: Published DC OPF results on MATPOWER's case5 (PJM 5-bus, Li & Bo 2010): pandapower 3.5.6 `rundcopp` and
#: MATPOWER `rundcopf` give these LMPs (buses A-E, $/MWh) and cost ($/h); measured for the research note
#: (../shared/research/wave2.md, section 2a), where the PTDF split was energy 16.98 at bus A and a single binding
#: line, D-E at 240 MW, with shadow price 62.32 $/MWh.
CASE5_LMP = (16.98, 26.38, 30.00, 39.94, 10.00)
CASE5_COST = 17_479.90
CASE5_LINE_DE_SHADOW = 62.32


@pytest.fixture(scope="module")
def case5() -> Network:
    return load_network(network_path("case5"))


def test_case5_reproduces_the_published_lmps_and_cost(case5: Network) -> None:
    d = solve_dispatch(case5, case5.fixed_loads())
    assert np.abs(d.lmp - np.array(CASE5_LMP)).max() < 0.01
    assert d.cost == pytest.approx(CASE5_COST, abs=0.01)
    assert d.by_unit() == pytest.approx({"Alta": 40.0, "Park City": 170.0, "Solitude": 323.49, "Sundance": 0.0,
                                         "Brighton": 466.51}, abs=0.01)
    lines = {b.constraint: b for b in d.binding if b.constraint.startswith("line")}
    assert list(lines) == ["line D-E"]
    assert lines["line D-E"].shadow_price == pytest.approx(CASE5_LINE_DE_SHADOW, abs=0.01)
    assert "E->D at 240.00 MW" in lines["line D-E"].detail


def test_case5_equals_an_independent_ptdf_solve_including_the_lmp_split(case5: Network) -> None:
    loads = case5.fixed_loads()
    d = solve_dispatch(case5, loads)
    ref = reference.solve(case5, loads)
    assert d.cost == pytest.approx(ref.cost, abs=1e-6)
    np.testing.assert_allclose(d.lmp, ref.lmp, atol=1e-6)
    # Energy: the load-weighted LMP; congestion: each bus's PTDF (relative to that reference) against the lines'
    # shadow prices; no losses in a DC model.
    weights = loads / loads.sum()
    assert d.energy == pytest.approx(float(weights @ ref.lmp), abs=1e-6)
    relative = ref.ptdf - (ref.ptdf @ weights)[:, None]
    np.testing.assert_allclose(d.congestion, ref.line_prices @ relative, atol=1e-6)
    np.testing.assert_allclose(d.energy + d.congestion, d.lmp, atol=1e-9)


def test_a_bus_reference_splits_at_that_bus(case5: Network) -> None:
    at_a = case5.model_copy(update={"network": case5.network.model_copy(update={"reference": "A"})})
    d = solve_dispatch(at_a, case5.fixed_loads())
    assert d.energy == pytest.approx(16.98, abs=0.01)
    np.testing.assert_allclose(d.congestion, [0.0, 9.41, 13.02, 22.97, -6.98], atol=0.01)


@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_random_meshed_congested_networks_match_the_ptdf_solve(seed: int) -> None:
    network = synthetic_network(30, seed=seed, congested=0.3)
    loads = network.fixed_loads()
    d = solve_dispatch(network, loads)
    ref = reference.solve(network, loads)
    assert d.cost == pytest.approx(ref.cost, rel=1e-9, abs=1e-6)
    np.testing.assert_allclose(d.lmp, ref.lmp, atol=1e-6)
    assert sum(b.constraint.startswith("line") for b in d.binding) >= 1  # the case is congested


def test_an_override_fixes_a_unit_and_costs_what_the_lmp_says(case5: Network) -> None:
    base = solve_dispatch(case5, case5.fixed_loads())
    forced = solve_dispatch(case5, case5.fixed_loads(), fixed={"Sundance": 50.0})
    assert forced.by_unit()["Sundance"] == pytest.approx(50.0)
    # Sundance at 40 $/MWh where the LMP is 39.94: 50 MW cost 50 x 0.057 more (no breakpoint crossed).
    assert forced.cost - base.cost == pytest.approx(50 * (40.0 - base.lmp[3]), abs=1e-6)
    assert forced.cost == pytest.approx(reference.solve(case5, case5.fixed_loads(), fixed={"Sundance": 50.0}).cost)


def test_reserve_is_held_where_the_high_load_scenario_can_be_served(case5: Network) -> None:
    margin = np.array([0.0, 60.0, 60.0, 180.0, 0.0])
    d = solve_dispatch(case5, case5.fixed_loads(), reserve=margin)
    np.testing.assert_allclose(d.lmp, CASE5_LMP, atol=0.01)  # deliverable headroom was there: prices unchanged
    capacity = np.array([40.0, 170.0, 520.0, 200.0, 600.0])
    assert np.all(d.mw + d.reserve <= capacity + 1e-6)
    assert d.reserve.sum() == pytest.approx(margin.sum())
    # Deployed, the headroom serves the raised loads within every line limit (the PTDF flows of the scenario).
    ptdf = reference.ptdf_matrix(case5)
    injections = np.zeros(5)
    np.add.at(injections, [0, 0, 2, 3, 4], d.mw + d.reserve)
    flows = ptdf @ (injections - case5.fixed_loads() - margin)
    limits = np.array([line.limit_mw or np.inf for line in case5.lines])
    assert np.all(np.abs(flows) <= limits + 1e-6)
    assert d.reserve_price is not None and np.allclose(d.reserve_price, 0.0)  # headroom to spare costs nothing


def test_scarce_reserve_is_priced_at_the_value_of_lost_load(case5: Network) -> None:
    margin = np.array([0.0, 0.0, 0.0, 700.0, 0.0])  # 170 MW more than the 530 MW of spare capacity
    d = solve_dispatch(case5, case5.fixed_loads(), reserve=margin, voll=1000.0)
    assert d.reserve_price is not None and d.reserve_price[3] == pytest.approx(1000.0)
    assert d.cost >= CASE5_COST + 170 * 1000.0  # at least the capacity it lacks, lost at 1,000 $/MWh
    # Scarce deliverable headroom moves the base dispatch too (it frees line D-E for deployment): LMPs shift.
    assert np.abs(d.lmp - np.array(CASE5_LMP)).max() > 1.0
    with pytest.raises(Infeasible, match=r"reserve: the loads' upper bound \(\+700.00 MW\) cannot be served"):
        solve_dispatch(case5, case5.fixed_loads(), reserve=margin)


def test_unserved_load_is_priced_at_the_value_of_lost_load(case5: Network) -> None:
    d = solve_dispatch(case5, case5.fixed_loads() * 2, voll=1000.0)
    assert d.shed.sum() >= 2000 - 1530 - 1e-6
    assert d.lmp.max() == pytest.approx(1000.0)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"loads_factor": 2.0}, "energy balance: load that cannot be served"),
        ({"co2_cap": 100.0}, "co2 cap: 100.000 t/h"),
        ({"reserve": np.array([0.0, 0.0, 0.0, 600.0, 0.0])}, "reserve: the loads' upper bound (+600.00 MW)"),
        ({"fixed": {"Sundance": 200.0, "Solitude": 520.0, "Brighton": 300.0}}, "generation that cannot be absorbed"),
    ],
)
def test_an_infeasible_case_is_refused_naming_the_constraint(case5: Network, kwargs: dict, named: str) -> None:
    factor = kwargs.pop("loads_factor", 1.0)
    with pytest.raises(Infeasible, match="infeasible") as caught:
        solve_dispatch(case5, case5.fixed_loads() * factor, **kwargs)
    assert named in str(caught.value)


def test_a_negative_bus_load_is_refused_naming_the_bus(case5: Network) -> None:
    loads = case5.fixed_loads()
    loads[1] = -60.0
    with pytest.raises(FusionError, match=r"network case5: a bus load is at least 0 MW \(bus B -60 MW\)"):
        solve_dispatch(case5, loads, voll=1000.0)


def test_a_line_limit_that_cannot_hold_is_named() -> None:
    two = parse_network({
        "network": {"name": "two"},
        "buses": [{"id": "A", "load_mw": 0.0}, {"id": "B", "load_mw": 100.0}],
        "lines": [{"from": "A", "to": "B", "reactance": 0.1, "limit_mw": 60.0}],
        "generators": [{"id": "g", "bus": "A", "capacity_mw": 200.0, "cost": 10.0}],
    })
    with pytest.raises(Infeasible) as caught:
        solve_dispatch(Grid.from_network(two), two.fixed_loads())
    assert str(caught.value) == "network two is infeasible: line A-B: its limit 60 MW would need 100.00 MW"
    with pytest.raises(Infeasible, match="Sundance cannot be fixed at 250 MW: its range is 0 to 200 MW"):
        case5 = load_network(network_path("case5"))
        solve_dispatch(case5, case5.fixed_loads(), fixed={"Sundance": 250.0})
