"""`fusion forecast` and `fusion backtest` over a real store: what they write, what they read, and the Python API
that reads the forecasts back."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from forecasting.intervals import Z95
from forecasting.run import run_backtests, run_forecasts
from fusion.api import DERIVED_TABLES, open_store, write_derived
from fusion.config.forecasting import ModelName, Statistic
from fusion.errors import FusionError
from schemas.tables import TABLE_SCHEMAS
from tests.forecasting.conftest import T0, Federation, federation, release_table, released


def test_a_forecast_is_written_with_its_intervals_and_what_it_read(fed: Federation) -> None:
    run = run_forecasts(fed.config)
    assert run.forecast_rows == 48 and run.score_rows == 0
    rows = fed.store.read("forecasts")
    assert rows.num_rows == 48 and set(rows.column("purpose").to_pylist()) == {"forecast"}
    first = rows.slice(0, 1).to_pylist()[0]
    assert first["model"] == "uc" and first["calibration_factor"] == 1.0 and first["horizon"] == 1
    assert first["origin"] == first["window_start"] == T0 + timedelta(days=21)
    assert first["releases_version"] == fed.store.version("releases")
    assert first["input_release_ids"] == [f"r-temp-{T0 + timedelta(days=d):%Y%m%d}" for d in range(21)]
    assert json.loads(first["params"])["selected_by"].startswith("default")
    assert json.loads(first["params"])["releases_verified"] is False  # no release-signing key: nothing verified
    mean, sd, noise = (np.array(rows.column(c).to_pylist()) for c in ("mean", "sd", "noise_sd"))
    assert np.allclose(noise, 1.0)  # the median noise SD of recent cells
    assert np.allclose(np.array(rows.column("ci95_high").to_pylist()) - mean, Z95 * sd)
    assert np.allclose(np.array(rows.column("release_sd").to_pylist()) ** 2, sd**2 + noise**2)
    # Issued again with nothing new released: the same forecast, already there, adds nothing.
    assert run_forecasts(fed.config).forecast_rows == 0


def test_a_forecast_fitted_on_another_history_of_the_same_releases_is_another_forecast(tmp_path: Path) -> None:
    """With weekly releases, histories of 28 and 22 days read the same four releases: the forecast_id left the
    history out, so the 22-day forecast (other numbers) was taken for the 28-day one already issued and dropped,
    and the store's latest forecast was not the one the run returned."""
    long = federation(tmp_path, forecasting='history = "28d"\nhorizon = "24h"')
    hours = np.arange(35 * 24)
    sds = np.ones(hours.size)
    weekly = release_table(hours, released(hours, sds, seed=3), sds)
    weekly = weekly.set_column(0, "release_id", pa.array([f"r-week{h // (7 * 24)}" for h in hours]))
    long.store.insert_new("releases", weekly)
    first = run_forecasts(long.config).outcomes[0].forecast
    short = federation(tmp_path, forecasting='history = "22d"\nhorizon = "24h"')  # the same store
    run = run_forecasts(short.config)
    second = run.outcomes[0].forecast
    assert first is not None and second is not None
    assert first.input_release_ids == second.input_release_ids == ["r-week1", "r-week2", "r-week3", "r-week4"]
    assert (first.params["history_windows"], second.params["history_windows"]) == (28 * 24, 22 * 24)
    assert second.forecast_id != first.forecast_id and run.forecast_rows == 24
    with open_store(short.config) as store:
        latest = store.forecasts("temp", "north").to_pylist()
    assert {row["forecast_id"] for row in latest} == {second.forecast_id}
    assert [row["mean"] for row in latest] == pytest.approx(list(second.bands.mean))


