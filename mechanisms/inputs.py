"""What a stored recommendation read, checked against the releases `fusion verify` calls verified or legacy: the
releases its inputs name (`release_ids`, and its region loads' `release:<id>` records) and those that the forecasts
it names (`forecast_ids`, `forecast:<id>`) read, as the `forecasts` table records them (`input_release_ids`).

A recommendation recorded before `fusion recommend` left out releases that do not verify, one made before a release
it read stopped verifying, or one written by a party that bypassed that rule verifies as signed all the same: the
audit (`mechanisms.audit`) says so with its own status. The releases that do not verify
(`fusion.api.unverified_releases`: tampered, missing, a violation...; seconds on a large store) are taken once per
audit, and only when a recommendation names a release or forecast. A release named that the store does not hold is
no more verified than a tampered one; a forecast named that the store does not hold cannot be checked, and is named
too. So is a forecast named that does not replay (forecasting.replay: computed again from the releases it names, its
latest issue that replays differs from its rows, or none replays), or whose value for the recommendation's window is
not the load the recommendation took from it: `forecasts` rows are not signed, and before `fusion recommend` replayed
them a row appended with made-up values was a load. Each forecast named (and not already named for reading a release
that does not verify) is computed again once per check: milliseconds to a second each (docs/forecasting.md). Where
no release-signing key is registered nothing can be verified, and nothing is checked (`fusion recommend` reads every
release and forecast then).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fusion.api import FusedStore
from mechanisms.records import Recommendation

if TYPE_CHECKING:
    from forecasting.replay import ForecastReplay

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
    not_replayed: dict[str, str] = field(default_factory=dict)  # forecasts that do not replay, or not to its load: why

    def names(self) -> list[str]:
        """The releases, and the forecasts that cannot be checked or do not replay: 'r-forged', 'forecast fc-9'."""
        forecasts = sorted(set(self.unknown_forecasts) | set(self.not_replayed))
        return sorted(self.releases) + [f"forecast {f}" for f in forecasts]

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
        if self.not_replayed:
            named = "; ".join(f"{f}: {why}" for f, why in sorted(self.not_replayed.items()))
            parts.append(f"{subject} read forecast(s) that do not replay from the releases they name ({named})")
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
    or legacy, a forecast the store does not hold or one that does not replay to the load taken from it, with what
    they read (id -> UnverifiedRead). `store` reads the `releases` and `forecasts` tables; a few queries for all of
    them together, and each forecast named computed again once."""
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
    from forecasting.replay import ForecastReplay

    found = {}
    with ForecastReplay(store, unverified=unverified) as replay:
        for rid, n in named.items():
            direct = {r: bad[r] for r in n.releases if r in bad}
            through = {f: {r: bad[r] for r in read[f] if r in bad} for f in n.forecasts if f in read}
            through = {f: rs for f, rs in through.items() if rs}
            unknown = tuple(sorted(f for f in n.forecasts if f not in read))
            replayable = sorted(f for f in n.forecasts if f in read and f not in through)
            forged = _not_replayed(replay, recommendations[rid], replayable) if replayable else {}
            if direct or through or unknown or forged:
                releases_read = direct | {r: s for rs in through.values() for r, s in rs.items()}
                found[rid] = UnverifiedRead(releases_read, tuple(sorted(through)), unknown, forged)
    return found


def _not_replayed(replay: ForecastReplay, recommendation: Recommendation, forecasts: list[str]) -> dict[str, str]:
    """Of `forecasts` (named by `recommendation`), those that do not replay for its window, or whose replayed mean
    and SD there are not the load it took from them, with why."""
    from forecasting.replay import REPLAY_RTOL

    loads: dict[str, list[tuple[str, float, float]]] = {}
    region_loads = recommendation.inputs.get("region_loads")
    for region, load in (region_loads.items() if isinstance(region_loads, dict) else ()):
        kind, _, name = str(load.get("record", "")).partition(":") if isinstance(load, dict) else ("", "", "")
        value, spread = (load.get("value"), load.get("sd")) if isinstance(load, dict) else (None, None)
        if kind == "forecast" and isinstance(value, int | float) and isinstance(spread, int | float):
            loads.setdefault(name, []).append((region, float(value), float(spread)))
    why: dict[str, str] = {}
    for forecast in forecasts:
        found = replay.window(forecast, recommendation.valid_from)
        if isinstance(found, str):
            why[forecast] = found
            continue
        mean, sd = found
        for region, value, taken_sd in loads.get(forecast, ()):
            if not (math.isclose(value, mean, rel_tol=REPLAY_RTOL) and math.isclose(taken_sd, sd, rel_tol=REPLAY_RTOL)):
                why[forecast] = (f"the load it took for {region}, {value:.6g} (SD {taken_sd:.6g}), is not the "
                                 f"forecast's for its window, {mean:.6g} (SD {sd:.6g})")
    return why


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
