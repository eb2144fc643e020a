"""What a release's signature says about its privacy period, and checking the `budget` table against it.

From format v2 on (fusion/store/provenance.py), the key holder signs, with each release, the period it was charged
to (name, bounds, epsilon cap, delta, composition rule), its charge (interval and mechanism) and the period's
spend after it. So the periods can be recomposed from the signed releases alone, without trusting the shared
`budget` table: `budget_checks` reports a period whose signed releases compose past its cap (`overspent`), and a
budget row that is missing, is one of several rows for its period, names other bounds, cap, delta or composition
rule than the signed releases were charged under, lacks a signed release, charges one for another aggregate or
mechanism, or records less spend than the signed releases show, in its PLD epsilon, its RDP curve or that curve's
epsilon (`ledger`). A row may hold more than the signed releases (a pass charged, then crashed before it
published), so its spend and curve may be larger than theirs, never smaller; a value that is not a number (NaN)
never passes. Releases signed before v2 carry no claim and are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from fusion.errors import InternalError

if TYPE_CHECKING:  # the accountant (and dp-accounting, SciPy's stats and optimiser) load only where a claim is read
    from fusion.release.plan import Period
    from privacy.accountant import PeriodLoss, ReleaseCharge

#: Slack for comparing a spend recomposed here with one the ledger computed (the same code on the same charges).
_TOLERANCE = 1e-9


def budget_claim(
    *, period: Period, charge: ReleaseCharge, cap: float, delta: float, epsilon_after: float, charged_for: str
) -> dict[str, Any]:
    """The signed part of a release about its budget (a JSON object); `charged_for`: the digest the ledger bound
    the charge to (the aggregate's payload SHA-256)."""
    from privacy.accountant import NormBoundMechanism
    from privacy.pld import SkellamMechanism

    mechanism: dict[str, Any] | None = None
    if isinstance(charge.mechanism, SkellamMechanism):
        m = charge.mechanism
        mechanism = {"variance": m.variance, "coordinates": m.coordinates, "shift": m.shift}
    elif isinstance(charge.mechanism, NormBoundMechanism):
        m2 = charge.mechanism
        mechanism = {"variance": m2.variance, "l1": m2.l1, "l2": m2.l2}
    return {
        "period": period.name,
        "period_start": period.start.isoformat(),
        "period_end": period.end.isoformat(),
        "epsilon_cap": cap,
        "delta": delta,
        "composition": charge.composition.value,
        "interval_start": charge.start.isoformat(),
        "interval_end": charge.end.isoformat(),
        "mechanism": mechanism,
        "epsilon_after": epsilon_after,
        "charged_for": charged_for,
    }


@dataclass(frozen=True)
class BudgetClaim:
    """A release's signed budget claim, parsed."""

    period: str
    start: datetime  # the period's bounds
    end: datetime
    cap: float
    delta: float
    charge: ReleaseCharge
    epsilon_after: float
    charged_for: str  # the digest the ledger's row binds the charge to


def parse_budget_claim(doc: Any) -> BudgetClaim:
    """The claim a signature holds; ValueError, TypeError or KeyError for anything malformed."""
    from privacy.accountant import Composition, NormBoundMechanism, ReleaseCharge
    from privacy.pld import SkellamMechanism

    if not isinstance(doc, dict):
        raise TypeError("a budget claim is an object")
    numbers = [doc["epsilon_cap"], doc["delta"], doc["epsilon_after"]]
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in numbers):
        raise TypeError("a budget claim's cap, delta and spend are numbers")
    m = doc["mechanism"]
    mechanism: SkellamMechanism | NormBoundMechanism | None
    if m is None:
        mechanism = None
    elif "coordinates" in m:
        mechanism = SkellamMechanism(float(m["variance"]), int(m["coordinates"]), m["shift"])
    else:
        mechanism = NormBoundMechanism(float(m["variance"]), float(m["l1"]), float(m["l2"]))
    charge = ReleaseCharge(
        mechanism=mechanism,
        start=datetime.fromisoformat(doc["interval_start"]),
        end=datetime.fromisoformat(doc["interval_end"]),
        composition=Composition(doc["composition"]),
    )
    if not isinstance(doc["period"], str) or not isinstance(doc["charged_for"], str):
        raise TypeError("a budget claim's period and charged digest are text")
    return BudgetClaim(
        doc["period"],
        datetime.fromisoformat(doc["period_start"]),
        datetime.fromisoformat(doc["period_end"]),
        float(doc["epsilon_cap"]),
        float(doc["delta"]),
        charge,
        doc["epsilon_after"],
        doc["charged_for"],
    )


