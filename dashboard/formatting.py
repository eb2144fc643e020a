"""How the pages write numbers and times (Jinja filters): about four significant digits, thousands separated,
times in UTC; a missing value is a dash. The JSON API gives the exact values."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import PlainSerializer

DASH = "–"


def number(value: float | int | None) -> str:
    """'12.35', '1,234', '0.001235', '1.235e+07'; '–' for None; 'inf' and 'nan' as such.

    >>> number(12.3456), number(1234.5), number(0.0012346), number(12345678.0), number(None), number(0)
    ('12.35', '1,234', '0.001235', '1.235e+07', '–', '0')
    """
    if value is None:
        return DASH
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    size = abs(value)
    if size == 0:
        return "0"
    if size >= 1e7 or size < 1e-3:
        return f"{value:.4g}"
    decimals = max(0, 3 - math.floor(math.log10(size)))
    text = f"{value:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def epsilon(value: float | None) -> str:
    """Four decimals, as `fusion budget` prints epsilon: '0.9998'; 'inf' (noise off, test mode)."""
    if value is None:
        return DASH
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def sd(value: float | None) -> str:
    """'± 1.23', or '± –' where no noise sd is released."""
    return f"± {number(value)}"


def interval(low: float | None, high: float | None) -> str:
    """'[9.5, 10.5]', or '–' where no interval is released."""
    return DASH if low is None or high is None else f"[{number(low)}, {number(high)}]"


def when(value: datetime | None) -> str:
    """'2026-01-05 06:00' (UTC), seconds shown only when not zero."""
    if value is None:
        return DASH
    moment = value.astimezone(UTC) if value.tzinfo else value
    return moment.strftime("%Y-%m-%d %H:%M:%S" if moment.second or moment.microsecond else "%Y-%m-%d %H:%M")


def json_number(value: float) -> float | str:
    """`value` for JSON, which has no infinity or NaN: itself, or "Infinity", "-Infinity", "NaN" (a null would read
    as no value at all).

    >>> json_number(0.5), json_number(float("inf")), json_number(float("-inf")), json_number(float("nan"))
    (0.5, 'Infinity', '-Infinity', 'NaN')
    """
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


#: A number that may be infinite (the epsilon of a test-mode release with noise off): in the JSON API a number, or
#: one of these strings, as the OpenAPI document says.
Unbounded = Annotated[
    float,
    PlainSerializer(json_number, return_type=float | Literal["Infinity", "-Infinity", "NaN"], when_used="json"),
]


def finite(value: float | None) -> float | None:
    """`value`, or None when it is missing or not finite (JSON has no NaN or infinity)."""
    return value if value is not None and math.isfinite(value) else None


FILTERS = {"num": number, "eps": epsilon, "sd": sd, "interval": interval, "when": when}
