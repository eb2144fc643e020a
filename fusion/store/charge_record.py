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
from typing import TYPE_CHECKING, Any

from fusion.errors import FusionError

if TYPE_CHECKING:
    from fusion.config.federation import Config

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
        return self._load(self._path(period), period)

    def rows(self) -> list[dict[str, Any]]:
        """Every period's row as the key holder last recorded it (none: nothing charged under this record yet)."""
        found = (self._load(path, None) for path in sorted(self.directory.glob("*.json")))
        return [row for row in found if row is not None]

    def _load(self, path: Path, period: str | None) -> dict[str, Any] | None:
        """The row `path` records: of `period`, or (None) of the period its name is derived from."""
        try:
            text = path.read_text()
        except FileNotFoundError:  # none, or removed between a look and a read (a charge taken back): none
            return None
        except OSError:
            text = ""
        try:
            doc = json.loads(text)
            row = doc["row"]
            named = row.get("period") if isinstance(row, dict) else None
            valid = (
                isinstance(named, str)
                and (named == period if period is not None else self._path(named) == path)
                and isinstance(doc["store"], str)
            )
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            valid = False
        if not valid:
            raise FusionError(
                f"the key holder's budget record {path}{'' if period is None else f' of period {period}'} is "
                "unreadable: restore it from a backup (moving it away lets the period be charged from the store's "
                "row alone, which anyone who can write to the store can roll back)"
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


def key_holder_record(config: Config) -> ChargeRecord | None:
    """The key holder's record of the config's store where this process can read it (its keys directory,
    `federation.keys`, holds a record that this process may list); None elsewhere: another party's machine, or a key
    holder that has charged nothing yet."""
    directory = Path(config.keys_path) / CHARGE_RECORD_DIR
    if not (directory.is_dir() and os.access(directory, os.R_OK | os.X_OK)):
        return None
    from fusion.store.delta import Store
    from fusion.store.provenance import store_id

    store = Store(config.store_path)
    # No audit table: a store other than the one the record was kept for (recreated), which `read` then says; and a
    # reader creates no table.
    return ChargeRecord(directory.parent, store_id(store) if store.version("audit") is not None else "")


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
