"""How forecasting reads the store: its own reads are bounded by construction (a series' history, a backtest's
origins, a horizon of at most MAX_HORIZON_WINDOWS), so they are made a group of series at a time, each group's
result under a row budget, and never meet the `[sql]` limits that are meant for people's ad-hoc queries (`fusion
sql`, the Python API) however many series a federation has. Where one series alone is past them, the refusal says
which forecasting setting to shorten, not how to raise an ad-hoc query's limit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import pyarrow as pa

from fusion.errors import FusionError, SqlLimitExceeded
from fusion.store.access import FusedStore

#: The most rows one of forecasting's reads is sized to return (about 10 MB of its narrow columns): well under the
#: default `[sql] max_rows` (1,000,000) and `max_size` (256MB); a smaller `max_rows` makes the groups smaller.
ROWS_PER_READ = 100_000

T = TypeVar("T")


def in_groups(names: Sequence[T], *, rows_each: int, budget: int) -> list[list[T]]:
    """`names` in consecutive groups whose rows (`rows_each` per name, at most) fit `budget`; one name a group
    where a single name's rows do not.

    >>> in_groups(["a", "b", "c", "d", "e"], rows_each=40, budget=100)
    [['a', 'b'], ['c', 'd'], ['e']]
    """
    size = max(1, budget // max(rows_each, 1))
    return [list(names[i : i + size]) for i in range(0, len(names), size)]


def read_budget(store: FusedStore) -> int:
    """The rows one read is sized to: ROWS_PER_READ, or the store's `max_rows` where that is smaller."""
    return min(ROWS_PER_READ, store.limits.max_rows)


def read(store: FusedStore, query: str, *, what: str, settings: str) -> pa.Table:
    """`query`'s result; past a `[sql]` limit, a refusal naming `what` was read and the forecasting `settings`
    that bound it."""
    try:
        return store.sql(query)
    except SqlLimitExceeded as exc:
        raise FusionError(
            f"forecasting could not read {what} within the config's [sql] limits ({_which(str(exc))}); it reads a few "
            f"series at a time, so one series' {settings} is past them: shorten it in [forecasting], or raise the "
            "limit in the config's [sql] block"
        ) from None


def _which(message: str) -> str:
    """The limit a SqlLimitExceeded message names, without its advice for ad-hoc queries."""
    return message.split(", its limit", 1)[0].split(" and was stopped", 1)[0]


__all__ = ["ROWS_PER_READ", "in_groups", "read", "read_budget"]