def test_an_earlier_forecast_issued_again_is_the_latest_again(fed: Federation) -> None:
    """24h, then 12h, then 24h again, nothing released between: the third run's forecast was issued first, so it
    was dropped as already there, and the store's latest forecast stayed the 12-hour one the third run replaced.
    Issued again, its rows are appended under the new issued_at; issued a fourth time it is the latest already."""
    first, second, third, fourth = (T0 + timedelta(days=22, hours=h) for h in range(4))
    a = run_forecasts(fed.config, horizon="24h", now=first)
    b = run_forecasts(fed.config, horizon="12h", now=second)
    again = run_forecasts(fed.config, horizon="24h", now=third)
    ids = [run.outcomes[0].forecast.forecast_id for run in (a, b, again)]  # type: ignore[union-attr]
    assert ids[0] == ids[2] != ids[1]
    assert again.forecast_rows == 24 and again.outcomes[0].issued_before == first
    assert "issued again (first at 2026-01-23 00:00:00Z)" in again.outcomes[0].note
    with open_store(fed.config) as store:
        latest = store.forecasts("temp", "north")
        every = store.forecasts(latest=False)
    assert set(latest.column("forecast_id").to_pylist()) == {ids[0]} and latest.num_rows == 24
    assert set(latest.column("issued_at").to_pylist()) == {third}
    assert every.num_rows == 24 + 12 + 24  # every issue kept
    same = run_forecasts(fed.config, horizon="24h", now=fourth)
    assert same.forecast_rows == 0 and not same.outcomes[0].written
    assert "already issued at 2026-01-23 02:00:00Z, the series' latest: not written again" in same.outcomes[0].note
    hours = np.arange(21 * 24, 22 * 24)  # the windows forecast
    fed.store.insert_new("releases", release_table(hours, released(hours, np.ones(hours.size), seed=2),
                                                   np.ones(hours.size)))
    assert run_forecasts(fed.config, horizon="24h").score_rows == 24 + 12  # each forecast's windows, once
    assert run_backtests(fed.config, origins=2, horizon="24h").forecast_rows > 0
    again_backtest = run_backtests(fed.config, origins=2, horizon="24h")
    assert (again_backtest.forecast_rows, again_backtest.score_rows) == (0, 0)  # recorded once


def test_the_backtest_records_each_origin_and_the_choice_a_forecast_then_uses(fed: Federation) -> None:
    backtest = run_backtests(fed.config)
    (outcome,) = backtest.outcomes
    assert {str(s.model) for s in outcome.scores} == {"uc", "seasonal_naive", "same_hour_mean"}
    # uc (listed first) is kept unless another model's MAE is more than 10% lower (selection_margin) and its
    # squared errors are lower origin by origin (selection_t; forecasting.backtest.preferred): with four origins
    # of simulated releases, uc stays.
    mae = {s.model: s.mae for s in outcome.scores}
    expected = ModelName.UC
    assert outcome.chosen is expected and outcome.note.startswith(f"chooses {expected}")
    assert mae[ModelName.UC] < 1.5 * min(mae.values())
    best = next(s for s in outcome.scores if s.model is expected)
    assert backtest.forecast_rows == backtest.score_rows == 3 * 4 * 48
    with open_store(fed.config) as store:
        origins = store.sql("SELECT model, count(DISTINCT origin) AS n, arg_min(calibration_factor, origin) AS first "
                            "FROM forecasts WHERE purpose = 'backtest' GROUP BY model ORDER BY model").to_pylist()
    assert [(o["n"], o["first"]) for o in origins] == [(4, 1.0)] * 3  # the first origins: nothing to learn from
    run = run_forecasts(fed.config)
    issued = run.outcomes[0].forecast
    assert issued is not None and issued.model is best.model
    assert issued.factor == pytest.approx(best.factor) and issued.factor != 1.0
    assert json.loads(fed.store.read("forecasts").filter(
        pa.compute.equal(fed.store.read("forecasts").column("purpose"), "forecast")
    ).column("params")[0].as_py())["backtest_mae"].keys() == {"uc", "seasonal_naive", "same_hour_mean"}


