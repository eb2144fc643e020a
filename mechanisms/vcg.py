"""VCG procurement on the dispatch LP: bids (a bidder's MW at a bus, at a price) are allocated by the least-cost
dispatch of the bids themselves; each bidder is paid the Clarke pivot

    payment_i = C(without i) - (C - bid cost of i's allocation)

where C is the optimal cost with every bid and C(without i) with bidder i's bids removed (N + 1 LPs). Truthful
bidding is then each bidder's best strategy and no truthful bidder loses money, but VCG is not budget-balanced:
it pays more than LMP settlement (the LMP at each bid's bus times its MW), and a pivotal bidder, without whom more
load would go unserved than with every bid, is paid off the value of lost load. So it is reported beside LMP
settlement as a diagnostic, "the rent of truthful bidding", never as the settlement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fusion.errors import FusionError
from mechanisms.opf import Dispatch, Grid, Infeasible, Supply, solve_dispatch


@dataclass(frozen=True)
class Bid:
    """An offer: up to `mw` MW at `bus`, at `price` $/MWh (and `co2` t/MWh)."""

    bidder: str
    bus: str
    mw: float
    price: float
    co2: float = 0.0


@dataclass(frozen=True)
class BidderOutcome:
    bidder: str
    allocation_mw: float
    bid_cost: float  # $/h: its bids' prices times their MW
    vcg_payment: float  # $/h
    lmp_payment: float  # $/h: the LMP at each bid's bus times its MW
    pivotal: bool  # without it, more load would go unserved than with every bid


@dataclass(frozen=True)
class Auction:
    dispatch: Dispatch
    outcomes: tuple[BidderOutcome, ...]

    @property
    def vcg_total(self) -> float:
        return sum(o.vcg_payment for o in self.outcomes)

    @property
    def lmp_total(self) -> float:
        return sum(o.lmp_payment for o in self.outcomes)


def bid_supply(grid: Grid, bids: Sequence[Bid]) -> Supply:
    """The bids as units of a dispatch, named `bidder#n` (n: the bid's place among the bidder's bids)."""
    index = {bus: i for i, bus in enumerate(grid.bus_ids)}
    seen: dict[str, int] = {}
    ids = []
    for number, bid in enumerate(bids):
        if bid.bus not in index:
            raise FusionError(f"bids[{number}] ({bid.bidder}): unknown bus '{bid.bus}' (network {grid.name})")
        if not (np.isfinite(bid.mw) and bid.mw >= 0 and np.isfinite(bid.price)):
            raise FusionError(f"bids[{number}] ({bid.bidder}): need finite mw >= 0 and price, got {bid.mw}, "
                              f"{bid.price}")
        seen[bid.bidder] = seen.get(bid.bidder, 0) + 1
        ids.append(f"{bid.bidder}#{seen[bid.bidder]}")
    return Supply(
        ids=tuple(ids),
        bus=np.array([index[b.bus] for b in bids], dtype=np.int64),
        capacity=np.array([b.mw for b in bids], dtype=float),
        minimum=np.zeros(len(bids)),
        cost=np.array([b.price for b in bids], dtype=float),
        co2=np.array([b.co2 for b in bids], dtype=float),
    )


def run_auction(grid: Grid, loads: np.ndarray, bids: Sequence[Bid], *, voll: float | None = None,
                fixed: dict[str, float] | None = None) -> Auction:
    """Allocate `bids` by the least-cost dispatch serving `loads`, and price it by VCG and by LMP. Without a
    value of lost load, a bidder without whom the load cannot be served has no Clarke pivot: refused, naming it."""
    if not bids:
        raise FusionError("an auction needs at least one bid")
    supply = bid_supply(grid, bids)
    voll = voll if voll is not None else grid.voll
    dispatch = solve_dispatch(grid, loads, supply=supply, voll=voll, fixed=fixed)
    bidders = list(dict.fromkeys(b.bidder for b in bids))
    owner = np.array([b.bidder for b in bids])
    # Each bidder's bid cost and LMP revenue; (S,) arrays summed per bidder.
    lmp_at_bid = dispatch.lmp[supply.bus]
    outcomes = []
    for bidder in bidders:
        mine = owner == bidder
        try:
            others = solve_dispatch(grid, loads, supply=supply.without(mine), voll=voll)
        except Infeasible:
            raise Infeasible(
                f"without bidder {bidder} the load cannot be served, so its Clarke pivot is undefined: give the "
                "auction a value of lost load (--voll, [mechanisms] voll, or voll in the network file)"
            ) from None
        bid_cost = float(supply.cost[mine] @ dispatch.mw[mine])
        outcomes.append(BidderOutcome(
            bidder=bidder,
            allocation_mw=float(dispatch.mw[mine].sum()),
            bid_cost=bid_cost,
            vcg_payment=others.cost - (dispatch.cost - bid_cost),
            lmp_payment=float(lmp_at_bid[mine] @ dispatch.mw[mine]),
            pivotal=bool(others.shed.sum() > dispatch.shed.sum() + 1e-6),
        ))
    return Auction(dispatch, tuple(outcomes))


__all__ = ["Auction", "Bid", "BidderOutcome", "bid_supply", "run_auction"]
