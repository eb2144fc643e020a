"""Scheduled and stream releases refresh the forecasts of the series they release (real Beam, TenSEAL and store):
three days of `temp` in the north are in the store before the federation's first hour; releasing that hour
forecasts the series again, from the history and the new hour together."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest

from fusion.runtime.schedule import Interval, RunStatus
from fusion.store.delta import Store
from fusion.store.mode import bind_store_mode
from pipelines.scheduler import run_interval
from pipelines.stream_driver import StreamDriver
from tests.conftest import START, Federation, publish_signed
from tests.forecasting.conftest import release_table, released

pytestmark = pytest.mark.e2e

FORECASTING = '\n[forecasting]\nhorizon = "6h"\nmodels = ["seasonal_naive", "same_hour_mean"]\n'
SCHEDULE = '[[schedules]]\nname = "hourly"\ncron = "5 * * * *"\ninterval = "1h"\nstart = 2026-01-01T00:00:00\n'
STREAM = f'[stream]\nallowed_lateness = "0s"\nstart = "{START.isoformat()}"\n'


def with_history(make_federation: Callable[..., Federation], extra: str, subdir: str) -> Federation:
    fed = make_federation(
        noise=False, quorum=2, subdir=subdir, extra_privacy="epsilon_cap = 50.0", extra=extra + FORECASTING
    )
    hours = np.arange(-72, 0)  # the three days before START (the conftest's T0 is START)
    store = Store(fed.config.store_path)
    bind_store_mode(store, fed.config.privacy.mode)  # a test-mode store, as the releases below say
    history = release_table(hours, released(hours, 1.0, seed=4), np.ones(hours.size))
    history = history.set_column(
        history.schema.get_field_index("noise"), "noise", pa.array(["off (test mode)"] * hours.size)
    )
    publish_signed(fed.config, store, history)  # signed by the key holder: a forecast reads only verified releases
    return fed


def forecast_origins(fed: Federation) -> set[object]:
    rows = Store(fed.config.store_path).read("forecasts").to_pylist()
    return {(r["metric"], r["region"], r["origin"]) for r in rows}


def test_a_scheduled_release_refreshes_the_forecasts_of_its_series(make_federation: Callable[..., Federation]) -> None:
    fed = with_history(make_federation, SCHEDULE, "scheduled")
    result = run_interval(
        fed.config, fed.config.schedules[0], Interval(START, START + timedelta(hours=1)), runner="test"
    )
    assert result.status is RunStatus.RELEASED
    # temp in the north has 73 hours; the other five series of the release only the one.
    assert result.detail.startswith("forecasts refreshed: 1 of 6 series, 6 row(s)"), result.detail
    assert forecast_origins(fed) == {("temp", "north", START + timedelta(hours=1))}


def test_a_stream_step_refreshes_the_forecasts_of_what_it_released(make_federation: Callable[..., Federation]) -> None:
    fed = with_history(make_federation, STREAM, "stream")
    for inst in fed.config.institutions:  # no readings: the stream releases its grid's windows all the same
        shutil.rmtree(fed.directory / "feeds" / inst.id)
        (fed.directory / "feeds" / inst.id).mkdir()
    notices: list[str] = []
    StreamDriver(fed.config, until=START + timedelta(hours=2), on_notice=notices.append).run(drain=True)
    assert notices[-1].startswith("forecasts refreshed: 1 of 6 series, 6 row(s)"), notices
    assert forecast_origins(fed) == {("temp", "north", START + timedelta(hours=2))}
