"""Mechanisms that only recommend: DC-OPF dispatch with LMPs, a cost/emissions Pareto frontier and VCG procurement,
read from the common-knowledge store through Fusion's public API and written, signed, to `recommendations`;
authorities ratify, override or reject them in `decisions`. Nothing here executes anything.

Modules: network (network files), opf (the LP, LMPs and their split), pareto, vcg, loads (bus loads from the
store), records (digests, signatures, rows), recommend, decisions, rules (what a decision must meet: `decide`
and `verify` both), authorities (the registry's parties), bids, audit (`fusion verify`, the overrides report),
inputs (what a recommendation read, against the releases that verify), tables (the only reads and writes). The
names below load their
module on first use, so `import mechanisms` costs nothing (the solver, scipy, loads with `opf`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Network": "network", "load_network": "network", "network_path": "network",
    "Grid": "opf", "Dispatch": "opf", "Infeasible": "opf", "solve_dispatch": "opf",
    "Frontier": "pareto", "sweep": "pareto",
    "Bid": "vcg", "Auction": "vcg", "run_auction": "vcg",
    "Recommendation": "records", "Decision": "records", "Kind": "records", "Action": "records",
    "ReasonCode": "records",
    "Request": "recommend", "recommend": "recommend", "replay": "recommend",
    "DecideRequest": "decisions", "decide": "decisions",
    "verify_mechanisms": "audit", "overrides_report": "audit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mechanisms' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mechanisms.{_EXPORTS[name]}"), name)
