"""Cost against emissions (and line-loading headroom) by the epsilon-constraint method: the least-cost dispatch
under a sweep of CO2 caps between the least-emitting dispatch and the least-cost one, each cap's dual the implied
carbon price. Exact (every point is an LP optimum), monotone, and each point carries its dispatch.

A third, reliability axis caps the loading of every rated line at a fraction of its limit (`loading_caps`): the
sweep is repeated under each cap, so a user sees what headroom on the lines costs. A cap under which the loads
cannot be served is skipped with the reason (the frontier keeps both); with none left the sweep is refused, naming
each cap's. With a value of lost load, every point may leave load unserved at that price, as a dispatch may.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mechanisms.opf import Dispatch, Grid, Infeasible, Supply, solve_dispatch

#: The cap is set this far (relative) above the least emissions: at exactly that value the LP sits on the edge of
#: feasibility, where HiGHS may answer either way.
_EDGE = 1e-9


@dataclass(frozen=True)
class FrontierPoint:
    index: int
    loading_cap: float  # the fraction of every rated line's limit allowed (1: the limits themselves)
    co2_cap: float  # t/h, the cap of this point (inf: no cap, the least-cost dispatch)
    dispatch: Dispatch

    @property
    def cost(self) -> float:
        return self.dispatch.cost

    @property
    def co2(self) -> float:
        return self.dispatch.co2

    @property
    def carbon_price(self) -> float:
        return self.dispatch.carbon_price or 0.0


@dataclass(frozen=True)
class Frontier:
    points: tuple[FrontierPoint, ...]
    proposed: int  # the index of the point proposed
    rationale: str  # why that one
    skipped: tuple[tuple[float, str], ...]  # (loading cap, why no dispatch is feasible under it)


def least_emissions(grid: Grid, loads: np.ndarray, *, supply: Supply | None = None,
                    loading_cap: float | None = None, reserve: np.ndarray | None = None,
                    voll: float | None = None) -> float:
    """The least CO2 (t/h) any feasible dispatch emits: the same constraints, emissions as the objective. With a
    value of lost load, unserved load costs `voll` per MW in it too (far above any t/MWh rate: load is served
    first, then emissions cut), so the floor is the least emissions of a dispatch that sheds only what it must."""
    supply = supply or grid.generators
    clean = Supply(supply.ids, supply.bus, supply.capacity, supply.minimum, supply.co2, supply.co2)
    # Emissions priced as cost: the least-cost dispatch of `clean` is the least-emitting one.
    return solve_dispatch(grid, loads, supply=clean, loading_cap=loading_cap, reserve=reserve, voll=voll).co2


def sweep(
    grid: Grid,
    loads: np.ndarray,
    *,
    points: int = 41,
    loading_caps: Sequence[float] = (1.0,),
    carbon_price: float | None = None,
    reserve: np.ndarray | None = None,
    voll: float | None = None,
) -> Frontier:
    """`points` caps evenly spaced from the least-cost dispatch's emissions down to the least possible, for each
    loading cap; proposes the point that minimises cost + carbon_price * CO2 when a price is given, else the knee
    (the point farthest below the straight line between the frontier's ends, in costs and emissions scaled to
    their ranges: where cutting emissions stops being cheap). `voll` ($/MWh, default the network's) allows
    unserved load at that price, as in a dispatch."""
    if points < 2:
        raise ValueError("a frontier needs at least 2 points")
    found: list[FrontierPoint] = []
    skipped: list[tuple[float, str]] = []
    for alpha in loading_caps:
        cap = None if alpha == 1.0 else alpha
        try:
            cheapest = solve_dispatch(grid, loads, loading_cap=cap, reserve=reserve, voll=voll)
        except Infeasible as exc:
            skipped.append((alpha, str(exc)))
            continue
        floor = least_emissions(grid, loads, loading_cap=cap, reserve=reserve, voll=voll)
        top = cheapest.co2
        caps = np.linspace(top, floor, points)
        caps[-1] = floor * (1 + _EDGE) + _EDGE
        for k, co2_cap in enumerate(caps.tolist()):
            if k == 0:  # the cap at the least-cost emissions: that dispatch, priced with the cap's dual
                co2_cap = top * (1 + _EDGE) + _EDGE
            point = solve_dispatch(grid, loads, co2_cap=co2_cap, loading_cap=cap, reserve=reserve, voll=voll)
            found.append(FrontierPoint(len(found), alpha, co2_cap, point))
    if not found:
        raise Infeasible(f"network {grid.name}: no loading cap of {list(loading_caps)} leaves a feasible dispatch: "
                         + "; ".join(f"under {alpha:g}, {why}" for alpha, why in skipped))
    proposed, rationale = _propose(found, carbon_price)
    return Frontier(tuple(found), proposed, rationale, tuple(skipped))


def _propose(points: list[FrontierPoint], carbon_price: float | None) -> tuple[int, str]:
    if carbon_price is not None:
        total = [p.cost + carbon_price * p.co2 for p in points]
        best = int(np.argmin(total))
        p = points[best]
        return best, (
            f"point {best} has the least cost plus emissions at {carbon_price:g} $/t: {p.cost:,.2f} $/h and "
            f"{p.co2:,.3f} t/h ({total[best]:,.2f} $/h in all)"
        )
    cost = np.array([p.cost for p in points])
    co2 = np.array([p.co2 for p in points])
    span_cost, span_co2 = np.ptp(cost), np.ptp(co2)
    if span_cost <= 0 or span_co2 <= 0:
        best = int(np.argmin(cost))
        return best, f"point {best}: the frontier is a single point (cost and emissions do not trade off here)"
    x = (co2.max() - co2) / span_co2  # 0 at the highest emissions, 1 at the lowest
    y = (cost - cost.min()) / span_cost  # 0 at the least cost
    gap = x - y  # how far below the diagonal from (0, 0) to (1, 1): emissions cut beyond proportional cost
    best = int(np.argmax(gap))
    p = points[best]
    return best, (
        f"point {best} is the knee of the frontier: {p.co2:,.3f} t/h for {p.cost:,.2f} $/h, cutting "
        f"{100 * x[best]:.0f}% of the emissions range for {100 * y[best]:.0f}% of the cost range; beyond it each "
        f"t/h cut costs more (carbon price {p.carbon_price:,.2f} $/t there)"
    )


__all__ = ["Frontier", "FrontierPoint", "least_emissions", "sweep"]
