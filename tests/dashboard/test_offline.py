"""The dashboard works offline: the vendored vega bundles are the npm registry's files (checksums) with their
licences, nothing the app serves names another origin, and the Content-Security-Policy allows only the app."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from dashboard import charts
from dashboard.app import STATIC, VENDORED
from dashboard.guard import CSP

TEMPLATES = STATIC.parent / "templates"


def test_the_vendored_bundles_match_their_checksums_and_carry_their_licences() -> None:
    vendor = STATIC / "vendor"
    sums = dict(reversed(line.split("  ", 1)) for line in (vendor / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == sorted(v.removeprefix("vendor/") for v in VENDORED)
    for name, digest in sums.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
        licence = (vendor / name).parent / "LICENSE"
        assert "University of Washington Interactive Data Lab" in licence.read_text()


def test_no_page_template_script_or_style_names_another_origin() -> None:
    own = [*TEMPLATES.glob("*.html"), *STATIC.glob("*.css"), *STATIC.glob("*.js")]
    assert len(own) >= 9
    for path in own:
        text = path.read_text()
        assert not re.search(r"(?i)(src|href|action)\s*=\s*[\"']?\s*(https?:)?//", text), path
        assert not re.search(r"(?i)url\(\s*[\"']?(https?:)?//", text), path
        assert not re.search(r"(?i)@import", text), path


def test_chart_specs_load_no_data_from_anywhere() -> None:
    specs = [charts.band_spec("mean (degC)"), charts.band_spec("mean", ("a", "b")), charts.budget_spec(),
             charts.bars_spec("bus", "$/MWh"), charts.frontier_spec("cost", "co2")]
    for spec in specs:
        text = repr({k: v for k, v in spec.items() if k != "$schema"})  # a version tag vega-embed only parses
        assert "http" not in text and "url" not in text


def test_the_content_security_policy_allows_only_the_app_itself() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'"
    for name, sources in directives.items():
        assert set(sources.split()) <= {"'self'", "'none'", "data:"}, name
    assert "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP


def test_every_template_is_autoescaped() -> None:
    """The app's Jinja environment escapes by default; no template switches it off or marks store text safe."""
    for path in TEMPLATES.glob("*.html"):
        text = path.read_text()
        assert "autoescape false" not in text and "|safe" not in text and "Markup(" not in text, path
    source = (STATIC.parent / "app.py").read_text()
    assert "autoescape=True" in source


def test_the_package_ships_its_templates_and_static_files() -> None:
    """pyproject's package-data names every file the app serves (an installed dashboard finds them)."""
    import tomllib

    patterns = tomllib.loads((STATIC.parent.parent / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["dashboard"]
    files = [p.relative_to(STATIC.parent) for p in [*TEMPLATES.rglob("*"), *STATIC.rglob("*")] if p.is_file()]
    for file in files:
        assert any(Path(file).match(pattern) for pattern in patterns), file
