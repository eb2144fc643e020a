"""`fusion demo --dir` replaces only an empty directory or an earlier demo: a mistyped path deletes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion.demo import DEMO_MARK, build_demo
from fusion.errors import FusionError


def test_a_foreign_directory_is_refused_and_kept(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(FusionError, match="not an earlier Fusion demo"):
        build_demo(tmp_path, days=1)
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_a_directory_with_a_lookalike_readme_but_no_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "README.txt").write_text(f"{DEMO_MARK}\n")
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(FusionError, match="--dir"):
        build_demo(tmp_path, days=1)
    assert (tmp_path / "notes.txt").exists()


def test_a_file_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep")
    with pytest.raises(FusionError, match="not a directory"):
        build_demo(target, days=1)
    assert target.read_text() == "keep"


def test_an_earlier_demo_is_replaced(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    build_demo(directory, days=1)
    (directory / "stale.txt").write_text("from an earlier run")
    config = build_demo(directory, days=1)
    assert config == directory / "federation.toml" and config.is_file()
    assert not (directory / "stale.txt").exists()


def test_a_link_to_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "data.txt").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(FusionError, match="is a link"):
        build_demo(tmp_path / "link", days=1)
    assert (tmp_path / "real" / "data.txt").exists()
