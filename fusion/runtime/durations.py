"""Durations in configs ('15m', '1h', '1d') and times on a fixed grid counted from the Unix epoch (UTC)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|min|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_duration(text: str) -> timedelta:
    """Parse '15m', '1h', '1d', '30s' into a timedelta."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a duration; write e.g. '15m', '1h' or '1d'")
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def floor_to_grid(moment: datetime, length: timedelta) -> datetime:
    """The start of the grid cell of `length` (counted from the epoch, UTC) that holds `moment`."""
    return EPOCH + ((moment.astimezone(UTC) - EPOCH) // length) * length


__all__ = ["EPOCH", "floor_to_grid", "parse_duration"]
