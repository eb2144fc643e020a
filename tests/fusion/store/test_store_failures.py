"""A store that cannot be used (read-only, full, failing) is said in one line naming it, never as a traceback."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from deltalake.exceptions import CommitFailedError, DeltaError

from fusion.store.failures import StoreUnavailable, check_writable, store_failure, store_failures


def test_an_operating_system_error_of_the_store_names_the_store_and_the_error(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    quoted = DeltaError(
        f"Failed to parse parquet: External: Generic LocalFileSystem error: Unable to open file {store}/budget/"
        "part-00000.snappy.parquet#1: Read-only file system (os error 30)"
    )
    failure = store_failure(quoted, store)
    assert isinstance(failure, StoreUnavailable) and "\n" not in str(failure)
    assert str(failure).startswith(f"the store {store} cannot be used now: Read-only file system (os error 30). ")
    full = store_failure(OSError(errno.ENOSPC, "No space left on device", f"{store}/audit/x.parquet"), store)
    assert full is not None and "No space left on device (os error 28)" in str(full)


def test_other_errors_are_left_as_they_are(tmp_path: Path) -> None:
    """A commit conflict is the store's concurrency at work, an error without an OS error is not the disk's, and an
    OSError about another directory is not the store's."""
    store = str(tmp_path / "store")
    assert store_failure(CommitFailedError("Transaction failed: version already exists (os error 17)"), store) is None
    assert store_failure(DeltaError("Invalid data found: 1 rows failed validation check"), store) is None
    assert store_failure(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "spool" / "x")), store) is None
    assert store_failure(ValueError("(os error 30)"), store) is None


def test_a_store_that_cannot_take_a_write_is_refused_before_delta_writes_to_it(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    check_writable(str(store))  # writable: nothing left behind
    assert list(store.iterdir()) == []
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    with pytest.raises(StoreUnavailable, match=rf"the store {not_a_directory} cannot be used now: Not a directory"):
        check_writable(str(not_a_directory))


def test_a_table_directory_delta_cannot_write_into_is_refused_too(tmp_path: Path) -> None:
    """Delta writes a table's data files in its directory and its commits in `_delta_log`: one of them read-only
    (here a file where a table's directory should be, which refuses a write as root too) fails Delta's writer with
    a panic of its own, so it is refused first. A store not made yet gets its directory, parents and all."""
    store = tmp_path / "new" / "store"
    check_writable(str(store))
    assert store.is_dir() and list(store.iterdir()) == []
    (store / "budget" / "_delta_log").mkdir(parents=True)
    check_writable(str(store))
    assert list(store.rglob("*")) == [store / "budget", store / "budget" / "_delta_log"]  # nothing left behind
    (store / "runs").write_text("")
    with pytest.raises(StoreUnavailable, match=rf"^the store {store} cannot be used now: Not a directory \(os error"):
        check_writable(str(store))
    under_a_file = store / "runs" / "store"
    with pytest.raises(StoreUnavailable, match=rf"^the store {under_a_file} cannot be used now: Not a directory"):
        check_writable(str(under_a_file))


def test_store_failures_raises_the_stores_operating_system_errors_as_one_line_naming_it(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    full = rf"^the store {store} cannot be used now: No space left on device"
    with pytest.raises(StoreUnavailable, match=full), store_failures(store):
        raise DeltaError(f"Generic LocalFileSystem error: Unable to write {store}/runs/x: (os error 28)")
    with pytest.raises(CommitFailedError), store_failures(store):  # any other error as it was
        raise CommitFailedError("version already exists")
