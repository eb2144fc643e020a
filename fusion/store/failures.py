"""The store failing under a command (a read-only or full disk, a failing one): one line naming the store.

Delta Lake reports an operating-system error of its files as a `DeltaError` quoting it ("... Read-only file system
(os error 30)"), and its Rust writer prints a panic of its own to stderr when a write fails; Python's own file
calls raise an `OSError` with an errno. Either way the user should read which store failed and why, not a
traceback: `store_failure` turns such an error into a `StoreUnavailable` (`store_failures` around a block of a
command's work), `read_failure` one that a read of a table's data files meets (permission denied, an I/O error),
and `check_writable` finds a store that cannot take a write before Delta is asked to write to it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from deltalake.exceptions import CommitFailedError, DeltaError, SchemaMismatchError, TableNotFoundError

from fusion.errors import FusionError
from schemas.tables import TABLE_SCHEMAS

#: How Delta Lake's messages quote an operating-system error.
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class StoreUnavailable(FusionError):
    """The store cannot be written or read now: its disk is read-only, full or failing. Nothing about the work is
    wrong: what was not committed is done again by the next run, and the store's keyed commits and ledger keep
    every release and charge once."""


def _message(store: str, code: int) -> str:
    return (
        f"the store {store} cannot be used now: {os.strerror(code)} (os error {code}). What was not committed is done "
        "again by the next run, and nothing is released or charged twice: free space on its disk, or make it "
        "writable, then run the command again"
    )


def store_failure(exc: BaseException, store: str) -> StoreUnavailable | None:
    """`exc` as a `StoreUnavailable` naming `store`, when it is an operating-system error of the store's files: a
    Delta error quoting one, or an OSError with an errno about a file under the store. None for any other error
    (a commit conflict, a schema mismatch, an error elsewhere), which the caller raises as it was."""
    if isinstance(exc, CommitFailedError | SchemaMismatchError | TableNotFoundError):
        return None
    if isinstance(exc, DeltaError) and (quoted := _OS_ERROR.search(str(exc))):
        return StoreUnavailable(_message(store, int(quoted.group(1))))
    if isinstance(exc, OSError) and exc.errno is not None and _under(exc.filename, store):
        return StoreUnavailable(_message(store, exc.errno))
    return None


def read_failure(store: str, table: str, exc: OSError) -> StoreUnavailable:
    """An operating-system error other than a missing file (EACCES, EIO) reading `table`'s data files in `store`, as
    a `StoreUnavailable` naming the store and the cause; its public text leaves out where the store lies."""
    code = exc.errno or 0
    cause = f"{os.strerror(code)} (os error {code})"
    advice = ("check that this user may read its files (their permissions and owner) and that its disk is healthy, "
              "then run the command again")
    return StoreUnavailable(f"the store {store} cannot be read now: table {table}: {cause}; {advice}",
                            public=f"the store's table {table} cannot be read now: {cause}; {advice}")


def _under(filename: object, store: str) -> bool:
    if not isinstance(filename, str | bytes | os.PathLike) or "://" in store:
        return False
    root = Path(store).resolve()
    path = Path(os.fsdecode(filename)).resolve()
    return path == root or root in path.parents


@contextlib.contextmanager
def store_failures(store: str) -> Iterator[None]:
    """Within it, an operating-system error of `store`'s files (`store_failure`) is raised as the
    `StoreUnavailable` naming it; any other error as it was."""
    try:
        yield
    except (OSError, DeltaError) as exc:
        failure = store_failure(exc, store)
        if failure is not None:
            raise failure from exc
        raise


def check_writable(store: str) -> None:
    """Refuse a local store that cannot take a write now (read-only, no space left, not a directory) before Delta
    writes to it: a small file is written, synced and removed in its directory, and an empty one made and removed
    in each of its tables' directories and logs, where Delta writes (one made read-only fails Delta's writer with
    a panic of its own). A store not made yet gets its directory, as Delta's first write would make it. An object
    store is left to its first write."""
    if "://" in store:
        return
    root = Path(store)
    try:
        if not root.exists():
            root.mkdir(parents=True, exist_ok=True)
        _probe(root, size=4096)
        for name in TABLE_SCHEMAS:
            for directory in (root / name, root / name / "_delta_log"):
                if os.path.lexists(directory):  # a file there, where Delta needs a directory, is refused too
                    _probe(directory, size=0)
    except OSError as exc:
        raise StoreUnavailable(_message(store, exc.errno or errno.EIO)) from exc


def _probe(directory: Path, *, size: int) -> None:
    """Make a file of `size` bytes in `directory` (synced when not empty, so a full disk says so now), then remove
    it."""
    probe = directory / f".fusion-write-check-{os.getpid()}-{secrets.token_hex(4)}"
    descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if size:
            os.write(descriptor, b"\0" * size)
            os.fsync(descriptor)
    finally:
        os.close(descriptor)
        probe.unlink(missing_ok=True)


__all__ = ["StoreUnavailable", "check_writable", "read_failure", "store_failure", "store_failures"]