@dataclass(frozen=True)
class PeriodFinding:
    """One thing wrong with a period: `overspent` (its signed releases compose past its cap) or `ledger` (the
    budget table disagrees with the signed releases)."""

    period: str
    status: str
    reason: str


def budget_checks(
    signed: Iterable[tuple[str, BudgetClaim]], budget_rows: Iterable[dict[str, Any]]
) -> list[PeriodFinding]:
    """Each period of the signed releases (release id, claim) recomposed from them alone and compared with its cap
    and with its row in the `budget` table; and every period the table holds more than one row for."""
    signed = list(signed)
    if not signed:  # releases signed before v2 only: nothing to recompose (nor the accountant to load)
        return []
    from privacy.accountant import period_loss

    by_period: dict[str, list[tuple[str, str, BudgetClaim]]] = {}
    for release_id, claim in signed:
        by_period.setdefault(claim.period, []).append((release_id, claim.charged_for, claim))
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in budget_rows:
        rows.setdefault(r["period"], []).append(r)
    findings = [
        PeriodFinding(
            period,
            "ledger",
            f"the budget table holds {len(held)} rows for the period, where the ledger keeps one (rows added)",
        )
        for period, held in sorted(rows.items(), key=lambda item: str(item[0]))
        if len(held) > 1
    ]
    for period, members in sorted(by_period.items()):
        ids = [rid for rid, _, _ in members]
        terms = {(c.cap, c.delta, c.charge.composition) for _, _, c in members}
        if len(terms) > 1:
            findings.append(
                PeriodFinding(
                    period, "overspent", f"its signed releases {ids} name different caps, deltas or composition rules"
                )
            )
        cap, delta, composition = min(terms, key=lambda t: (t[0], -t[1]))
        loss = period_loss([c.charge for _, _, c in members], composition=composition, delta=delta)
        if loss.epsilon > cap * (1 + _TOLERANCE):
            findings.append(
                PeriodFinding(
                    period,
                    "overspent",
                    (
                        f"its signed releases {ids} compose ({composition.value}) to epsilon {loss.epsilon:.4f}, "
                        f"over its cap {cap:.4f}: the key holder charged them against a budget row that was behind "
                        "(rolled back?)"
                    ),
                )
            )
        held = rows.get(period, [])
        if len(held) <= 1:  # several: reported above, whichever of them holds what
            findings.extend(_row_findings(period, members, held[0] if held else None, loss))
    return findings


def _row_findings(
    period: str, members: list[tuple[str, str, BudgetClaim]], row: dict[str, Any] | None, loss: PeriodLoss
) -> list[PeriodFinding]:
    """How the period's `budget` row disagrees with its signed releases (`loss`: theirs, recomposed)."""
    from fusion.store.ledger import recorded_charges

    if row is None:
        ids = [rid for rid, _, _ in members]
        return [
            PeriodFinding(
                period,
                "ledger",
                f"the budget table has no row for the period, to which the signed "
                f"releases {ids} were charged (deleted)",
            )
        ]
    findings = _term_findings(period, members, row)
    try:
        charged = recorded_charges(row)
    except (InternalError, ValueError, TypeError, KeyError) as exc:
        return [*findings, PeriodFinding(period, "ledger", f"its budget row is unreadable: {exc}")]
    missing = [rid for rid, _, _ in members if rid not in charged]
    if missing:
        findings.append(
            PeriodFinding(
                period,
                "ledger",
                f"the signed releases {missing} are missing from its budget row (removed or rewritten)",
            )
        )
    other = [
        rid for rid, aggregate, claim in members
        if rid in charged and (charged[rid][0] != aggregate
                               or (charged[rid][1] is not None and charged[rid][1] != claim.charge))
    ]  # fmt: skip
    if other:
        findings.append(
            PeriodFinding(
                period,
                "ledger",
                f"its budget row charges the releases {other} for another "
                "aggregate or mechanism than they were signed with",
            )
        )
    signed_spend = max(max(c.epsilon_after for _, _, c in members), loss.epsilon)
    spent = row.get("epsilon_spent")
    if not (_number(spent) and math.isfinite(spent) and spent >= signed_spend * (1 - _TOLERANCE)):
        findings.append(
            PeriodFinding(
                period,
                "ledger",
                (
                    f"its budget row records epsilon {_shown(spent)} spent, less than its signed "
                    f"releases show ({signed_spend:.4f})"
                ),
            )
        )
    else:  # the RDP cross-check of a row whose spend is already short would name the same rollback again
        findings.extend(_rdp_findings(period, row, loss))
    return findings


