"""A slow, obvious DC-OPF for the tests: the PTDF form, dense, written from the textbook independently of
mechanisms/opf.py (which solves the sparse B-theta form). LMPs come straight from the duals as the derivative of
the optimal cost with respect to each bus's load."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from mechanisms.network import Network


@dataclass(frozen=True)
class Reference:
    cost: float
    mw: np.ndarray  # (G,)
    lmp: np.ndarray  # (B,)
    ptdf: np.ndarray  # (L, B), injections at each bus withdrawn at the first bus
    line_prices: np.ndarray  # (L,) d cost / d (flow from->to): the lines' signed shadow prices


def ptdf_matrix(network: Network) -> np.ndarray:
    buses = {b.id: i for i, b in enumerate(network.buses)}
    n, lines = len(buses), network.lines
    incidence = np.zeros((len(lines), n))
    for k, line in enumerate(lines):
        incidence[k, buses[line.from_bus]], incidence[k, buses[line.to_bus]] = 1.0, -1.0
    b = np.diag([network.network.base_mva / line.reactance for line in lines])
    bus_matrix = incidence.T @ b @ incidence
    x = np.zeros((n, n))
    x[1:, 1:] = np.linalg.inv(bus_matrix[1:, 1:])  # angles with bus 0 as the reference
    return b @ incidence @ x


def solve(network: Network, loads: np.ndarray, *, co2_cap: float | None = None,
          fixed: dict[str, float] | None = None) -> Reference:
    buses = {b.id: i for i, b in enumerate(network.buses)}
    gens = network.generators
    at = np.zeros((len(buses), len(gens)))
    for g, gen in enumerate(gens):
        at[buses[gen.bus], g] = 1.0
    ptdf = ptdf_matrix(network)
    limits = np.array([line.limit_mw or np.inf for line in network.lines])
    rated = np.isfinite(limits)
    # flow = ptdf (at P - D): rows  ptdf at P <= F + ptdf D  and  -ptdf at P <= F - ptdf D, rated lines only.
    shift = ptdf @ at
    a_ub = np.vstack([shift[rated], -shift[rated]])
    b_ub = np.concatenate([limits[rated] + ptdf[rated] @ loads, limits[rated] - ptdf[rated] @ loads])
    if co2_cap is not None:
        a_ub = np.vstack([a_ub, [g.co2 for g in gens]])
        b_ub = np.append(b_ub, co2_cap)
    bounds = [(g.min_mw, g.capacity_mw) for g in gens]
    for unit, mw in (fixed or {}).items():
        bounds[[g.id for g in gens].index(unit)] = (mw, mw)
    res = linprog([g.cost for g in gens], A_ub=a_ub if len(a_ub) else None, b_ub=b_ub if len(b_ub) else None,
                  A_eq=np.ones((1, len(gens))), b_eq=[loads.sum()], bounds=bounds, method="highs")
    assert res.status == 0, res.message
    m = np.asarray(res.ineqlin.marginals) if len(b_ub) else np.zeros(0)
    k = int(rated.sum())
    upper, lower = m[:k], m[k : 2 * k]
    # d cost / d D_b: the balance row's marginal plus, through each rated row's right-hand side, +-ptdf.
    lmp = res.eqlin.marginals[0] + upper @ ptdf[rated] - lower @ ptdf[rated]
    prices = np.zeros(len(limits))
    prices[rated] = upper - lower
    return Reference(float(res.fun), res.x, lmp, ptdf, prices)
