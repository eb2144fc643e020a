"""What a run found in an institution's feed files beside its readings: per-file tallies, the files refused whole,
and whether the share of the interval's rows it rejected lets the institution contribute.

Pure functions over counts: the contribution pipeline (pipelines/contribute.py) collects the tallies and acts on
the verdict. All of it stays with the institution (its local run report and console); exact counts never reach
the shared store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from fusion.config.federation import InstitutionConfig
from schemas.reasons import PUBLISHED_REASONS, RejectReason

#: Reasons decided once a row's time was found inside the interval (validation checks them after the time).
_TIMED = frozenset(r.value for r in PUBLISHED_REASONS if r is not RejectReason.DUPLICATE)
#: Rejects that say nothing about the data's health: rows of other intervals, exact copies of accepted readings,
#: and (streaming) readings for a window already released.
_NOT_FAULTS = frozenset({RejectReason.OUT_OF_INTERVAL.value, RejectReason.DUPLICATE.value, RejectReason.LATE.value})
#: Files a refusal message names at most.
NAMED_FILES = 5


@dataclass
class FileTally:
    """One feed file in a run: rows read, rows rejected by reason, and, when the whole file was refused, the
    reason code it was refused with and what was wrong (None when it was read)."""

    read: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    reason: str | None = None  # malformed_record (unreadable) or missing_column
    fault: str | None = None

    def refuse(self, reason: str, fault: str) -> None:
        self.reason, self.fault = reason, fault

    def merge(self, other: FileTally) -> FileTally:
        self.read += other.read
        self.rejected.update(other.rejected)
        if self.reason is None:
            self.reason, self.fault = other.reason, other.fault
        return self

    def faults(self) -> Counter[str]:
        """Its rejects that count against the data (see `interval_reject_rate`)."""
        return Counter({r: n for r, n in self.rejected.items() if r not in _NOT_FAULTS and n})

    def as_report(self) -> dict[str, object]:
        report: dict[str, object] = {"read": self.read, "rejected": dict(sorted(self.rejected.items()))}
        if self.reason:
            report |= {"reason": self.reason, "fault": self.fault}
        return report


def merge_tallies(into: dict[str, FileTally], other: Mapping[str, FileTally]) -> dict[str, FileTally]:
    """Add `other`'s tallies (by file path) into `into`; returns `into`."""
    for path, tally in other.items():
        into.setdefault(path, FileTally()).merge(tally)
    return into


def interval_reject_rate(read: int, rejected: Mapping[str, int]) -> float:
    """The share of the interval's rows that were rejected, in [0, 1].

    Rows of other intervals and exact duplicates are left out (a daily file read by an hourly release is mostly
    out_of_interval, and a resent file mostly duplicates, with nothing wrong). Rows rejected before their time
    was known (unparseable, missing fields, a file without a column) may belong to any interval the file
    covers: they count in proportion to the rows with a readable time that fall inside this one.
    """
    counts = {r: n for r, n in rejected.items() if n}
    accepted = read - sum(counts.values())
    timed = sum(n for r, n in counts.items() if r in _TIMED)
    untimed = sum(n for r, n in counts.items() if r not in _TIMED and r not in _NOT_FAULTS)
    inside = accepted + timed + counts.get(RejectReason.DUPLICATE.value, 0)
    outside = counts.get(RejectReason.OUT_OF_INTERVAL.value, 0)
    untimed_here = untimed * (inside / (inside + outside) if inside + outside else 1.0)
    rows = accepted + timed + untimed_here
    return (timed + untimed_here) / rows if rows else 0.0


class RejectLevel(StrEnum):
    OK = "ok"
    WARN = "warn"  # above the institution's warn_reject_rate: said, and it contributes
    STOP = "stop"  # above its max_reject_rate: it seals nothing unless its operator accepts the rejects


@dataclass(frozen=True)
class RejectVerdict:
    rate: float
    level: RejectLevel
    message: str = ""  # for WARN and STOP: the rate, the threshold, the files and their reasons


def judge_rejects(
    institution: InstitutionConfig,
    *,
    read: int,
    rejected: Mapping[str, int],
    files: Mapping[str, FileTally],
    entity_level: bool = False,
) -> RejectVerdict:
    """Whether the institution's rejects for the interval are above its thresholds, with a message naming the
    files that hold most of them and why (the stop rate by privacy unit: InstitutionConfig.stop_rate)."""
    rate = interval_reject_rate(read, rejected)
    stop = institution.stop_rate(entity_level=entity_level)
    if rate > stop:
        level, setting, limit = RejectLevel.STOP, "max_reject_rate", stop
    elif rate > institution.warn_reject_rate:
        level, setting, limit = RejectLevel.WARN, "warn_reject_rate", institution.warn_reject_rate
    else:
        return RejectVerdict(rate, RejectLevel.OK)
    message = (
        f"institution {institution.id}: {rate:.1%} of its rows for this interval were rejected, above its "
        f"{setting} of {limit:.0%}: {describe_files(files)}"
    )
    return RejectVerdict(rate, level, message)


def worst_files(files: Mapping[str, FileTally]) -> list[str]:
    """The paths of the files with the most rejects that count against the data, most first."""
    ranked = sorted(
        ((path, tally) for path, tally in files.items() if tally.faults() or tally.fault),
        key=lambda item: (-sum(item[1].faults().values()), item[0]),
    )
    return [path for path, _ in ranked]


def describe_files(files: Mapping[str, FileTally]) -> str:
    """The files with the most rejects that count against the data, each with its reasons (and its fault)."""
    ranked = worst_files(files)
    parts = []
    for path in ranked[:NAMED_FILES]:
        tally = files[path]
        reasons = ", ".join(f"{r}={n:,}" for r, n in tally.faults().most_common())
        parts.append(f"{path} ({reasons}{'; ' + tally.fault if tally.fault else ''})")
    if len(ranked) > NAMED_FILES:
        parts.append(f"and {len(ranked) - NAMED_FILES} more file(s)")
    return "; ".join(parts) or "no file stands out"
