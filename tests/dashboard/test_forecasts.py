"""The Forecasts view over a store holding a forecast longer than any issued now (the store keeps it)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from dashboard.forecasts import forecasts_view
from dashboard.snapshot import Snapshot, VersionCache
from fusion.config.federation import load_config
from fusion.config.forecasting import MAX_HORIZON_WINDOWS
from fusion.store.delta import Store
from tests.conftest import START, config_text
from tests.dashboard.rows import add_forecast


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
