"""The dashboard in a real browser: Debian's chromium driven by Playwright, over a demo store (the demo
federation, two days released by the real pipeline, plus forecasts, a recommendation and a decision, and hostile
text), served on a free loopback port. One server and one browser for the module.

Skipped, saying why, only where no chromium is found and FUSION_REQUIRE_BROWSER is unset (CI sets it: `.ci/run`
installs chromium); with it set, a missing browser fails."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import pytest

from fusion.config.federation import load_config
from tests.dashboard.rows import HOSTILE, add_forecast, add_hostile, add_recommendation

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

#: Chromium's flags for a container without a GPU or a network: no sandbox (root), no background fetches.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
#: page -> how many charts it draws over this store.
PAGES = {"releases": 1, "budget": 1, "provenance": 0, "forecasts": 1, "recommendations": 2, "api": 0}
REQUIRE = "FUSION_REQUIRE_BROWSER"


def chromium_path() -> str | None:
    """FUSION_CHROMIUM, else Debian's /usr/bin/chromium, else `chromium` on the PATH."""
    for candidate in (os.environ.get("FUSION_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _unavailable(why: str) -> None:
    if os.environ.get(REQUIRE):
        pytest.fail(f"{REQUIRE} is set but {why}", pytrace=False)
    pytest.skip(f"{why}; set {REQUIRE}=1 to make this a failure")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        _unavailable("no chromium found (apt-get install --no-install-recommends chromium, or set FUSION_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed (it is pinned in requirements.lock)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    """(the dashboard's URL, facts about the store): the demo federation with its first two days released."""
    from dashboard.server import running
    from fusion.demo.federation import DEMO_START, build_demo
    from fusion.release.plan import plan_release
    from fusion.store.delta import Store
    from pipelines.batch import run_batch

    config_path = build_demo(tmp_path_factory.mktemp("browser") / "demo", days=2)
    config = load_config(config_path)
    for day in (0, 1):
        start = DEMO_START + timedelta(days=day)
        run_batch(plan_release(config, start, start + timedelta(days=1)))
    store = Store(config.store_path)
    regions = sorted(config.regions)
    add_hostile(store, metric="air_temp", at=DEMO_START)
    add_forecast(store, metric="air_temp", region=regions[0], origin=DEMO_START + timedelta(days=2))
    add_recommendation(store, at=DEMO_START)
    with running(load_config(config_path, check_release=False)) as url:
        yield url, {"regions": regions}


@pytest.fixture(scope="module")
def session(browser: Any, demo: tuple[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One browser context for the module, recording every request and console message; any request for
    another host than the dashboard's is recorded and aborted."""
    url, facts = demo
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    requests: list[str] = []
    outside: list[str] = []
    console: list[str] = []

    def route(route: Any) -> None:
        requests.append(route.request.url)
        if urlparse(route.request.url).hostname != "127.0.0.1":
            outside.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    context.route("**/*", route)
    context.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    context.on("weberror", lambda error: console.append(f"pageerror: {error.error}"))
    yield {"url": url, "context": context, "requests": requests, "outside": outside, "console": console, **facts}
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def open_page(session: dict[str, Any], path: str) -> tuple[Any, Any]:
    page = session["context"].new_page()
    response = page.goto(session["url"] + path)
    return page, response


def drawn(page: Any, charts: int) -> None:
    """Every chart of the page drawn: vega-embed finished, and a canvas is in the chart's element."""
    if charts:
        page.wait_for_function(
            f"document.querySelectorAll('[data-chart][data-state=drawn] canvas').length === {charts}", timeout=20_000)
    states = page.eval_on_selector_all("[data-chart]", "els => els.map(e => e.dataset.state)")
    assert states == ["drawn"] * charts


@pytest.mark.parametrize("name", list(PAGES))
def test_each_page_renders_draws_its_charts_and_is_screenshotted(session: dict[str, Any], shots: Path,
                                                                  name: str) -> None:
    page, response = open_page(session, f"/{name}")
    try:
        assert response.status == 200
        assert page.locator("h1").inner_text()
        assert page.locator(f"nav a[href='/{name}']").get_attribute("aria-current") == "page"
        drawn(page, PAGES[name])
        page.screenshot(path=shots / f"{name}.png", full_page=True)
        assert (shots / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "Traceback" not in page.content()
    finally:
        page.close()


def test_switching_region_changes_the_data(session: dict[str, Any]) -> None:
    first, second = session["regions"][:2]
    page, _ = open_page(session, f"/releases?metric=air_temp&region={first}&days=all")
    try:
        drawn(page, 1)
        before = page.locator("table#cells tbody").inner_text()
        chart_before = page.eval_on_selector("#spec-releases", "e => JSON.parse(e.textContent).datasets.points")
        with page.expect_navigation():
            page.select_option("select[name=region]", second)
        assert f"region={second}" in page.url
        assert page.locator(".summary .region-name").inner_text() == second
        drawn(page, 1)
        assert page.locator("table#cells tbody").inner_text() != before
        chart_after = page.eval_on_selector("#spec-releases", "e => JSON.parse(e.textContent).datasets.points")
        assert len(chart_after) == len(chart_before) == 48
        assert [p["value"] for p in chart_after] != [p["value"] for p in chart_before]
    finally:
        page.close()


#: For each row of the cells table: the statistic columns, and for each its value, sd and interval texts.
CELLS_SCRIPT = """() => {
  const heads = [...document.querySelectorAll("table#cells thead th")].map(th => th.textContent.trim());
  return [...document.querySelectorAll("table#cells tbody tr")].map(tr => [...tr.children].map((td, i) => ({
    column: heads[i],
    value: td.querySelector(".value")?.textContent ?? null,
    sd: td.querySelector(".sd")?.textContent ?? null,
    ci: td.querySelector(".ci")?.textContent ?? null,
  })));
}"""
NUMBER = r"-?[\d,]*\.?\d+(?:e[-+]\d+)?"


def test_every_cell_shows_its_sd_and_interval(session: dict[str, Any]) -> None:
    page, _ = open_page(session, f"/releases?metric=air_temp&region={session['regions'][0]}&days=all")
    try:
        rows = page.evaluate(CELLS_SCRIPT)
    finally:
        page.close()
    assert len(rows) == 48  # two days of hourly windows
    for row in rows:
        statistics = {c["column"]: c for c in row if c["value"] is not None}
        assert {"mean", "count", "sum"} <= set(statistics), statistics
        for name, cell in statistics.items():
            # a stddev whose noise dwarfs the spread (the demo's hours) shows its interval alone
            assert re.fullmatch(NUMBER, cell["value"]) or (name == "stddev" and cell["value"] == "–"), cell
            assert re.fullmatch(rf"\[{NUMBER}, {NUMBER}\]", cell["ci"]), cell
            if name in ("mean", "count", "sum"):
                assert re.fullmatch(rf"± {NUMBER}", cell["sd"]), cell


@pytest.mark.parametrize(("path", "said"), [
    ("/releases?region=atlantis", "region: 'atlantis' is not one of the store's values"),
    ("/releases?days=fortnight", "days: 'fortnight' is not a number of days"),
    ("/provenance?start=last+tuesday", "start: 'last tuesday' is not a time"),
])
def test_a_bad_parameter_shows_a_message_not_a_traceback(session: dict[str, Any], path: str, said: str) -> None:
    page, response = open_page(session, path)
    try:
        assert response.status == 400
        assert said in page.locator(".error[role=alert]").inner_text()
        assert "Traceback" not in page.content()
        assert page.locator("header nav a").count() == len(PAGES)  # the way back is still there
    finally:
        page.close()


HOSTILE_SCRIPT = """() => ({
  title: document.title,
  injected: document.querySelectorAll("img[src='x'], body script:not([type='application/json'])").length,
  text: document.body.innerText,
})"""


@pytest.mark.parametrize("path", [
    f"/releases?metric=air_temp&region={quote(HOSTILE, safe='')}", "/budget", "/provenance", "/recommendations",
])
def test_hostile_text_from_the_store_shows_as_text(session: dict[str, Any], path: str) -> None:
    page, response = open_page(session, path)
    try:
        assert response.status == 200
        found = page.evaluate(HOSTILE_SCRIPT)
    finally:
        page.close()
    assert "pwned" not in found["title"]
    assert found["injected"] == 0
    assert HOSTILE.strip() in found["text"]


def test_no_request_leaves_loopback_and_no_policy_is_violated(session: dict[str, Any]) -> None:
    """Every page and a region switch; every request stays on 127.0.0.1, the vendored bundles included, and
    the Content-Security-Policy blocks nothing the pages need."""
    for name, charts in PAGES.items():
        page, _ = open_page(session, f"/{name}")
        drawn(page, charts)
        page.close()
    assert session["outside"] == []
    hosts = {urlparse(u).hostname for u in session["requests"]}
    assert hosts == {"127.0.0.1"}
    assert any(u.endswith("/static/vendor/vega/vega.min.js") for u in session["requests"])
    problems = [m for m in session["console"] if "Content Security Policy" in m or m.startswith("pageerror")]
    assert problems == []
