"""The key holder's own record of what it charged to each privacy period: the authoritative copy of its budget rows.

The store's `budget` table is shared: anyone who can write to the store could delete a period's row or rewrite its
release ids or mechanisms, and a ledger that read only that row would then charge the period from a smaller spend
than it really has. So the key holder keeps, beside its keys (owner-only, like its chain record), one file per
period holding the period's row as it last wrote it, and writes that file (fsynced, renamed into place) before the
store's row. `BudgetLedger` (fusion/store/ledger.py) compares the two on every charge: a store row that does not
start with the recorded releases (deleted, or rewritten) is rebuilt from the record before anything more is charged.
A crash between the record and the store's commit leaves the store's row behind the record; the re-run completes it
the same way, so the release is charged once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from fusion.errors import FusionError

#: The directory of period records, in the key holder's keys directory.
CHARGE_RECORD_DIR = "budget-record"
_LOCK = ".lock"
#: Timestamp fields of a row document (ISO 8601 text in the record's JSON).
_TIMES = ("period_start", "period_end", "updated_at")
_MECHANISM_TIMES = ("interval_start", "interval_end")


class ChargeRecord:
    """The per-period records of one store's budget rows, in `state_dir`/budget-record/ (owner-only files)."""

    def __init__(self, state_dir: Path, store_id: str) -> None:
        self.directory = Path(state_dir) / CHARGE_RECORD_DIR
        self.store_id = store_id

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One key-holder pass at a time reads, charges and records (an advisory lock held over the store's commit
        too, so that a pass never mistakes another's charge in flight for a store row rolled back)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.directory / _LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _path(self, period: str) -> Path:
        return self.directory / f"{hashlib.sha256(period.encode()).hexdigest()[:32]}.json"

    def read(self, period: str) -> dict[str, Any] | None:
        """The period's budget row as the key holder last recorded it (the `budget` table's columns), or None."""
        path = self._path(period)
        try:
            text = path.read_text()
        except FileNotFoundError:  # none, or removed between a look and a read (a charge taken back): none
            return None
        except OSError:
            text = ""
        try:
            doc = json.loads(text)
            row = doc["row"]
            valid = isinstance(row, dict) and row.get("period") == period and isinstance(doc["store"], str)
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            valid = False
        if not valid:
            raise FusionError(
                f"the key holder's budget record {path} of period {period} is unreadable: restore it from a backup "
                "(moving it away lets the period be charged from the store's row alone, which anyone who can write "
                "to the store can roll back)"
            )
        if doc["store"] != self.store_id:
            raise FusionError(
                f"the key holder's budget record {path} belongs to another store (its audit table was created "
                f"anew): if the store was recreated on purpose, move {self.directory} away; otherwise find out who "
                "replaced the audit table"
            )
        return _from_json(row)

    def write(self, period: str, row: dict[str, Any] | None) -> None:
        """Record the period's row (None: forget it), durably: written, fsynced and renamed into place, then the
        directory fsynced, before the caller commits the same row to the store."""
        path = self._path(period)
        for left in path.parent.glob(f".{path.name}.*"):  # a pass that died mid-write left its copy (under the lock)
            left.unlink(missing_ok=True)
        if row is None:
            path.unlink(missing_ok=True)
        else:
            pending = path.with_name(f".{path.name}.{os.getpid()}")
            descriptor = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                json.dump({"store": self.store_id, "row": _to_json(row)}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(pending, path)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _to_json(row: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
    if doc.get("mechanisms"):
        doc["mechanisms"] = [
            {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in m.items()} for m in doc["mechanisms"]
        ]
    return doc


def _from_json(doc: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        k: (datetime.fromisoformat(v) if k in _TIMES and v is not None else v) for k, v in doc.items()
    }
    if row.get("mechanisms"):
        row["mechanisms"] = [
            {k: (datetime.fromisoformat(v) if k in _MECHANISM_TIMES else v) for k, v in m.items()}
            for m in row["mechanisms"]
        ]
    return row
