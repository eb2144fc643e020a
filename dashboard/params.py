"""Query parameters of the dashboard's pages and JSON API: parsed and checked here, so a bad one is answered with
a message that names it and says what it accepts (never a traceback), and every value that reaches SQL is either
one of the store's own values or a typed literal written by `sql_text` / `sql_time`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

from fusion.errors import FusionError

#: Control characters (and NUL) have no place in a filter; refusing them keeps every literal printable.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: The longest free-text filter accepted.
MAX_TEXT = 200


class BadParameter(FusionError):
    """A page or API parameter that cannot be used; the message names it and what it accepts."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def choice(name: str, value: str | None, choices: Sequence[str], *, default: str | None = None) -> str | None:
    """`value` if it is one of `choices` (None or empty: `default`)."""
    if value is None or value == "":
        return default
    if value not in choices:
        shown = ", ".join(repr(c) for c in list(choices)[:20]) + (", ..." if len(choices) > 20 else "")
        raise BadParameter(name, f"{value!r} is not one of the store's values ({shown or 'none yet'})")
    return value


def text(name: str, value: str | None) -> str | None:
    """A free-text filter: printable, at most MAX_TEXT characters (None or empty: no filter)."""
    if value is None or value.strip() == "":
        return None
    if len(value) > MAX_TEXT:
        raise BadParameter(name, f"at most {MAX_TEXT} characters, got {len(value)}")
    if _CONTROL.search(value):
        raise BadParameter(name, "control characters are not accepted; give plain text")
    return value


def time(name: str, value: str | None) -> datetime | None:
    """A UTC time in ISO 8601: '2026-01-05', '2026-01-05T06:00', '2026-01-05T06:00:00Z' (None or empty: none).
    A time without offset is UTC; one with an offset is converted."""
    if value is None or value.strip() == "":
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadParameter(name, f"{value!r} is not a time; write e.g. 2026-01-05 or 2026-01-05T06:00 (UTC)") from None
    try:
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError:  # an offset that takes the time past year 1 or 9999
        raise BadParameter(name, f"{value!r} is out of the range of times; write e.g. 2026-01-05 (UTC)") from None


#: A whole number as a query gives one: ASCII digits only (str.isdigit also takes '²', which int() refuses).
_WHOLE = re.compile(r"[0-9]{1,9}")


def days(name: str, value: str | None, *, default: int | None, limit: int = 3660) -> int | None:
    """A number of days between 1 and `limit`, or 'all' (None: the whole series)."""
    if value is None or value == "":
        return default
    if value == "all":
        return None
    if not _WHOLE.fullmatch(value) or not 1 <= int(value) <= limit:
        raise BadParameter(name, f"{value!r} is not a number of days from 1 to {limit}, or 'all'")
    return int(value)


def page(name: str, value: str | None) -> int:
    """A page number, from 1."""
    if value is None or value == "":
        return 1
    if not _WHOLE.fullmatch(value) or int(value) < 1 or int(value) > 1_000_000:
        raise BadParameter(name, f"{value!r} is not a page number (1, 2, ...)")
    return int(value)


def time_range(start: datetime | None, end: datetime | None) -> None:
    if start is not None and end is not None and end <= start:
        raise BadParameter("end", f"{end:%Y-%m-%d %H:%M} is not after start {start:%Y-%m-%d %H:%M}")


def sql_text(value: str) -> str:
    """A DuckDB string literal holding `value` exactly: quotes doubled (DuckDB's literals have no backslash
    escapes); `value` holds no control characters (see `text`) or is one of the store's own values."""
    return "'" + value.replace("'", "''") + "'"


def sql_time(value: datetime) -> str:
    """A TIMESTAMPTZ literal (the store's times are UTC microseconds)."""
    return f"TIMESTAMPTZ '{value.astimezone(UTC).isoformat()}'"
