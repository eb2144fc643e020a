"""The documentation: the site builds strictly (no broken link, anchor or page), the reference pages follow the
code, and the README stays a short front door whose links resolve."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\[[^\]]+\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of docs/ and mkdocs.yml, its reference pages generated, built with --strict into site/."""
    root = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "docs", root / "docs", ignore=shutil.ignore_patterns("cli.md", "config.md", "tables.md"))
    shutil.copy(ROOT / "mkdocs.yml", root / "mkdocs.yml")
    subprocess.run([sys.executable, str(ROOT / "docs" / "gen_reference.py"), str(root / "docs" / "reference")],
                   check=True, cwd=ROOT)
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(root / "site")],
                            cwd=root, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
    return root


def test_the_site_builds_strictly_with_every_page_of_the_nav(built: Path) -> None:
    for page in ("index", "tutorial", "concepts/trust-model", "guides/epsilon", "reference/cli", "reference/config",
                 "reference/tables", "performance", "troubleshooting"):
        assert (built / "site" / page / "index.html").is_file() or (built / "site" / f"{page}.html").is_file(), page


def test_a_broken_link_fails_the_strict_build(built: Path) -> None:
    (built / "docs" / "limits.md").write_text((built / "docs" / "limits.md").read_text() + "\n[gone](nowhere.md)\n")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(built / "s2")],
                            cwd=built, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""})
    assert result.returncode != 0
    assert "nowhere.md" in result.stderr


def test_the_reference_pages_come_from_the_code(built: Path) -> None:
    from fusion.cli.core import _parser
    from fusion.config.federation import PrivacyConfig
    from schemas.tables import TABLE_SCHEMAS

    reference = built / "docs" / "reference"
    cli = (reference / "cli.md").read_text()
    commands = next(a for a in _parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices
    assert all(f"## fusion {name}" in cli for name in commands)
    config = (reference / "config.md").read_text()
    assert all(f"| `{field}` |" in config for field in PrivacyConfig.model_fields)
    tables = (reference / "tables.md").read_text()
    for table, schema in TABLE_SCHEMAS.items():
        assert f"## {table}" in tables
        assert all(f"| `{column.name}` |" in tables for column in schema)


def test_the_troubleshooting_sql_section_names_every_table_a_query_can_read() -> None:
    from schemas.tables import TABLE_SCHEMAS

    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    section = page.partition("## SQL (`fusion sql` and `store.sql`)")[2].partition("\n## ")[0]
    tables = section.partition("One read-only query over the store's tables (")[2].partition(")")[0]
    assert set(re.findall(r"`(\w+)`", tables)) == set(TABLE_SCHEMAS)


def test_the_readme_is_a_short_front_door_whose_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 250
    first_screen = "\n".join(lines[:30])
    assert "make demo" in first_screen and "make test" in first_screen
    for target in LINK.findall(readme):
        if not target.startswith(("http://", "https://", "#")):
            assert (ROOT / target.partition("#")[0]).exists(), target


def test_links_between_doc_pages_are_relative_markdown_links() -> None:
    for page in (ROOT / "docs").rglob("*.md"):
        for target in LINK.findall(page.read_text()):
            assert not target.startswith("/"), (page, target)
            assert "README.md" not in target, (page, target)


def test_the_committed_reference_pages_are_up_to_date(tmp_path: Path) -> None:
    """The generated reference pages are committed (so they read on GitHub too): after a change to the CLI, the
    config models or the tables, `make docs` (or `python docs/gen_reference.py`) writes them again."""
    subprocess.run([sys.executable, str(ROOT / "docs" / "gen_reference.py"), str(tmp_path)], check=True,
                   capture_output=True, cwd=ROOT)
    for page in ("cli.md", "config.md", "tables.md"):
        fresh = (tmp_path / page).read_text()
        assert (ROOT / "docs" / "reference" / page).read_text() == fresh, f"docs/reference/{page} is stale: make docs"
