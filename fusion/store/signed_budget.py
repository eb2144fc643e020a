"""What a release's signature says about its privacy period, and checking the `budget` table against it.

From format v2 on (fusion/store/provenance.py), the key holder signs, with each release, the period it was charged
to (name, bounds, epsilon cap, delta, composition rule), its charge (interval and mechanism) and the period's
spend after it. So the periods can be recomposed from the signed releases alone, without trusting the shared
`budget` table: `budget_checks` reports a period whose signed releases compose past its cap (`overspent`), and a
budget row that is missing, lacks a signed release, charges one for another aggregate or mechanism, or records
less spend than the signed releases show (`ledger`). Releases signed before v2 carry no claim and are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fusion.errors import InternalError

if TYPE_CHECKING:  # the accountant (and dp-accounting, SciPy's stats and optimiser) load only where a claim is read
    from fusion.release.plan import Period
    from privacy.accountant import ReleaseCharge

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
        doc["period"], float(doc["epsilon_cap"]), float(doc["delta"]), charge, doc["epsilon_after"], doc["charged_for"]
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
    and with its row in the `budget` table."""
    signed = list(signed)
    if not signed:  # releases signed before v2 only: nothing to recompose (nor the accountant to load)
        return []
    from privacy.accountant import period_loss

    by_period: dict[str, list[tuple[str, str, BudgetClaim]]] = {}
    for release_id, claim in signed:
        by_period.setdefault(claim.period, []).append((release_id, claim.charged_for, claim))
    rows = {r["period"]: r for r in budget_rows}
    findings = []
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
        findings.extend(_row_findings(period, members, rows.get(period), loss.epsilon))
    return findings


def _row_findings(
    period: str, members: list[tuple[str, str, BudgetClaim]], row: dict[str, Any] | None, recomposed: float
) -> list[PeriodFinding]:
    """How the period's `budget` row disagrees with its signed releases."""
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
    try:
        charged = recorded_charges(row)
    except (InternalError, ValueError, TypeError, KeyError) as exc:
        return [PeriodFinding(period, "ledger", f"its budget row is unreadable: {exc}")]
    findings = []
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
    signed_spend = max(max(c.epsilon_after for _, _, c in members), recomposed)
    if row["epsilon_spent"] < signed_spend * (1 - _TOLERANCE):
        findings.append(
            PeriodFinding(
                period,
                "ledger",
                (
                    f"its budget row records epsilon {row['epsilon_spent']:.4f} spent, less than its signed "
                    f"releases show ({signed_spend:.4f})"
                ),
            )
        )
    return findings
