"""DC optimal power flow on `scipy.optimize.linprog(method="highs")`: dispatch, LMPs from the duals (split into an
energy and a congestion part), and the binding constraints with their shadow prices.

The LP is the sparse B-theta form, one row per bus and per line (it scales to thousands of buses; the PTDF form of
the tests is its independent check):

    min  sum_s cost_s P_s + voll sum_b shed_b
    s.t. sum_{s at b} P_s + shed_b - sum_l A_lb f_l = D_b        (bus b: its dual is the LMP, $/MWh)
         f_l - (base_mva / x_l) (theta_from - theta_to) = 0       (line l's DC flow, MW)
         -alpha F_l <= f_l <= alpha F_l                           (rated lines; alpha: a loading cap, default 1)
         min_s <= P_s <= capacity_s                               (or P_s fixed, for an override)
         sum_s co2_s P_s <= E                                     (only with a CO2 cap: its dual is a carbon price)

With a reserve, the loads' uncertainty becomes a second scenario: every bus's load raised by its margin dD_b
(the upper end of its interval), served by the same dispatch plus headroom r_s >= 0 deployed on the units
(P_s + r_s <= capacity_s), through the same network within the same limits (its own angles and flows). So the
headroom is held where it can be delivered; the second balance's duals are the buses' reserve prices, and a line
that binds only when the reserve is deployed shows in the LMPs too.

The LMP's energy part is its value at the reference (a bus, or the loads' weighted average: a distributed,
load-weighted reference as ISOs publish); the congestion part is the rest (a DC model has no losses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from fusion.errors import FusionError
from mechanisms.network import Network

#: A dual smaller than this ($/MWh or $/t) is not a binding constraint.
BINDING_TOLERANCE = 1e-6


class Infeasible(FusionError):
    """No dispatch meets every constraint; the message names the constraints that would have to give."""


@dataclass(frozen=True)
class Supply:
    """Offers to produce, one per unit: the network's generators, or the bids of an auction."""

    ids: tuple[str, ...]
    bus: np.ndarray  # (S,) bus index
    capacity: np.ndarray  # (S,) MW
    minimum: np.ndarray  # (S,) MW
    cost: np.ndarray  # (S,) $/MWh
    co2: np.ndarray  # (S,) t/MWh

    @classmethod
    def from_generators(cls, network: Network) -> Supply:
        index = network.bus_index()
        gens = network.generators
        return cls(
            ids=tuple(g.id for g in gens),
            bus=np.array([index[g.bus] for g in gens], dtype=np.int64),
            capacity=np.array([g.capacity_mw for g in gens], dtype=float),
            minimum=np.array([g.min_mw for g in gens], dtype=float),
            cost=np.array([g.cost for g in gens], dtype=float),
            co2=np.array([g.co2 for g in gens], dtype=float),
        )

    def without(self, drop: np.ndarray) -> Supply:
        """The units where `drop` (a boolean mask) is false."""
        keep = ~drop
        return Supply(tuple(i for i, d in zip(self.ids, drop, strict=True) if not d), self.bus[keep],
                      self.capacity[keep], self.minimum[keep], self.cost[keep], self.co2[keep])


@dataclass(frozen=True)
class Grid:
    """A network's arrays, built once and shared by every solve on it."""

    name: str
    bus_ids: tuple[str, ...]
    line_ids: tuple[str, ...]
    line_from: np.ndarray  # (L,) bus index
    line_to: np.ndarray  # (L,)
    susceptance: np.ndarray  # (L,) MW per radian: base_mva / x
    limit: np.ndarray  # (L,) MW, inf where unrated
    angle_reference: int  # the bus whose angle is 0
    price_reference: int | None  # the bus of the energy part; None: load-weighted
    voll: float | None
    generators: Supply

    @classmethod
    def from_network(cls, network: Network) -> Grid:
        index = network.bus_index()
        lines = network.lines
        reference = network.network.reference
        return cls(
            name=network.name,
            bus_ids=tuple(b.id for b in network.buses),
            line_ids=tuple(line.name for line in lines),
            line_from=np.array([index[line.from_bus] for line in lines], dtype=np.int64),
            line_to=np.array([index[line.to_bus] for line in lines], dtype=np.int64),
            susceptance=np.array([network.network.base_mva / line.reactance for line in lines], dtype=float),
            limit=np.array([line.limit_mw if line.limit_mw is not None else np.inf for line in lines], dtype=float),
            angle_reference=0 if reference == "load" else index[reference],
            price_reference=None if reference == "load" else index[reference],
            voll=network.network.voll,
            generators=Supply.from_generators(network),
        )

    @property
    def buses(self) -> int:
        return len(self.bus_ids)

    @property
    def lines(self) -> int:
        return len(self.line_ids)


