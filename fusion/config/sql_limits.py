"""Limits on one SQL query over the store (`fusion sql`, the Python API): how long it may run, how large its
result may be, and DuckDB's threads and memory. The config's `[sql]` block; `fusion sql` options override it."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fusion.runtime.durations import parse_duration

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str | int) -> int:
    """Bytes in a size: '512MB' (powers of 1000), '2GiB' (powers of 1024), '1000B' or a plain number of bytes;
    as DuckDB reads its memory_limit.

    >>> parse_size("256MB"), parse_size("1GiB"), parse_size(42)
    (256000000, 1073741824, 42)
    """
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"'{text}' is not a size; write e.g. '256MB', '2GB' or '1GiB'")
    size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()])
    if size <= 0:
        raise ValueError(f"size '{text}' must be positive")
    return size


class SqlLimits(BaseModel):
    """Per query: `timeout` bounds the time to run it and hand its whole result over (a DuckDB interrupt stops
    it); `max_rows` and `max_size` bound its result (Arrow bytes, its schema included), checked batch by batch as
    DuckDB produces it, so a result too large stops before it is held; `memory_limit` and `threads` bound DuckDB's
    own work (it never spills to disk)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    timeout: str = "60s"
    max_rows: int = Field(default=1_000_000, ge=1)
    max_size: str = "256MB"
    memory_limit: str = "2GB"
    threads: int = Field(default=2, ge=1, le=256)

    @field_validator("timeout")
    @classmethod
    def _positive_duration(cls, text: str) -> str:
        if parse_duration(text).total_seconds() <= 0:
            raise ValueError(f"timeout '{text}' must be positive")
        return text

    @field_validator("max_size", "memory_limit", mode="before")
    @classmethod
    def _size(cls, text: Any) -> str:
        parse_size(text)
        return str(text)

    @property
    def timeout_s(self) -> float:
        return parse_duration(self.timeout).total_seconds()

    @property
    def max_bytes(self) -> int:
        return parse_size(self.max_size)

    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory_limit)

    def replace(self, **changes: Any) -> SqlLimits:
        """These limits with `changes` (a None value keeps the field), validated again."""
        given = {name: value for name, value in changes.items() if value is not None}
        return SqlLimits.model_validate({**self.model_dump(), **given})


__all__ = ["SqlLimits", "parse_size"]