def test_forecasts_are_scored_once_their_windows_are_released(fed: Federation) -> None:
    run_forecasts(fed.config)
    hours = np.arange(21 * 24, 22 * 24)  # the next day is released; three of its cells withheld
    sds = np.full(hours.size, 1.0)
    withheld = np.isin(hours % 24, [3, 4, 5])
    fed.store.insert_new("releases", release_table(hours, released(hours, sds, seed=2), sds, withheld=withheld))
    second = run_forecasts(fed.config)
    assert second.score_rows == 24 and second.forecast_rows == 48
    scores = fed.store.read("forecast_scores").sort_by("window_start").to_pylist()
    assert [s["horizon"] for s in scores] == list(range(1, 25))
    assert [s["value"] is None for s in scores] == list(withheld)  # withheld: scored as such, never as zero
    first = fed.store.read("forecasts").sort_by([("issued_at", "ascending"), ("window_start", "ascending")])
    for score, forecast in zip(scores, first.to_pylist(), strict=False):
        if score["value"] is None:
            assert score["covered95"] is None and score["error"] is None
            continue
        assert score["error"] == pytest.approx(score["value"] - forecast["mean"])
        assert score["z"] == pytest.approx(score["error"] / forecast["release_sd"])
        assert score["covered95"] == (forecast["release_ci95_low"] <= score["value"] <= forecast["release_ci95_high"])
    assert np.mean([s["covered95"] for s in scores if s["covered95"] is not None]) > 0.8
    assert run_forecasts(fed.config).score_rows == 0  # scored once


def test_the_api_returns_each_series_latest_forecast_as_arrow_and_pandas(fed: Federation) -> None:
    run_forecasts(fed.config, horizon="24h")
    hours = np.arange(21 * 24, 22 * 24)
    fed.store.insert_new("releases", release_table(hours, released(hours, np.ones(hours.size), seed=2),
                                                   np.ones(hours.size)))
    run_forecasts(fed.config, horizon="24h")
    with open_store(fed.config) as store:
        latest = store.forecasts("temp", "north")
        every = store.forecasts(latest=False)
        frame = store.forecasts_pandas(region="north")
        none = store.forecasts("temp", "south")
    assert latest.num_rows == 24 and every.num_rows == 48
    assert set(latest.column("origin").to_pylist()) == {T0 + timedelta(days=22)}
    assert latest.schema == TABLE_SCHEMAS["forecasts"]
    assert len(frame) == 24 and list(frame.columns) == TABLE_SCHEMAS["forecasts"].names
    assert none.num_rows == 0


def test_sum_and_count_series_are_forecast_with_their_own_noise(fed: Federation) -> None:
    run = run_forecasts(fed.config, statistics=[Statistic.SUM, Statistic.COUNT], horizon="24h")
    assert sorted(str(o.key.statistic) for o in run.outcomes) == ["count", "sum"]
    with open_store(fed.config) as store:
        count = store.forecasts("temp", "north", statistic="count").to_pylist()
        total = store.forecasts("temp", "north", statistic="sum").to_pylist()
    assert count[0]["unit"] == "readings" and count[0]["noise_sd"] == pytest.approx(2.0)  # count_sd
    assert count[0]["mean"] == pytest.approx(100.0, abs=1.0)
    assert total[0]["unit"] == "degC" and total[0]["noise_sd"] == pytest.approx(20.0)  # sum_sd


def test_a_series_too_short_and_an_unknown_name_are_refused_clearly(tmp_path: Path) -> None:
    short = federation(tmp_path)
    hours = np.arange(30)
    short.store.insert_new("releases", release_table(hours, released(hours, 1.0, seed=1), np.ones(30)))
    with pytest.raises(FusionError, match=r"no series could be forecast \(temp mean north: too short: 30 released "
                                          r"window\(s\) in the history; a forecast needs at least 48"):
        run_forecasts(short.config)
    with pytest.raises(FusionError, match="no series could be backtested"):
        run_backtests(short.config)
    with pytest.raises(FusionError, match="unknown metric 'tmp'; the config declares: temp, load"):
        run_forecasts(short.config, metrics=["tmp"])
    with pytest.raises(FusionError, match="no released windows of load in north"):
        run_forecasts(short.config, metrics=["load"], regions=["north"])
    with pytest.raises(FusionError, match=r"^horizon 90m is not a positive whole number of federation\.window"):
        run_forecasts(short.config, horizon="90m")


