"""A small federation for the dashboard's tests: a real store (Delta tables, read through the sandboxed SQL)
holding two regions' releases of `temp`, a budget period, forecasts, a recommendation and a decision, and hostile
text in every kind of field a page shows; and the dashboard served over it on a free loopback port."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from fusion.config.federation import load_config
from fusion.keys.registry import create_key_holder_key
from fusion.store.delta import Store
from tests.conftest import START, config_text
from tests.dashboard.rows import add_forecast, add_hostile, add_recommendation, table
from tests.fusion.store.test_store import release_rows

#: Released hours per region; the regions differ in their counts (north 100 + h, south 500 + h).
HOURS = 48
#: Scheduler events in the audit table: more than one page of them.
AUDIT_RUNS = 205


@dataclass(frozen=True)
class Served:
    config_path: Path
    url: str

    def get(self, path: str, *, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        """(status, headers, body) of a GET, whatever the status."""
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, dict(answer.headers), answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    def json(self, path: str) -> tuple[int, Any]:
        status, _, body = self.get(path)
        return status, json.loads(body)


def build_store(root: Path) -> Path:
    """The federation's config; its store filled as described above."""
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "federation.toml"
    config_path.write_text(config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2))
    config = load_config(config_path, check_release=False)
    store = Store(config.store_path)
    north = release_rows("r-north", range(HOURS), region="north", count=100.0)
    for name, bound in (("stddev_ci_low", 0.0), ("stddev_ci_high", 4.5)):  # a withheld stddev: its interval only
        north = north.set_column(north.schema.get_field_index(name), name, pa.array([bound] * HOURS, pa.float64()))
    store.insert_new("releases", north)
    store.insert_new("releases", release_rows("r-south", range(HOURS), region="south", count=500.0))
    store.insert_new("budget", table("budget", [{
        "period": "2026-01-01", "period_start": START, "period_end": START + timedelta(days=1), "epsilon_cap": 2.0,
        "epsilon_spent": 1.25, "delta": 1e-6, "releases": 2, "release_ids": ["r-north", "r-south"],
        "aggregates": [], "rdp": [], "updated_at": START, "composition": "parallel", "mechanisms": None,
        "epsilon_rdp": 1.5}], at=START))
    create_key_holder_key(config, published=store.release_ids())  # the releases so far verify as legacy
    store.insert_new("audit", table("audit", [  # more than a page of events
        {"event_id": f"run-{i:03d}", "at": START + timedelta(minutes=i), "actor_role": "scheduler",
         "actor": "runner-1", "action": "run", "release_id": None, "interval_start": None, "interval_end": None,
         "reason": None, "detail": None} for i in range(AUDIT_RUNS)], at=START))
    add_hostile(store, metric="temp", at=START)
    add_forecast(store, metric="temp", region="north", origin=START + timedelta(hours=HOURS))
    add_recommendation(store, at=START)
    return config_path


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp("dashboard"))


@pytest.fixture(scope="module")
def served(federation: Path) -> Iterator[Served]:
    from dashboard.server import running

    with running(load_config(federation, check_release=False)) as url:
        yield Served(federation, url)
