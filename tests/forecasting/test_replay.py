"""Replay of stored forecasts (forecasting.replay): every forecast `fusion forecast` and `fusion backtest` write is
computed again to within REPLAY_RTOL from the releases it names, and a row changed in any column, or naming what it
did not read, is not."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from forecasting.intervals import Calibration, intervals
from forecasting.replay import REPLAY_RTOL, VALUE_COLUMNS, ForecastReplay
from forecasting.rows import forecast_rows
from forecasting.run import run_backtests, run_forecasts
from fusion.api import open_store
from fusion.config.federation import load_config
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


def _two_models(tmp_path: Path) -> Federation:
    """As `quick`, backtesting `profile` against `seasonal_naive` (both closed-form)."""
    made = federation(tmp_path, forecasting='models = ["profile", "seasonal_naive"]')
    hours = np.arange(21 * 24)
    sds = np.full(hours.size, 1.0)
    made.store.insert_new("releases", release_table(hours, released(hours, sds, seed=1), sds))
    return made


def _backtests(fed: Federation, model: str) -> pa.Table:
    rows = fed.store.read("forecasts")
    return rows.filter(pc.and_(pc.equal(rows["purpose"], "backtest"), pc.equal(rows["model"], model)))


def _wider_sd(fed: Federation) -> None:
    """Every backtest of `profile` issued again with its SD five times what it is: the run reads the model's SD as
    five times wider than its errors (calibration_factor unchanged), so it learns a narrower calibration."""
    rows = _backtests(fed, "profile")
    fed.store.insert_new("forecasts", _forged(rows, "sd", lambda sd: [5 * v for v in sd]))


def _perfect_naive(fed: Federation) -> None:
    """Backtests of `seasonal_naive` under ids of the forger's own, each window's mean its release, and their scores
    (errors 0): the run reads seasonal_naive as exact, so it chooses it over `profile`."""
    rows = _backtests(fed, "seasonal_naive")
    releases = {r["window_start"]: r["ratio_mean"] for r in fed.store.read("releases").to_pylist()}
    ids = {f: f"f-forged{n:016d}" for n, f in enumerate(sorted(set(rows["forecast_id"].to_pylist())))}
    forged = _forged(rows, "forecast_id", lambda fs: [ids[f] for f in fs])
    forged = _forged(forged, "mean", lambda _: [releases[s] for s in forged["window_start"].to_pylist()])
    scores = fed.store.read("forecast_scores")
    scores = scores.filter(pc.is_in(scores["forecast_id"], value_set=pa.array(sorted(ids))))
    for name, values in (("forecast_id", [ids[f] for f in scores["forecast_id"].to_pylist()]),
                         ("error", [0.0] * scores.num_rows), ("scaled_error", [0.0] * scores.num_rows),
                         ("z", [0.0] * scores.num_rows)):
        index = scores.schema.get_field_index(name)
        scores = scores.set_column(index, scores.schema.field(index), pa.array(values, scores.schema.field(index).type))
    fed.store.insert_new("forecasts", forged)
    fed.store.insert_new("forecast_scores", scores)


@pytest.mark.parametrize(("forge", "steered", "reason"), [
    (_wider_sd, lambda f: f.model == "profile" and f.factor < 0.5, "its calibration is {"),
    (_perfect_naive, lambda f: f.model == "seasonal_naive",
     "its model is seasonal_naive, but its backtests that replay choose profile"),
])
def test_a_forecast_whose_choice_forged_backtests_steered_does_not_replay(
    tmp_path: Path, forge: Callable[[Federation], None], steered: Callable[[Any], bool], reason: str
) -> None:
    """`forecasts` and `forecast_scores` rows are not signed: backtest rows (and scores) appended by a forger were
    what a later genuine `fusion forecast` chose its model and calibration by, and the forecast replayed (its fit is
    genuine). Its choice is made again from the backtests that replay and scores computed from the releases: it is
    not the one recorded, so the forecast does not replay, and neither do the forged backtests."""
    fed = _two_models(tmp_path)
    run_backtests(fed.config, horizon="24h", now=ISSUED - timedelta(hours=2))
    genuine = run_forecasts(fed.config, horizon="24h", now=ISSUED - timedelta(hours=1)).outcomes[0].forecast
    assert genuine is not None and genuine.model == "profile" and genuine.params["calibrated"]
    forge(fed)  # backtests issued at FORGED_AT
    forecast = run_forecasts(fed.config, horizon="24h", now=FORGED_AT + timedelta(hours=1)).outcomes[0].forecast
    assert forecast is not None and steered(forecast)
    with open_store(fed.config) as store, ForecastReplay(store) as replay:
        why = replay.why_not(forecast.forecast_id, FORGED_AT + timedelta(hours=1))
        assert why is not None and why.startswith(reason), why
        assert replay.why_not(genuine.forecast_id, ISSUED - timedelta(hours=1)) is None
        backtests = fed.store.read("forecasts").filter(pc.equal(pc.field("issued_at"), FORGED_AT))
        issues = set(backtests["forecast_id"].to_pylist())
        assert issues and all(replay.why_not(f, FORGED_AT) is not None for f in issues)


@pytest.mark.parametrize("backtested", [True, False])
def test_a_forecast_with_a_calibration_of_its_own_does_not_replay(quick: Federation, backtested: bool) -> None:
    """A forecast computed as Fusion computes it, but with intervals calibrated by a factor of the forger's choosing
    (within the bounds every calibration is kept in), under the id its record names: it is consistent, so it
    replayed. Its calibration is not the one its backtests give (none, without a backtest)."""
    if backtested:
        run_backtests(quick.config, horizon="24h", now=ISSUED - timedelta(hours=1))
    genuine = run_forecasts(quick.config, horizon="24h", now=ISSUED).outcomes[0].forecast
    assert genuine is not None and genuine.params["calibrated"] is backtested
    chosen = Calibration.scaled(3.0 * genuine.factor)
    bands = genuine.bands
    forged = replace(
        genuine,
        params={**genuine.params, "calibration": chosen.as_dict()},
        bands=intervals(bands.mean, (bands.sd / genuine.factor) ** 2, noise_var=bands.noise_sd**2, factor=chosen),
        factor=chosen.factor,
    )
    quick.store.insert_new("forecasts", forecast_rows(forged, FORGED_AT))
    why = _why_not(quick, forged.forecast_id, FORGED_AT)
    assert why is not None and why.startswith("its calibration is {"), why
    assert "but its backtests that replay give" in why
    assert _why_not(quick, genuine.forecast_id) is None


def test_a_forecast_on_a_shorter_history_or_from_an_earlier_origin_does_not_replay(quick: Federation) -> None:
    """Forecasts Fusion computes, but under choices a run does not make: one fitted on 20 of the three weeks
    released (a config of the forger's own), one of an origin a day before the series' latest window relabelled as
    read at the later releases_version (its id does not name the version)."""
    shorter = quick.path.with_name("shorter.toml")
    shorter.write_text(quick.path.read_text() + 'history = "20d"\n')
    cut = run_forecasts(load_config(shorter), horizon="24h", now=ISSUED).outcomes[0].forecast
    assert cut is not None and cut.params["history_windows"] == 480
    assert _why_not(quick, cut.forecast_id) == ("its history of 480 windows starts at 2026-01-02T00:00Z, but its "
                                                "series was released from 2026-01-01T00:00Z: a forecast is fitted on "
                                                "the configured history where the releases hold it")
    genuine = run_forecasts(quick.config, horizon="24h", now=ISSUED).outcomes[0].forecast
    assert genuine is not None
    hours = np.arange(21 * 24, 22 * 24)
    sds = np.full(hours.size, 1.0)
    quick.store.insert_new("releases", release_table(hours, released(hours, sds, seed=2), sds))
    rows = _latest(quick).filter(pc.equal(pc.field("forecast_id"), genuine.forecast_id))
    quick.store.insert_new("forecasts", _forged(rows, "releases_version", lambda v: [v[0] + 1] * len(v)))
    assert _why_not(quick, genuine.forecast_id) is None
    assert _why_not(quick, genuine.forecast_id, FORGED_AT) == (
        "its origin 2026-01-22T00:00Z is not the end of its series' verified releases at its releases_version (to "
        "2026-01-23T00:00Z): a forecast is made from its series' latest window, a backtest's windows are released")
