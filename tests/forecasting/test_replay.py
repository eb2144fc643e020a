"""Replay of stored forecasts (forecasting.replay): every forecast `fusion forecast` and `fusion backtest` write is
computed again to within REPLAY_RTOL from the releases it names, and a row changed in any column, or naming what it
did not read, is not."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from forecasting.replay import OPTIMUM_RTOL, REPLAY_RTOL, VALUE_COLUMNS, ForecastReplay
from forecasting.run import run_backtests, run_forecasts
from fusion.api import open_store
from tests.forecasting.conftest import T0, Federation, federation, release_table, released

ISSUED = T0 + timedelta(days=21)
FORGED_AT = ISSUED + timedelta(hours=3)


@pytest.fixture
def quick(tmp_path: Path) -> Federation:
    """Three weeks of hourly releases of `temp` in the north (noise SD 1, daily releases), forecast by `profile`
    (no optimiser: a fit takes milliseconds)."""
    made = federation(tmp_path, forecasting='models = ["profile"]')
    hours = np.arange(21 * 24)
    sds = np.full(hours.size, 1.0)
    made.store.insert_new("releases", release_table(hours, released(hours, sds, seed=1), sds))
    return made


def _why_not(fed: Federation, forecast_id: str, issued_at: Any = ISSUED,
             unverified: dict[str, str] | None = None) -> str | None:
    with open_store(fed.config) as store, ForecastReplay(store, unverified=unverified) as replay:
        return replay.why_not(forecast_id, issued_at)


def _latest(fed: Federation) -> pa.Table:
    """The rows of the forecast issued at ISSUED."""
    rows = fed.store.read("forecasts")
    return rows.filter(pc.and_(pc.equal(rows["purpose"], "forecast"), pc.equal(rows["issued_at"], ISSUED)))


def _forged(rows: pa.Table, name: str, change: Callable[[list[Any]], list[Any]]) -> pa.Table:
    """`rows` issued again at FORGED_AT with column `name` changed (a forger's copy)."""
    for column, values in ((name, change(rows[name].to_pylist())), ("issued_at", [FORGED_AT] * rows.num_rows)):
        index = rows.schema.get_field_index(column)
        rows = rows.set_column(index, rows.schema.field(index), pa.array(values, rows.schema.field(index).type))
    return rows


def test_every_forecast_and_backtest_fusion_writes_replays_even_after_later_releases(fed: Federation) -> None:
    """The backtest's forecasts (each calibrated by the origins before it) and the forecast that uses its choice
    and calibration replay, `uc` and the baselines alike; after a day more is released, from the version of
    `releases` they read."""
    run_backtests(fed.config, horizon="24h", now=ISSUED - timedelta(hours=1))
    run = run_forecasts(fed.config, horizon="24h", now=ISSUED)
    forecast = run.outcomes[0].forecast
    assert forecast is not None and forecast.params["calibrated"] and forecast.factor != 1.0
    hours = np.arange(21 * 24, 22 * 24)
    sds = np.full(hours.size, 1.0)
    fed.store.insert_new("releases", release_table(hours, released(hours, sds, seed=2), sds))
    run_forecasts(fed.config, horizon="24h", now=ISSUED + timedelta(days=1))
    issues = fed.store.read("forecasts").select(["forecast_id", "issued_at", "purpose", "model"])
    issues = issues.group_by(issues.column_names).aggregate([]).to_pylist()
    assert {i["purpose"] for i in issues} == {"backtest", "forecast"}
    assert {i["model"] for i in issues} == {"uc", "seasonal_naive", "same_hour_mean"}
    with open_store(fed.config) as store, ForecastReplay(store) as replay:
        assert {i["forecast_id"]: replay.why_not(i["forecast_id"], i["issued_at"]) for i in issues} == {
            i["forecast_id"]: None for i in issues}


def test_a_difference_within_the_tolerance_still_replays(quick: Federation) -> None:
    run_forecasts(quick.config, horizon="24h", now=ISSUED)
    rows = _latest(quick)
    quick.store.insert_new("forecasts", _forged(rows, "mean", lambda m: [v * (1 + REPLAY_RTOL / 10) for v in m]))
    assert _why_not(quick, rows["forecast_id"][0].as_py(), FORGED_AT) is None


def test_a_forecast_on_a_history_longer_than_the_config_now_names_still_replays(quick: Federation) -> None:
    """A forecast fitted on 21 days of history, then `[forecasting] history` shortened to 7 days: the forecast is
    what Fusion computed from the verified releases it names, so it still replays (it was refused as a history
    longer than the configured one, so `fusion verify` failed on an honest store after a config edit). A history
    past MAX_HISTORY_WINDOWS (a bound on replay's cost, not the config's) does not."""
    from forecasting.replay import MAX_HISTORY_WINDOWS
    from fusion.config.federation import load_config

    run_forecasts(quick.config, horizon="24h", now=ISSUED)
    forecast_id = _latest(quick)["forecast_id"][0].as_py()
    quick.path.write_text(quick.path.read_text().replace(
        'models = ["profile"]', 'models = ["profile"]\nhistory = "7d"'))
    shorter = dataclasses.replace(quick, config=load_config(quick.path))
    assert shorter.config.forecasting.history == "7d"
    assert _why_not(shorter, forecast_id) is None
    rows = _forged(_latest(quick), "params", lambda p: [t.replace('"history_windows": 504',
                                                                  f'"history_windows": {MAX_HISTORY_WINDOWS + 1}')
                                                        for t in p])
    quick.store.insert_new("forecasts", rows)
    why = _why_not(shorter, forecast_id, FORGED_AT)
    assert why is not None and f"not within the 1 to {MAX_HISTORY_WINDOWS} windows" in why


@pytest.mark.parametrize("column", VALUE_COLUMNS)
def test_a_value_changed_in_any_column_does_not_replay(quick: Federation, column: str) -> None:
    """A copy of a genuine forecast under its own id, naming its own releases, one window's value moved by 0.1%."""
    run_forecasts(quick.config, horizon="24h", now=ISSUED)
    rows = _latest(quick)
    forecast_id = rows["forecast_id"][0].as_py()
    quick.store.insert_new("forecasts", _forged(rows, column, lambda v: [v[0], v[1] * 1.001, *v[2:]]))
    why = _why_not(quick, forecast_id, FORGED_AT)
    assert why is not None and why.startswith(f"its {column} at {T0 + timedelta(days=21, hours=1):%Y-%m-%dT%H:%MZ} is ")
    assert why.endswith(" computed again")
    assert _why_not(quick, forecast_id) is None  # the genuine issue still replays


def _drop_first(ids: list[list[str]]) -> list[list[str]]:
    return [i[1:] for i in ids]


@pytest.mark.parametrize(("column", "change", "reason"), [
    ("forecast_id", lambda ids: ["f-" + "0" * 24] * len(ids), "its forecast_id is not the one its model, series, "
     "origin, horizon, input releases, calibration and params name"),
    ("input_release_ids", _drop_first, "its forecast_id is not the one"),
    ("params", lambda p: [t.replace('"history_windows": 504', '"history_windows": 480') for t in p],
     "its forecast_id is not the one"),
    ("horizon", lambda h: [*h[:-1], 99], "its 24 rows are not one forecast's windows (horizons 1 to 99"),
    ("model_version", lambda v: ["0"] * len(v), "it was made by profile version '0', which this Fusion does not have"),
    ("releases_version", lambda v: [9] * len(v), "its releases_version 9 is not one this store holds (it reads "
     "releases at version 1)"),
    ("unit", lambda u: ["MW"] * len(u), "its unit at 2026-01-22T00:00Z is 'MW', 'degC' computed again"),
    ("window_end", lambda e: [t + timedelta(hours=1) for t in e], "its window_end at 2026-01-22T00:00Z is "
     "2026-01-22T02:00Z, 2026-01-22T01:00Z computed again"),
])
def test_a_row_recording_what_its_forecast_did_not_do_does_not_replay(
    quick: Federation, column: str, change: Callable[[list[Any]], list[Any]], reason: str
) -> None:
    """A made-up id, releases or history its id does not name, a window missing, a model this Fusion does not have,
    a version of `releases` the store never had, or any other column changed."""
    run_forecasts(quick.config, horizon="24h", now=ISSUED)
    rows = _forged(_latest(quick), column, change)
    quick.store.insert_new("forecasts", rows)
    why = _why_not(quick, rows["forecast_id"][0].as_py(), FORGED_AT)
    assert why is not None and why.startswith(reason), why


def test_a_forecast_that_read_a_release_that_does_not_verify_does_not_replay(quick: Federation) -> None:
    run_forecasts(quick.config, horizon="24h", now=ISSUED)
    forecast_id = _latest(quick)["forecast_id"][0].as_py()
    why = _why_not(quick, forecast_id, unverified={"r-temp-20260105": "tampered"})
    assert why == "it read release(s) that `fusion verify` does not call verified or legacy: r-temp-20260105 (tampered)"
    assert _why_not(quick, "f-nothing") == "the store holds no rows of it"


@pytest.fixture(params=["uc", "ets"])
def optimised(request: pytest.FixtureRequest, tmp_path: Path) -> Federation:
    """As `quick`, forecast by a model whose parameters statsmodels' optimiser finds."""
    made = federation(tmp_path, forecasting=f'models = ["{request.param}"]')
    hours = np.arange(21 * 24)
    sds = np.full(hours.size, 1.0)
    made.store.insert_new("releases", release_table(hours, released(hours, sds, seed=1), sds))
    return made


def _fitted_elsewhere(fed: Federation, change: Callable[[float, int], float]) -> pa.Table:
    """The forecast issued at ISSUED as a machine whose optimiser stopped at other parameters (each parameter,
    numbered in order, changed by `change`) would issue it: every value computed at them, its id theirs, issued at
    FORGED_AT."""
    forecast_id = _latest(fed)["forecast_id"][0].as_py()
    with open_store(fed.config) as store, ForecastReplay(store) as replay:
        recorded = replay._recorded(forecast_id, replay._rows(forecast_id, ISSUED))
        assert not isinstance(recorded, str)
        fitted = {k: change(v, i) for i, (k, v) in enumerate(recorded.params["fitted"].items())}
        computed = replay._compute(dataclasses.replace(recorded, params={**recorded.params, "fitted": fitted}))
    assert not isinstance(computed, str)
    assert json.loads(computed.rows["params"][0].as_py())["fitted"] == fitted
    return _forged(computed.rows, "issued_at", lambda v: v)


def test_an_optimised_fit_that_stopped_elsewhere_within_its_tolerance_replays(optimised: Federation) -> None:
    """Parameters 1e-4 apart (another machine's BLAS kernels: 2e-4 on the demo's store) and the values they give:
    the forecast another machine would issue from the same releases replays here."""
    run_forecasts(optimised.config, horizon="24h", now=ISSUED)
    rows = _fitted_elsewhere(optimised, lambda v, i: v * (1 + (-1) ** i * 1e-4))
    assert rows["forecast_id"][0] != _latest(optimised)["forecast_id"][0]
    optimised.store.insert_new("forecasts", rows)
    assert _why_not(optimised, rows["forecast_id"][0].as_py(), FORGED_AT) is None


def test_an_optimised_fit_at_parameters_the_optimiser_does_not_give_does_not_replay(optimised: Federation) -> None:
    """Parameters moved 5%, every value computed at them: not the optimum of the releases it names."""
    run_forecasts(optimised.config, horizon="24h", now=ISSUED)
    rows = _fitted_elsewhere(optimised, lambda v, i: v * (1 + (-1) ** i * 5 * OPTIMUM_RTOL))
    optimised.store.insert_new("forecasts", rows)
    why = _why_not(optimised, rows["forecast_id"][0].as_py(), FORGED_AT)
    assert why is not None and why.startswith("its fitted ") and why.endswith(" fitted again"), why


def test_an_optimised_forecast_with_a_value_changed_does_not_replay(optimised: Federation) -> None:
    """The tolerance of an optimiser's parameters leaves the values none: each is computed at the recorded ones."""
    run_forecasts(optimised.config, horizon="24h", now=ISSUED)
    rows = _latest(optimised)
    forecast_id = rows["forecast_id"][0].as_py()
    assert _why_not(optimised, forecast_id) is None
    optimised.store.insert_new("forecasts", _forged(rows, "mean", lambda v: [v[0] * 1.01, *v[1:]]))
    why = _why_not(optimised, forecast_id, FORGED_AT)
    assert why is not None and why.startswith(f"its mean at {ISSUED:%Y-%m-%dT%H:%MZ} is "), why