def _term_findings(
    period: str, members: list[tuple[str, str, BudgetClaim]], row: dict[str, Any]
) -> list[PeriodFinding]:
    """The period's bounds, cap, delta and composition rule as its row names them, against those each signed release
    was charged under (the ledger refuses a charge under other terms than its row's: fusion/store/ledger.py). A row
    opened before the ledger kept mechanisms has no composition rule (NULL, and no mechanisms either): it composes
    its releases' RDP curves sequentially, whatever rule the releases charged to it later were signed with."""
    differ: dict[str, tuple[Any, Any]] = {}  # what the row says -> (in the row, signed), for the first that differs
    ids = []
    for rid, _, claim in members:
        composition = row.get("composition")
        older = composition is None and row.get("mechanisms") is None
        wrong = {
            name: (held, signed)
            for name, held, signed, same in (
                ("period_start", row.get("period_start"), claim.start, row.get("period_start") == claim.start),
                ("period_end", row.get("period_end"), claim.end, row.get("period_end") == claim.end),
                ("epsilon_cap", row.get("epsilon_cap"), claim.cap, row.get("epsilon_cap") == claim.cap),
                ("delta", row.get("delta"), claim.delta, row.get("delta") == claim.delta),
                (
                    "composition",
                    composition,
                    claim.charge.composition.value,
                    older or composition == claim.charge.composition.value,
                ),
            )
            if not same  # NaN equals nothing
        }
        if wrong:
            ids.append(rid)
            for name, values in wrong.items():
                differ.setdefault(name, values)
    if not ids:
        return []
    shown = "; ".join(f"{name} {held} in the row, {signed} signed" for name, (held, signed) in differ.items())
    return [
        PeriodFinding(
            period,
            "ledger",
            f"its budget row names other terms than the signed releases {ids} were charged under ({shown})",
        )
    ]


def _rdp_findings(period: str, row: dict[str, Any], loss: PeriodLoss) -> list[PeriodFinding]:
    """The row's RDP cross-check (its composed RDP curve, and that curve's epsilon) against the signed releases'
    own: the ledger computes both from the row's charges (an older row's curve by adding them), which hold the
    signed releases', so neither can be below theirs."""
    from privacy.accountant import ORDERS

    findings = []
    epsilon_rdp = row.get("epsilon_rdp")
    if not (_number(epsilon_rdp) and epsilon_rdp >= loss.epsilon_rdp * (1 - _TOLERANCE)):
        findings.append(
            PeriodFinding(
                period,
                "ledger",
                f"its budget row records an RDP epsilon of {_shown(epsilon_rdp)}, less than its signed releases' "
                f"({loss.epsilon_rdp:.4f})",
            )
        )
    curve = row.get("rdp")
    try:
        held = np.asarray(curve, dtype=float)
    except (ValueError, TypeError):
        held = np.zeros(0)
    if held.shape != ORDERS.shape:
        reason = f"its budget row's RDP curve has {held.size} orders, not {ORDERS.size}"
    elif not bool(np.all(held >= loss.rdp * (1 - _TOLERANCE))):  # False for NaN
        order = int(ORDERS[int(np.argmax(~(held >= loss.rdp * (1 - _TOLERANCE))))])
        reason = f"its budget row's RDP curve is below its signed releases' (at order {order}, among others)"
    else:
        return findings
    return [*findings, PeriodFinding(period, "ledger", reason)]


def _number(value: Any) -> TypeGuard[float]:
    """Whether a value read from the table is a number and not NaN (which compares false with everything)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _shown(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) and not isinstance(value, bool) else repr(value)
