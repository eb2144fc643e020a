"""The Forecasts view over a store holding a forecast longer than any issued now (the store keeps it)."""

from __future__ import annotations

import html
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from dashboard.forecasts import forecasts_view
from dashboard.snapshot import Snapshot, VersionCache
from forecasting.intervals import Z95
from forecasting.plot import plotted
from fusion.config.federation import load_config
from fusion.config.forecasting import MAX_HORIZON_WINDOWS
from fusion.store.delta import Store
from tests.conftest import START, config_text, keyless_registry
from tests.dashboard.rows import add_forecast
from tests.fusion.store.test_store import release_rows


def test_a_forecast_longer_than_the_bound_shows_its_first_windows(tmp_path: Path) -> None:
    """A forecast issued before the horizon was bounded reaches further than MAX_HORIZON_WINDOWS: the view loads
    its first MAX_HORIZON_WINDOWS windows only, so the page stays within what a request may read."""
    path = tmp_path / "federation.toml"
    path.write_text(config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2))
    keyless_registry(tmp_path)
    config = load_config(path, check_release=False)
    add_forecast(Store(config.store_path), metric="temp", region="north", origin=START + timedelta(days=2),
                 windows=MAX_HORIZON_WINDOWS + 20)
    with Snapshot(config, VersionCache()) as shot:
        view = forecasts_view(shot)
    assert (view.metric, view.region, view.model) == ("temp", "north", "seasonal_naive")
    assert len(view.windows) == MAX_HORIZON_WINDOWS
    assert view.windows[0].horizon == 1 and view.windows[-1].horizon == MAX_HORIZON_WINDOWS


def test_the_releases_drawn_are_what_was_forecast_and_scored(tmp_path: Path) -> None:
    """A forecast of the mean follows `ratio_mean` (the unclipped ratio) and is scored against it: the page drew
    the clipped `mean` as "released" beside it (on irradiance at night, hundreds of W/m2 apart), and every release
    of a window rather than the latest. `fusion forecast --plot` reads the same points."""
    path = tmp_path / "federation.toml"
    path.write_text(config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2))
    keyless_registry(tmp_path)
    config = load_config(path, check_release=False)
    store = Store(config.store_path)
    rows = release_rows("r-a", range(48))
    ratio = [-3.0 + 0.5 * h for h in range(48)]  # the clipped mean stays 10.0 (release_rows)
    rows = rows.set_column(rows.schema.get_field_index("ratio_mean"), "ratio_mean", pa.array(ratio))
    store.insert_new("releases", rows)
    again = rows.slice(47).set_column(0, "release_id", pa.array(["r-b"]))  # the last window released again, later
    again = again.set_column(again.schema.get_field_index("ratio_mean"), "ratio_mean", pa.array([99.0]))
    again = again.set_column(again.schema.get_field_index("released_at"), "released_at",
                             pa.array([START + timedelta(hours=1)], pa.timestamp("us", tz="UTC")))
    store.insert_new("releases", again)
    add_forecast(store, metric="temp", region="north", origin=START + timedelta(hours=48))
    with Snapshot(config, VersionCache()) as shot:
        view = forecasts_view(shot)
    assert [p.value for p in view.released] == [*ratio[:47], 99.0]
    assert all(p.sd == 0.25 for p in view.released)
    assert view.released[0].low == pytest.approx(-3.0 - Z95 * 0.25)
    assert view.released[0].high == pytest.approx(-3.0 + Z95 * 0.25)
    drawn = plotted(config, "temp", "north", days=2).releases.to_pylist()
    assert [(p["value"], p["low"], p["high"]) for p in drawn] == [(p.value, p.low, p.high) for p in view.released]


def test_only_the_releases_forecasts_read_are_drawn_and_those_left_out_are_named(tmp_path: Path) -> None:
    """Forecasts read only the releases `fusion verify` calls verified or legacy; the page (and its JSON) and
    `fusion forecast --plot` drew every release beside them: a signed release rewritten after it was signed, and
    rows released later under an unsigned id, replaced the values forecast. They are left out of what is drawn
    too, each window drawn from its latest release that verifies (or not at all), and named as forecasts name
    them."""
    import json

    import numpy as np
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from dashboard.server import running
    from fusion.api import forecast
    from fusion.keys.registry import create_key_holder_key
    from tests.conftest import publish_signed
    from tests.forecasting.conftest import federation, release_table, released

    fed = federation(tmp_path, forecasting='horizon = "24h"')
    hours = np.arange(4 * 24)
    rows = release_table(hours, released(hours, 1.0, seed=1), np.ones(hours.size))  # a release a day
    create_key_holder_key(fed.config)
    publish_signed(fed.config, fed.store, rows)
    DeltaTable(fed.store.table_path("releases")).update(  # the third day's release, rewritten after it was signed
        updates={"ratio_mean": "ratio_mean + 30"}, predicate="release_id = 'r-temp-20260103'")
    last = rows.slice(3 * 24)
    unsigned = last.set_column(0, "release_id", pa.array(["r-unsigned"] * 24)).set_column(
        last.schema.get_field_index("ratio_mean"), "ratio_mean", pc.add(last["ratio_mean"], 30.0)).set_column(
        last.schema.get_field_index("released_at"), "released_at",
        pc.add(last["released_at"], pa.scalar(timedelta(hours=1), pa.duration("us"))))
    fed.store.insert_new("releases", unsigned)
    run = forecast(fed.path)
    assert run.skipped_releases == {"r-temp-20260103": "tampered", "r-unsigned": "tampered"}
    trusted = [(start, value) for start, value, day in zip(
        rows["window_start"].to_pylist(), rows["ratio_mean"].to_pylist(), rows["release_id"].to_pylist(),
        strict=True) if day != "r-temp-20260103"]  # the fourth day from its signed release
    said = ("left out 2 release(s) that `fusion verify` does not call verified or legacy: r-temp-20260103 "
            "(tampered), r-unsigned (tampered)")
    with running(fed.config) as url:
        with urllib.request.urlopen(url + "/api/forecasts", timeout=30) as answer:
            view = json.loads(answer.read())
        with urllib.request.urlopen(url + "/forecasts", timeout=30) as answer:
            page = answer.read().decode()
    assert [(datetime.fromisoformat(p["window_start"]), p["value"]) for p in view["released"]] == trusted
    assert view["skipped_releases"] == run.skipped_releases and view["left_out"] == said
    assert said in html.unescape(page)
    drawn = plotted(fed.config, "temp", "north", days=4)
    assert [(p["window_start"], p["value"]) for p in drawn.releases.to_pylist()] == trusted
    assert drawn.skipped == run.skipped_releases
