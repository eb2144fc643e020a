"""The Forecasts view over a store holding a forecast longer than any issued now (the store keeps it)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from dashboard.forecasts import Z95, forecasts_view
from dashboard.snapshot import Snapshot, VersionCache
from forecasting.plot import released
from fusion.api import open_store
from fusion.config.federation import load_config
from fusion.config.forecasting import MAX_HORIZON_WINDOWS, Statistic
from fusion.store.delta import Store
from tests.conftest import START, config_text
from tests.dashboard.rows import add_forecast
from tests.fusion.store.test_store import release_rows


def test_a_forecast_longer_than_the_bound_shows_its_first_windows(tmp_path: Path) -> None:
    """A forecast issued before the horizon was bounded reaches further than MAX_HORIZON_WINDOWS: the view loads
    its first MAX_HORIZON_WINDOWS windows only, so the page stays within what a request may read."""
    path = tmp_path / "federation.toml"
    path.write_text(config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2))
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
    with open_store(config) as opened:
        plotted = released(opened, "temp", "north", Statistic.MEAN, START).to_pylist()
    assert [(p["value"], p["low"], p["high"]) for p in plotted] == [(p.value, p.low, p.high) for p in view.released]
