"""`fusion demo --dir` replaces only an empty directory or an earlier demo: a mistyped path deletes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion.demo.federation import DEMO_MARK, build_demo
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


@pytest.mark.e2e
def test_the_demo_configs_commented_schedule_runs_its_days_once_and_no_more(tmp_path: Path) -> None:
    """Uncommented as the demo config says, `fusion schedule --once` (on today's clock, months after the demo's
    data) releases the demo's days not yet released and stops at `end`: no catch-up of every day since."""
    import re

    from fusion.cli.core import main
    from fusion.store.delta import Store

    config = build_demo(tmp_path / "demo", days=2)
    text = config.read_text()
    block = re.search(r"^# \[\[schedules\]\]\n(?:# .*\n)+", text, re.MULTILINE)
    assert block is not None
    config.write_text(text.replace(block.group(0), re.sub(r"^# ", "", block.group(0), flags=re.MULTILINE)))
    assert main(["batch", "--config", str(config), "--start", "2026-01-01T00:00", "--end", "2026-01-02T00:00"]) == 0
    assert main(["schedule", "--config", str(config), "--once"]) == 0
    runs = Store(str(config.parent / "store")).read("runs").to_pylist()
    assert sorted((r["interval_start"].date().isoformat(), r["status"]) for r in runs) == [
        ("2026-01-01", "already_released"),
        ("2026-01-02", "released"),
    ]
    assert main(["schedule", "--config", str(config), "--once"]) == 0  # a second pass finds nothing due
    assert len(Store(str(config.parent / "store")).read("runs").to_pylist()) == 2