@contextmanager
def opened_paths() -> Iterator[list[str]]:
    """The paths Python code opens or lists while the block runs (an audit hook; Arrow's and Delta's native
    reads are the store's own files)."""
    seen: list[str] = []
    _RECORDERS.append(seen)
    try:
        yield seen
    finally:
        _RECORDERS.remove(seen)


_RECORDERS: list[list[str]] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _RECORDERS and event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], str | Path):
        for recorder in _RECORDERS:
            recorder.append(str(args[0]))


sys.addaudithook(_audit)


def test_a_forecast_reads_only_the_store_and_writes_only_its_two_tables(fed: Federation) -> None:
    """The federation's keys, exchange and feeds lie beside the store: the backtest and forecast open and list
    nothing outside the store but the registry (its public release-signing key, to read only verified releases:
    fusion.api.verify) (Python's file opens, watched by an audit hook; the store's Delta files are read natively),
    create nothing beside it, and of the store's tables only `forecasts` and `forecast_scores` gain versions,
    through fusion.api's write_derived (which refuses any other table)."""
    fed.store.ensure_tables()
    root = fed.path.parent
    for private in ("keys/he_secret.ctx", "exchange/he_public.ctx", "feeds/alpha/day.parquet"):
        (root / private).parent.mkdir(parents=True, exist_ok=True)
        (root / private).write_text("not for forecasting")
    listing = sorted(str(p.relative_to(root)) for p in root.rglob("*") if "store" not in p.parts)
    before = {name: fed.store.version(name) for name in TABLE_SCHEMAS}
    with opened_paths() as paths:
        run_backtests(fed.config)
        run_forecasts(fed.config)
    after = {name: fed.store.version(name) for name in TABLE_SCHEMAS}
    changed = {name for name in TABLE_SCHEMAS if after[name] != before[name]}
    assert changed == DERIVED_TABLES == {"forecasts", "forecast_scores"}
    store = Path(fed.config.store_path).resolve()
    outside = [p for p in paths if Path(p).resolve().is_relative_to(root.resolve())
               and not Path(p).resolve().is_relative_to(store)]
    assert set(outside) <= {str(root / "registry.toml")}
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if "store" not in p.parts) == listing
    with pytest.raises(FusionError, match="'releases' is not a derived table"):
        write_derived(fed.config, "releases", fed.store.read("releases"))


def test_a_model_consistently_better_than_the_first_is_chosen_from_the_store(tmp_path: Path) -> None:
    # seasonal naive listed first: it carries two cells' noise (SD 1 each), the daily profile averages it away at
    # every origin, so the backtest (paired test included) and the forecast reading it back both choose profile.
    # Ten origins a day apart: 48 h forecasts from neighbouring origins share a day, which the paired test allows
    # for (with six it could no longer tell: t -1.7, -2.5 had the overlap been ignored).
    made = federation(tmp_path, forecasting='models = ["seasonal_naive", "profile"]\nbacktest_origins = 10')
    hours = np.arange(21 * 24)
    sds = np.full(hours.size, 1.0)
    made.store.insert_new("releases", release_table(hours, released(hours, sds, seed=4), sds))
    (outcome,) = run_backtests(made.config).outcomes
    assert outcome.chosen is ModelName.PROFILE, outcome.note
    issued = run_forecasts(made.config).outcomes[0].forecast
    assert issued is not None and issued.model is ModelName.PROFILE
    forecasts = made.store.read("forecasts")
    params = json.loads(forecasts.filter(pa.compute.equal(forecasts.column("purpose"), "forecast")).column("params")[0]
                        .as_py())
    assert "paired t <= -2" in params["selected_by"]


def test_the_api_refuses_a_horizon_past_the_history_naming_it(fed: Federation) -> None:
    from fusion.api import forecast

    with pytest.raises(FusionError, match=r"^horizon 60d is longer than forecasting.history \(28d\)"):
        forecast(fed.path, horizon="60d")
    assert fed.store.version("forecasts") is None