@dataclass(frozen=True)
class Binding:
    """A constraint at its limit, with its shadow price: what one more unit of the limit would save."""

    constraint: str  # e.g. "line D-E", "capacity Alta", "co2 cap", "reserve line D-E"
    shadow_price: float
    unit: str  # "$/MWh" or "$/t"
    detail: str


@dataclass(frozen=True)
class Dispatch:
    """The optimal dispatch of one LP and what its duals say."""

    grid: str
    bus_ids: tuple[str, ...]
    line_ids: tuple[str, ...]
    supply_ids: tuple[str, ...]
    loads: np.ndarray  # (B,) MW
    mw: np.ndarray  # (S,) MW per unit
    reserve: np.ndarray  # (S,) MW of headroom held per unit for the high-load scenario (zeros without one)
    shed: np.ndarray  # (B,) MW unserved (zeros without a value of lost load)
    flows: np.ndarray  # (L,) MW, positive from `from` to `to`
    lmp: np.ndarray  # (B,) $/MWh
    energy: float  # $/MWh, the LMP at the reference
    congestion: np.ndarray  # (B,) $/MWh, lmp - energy
    cost: float  # $/h: offers at their prices, plus unserved load at the value of lost load
    co2: float  # t/h
    max_loading: float  # the largest |flow| / limit over rated lines (0 if none)
    binding: tuple[Binding, ...]
    carbon_price: float | None  # $/t, the CO2 cap's dual (None without a cap)
    reserve_price: np.ndarray | None  # (B,) $/MWh, the high-load scenario's balance duals (None without one)

    def by_unit(self) -> dict[str, float]:
        return dict(zip(self.supply_ids, self.mw.tolist(), strict=True))


def solve_dispatch(
    network: Network | Grid,
    loads: np.ndarray,
    *,
    supply: Supply | None = None,
    reserve: np.ndarray | None = None,
    co2_cap: float | None = None,
    loading_cap: float | None = None,
    fixed: dict[str, float] | None = None,
    voll: float | None = None,
) -> Dispatch:
    """The least-cost dispatch of `supply` (default: the network's generators) serving `loads` (MW per bus), with
    optional headroom for a high-load scenario (`reserve`: MW added to each bus's load), CO2 cap (t/h), loading
    cap (a fraction of every rated line's limit) and units fixed at given MW (an override). `voll` ($/MWh,
    default the network's) allows unserved load at that price. Raises Infeasible naming the constraints that
    cannot all hold."""
    grid = network if isinstance(network, Grid) else Grid.from_network(network)
    supply = supply if supply is not None else grid.generators
    voll = voll if voll is not None else grid.voll
    loads = np.asarray(loads, dtype=float)
    if loads.shape != (grid.buses,) or not np.all(np.isfinite(loads)):
        raise FusionError(f"network {grid.name}: expected {grid.buses} finite bus loads, got {loads.shape}")
    if np.any(loads < 0):  # a negative load would be generation nobody offered, at no cost
        negative = ", ".join(f"bus {grid.bus_ids[i]} {loads[i]:g} MW" for i in np.flatnonzero(loads < 0))
        raise FusionError(f"network {grid.name}: a bus load is at least 0 MW ({negative})")
    margin = None if reserve is None or not np.any(np.asarray(reserve) > 0) else np.asarray(reserve, dtype=float)
    if margin is not None and (margin.shape != loads.shape or np.any(margin < 0) or not np.all(np.isfinite(margin))):
        raise FusionError(f"network {grid.name}: the reserve margin needs {grid.buses} finite MW >= 0, one per bus")
    low, high = _unit_bounds(supply, fixed or {})
    problem = _Problem(grid, supply, loads, low, high, margin, co2_cap, loading_cap, voll)
    res = linprog(problem.c, A_ub=problem.a_ub, b_ub=problem.b_ub, A_eq=problem.a_eq, b_eq=problem.b_eq,
                  bounds=problem.bounds, method="highs")
    if res.status == 2:
        raise Infeasible(_diagnose(problem))
    if res.status != 0:
        raise Infeasible(f"network {grid.name}: the LP solver stopped: {res.message}")
    return problem.dispatch(res)


