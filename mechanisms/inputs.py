"""What a stored recommendation read, checked against the releases `fusion verify` calls verified or legacy: the
releases its inputs name (`release_ids`, and its region loads' `release:<id>` records) and those that the forecasts
it names (`forecast_ids`, `forecast:<id>`) read, as the `forecasts` table records them (`input_release_ids`).

A recommendation recorded before `fusion recommend` left out releases that do not verify, one made before a release
it read stopped verifying, or one written by a party that bypassed that rule verifies as signed all the same: the
audit (`mechanisms.audit`) says so with its own status. The releases that do not verify
(`fusion.api.unverified_releases`: tampered, missing, a violation...; seconds on a large store) are taken once per
audit, and only when a recommendation names a release or forecast. A release named that the store does not hold is
no more verified than a tampered one; a forecast named that the store does not hold cannot be checked, and is named
too. Where no release-signing key is registered nothing can be verified, and nothing is checked (`fusion recommend`
reads every release then).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fusion.api import FusedStore
from mechanisms.records import Recommendation

#: The status of a recommendation, and of a decision on one, that read a release `fusion verify` does not call
#: verified or legacy (`mechanisms.audit`).
UNVERIFIED_INPUT = "unverified_input"
#: How a release named that the store does not hold is listed.
ABSENT = "not in the store"
#: The most ids one query names (a query's text is bounded: fusion.store.sql).
_CHUNK = 1_000


@dataclass(frozen=True)
class UnverifiedRead:
    """What one recommendation read that does not verify: releases (id -> status), the forecasts it names that read
    one of them, and the forecasts it names that the store does not hold."""

    releases: dict[str, str]
    through: tuple[str, ...] = ()  # forecasts that read one of `releases`
    unknown_forecasts: tuple[str, ...] = ()

    def names(self) -> list[str]:
        """The releases, and the forecasts that cannot be checked: 'r-forged', 'forecast fc-9'."""
        return sorted(self.releases) + [f"forecast {f}" for f in self.unknown_forecasts]

    def why(self, subject: str = "it") -> str:
        """What `subject` read that does not verify, naming it."""
        parts = []
        if self.releases:
            read = ", ".join(f"{r} ({status})" for r, status in sorted(self.releases.items()))
            via = f", through forecast(s) {_listed(self.through)}" if self.through else ""
            parts.append(f"{subject} read release(s) that `fusion verify` does not call verified or legacy: "
                         f"{read}{via}")
        if self.unknown_forecasts:
            parts.append(f"{subject} read forecast(s) the store does not hold, so what they read cannot be checked: "
                         f"{_listed(self.unknown_forecasts)}")
        return "; ".join(parts)


class ReleaseTrust:
    """The releases `fusion verify` does not call verified or legacy, each with its status (None where no
    release-signing key is registered), taken from `take` on first use only, once."""

    def __init__(self, take: Callable[[], Mapping[str, str] | None]) -> None:
        self._take = take
        self._taken = False
        self._unverified: Mapping[str, str] | None = None

    def unverified(self) -> Mapping[str, str] | None:
        if not self._taken:
            self._unverified, self._taken = self._take(), True
        return self._unverified


@dataclass(frozen=True)
class NamedInputs:
    """The releases and forecasts a recommendation's inputs name."""

    releases: frozenset[str]
    forecasts: frozenset[str]


def named_inputs(recommendation: Recommendation) -> NamedInputs:
    """The releases and forecasts `recommendation` records having read: its `release_ids` and `forecast_ids`, and the
    records of its region loads (each a signed part of its inputs, so both are read)."""
    inputs = recommendation.inputs
    found: dict[str, set[str]] = {"release": set(), "forecast": set()}
    for kind, names in found.items():
        names.update(_strings(inputs.get(f"{kind}_ids")))
    loads = inputs.get("region_loads")
    for load in loads.values() if isinstance(loads, dict) else ():
        record = load.get("record") if isinstance(load, dict) else None
        kind, sep, name = record.partition(":") if isinstance(record, str) else ("", "", "")
        if sep and kind in found:
            found[kind].add(name)
    return NamedInputs(frozenset(found["release"]), frozenset(found["forecast"]))


def unverified_reads(
    store: FusedStore, recommendations: Mapping[str, Recommendation], trust: ReleaseTrust
) -> dict[str, UnverifiedRead]:
    """Of `recommendations` (id -> recommendation), those that read a release `fusion verify` does not call verified
    or legacy, or a forecast the store does not hold, with what they read (id -> UnverifiedRead). `store` reads the
    `releases` and `forecasts` tables; a few queries for all of them together."""
    named = {rid: named_inputs(rec) for rid, rec in recommendations.items()}
    named = {rid: n for rid, n in named.items() if n.releases or n.forecasts}
    if not named:
        return {}
    unverified = trust.unverified()
    if unverified is None:
        return {}
    # forecast -> the releases it read (a forecast the store does not hold is not among them).
    read = _forecast_reads(store, {f for n in named.values() for f in n.forecasts})
    releases = {r for n in named.values() for r in n.releases} | {r for rs in read.values() for r in rs}
    held = _held_releases(store, releases - set(unverified))
    bad = dict(unverified) | {r: ABSENT for r in releases - held - set(unverified)}
    found = {}
    for rid, n in named.items():
        direct = {r: bad[r] for r in n.releases if r in bad}
        through = {f: {r: bad[r] for r in read[f] if r in bad} for f in n.forecasts if f in read}
        through = {f: rs for f, rs in through.items() if rs}
        unknown = tuple(sorted(f for f in n.forecasts if f not in read))
        if direct or through or unknown:
            releases_read = direct | {r: s for rs in through.values() for r, s in rs.items()}
            found[rid] = UnverifiedRead(releases_read, tuple(sorted(through)), unknown)
    return found


def _forecast_reads(store: FusedStore, forecasts: set[str]) -> dict[str, frozenset[str]]:
    """Each of `forecasts` the store holds -> the releases its rows record having read (all its rows': a forecast's
    windows share them)."""
    read: dict[str, set[str]] = {}
    for chunk in _chunks(forecasts):
        rows = store.sql(
            f"SELECT DISTINCT forecast_id, input_release_ids FROM forecasts WHERE forecast_id IN ({_literals(chunk)})"
        ).to_pylist()
        for row in rows:
            read.setdefault(row["forecast_id"], set()).update(row["input_release_ids"] or ())
    return {f: frozenset(rs) for f, rs in read.items()}


def _held_releases(store: FusedStore, releases: set[str]) -> set[str]:
    """Those of `releases` the store holds rows of."""
    held: set[str] = set()
    for chunk in _chunks(releases):
        held.update(store.sql(
            f"SELECT DISTINCT release_id FROM releases WHERE release_id IN ({_literals(chunk)})"
        ).column("release_id").to_pylist())
    return held


def _chunks(names: Iterable[str]) -> Iterator[list[str]]:
    ordered = sorted(names)
    for start in range(0, len(ordered), _CHUNK):
        yield ordered[start:start + _CHUNK]


def _literals(names: Iterable[str]) -> str:
    return ", ".join("'" + name.replace("'", "''") + "'" for name in names)


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _listed(names: Iterable[str], most: int = 5) -> str:
    """'a, b, c and 3 more'."""
    ordered = sorted(names)
    return ", ".join(ordered[:most]) + (f" and {len(ordered) - most} more" if len(ordered) > most else "")


__all__ = ["ABSENT", "UNVERIFIED_INPUT", "NamedInputs", "ReleaseTrust", "UnverifiedRead", "named_inputs",
           "unverified_reads"]