def test_scoring_reads_only_the_released_windows_of_earlier_forecasts(tmp_path: Path) -> None:
    """A long forecast issued earlier stays in the append-only store; scoring the next forecast reads only its
    windows released since, not the rest of it nor the releases each row read (under a [sql] max_rows below the
    earlier forecast's 672 rows, which a forecast reading all of it would exceed)."""
    made = federation(tmp_path)
    hours = np.arange(21 * 24)
    sds = np.full(hours.size, 1.0)
    made.store.insert_new("releases", release_table(hours, released(hours, sds, seed=1), sds))
    assert run_forecasts(made.config, metrics=["temp"], horizon="28d").forecast_rows == 672
    made.path.write_text(made.path.read_text() + "\n[sql]\nmax_rows = 600\n")
    more = np.arange(21 * 24, 22 * 24)
    made.store.insert_new("releases", release_table(more, released(more, sds[:24], seed=2), sds[:24]))
    from fusion.config.federation import load_config

    run = run_forecasts(load_config(made.path), metrics=["temp"])
    assert run.score_rows == 24 and run.forecast_rows == 48


def test_forecasting_reads_a_few_series_at_a_time_under_the_sql_row_limit(tmp_path: Path) -> None:
    """`[sql] max_rows` bounds people's ad-hoc queries, not forecasting's own reads: three regions' releases (504
    to 528 rows each) and backtests (two backtests' five origins, of which a forecast reads the latest four: 576 rows
    a region) are read a group of series at a time, each under a limit of 700 rows that all of them together, or all
    of a region's backtests ever recorded, pass. Where one series alone is past the limit, the refusal names the
    forecasting setting, never `fusion sql`."""
    made = federation(tmp_path, forecasting='models = ["profile", "seasonal_naive", "same_hour_mean"]\n'
                                            "backtest_origins = 4")
    text = made.path.read_text()
    made.path.write_text(text + "\n[sql]\nmax_rows = 700\n")
    from fusion.config.federation import load_config

    config = load_config(made.path)
    sds = np.ones(24)
    for day in range(22):
        hours = np.arange(day * 24, (day + 1) * 24)
        for region in ("north", "south", "east"):
            made.store.insert_new("releases", release_table(hours, released(hours, sds, seed=day, region=region), sds,
                                                            region=region))
        if day in (20, 21):
            assert run_backtests(config, metrics=["temp"]).score_rows > 0
    run = run_forecasts(config, metrics=["temp"])
    assert run.forecast_rows == 3 * 48
    basis = json.loads(made.store.read("forecasts").to_pylist()[0]["params"])
    assert len(basis["backtest_origins"]) == 4 and basis["calibrated"]
    made.path.write_text(text + "\n[sql]\nmax_rows = 300\n")
    with pytest.raises(FusionError) as refused:
        run_forecasts(load_config(made.path), metrics=["temp"])
    assert "history" in str(refused.value) and "[forecasting]" in str(refused.value)
    assert "fusion sql" not in str(refused.value)


def test_a_forecast_expects_each_window_its_own_noise(tmp_path: Path) -> None:
    """Cells at night (00-05) carry mean_sd 4.0 (few readings), by day 0.4: each forecast window's noise_sd is that
    of the same hour's recent releases, and its release interval is wide at night and narrow by day."""
    made = federation(tmp_path)
    hours = np.arange(21 * 24)
    sds = np.where(hours % 24 < 6, 4.0, 0.4)
    made.store.insert_new("releases", release_table(hours, released(hours, sds, seed=1), sds))
    run_forecasts(made.config, metrics=["temp"])
    rows = made.store.read("forecasts").to_pylist()
    night = [r for r in rows if r["window_start"].hour < 6]
    day = [r for r in rows if r["window_start"].hour >= 6]
    assert {round(r["noise_sd"], 6) for r in night} == {4.0} and {round(r["noise_sd"], 6) for r in day} == {0.4}
    assert min(r["release_ci95_high"] - r["release_ci95_low"] for r in night) > 2 * Z95 * 4.0
    assert max(r["release_ci95_high"] - r["release_ci95_low"] for r in day) < 2 * Z95 * 4.0
