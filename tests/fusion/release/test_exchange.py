"""Deleting whole directories through Beam FileSystems (fusion/release/exchange.py): a local tree whose path holds glob
characters, and the listing path that object stores (which have no directories) go through, run here against
Beam's real local file system."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fusion.release.exchange import ReleaseKey, glob_escape, read_bytes, remove_listed, remove_tree, write_bytes


def tree(root: Path) -> list[Path]:
    files = [root / "a.arrow", root / "sub" / "b.arrow", root / "sub" / "deeper" / "c.arrow.tmp-1f"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return files


def test_remove_tree_deletes_a_local_tree_whose_path_holds_glob_characters(tmp_path: Path) -> None:
    root = tmp_path / "dead[1]" / "_staging"
    tree(root)
    (tmp_path / "dead1").mkdir()  # what the pattern dead[1] would match: left alone
    remove_tree(str(root))
    assert not root.exists() and (tmp_path / "dead[1]").exists() and (tmp_path / "dead1").exists()
    remove_tree(str(root))  # already gone: nothing to do
    remove_tree(f"file://{tmp_path / 'dead[1]'}")
    assert not (tmp_path / "dead[1]").exists()


def test_remove_listed_deletes_every_file_under_a_directory_by_its_exact_name(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    files = tree(root)
    beside = tmp_path / "staging-other" / "keep.arrow"
    beside.parent.mkdir()
    beside.write_bytes(b"y")
    remove_listed(str(root))
    assert not any(path.exists() for path in files) and beside.exists()
    remove_listed(str(root))  # nothing listed: nothing to do


def test_remove_listed_matches_only_the_directory_named_even_with_glob_characters(tmp_path: Path) -> None:
    root = tmp_path / "dl[a]" / "_staging"
    files = tree(root)
    lookalike = tree(tmp_path / "dla" / "_staging")  # what dl[a] would match as a pattern
    remove_listed(str(root))
    assert not any(path.exists() for path in files) and all(path.exists() for path in lookalike)


def test_remove_listed_of_a_directory_that_does_not_exist_does_nothing(tmp_path: Path) -> None:
    remove_listed(str(tmp_path / "never" / "made"))
    remove_tree(str(tmp_path / "never" / "made"))


@pytest.mark.parametrize("path", ["plain/dir", "a[1]/b", "x*y?z", "c]d"])
def test_glob_escape_makes_a_pattern_that_matches_only_its_path(path: str) -> None:
    import re

    from apache_beam.io.filesystem import FileSystem

    pattern = re.compile(FileSystem.translate_pattern(glob_escape(path)))
    assert pattern.match(path)
    for other in {path.replace("[1]", "1"), path.replace("*", "Q"), path.replace("?", "Q")} - {path}:
        assert not pattern.match(other), other


@pytest.mark.parametrize(
    ("start", "length", "name"),
    [
        (datetime(2026, 1, 1, tzinfo=UTC), timedelta(days=1), "20260101T0000Z-20260102T0000Z"),
        (datetime(2026, 1, 1, 0, 15, tzinfo=UTC), timedelta(minutes=15), "20260101T0015Z-20260101T0030Z"),
        (datetime(2026, 1, 1, tzinfo=UTC), timedelta(seconds=15), "20260101T000000Z-20260101T000015Z"),
        (datetime(2026, 1, 1, 0, 0, 15, tzinfo=UTC), timedelta(seconds=15), "20260101T000015Z-20260101T000030Z"),
    ],
)
def test_interval_names_are_unique_down_to_the_second_and_parse_back(
    start: datetime, length: timedelta, name: str
) -> None:
    key = ReleaseKey("f", start, start + length, "layout", "parameters")
    assert key.interval_name == name
    assert ReleaseKey.parse_interval_name(name) == (start, start + length)
    assert ReleaseKey.parse_interval_name(f"{name}-0123.fenv") is None


def test_write_bytes_replaces_a_local_file_in_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A reader (or a crash) between deleting the old file and renaming the new one would find neither.
    from apache_beam.io.filesystems import FileSystems

    path = str(tmp_path / "sub" / "aggregate.fenv")
    write_bytes(path, b"old")
    monkeypatch.setattr(FileSystems, "delete", lambda paths: pytest.fail(f"deleted {paths} before replacing"))
    write_bytes(path, b"new")
    assert read_bytes(path) == b"new"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["aggregate.fenv"]  # no temporaries left
