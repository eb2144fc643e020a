"""Reason codes for rows that an institution's pipeline refuses (its dead-letter output)."""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    """Why a raw row was not accepted. Values are stable: they appear in dead letters and in `rejects`."""

    MALFORMED_RECORD = "malformed_record"  # the line could not be parsed at all (bad CSV row, bad JSON)
    MISSING_FIELD = "missing_field"  # a required field is absent or null
    MISTYPED_FIELD = "mistyped_field"  # a field is present but not of its type (e.g. value "abc")
    UNPARSEABLE_TIME = "unparseable_time"  # event time present but not a time
    OUT_OF_INTERVAL = "out_of_interval"  # event time outside the run's release interval
    UNKNOWN_METRIC = "unknown_metric"  # metric not declared in the federation config
    UNKNOWN_REGION = "unknown_region"  # region not among the public regions
    NON_FINITE_VALUE = "non_finite_value"  # NaN or +-infinity
    OUT_OF_RANGE = "out_of_range"  # outside the metric's plausible physical range
    DUPLICATE = "duplicate"  # exact duplicate of an accepted row in the same run
    LATE = "late"  # streaming: its event-time window had already closed (beyond the allowed lateness)


#: The order in which reasons are checked: a row gets the first reason that applies (late is decided after
#: validation, by the stream, for rows that are otherwise valid).
REASON_PRECEDENCE: tuple[RejectReason, ...] = tuple(r for r in RejectReason if r is not RejectReason.LATE)


#: Reasons published (as noisy tallies of the release, never exactly) in the shared `rejects` table: those decided
#: after the reading's event time put it inside the release's interval, so each such reading is counted by exactly
#: one release (the one its time belongs to), which keeps the release's sensitivity and parallel composition
#: intact. Rows rejected earlier (unparseable, no time, outside the interval) may be read by several releases
#: (a daily file read by hourly releases), and `late` ones arrive after their window's release: their counts stay
#: with the institution, in its dead-letter area.
PUBLISHED_REASONS: tuple[RejectReason, ...] = (
    RejectReason.UNKNOWN_METRIC,
    RejectReason.UNKNOWN_REGION,
    RejectReason.NON_FINITE_VALUE,
    RejectReason.OUT_OF_RANGE,
    RejectReason.DUPLICATE,
)


class FileReason(StrEnum):
    """Why a whole feed file (not one row of it) is refused or reported. Values are stable: they appear in dead
    letters, run reports and `audit`. A file that cannot be read at all is one `malformed_record`, as in a stream."""

    MISSING_COLUMN = "missing_column"  # the file lacks a mapped, required column: every row of it is refused
    MISSING_FILE = "missing_file"  # no file matched a feed's path for a day of the interval (reported, no rows)
