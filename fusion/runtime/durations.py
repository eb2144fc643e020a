"""Durations in configs ('15m', '1h', '1d') and times on a fixed grid counted from the Unix epoch (UTC)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|min|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: The longest duration Fusion takes (about a century): grids, periods and deadlines added to today's dates must stay
#: well inside Python's datetime range (year 9999), which a longer one would overflow deep inside a release.
MAX_DURATION = timedelta(days=36_600)


def parse_duration(text: str) -> timedelta:
    """Parse '15m', '1h', '1d', '30s' into a timedelta, at most MAX_DURATION (ValueError otherwise)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a duration; write e.g. '15m', '1h' or '1d'")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"'{text}' is too long: at most {MAX_DURATION.days} days")
    return timedelta(seconds=seconds)


def floor_to_grid(moment: datetime, length: timedelta) -> datetime:
    """The start of the grid cell of `length` (counted from the epoch, UTC) that holds `moment`."""
    return EPOCH + ((moment.astimezone(UTC) - EPOCH) // length) * length


__all__ = ["EPOCH", "MAX_DURATION", "floor_to_grid", "parse_duration"]
