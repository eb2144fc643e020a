"""Benchmark of `fusion serve`: how long each page takes to answer, on the demo store and on a year of 15-minute
releases for 50 regions x 5 metrics (8.76 million cells); and the README's screenshot of the releases page.

    make demo                                               # the demo store (demo/federation.toml)
    .venv/bin/python -m bench.dashboard                     # table; writes bench/results/dashboard.json
    .venv/bin/python -m bench.dashboard --screenshot docs/dashboard-releases.png

The dashboard runs in a thread of this process on a free loopback port (dashboard.server.running) and each page
is fetched over HTTP, as a browser would fetch it; a figure is the median of `--repeat` fetches after the first
(the first one, reported as `cold`, also reads what the dashboard keeps per table version: the store's series,
the verify report). The year store is written once through the store's own insert path (bench/releases.py,
about a minute) and kept in bench/out/dashboard-year. Targets: every page within 300 ms on the demo store; the
releases page within 1 s on the year store.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.generate import BenchData, config_text
from fusion.config.federation import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "dashboard.json"
YEAR = ROOT / "bench" / "out" / "dashboard-year"
TARGET_DEMO_MS = 300.0
TARGET_YEAR_RELEASES_MS = 1000.0
#: The pages timed on the demo store (each page, and the releases page's JSON twin).
DEMO_PAGES = ("/releases", "/budget", "/provenance", "/forecasts", "/recommendations", "/api", "/health",
              "/api/releases")
#: The pages timed on the year store: the default view (a series' last 7 days: 672 cells), another series, a
#: month of one series (2,976 cells), the JSON twin, and the other pages.
YEAR_PAGES = ("/releases", "/releases?metric=air_temp&region=region-17",
              "/releases?metric=air_temp&region=region-17&start=2026-03-01&end=2026-04-01",
              "/api/releases?metric=air_temp&region=region-17", "/budget", "/provenance", "/health")


def fetch_ms(url: str) -> tuple[float, int, int]:
    """(milliseconds, status, bytes) of one GET."""
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as answer:
        body = answer.read()
        status = answer.status
    return (time.perf_counter() - began) * 1000, status, len(body)


def time_pages(config: Config, pages: tuple[str, ...], repeat: int) -> dict[str, dict[str, Any]]:
    from dashboard.server import running

    timings = {}
    with running(config) as url:
        for page in pages:
            cold, status, size = fetch_ms(url + page)
            if status != 200:
                raise SystemExit(f"{page} answered {status}")
            warm = [fetch_ms(url + page)[0] for _ in range(repeat)]
            timings[page] = {"cold_ms": round(cold, 1), "median_ms": round(statistics.median(warm), 1),
                             "max_ms": round(max(warm), 1), "bytes": size}
    return timings


def year_store(days: int) -> Config:
    """A config over the year store, built on first use (bench/releases.py) and kept in bench/out."""
    from bench.releases import build_store

    marker = YEAR / f".built-{days}"
    if not marker.exists():
        YEAR.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        rows = build_store(YEAR / "store", days=days)
        print(f"built the year store: {rows:,} cells in {time.perf_counter() - began:.0f} s")
        marker.touch()
    path = YEAR / "federation.toml"
    data = BenchData(directory=YEAR, rows=0, institutions=("inst-00", "inst-01", "inst-02"))
    path.write_text(config_text(data).replace('id = "bench-federation"', 'id = "bench-federation"\nstore = "store"'))
    return load_config(path, check_release=False)


def screenshot(config: Config, target: Path, *, path: str = "/releases") -> None:
    """The releases page as a browser shows it (Debian's chromium, 1400 x 1000), chart drawn, to `target`."""
    from playwright.sync_api import sync_playwright

    from dashboard.server import running
    from tests.dashboard.test_browser import FLAGS, chromium_path

    executable = chromium_path()
    if executable is None:
        raise SystemExit("no chromium found: apt-get install --no-install-recommends chromium")
    with running(config) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url + path)
        page.wait_for_selector("[data-chart][data-state=drawn] canvas", timeout=30_000)
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=target)
        browser.close()
    print(f"screenshot of {path}: {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "demo" / "federation.toml",
                        help="the demo federation (make demo)")
    parser.add_argument("--days", type=int, default=365, help="days of 15-minute releases in the large store")
    parser.add_argument("--repeat", type=int, default=10, help="timed fetches per page (median reported)")
    parser.add_argument("--screenshot", type=Path, help="also write a PNG of the demo's releases page here")
    parser.add_argument("--screenshot-path", default="/releases?metric=air_temp&region=nc-triad-east",
                        help="the page the screenshot shows")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args(argv)
    if not args.config.exists():
        raise SystemExit(f"{args.config} is missing: run `make demo` first")
    demo = load_config(args.config, check_release=False)
    if args.screenshot:
        screenshot(demo, args.screenshot, path=args.screenshot_path)
    results: dict[str, Any] = {"demo": time_pages(demo, DEMO_PAGES, args.repeat)}
    results["year"] = time_pages(year_store(args.days), YEAR_PAGES, args.repeat)
    results["year_cells"] = args.days * 96 * 250
    demo_worst = max(t["median_ms"] for t in results["demo"].values())
    year_releases = max(t["median_ms"] for page, t in results["year"].items() if page.startswith("/releases"))
    results |= {
        "demo_worst_median_ms": demo_worst, "target_demo_ms": TARGET_DEMO_MS,
        "year_releases_worst_median_ms": year_releases, "target_year_releases_ms": TARGET_YEAR_RELEASES_MS,
        "meets_targets": demo_worst <= TARGET_DEMO_MS and year_releases <= TARGET_YEAR_RELEASES_MS,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, Python {platform.python_version()}", "cpus": len(os.sched_getaffinity(0)),
        "repeat": args.repeat,
    }
    for store in ("demo", "year"):
        print(f"{store} store{'':32} cold ms   median ms   max ms      bytes")
        for page, t in results[store].items():
            print(f"  {page[:44]:44} {t['cold_ms']:8.1f} {t['median_ms']:11.1f} {t['max_ms']:8.1f} {t['bytes']:10,}")
    print(f"demo: worst page median {demo_worst:.0f} ms (target {TARGET_DEMO_MS:.0f}); year: releases page "
          f"{year_releases:.0f} ms (target {TARGET_YEAR_RELEASES_MS:.0f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["meets_targets"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