def _unit_bounds(supply: Supply, fixed: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    low, high = supply.minimum.copy(), supply.capacity.copy()
    position = {unit: i for i, unit in enumerate(supply.ids)}
    for unit, mw in fixed.items():
        if unit not in position:
            raise FusionError(f"'{unit}' is not a unit of this dispatch (units: {', '.join(supply.ids)})")
        i = position[unit]
        if not (np.isfinite(mw) and low[i] - 1e-9 <= mw <= high[i] + 1e-9):
            raise Infeasible(f"{unit} cannot be fixed at {mw:g} MW: its range is {low[i]:g} to {high[i]:g} MW")
        low[i] = high[i] = mw
    return low, high


def _network_rows(grid: Grid, row0: int, injections: list[tuple[np.ndarray, np.ndarray]], theta0: int,
                  flow0: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """COO triplets of one scenario's rows: a balance row per bus (each injection: (bus index, column) arrays, +1;
    flows -1 at `from`, +1 at `to`) from `row0`, then a flow row per line, f - susceptance (theta_from - theta_to)."""
    b, lines = grid.buses, np.arange(grid.lines)
    rows = [row0 + bus for bus, _ in injections] + [row0 + grid.line_from, row0 + grid.line_to]
    cols = [col for _, col in injections] + [flow0 + lines, flow0 + lines]
    vals = [np.ones(len(col)) for _, col in injections] + [-np.ones(grid.lines), np.ones(grid.lines)]
    flow_rows = row0 + b + lines
    rows += [flow_rows, flow_rows, flow_rows]
    cols += [flow0 + lines, theta0 + grid.line_from, theta0 + grid.line_to]
    vals += [np.ones(grid.lines), -grid.susceptance, grid.susceptance]
    return rows, cols, vals


class _Problem:
    """The LP's matrices. Variables: P (S), theta (B), f (L), shed (B, with voll); with a reserve also r (S),
    theta2 (B), f2 (L), shed2 (B, with voll) for the high-load scenario. Equality rows: the base scenario's
    balances (B) and flows (L), then the high-load scenario's."""

    def __init__(self, grid: Grid, supply: Supply, loads: np.ndarray, low: np.ndarray, high: np.ndarray,
                 margin: np.ndarray | None, co2_cap: float | None, loading_cap: float | None,
                 voll: float | None) -> None:
        self.grid, self.supply, self.loads = grid, supply, loads
        self.low, self.high, self.margin = low, high, margin
        self.co2_cap, self.voll = co2_cap, voll
        self.alpha = 1.0 if loading_cap is None else loading_cap
        s, b, n_lines = len(supply.ids), grid.buses, grid.lines
        self.shedding, self.reserving = voll is not None, margin is not None
        n_shed = b if self.shedding else 0
        sizes = [s, b, n_lines, n_shed]
        if self.reserving:
            sizes += [s, b, n_lines, n_shed]
        offsets = np.cumsum([0, *sizes]).tolist()
        self.n = offsets[-1]
        self.p0, self.t0, self.f0, self.d0 = offsets[:4]
        self.r0, self.t2, self.f2, self.d2 = offsets[4:8] if self.reserving else (self.n,) * 4
        self.c = np.zeros(self.n)
        self.c[self.p0 : self.p0 + s] = supply.cost
        if self.shedding:
            self.c[self.d0 : self.d0 + b] = voll
            if self.reserving:  # load the headroom cannot serve is lost load too
                self.c[self.d2 : self.d2 + b] = voll
        units, buses = np.arange(s), np.arange(n_shed)
        base = [(supply.bus, self.p0 + units), (buses, self.d0 + buses)]
        rows, cols, vals = _network_rows(grid, 0, base, self.t0, self.f0)
        self.rows = b + n_lines
        rhs = [loads, np.zeros(n_lines)]
        if self.reserving:
            high_load = [(supply.bus, self.p0 + units), (supply.bus, self.r0 + units), (buses, self.d2 + buses)]
            more = _network_rows(grid, self.rows, high_load, self.t2, self.f2)
            rows, cols, vals = rows + more[0], cols + more[1], vals + more[2]
            rhs += [loads + margin, np.zeros(n_lines)]
            self.rows *= 2
        self.a_eq = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                  shape=(self.rows, self.n))
        self.b_eq = np.concatenate(rhs)
        ub: list[sp.spmatrix] = []
        ub_rhs: list[np.ndarray] = []
        self.co2_row: int | None = None
        if self.reserving:  # P + r <= capacity
            ub.append(sp.csr_matrix((np.ones(2 * s), (np.r_[units, units], np.r_[self.p0 + units, self.r0 + units])),
                                    shape=(s, self.n)))
            ub_rhs.append(supply.capacity)
        if co2_cap is not None:
            self.co2_row = s if self.reserving else 0
            ub.append(sp.csr_matrix((supply.co2, (np.zeros(s, dtype=np.int64), self.p0 + units)), shape=(1, self.n)))
            ub_rhs.append(np.array([co2_cap]))
        self.a_ub = sp.vstack(ub).tocsr() if ub else None
        self.b_ub = np.concatenate(ub_rhs) if ub_rhs else None
        self.bounds = self._bounds()

    def _bounds(self) -> list[tuple[float | None, float | None]]:
        grid = self.grid
        limit = [(None, None) if not np.isfinite(f) else (-f, f) for f in (self.alpha * grid.limit).tolist()]
        theta: list[tuple[float | None, float | None]] = [(None, None)] * grid.buses
        theta[grid.angle_reference] = (0.0, 0.0)
        shed = [(0.0, float(d)) for d in self.loads.tolist()] if self.shedding else []
        bounds = list(zip(self.low.tolist(), self.high.tolist(), strict=True)) + theta + limit + shed
        if self.reserving:
            assert self.margin is not None
            shed2 = [(0.0, float(d)) for d in (self.loads + self.margin).tolist()] if self.shedding else []
            bounds += [(0.0, float(c)) for c in self.supply.capacity.tolist()] + theta + limit + shed2
        return bounds

    def dispatch(self, res: Any) -> Dispatch:
        grid, supply = self.grid, self.supply
        s, b, n_lines = len(supply.ids), grid.buses, grid.lines
        x = res.x
        duals = np.asarray(res.eqlin.marginals, dtype=float)
        lmp = duals[:b]
        if grid.price_reference is not None:
            energy = float(lmp[grid.price_reference])
        else:
            total = float(self.loads.sum())
            energy = float(lmp @ self.loads / total) if total > 0 else float(lmp[grid.angle_reference])
        flows = x[self.f0 : self.f0 + n_lines]
        rated = np.isfinite(grid.limit)
        loading = np.abs(flows[rated]) / grid.limit[rated] if rated.any() else np.zeros(0)
        upper, lower = np.asarray(res.upper.marginals), np.asarray(res.lower.marginals)
        binding = self._lines(upper, lower, self.f0, flows, "line")
        if self.reserving:
            binding += self._lines(upper, lower, self.f2, x[self.f2 : self.f2 + n_lines], "reserve line")
        for i, unit in enumerate(supply.ids):
            fixed = self.low[i] == self.high[i]
            rent = -upper[self.p0 + i]
            if self.reserving:
                rent += -np.asarray(res.ineqlin.marginals)[i]
            if rent > BINDING_TOLERANCE and not fixed:
                binding.append(Binding(f"capacity {unit}", float(rent), "$/MWh", f"at its capacity {self.high[i]:g} MW"
                                       + (" (energy plus reserve)" if self.reserving else "")))
            if fixed and abs(upper[self.p0 + i] + lower[self.p0 + i]) > BINDING_TOLERANCE:
                binding.append(Binding(f"fixed {unit}", float(-(upper[self.p0 + i] + lower[self.p0 + i])), "$/MWh",
                                       f"held at {self.high[i]:g} MW"))
        carbon_price = None
        if self.co2_row is not None:
            carbon_price = float(-np.asarray(res.ineqlin.marginals)[self.co2_row])
            if carbon_price > BINDING_TOLERANCE:
                binding.append(Binding("co2 cap", carbon_price, "$/t", f"emissions at the cap {self.co2_cap:.3f} t/h"))
        mw = x[self.p0 : self.p0 + s]
        base_rows = b + n_lines
        return Dispatch(
            grid=grid.name, bus_ids=grid.bus_ids, line_ids=grid.line_ids, supply_ids=supply.ids, loads=self.loads,
            mw=mw, reserve=x[self.r0 : self.r0 + s] if self.reserving else np.zeros(s),
            shed=x[self.d0 : self.d0 + b] if self.shedding else np.zeros(b), flows=flows, lmp=lmp, energy=energy,
            congestion=lmp - energy, cost=float(res.fun), co2=float(supply.co2 @ mw),
            max_loading=float(loading.max()) if loading.size else 0.0, binding=tuple(binding),
            carbon_price=carbon_price,
            reserve_price=duals[base_rows : base_rows + b] if self.reserving else None,
        )

    def _lines(self, upper: np.ndarray, lower: np.ndarray, f0: int, flows: np.ndarray, label: str) -> list[Binding]:
        grid, found = self.grid, []
        for i, line in enumerate(grid.line_ids):
            price = -upper[f0 + i] if -upper[f0 + i] > BINDING_TOLERANCE else lower[f0 + i]
            if price > BINDING_TOLERANCE:
                a, b = grid.bus_ids[grid.line_from[i]], grid.bus_ids[grid.line_to[i]]
                direction = f"{a}->{b}" if flows[i] > 0 else f"{b}->{a}"
                found.append(Binding(f"{label} {line}", float(price), "$/MWh",
                                     f"flow {direction} at {abs(flows[i]):.2f} MW, its limit "
                                     f"{self.alpha * grid.limit[i]:g} MW"
                                     + (" (reserve deployed)" if label != "line" else "")))
        return found


def _diagnose(problem: _Problem) -> str:
    """Why the LP is infeasible: the same constraints made elastic (each may give, at a cost per MW or t of
    violation), solved for the least weighted violation; the constraints that had to give are named."""
    grid, supply = problem.grid, problem.supply
    b, n_lines = grid.buses, grid.lines
    scenarios = [(0, problem.f0, "")] + ([(b + n_lines, problem.f2, " (with the reserve deployed)")]
                                         if problem.reserving else [])
    limit = problem.alpha * grid.limit
    rated = np.flatnonzero(np.isfinite(limit))
    # Extra variables per scenario: short (B), surplus (B), over (rated lines); then the CO2 excess (1).
    per = 2 * b + len(rated)
    n = problem.n + per * len(scenarios) + 1
    co2_var = n - 1
    eq_rows, eq_cols, eq_vals = [], [], []
    ub_rows, ub_cols, ub_vals, ub_rhs = [], [], [], []
    cost = np.zeros(n)
    ub_count = 0
    for k, (row0, f0, _) in enumerate(scenarios):
        start = problem.n + k * per
        buses = np.arange(b)
        eq_rows += [row0 + buses, row0 + buses]
        eq_cols += [start + buses, start + b + buses]
        eq_vals += [np.ones(b), -np.ones(b)]
        # Serving the load comes first: an unserved MW in the base scenario costs more than any MW over a line's
        # limit, t over the CO2 cap or MW short in the high-load scenario, which are named before it when they
        # suffice.
        cost[start : start + 2 * b] = 1000.0 if k == 0 else 1.0
        cost[start + 2 * b : start + per] = 1.0
        for j, line in enumerate(rated.tolist()):
            for sign in (1.0, -1.0):
                ub_rows += [ub_count, ub_count]
                ub_cols += [f0 + line, start + 2 * b + j]
                ub_vals += [sign, -1.0]
                ub_rhs.append(float(limit[line]))
                ub_count += 1
    if problem.reserving:
        s = len(supply.ids)
        for i in range(s):
            ub_rows += [ub_count, ub_count]
            ub_cols += [problem.p0 + i, problem.r0 + i]
            ub_vals += [1.0, 1.0]
            ub_rhs.append(float(supply.capacity[i]))
            ub_count += 1
    if problem.co2_cap is not None:
        s = len(supply.ids)
        ub_rows += [ub_count] * (s + 1)
        ub_cols += [*range(problem.p0, problem.p0 + s), co2_var]
        ub_vals += [*supply.co2.tolist(), -1.0]
        ub_rhs.append(problem.co2_cap)
        ub_count += 1
        cost[co2_var] = 1.0
    a_eq = sp.hstack([problem.a_eq, sp.csr_matrix((np.concatenate(eq_vals),
                                                    (np.concatenate(eq_rows), np.concatenate(eq_cols))),
                                                   shape=(problem.rows, n))[:, problem.n :]]).tocsr()
    a_ub = (sp.csr_matrix((ub_vals, (ub_rows, ub_cols)), shape=(ub_count, n)) if ub_count else None)
    flows = set(range(problem.f0, problem.f0 + n_lines)) | (
        set(range(problem.f2, problem.f2 + n_lines)) if problem.reserving else set())
    bounds = [(None, None) if i in flows else bound for i, bound in enumerate(problem.bounds)]
    bounds += [(0, None)] * (n - problem.n)
    res = linprog(cost, A_ub=a_ub, b_ub=np.array(ub_rhs) if ub_count else None, A_eq=a_eq, b_eq=problem.b_eq,
                  bounds=bounds, method="highs")
    if res.status != 0:
        return f"network {grid.name}: no dispatch meets every constraint, and the solver could not say why"
    x = res.x
    named: list[str] = []
    load = float(problem.loads.sum())
    extra = float(problem.margin.sum()) if problem.margin is not None else 0.0
    for k, (_, _, where) in enumerate(scenarios):
        start = problem.n + k * per
        short, surplus = x[start : start + b], x[start + b : start + 2 * b]
        if short.sum() > 1e-6:
            at = ", ".join(f"bus {grid.bus_ids[i]} {short[i]:.2f} MW" for i in np.flatnonzero(short > 1e-6))
            named.append(
                f"energy balance: load that cannot be served ({at}; capacity {problem.high.sum():.2f} MW against "
                f"a load of {load:.2f} MW)" if k == 0 else
                f"reserve: the loads' upper bound (+{extra:.2f} MW) cannot be served by deploying headroom "
                f"({at} short)"
            )
        if surplus.sum() > 1e-6:
            at = ", ".join(f"bus {grid.bus_ids[i]} {surplus[i]:.2f} MW" for i in np.flatnonzero(surplus > 1e-6))
            named.append(f"energy balance{where}: generation that cannot be absorbed ({at}; minimum or fixed "
                         f"output {problem.low.sum():.2f} MW against a load of {load:.2f} MW)")
        over = x[start + 2 * b : start + per]
        for j in np.flatnonzero(over > 1e-6).tolist():
            line = int(rated[j])
            named.append(f"line {grid.line_ids[line]}{where}: its limit {limit[line]:g} MW would need "
                         f"{limit[line] + over[j]:.2f} MW")
    if x[co2_var] > 1e-6:
        named.append(f"co2 cap: {problem.co2_cap:.3f} t/h is {x[co2_var]:.3f} t/h below what the loads need")
    if not named:
        return f"network {grid.name}: no dispatch meets every constraint (numerically at the edge of feasibility)"
    return f"network {grid.name} is infeasible: " + "; ".join(named)


__all__ = ["Binding", "Dispatch", "Grid", "Infeasible", "Supply", "solve_dispatch"]
