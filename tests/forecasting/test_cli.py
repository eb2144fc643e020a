"""`fusion forecast` and `fusion backtest` on the command line (in process, through `main`), the `[forecasting]`
config block, and the refresh that scheduled and stream releases run."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from forecasting.plot import plotted
from forecasting.refresh import refresh_forecasts
from fusion.api import forecast
from fusion.cli.core import main
from fusion.errors import ConfigError
from fusion.keys.registry import create_key_holder_key
from tests.conftest import publish_signed
from tests.forecasting.conftest import Federation, federation, release_table, released


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_backtest_then_forecast_with_a_plot(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(["backtest", "--config", str(fed.path), "--format", "json"], capsys)
    assert code == 0, out
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["model"] for r in rows] == ["uc", "seasonal_naive", "same_hour_mean"]
    assert sum(r["note"] == "chosen" for r in rows) == 1
    assert all(0 <= r["cov95"] <= 1 and r["mae_vs_snaive"] > 0 for r in rows)
    png = tmp_path / "plot.png"
    code, out = run(["forecast", "--config", str(fed.path), "--metric", "temp", "--region", "north", "--horizon",
                     "24h", "--plot", str(png)], capsys)
    assert code == 0, out
    text = " ".join(out.split())
    assert "24 forecast row(s) written to `forecasts`" in text and "no budget spent" in text
    assert "chosen" in text and f"plot: {png}" in text  # the note: "<model>: chosen by backtest, intervals x..."
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["forecast", "--horizon", "soon"], "'soon' is not a duration"),
        (["forecast", "--horizon", "30m"], "not a positive whole number of federation.window"),
        (["forecast", "--metric", "nope"], "unknown metric 'nope'"),
        (["forecast", "--region", "atlantis"], "unknown region 'atlantis'"),
        (["forecast", "--plot", "x.png"], "--plot draws one series"),
        (["backtest", "--origins", "1"], "a backtest needs at least 2"),
        (["forecast", "--statistic", "median"], "invalid choice"),
        (["forecast", "--horizon", "30000d"], "--horizon 30000d is longer than forecasting.history (28d)"),
        (["forecast", "--horizon", "100000d"], "--horizon: '100000d' is too long: at most 36600 days"),
        (["backtest", "--horizon", "29d"], "--horizon 29d is longer than forecasting.history (28d)"),
    ],
)
def test_mistakes_fail_in_one_clear_line(
    fed: Federation, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run([argv[0], "--config", str(fed.path), *argv[1:]], capsys)
    assert code in (1, 2) and "Traceback" not in out and message in " ".join(out.split()), out


def test_a_name_given_twice_is_one_series(fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    """A metric, region or statistic named twice is forecast (and backtested) once, as if named once: the
    series' rows were written twice in one commit, an internal error."""
    twice = ["--metric", "temp", "--metric", "temp", "--region", "north", "--region", "north", "--statistic", "sum",
             "--statistic", "sum", "--horizon", "24h", "--format", "json"]
    code, out = run(["forecast", "--config", str(fed.path), *twice], capsys)
    assert code == 0 and "Traceback" not in out, out
    assert [(r["metric"], r["statistic"], r["region"]) for r in map(json.loads, out.splitlines())] == [
        ("temp", "sum", "north")]
    code, out = run(["backtest", "--config", str(fed.path), *twice, "--origins", "2"], capsys)
    assert code == 0 and "Traceback" not in out, out
    assert [r["model"] for r in map(json.loads, out.splitlines())] == ["uc", "seasonal_naive", "same_hour_mean"]
    run_ = forecast(fed.path, metrics=["temp", "temp"], statistics=["mean", "mean"], horizon="24h")
    assert [str(o.key) for o in run_.outcomes] == ["temp mean north"] and run_.forecast_rows == 24


def test_releases_that_do_not_verify_are_left_out_and_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With a release-signing key registered, a forecast reads only releases `fusion verify` calls verified or
    legacy: rows appended under an unsigned release id (released later, so "the latest release counts") replaced
    the signed cells in the forecast, with nothing saying so."""
    fed = federation(tmp_path, forecasting='horizon = "24h"')
    hours = np.arange(4 * 24)
    rows = release_table(hours, released(hours, 1.0, seed=1), np.ones(hours.size))
    fed.store.insert_new("releases", rows.slice(0, 24))  # published before the key: legacy
    create_key_holder_key(fed.config, published=["r-temp-20260101"])
    publish_signed(fed.config, fed.store, rows.slice(24))
    honest = forecast(fed.path).outcomes[0].forecast
    assert honest is not None and honest.params["releases_verified"] is True
    assert honest.params["unverified_releases_skipped"] == 0 and len(honest.input_release_ids) == 4
    last = rows.slice(3 * 24)
    forged = last.set_column(0, "release_id", pa.array(["r-forged"] * 24)).set_column(
        last.schema.get_field_index("ratio_mean"), "ratio_mean", pc.add(last["ratio_mean"], 30.0)).set_column(
        last.schema.get_field_index("released_at"), "released_at",
        pc.add(last["released_at"], pa.scalar(timedelta(hours=1), pa.duration("us"))))
    fed.store.insert_new("releases", forged.cast(rows.schema))
    run_ = forecast(fed.path)
    after = run_.outcomes[0].forecast
    assert after is not None and run_.skipped_releases == {"r-forged": "tampered"}
    assert list(after.bands.mean) == pytest.approx(list(honest.bands.mean))
    assert "r-forged" not in after.input_release_ids
    assert after.params["unverified_releases_skipped"] == 1 and after.params["unverified_release_ids"] == ["r-forged"]
    code, out = run(["forecast", "--config", str(fed.path), "--format", "csv"], capsys)
    assert code == 0 and "left out 1 release(s) that `fusion verify` does not call verified or legacy: r-forged " \
        "(tampered)" in " ".join(out.split()), out
    shown = plotted(fed.config, "temp", "north", days=4)  # what `--plot` draws: the releases forecast, not r-forged's
    assert shown.releases["value"].to_pylist() == pytest.approx(rows["ratio_mean"].to_pylist())
    assert shown.skipped == {"r-forged": "tampered"}


def test_a_release_id_left_out_is_named_with_its_escape_codes_written_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The "left out" line printed a release id from the store raw: escape codes in it reached the terminal (and
    text in brackets was read as markup). It is written out as the tables write it."""
    fed = federation(tmp_path, forecasting='horizon = "24h"')
    hours = np.arange(2 * 24)
    rows = release_table(hours, released(hours, 1.0, seed=1), np.ones(hours.size))
    create_key_holder_key(fed.config)
    publish_signed(fed.config, fed.store, rows)
    evil = "r-\x1b[2A\x1b[2K[bold]x"
    fed.store.insert_new("releases", rows.slice(24, 1).set_column(0, "release_id", pa.array([evil])))
    code, out = run(["forecast", "--config", str(fed.path)], capsys)
    assert code == 0 and "\x1b" not in out, repr(out)
    assert "r-\\x1b[2A\\x1b[2K[bold]x (tampered)" in " ".join(out.split()), out


def test_a_registry_gone_missing_refuses_the_forecast_rather_than_reading_every_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing registry read as an empty one (no key registered: every release taken as it stands): with
    registry.toml removed, a forecast read a release rewritten after it was signed, with no "left out" line, while
    `fusion verify` said nothing could be verified. Now every reader refuses, naming the file; a registry holding
    no key still reads every release."""
    from fusion.api import unverified_releases
    from fusion.errors import FusionError

    fed = federation(tmp_path, forecasting='horizon = "24h"')
    hours = np.arange(2 * 24)
    rows = release_table(hours, released(hours, 1.0, seed=1), np.ones(hours.size))
    assert unverified_releases(fed.config) is None  # no key registered yet: nothing can be verified
    create_key_holder_key(fed.config)
    publish_signed(fed.config, fed.store, rows)
    fed.store.insert_new("releases", rows.slice(24, 1).set_column(0, "release_id", pa.array(["r-forged"])))
    assert unverified_releases(fed.config) == {"r-forged": "tampered"}
    registry = tmp_path / "registry.toml"
    registry.unlink()
    missing = f"the registry {registry} is missing: the store's releases cannot be checked"
    with pytest.raises(FusionError, match=re.escape(missing)):
        unverified_releases(fed.config)
    for command in ("forecast", "backtest", "verify"):
        code, out = run([command, "--config", str(fed.path)], capsys)
        assert code == 1 and missing in " ".join(out.split()) and "Traceback" not in out, (command, out)
    assert fed.store.version("forecasts") is None


def test_a_horizon_past_the_bound_writes_nothing(fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    """Each window ahead is a row per series in the append-only `forecasts`: a horizon past the history (or past
    MAX_HORIZON_WINDOWS) is refused before anything is read or written, and a forecast then runs as before."""
    code, out = run(["forecast", "--config", str(fed.path), "--horizon", "60d"], capsys)
    assert code == 1 and "--horizon 60d is longer than forecasting.history" in " ".join(out.split()), out
    assert fed.store.version("forecasts") is None
    code, out = run(["forecast", "--config", str(fed.path), "--horizon", "28d"], capsys)
    assert code == 0 and "672 forecast row(s) written" in " ".join(out.split()), out


def test_a_store_with_too_little_released_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fed = federation(tmp_path)
    code, out = run(["forecast", "--config", str(fed.path)], capsys)
    assert code == 1 and "no released windows of temp, load" in out and "release some first" in out
    hours = np.arange(30)
    fed.store.insert_new("releases", release_table(hours, released(hours, 1.0, seed=1), np.ones(30)))
    code, out = run(["backtest", "--config", str(fed.path)], capsys)
    assert code == 1 and "too short: a backtest needs" in " ".join(out.split())


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ('horizon = "90m"', "forecasting.horizon = '90m' is not a whole number of federation.window"),
        ('models = ["uc", "arima"]', "forecasting.models"),
        ('models = ["uc", "uc"]', "names one twice"),
        ('history = "2d"\nmin_history = "3d"', "forecasting.min_history 3d is longer than forecasting.history 2d"),
        # A history too short for any model says so, not that it is shorter than the default min_history (2d).
        ('history = "24h"\nhorizon = "12h"', "forecasting.history 24h is shorter than the 2 days a model is fitted"),
        ('refresh = "yes"', "forecasting.refresh: Input should be a valid boolean"),
        ('refresh = 1', "forecasting.refresh: Input should be a valid boolean"),
        ("backtest_origins = 1", "forecasting.backtest_origins"),
        ('statistics = ["p90"]', "forecasting.statistics"),
        ('history = "24h"\nmin_history = "24h"\nhorizon = "24h"',
         "forecasting.history 24h is shorter than the 2 days a model is fitted on at least (48 windows"),
        ('min_history = "36h"', "forecasting.min_history 36h is shorter than the 2 days"),
        ('horizon = "30d"', "forecasting.horizon 30d is longer than forecasting.history (28d)"),
        ('horizon = "121d"\nhistory = "200d"', "forecasting.horizon 121d is 2,904 windows of 1:00:00, over the most"),
    ],
)
def test_a_bad_forecasting_block_fails_at_load_naming_the_field(tmp_path: Path, block: str, field: str) -> None:
    with pytest.raises(ConfigError, match="invalid federation config") as caught:
        federation(tmp_path, forecasting=block)
    assert field in str(caught.value)


def test_a_refresh_forecasts_the_series_a_release_holds_only_when_the_config_asks(tmp_path: Path) -> None:
    """`fusion schedule` and `fusion stream` call refresh_forecasts with what they released: the series in it are
    forecast again (and earlier forecasts scored); without a [forecasting] block, or with refresh = false,
    nothing; a failure comes back as the line to show, never as an exception that would fail the release."""
    hours = np.arange(15 * 24)
    rows = release_table(hours, released(hours, 1.0, seed=1), np.ones(hours.size))
    plain = federation(tmp_path / "plain")
    plain.store.insert_new("releases", rows)
    assert refresh_forecasts(plain.config, ["r-temp-20260115"]) is None
    off = federation(tmp_path / "off", forecasting="refresh = false")
    assert refresh_forecasts(off.config, ["r-temp-20260115"]) is None
    on = federation(tmp_path / "on", forecasting='horizon = "24h"')
    on.store.insert_new("releases", rows)
    note = refresh_forecasts(on.config, ["r-temp-20260115"])
    assert note == "forecasts refreshed: 1 of 1 series, 24 row(s), 0 earlier window(s) scored"
    assert on.store.read("forecasts").num_rows == 24
    assert refresh_forecasts(on.config, ["r-not-in-the-store"]) is None
    short = federation(tmp_path / "short", forecasting='horizon = "24h"')
    short.store.insert_new("releases", rows.slice(0, 30))
    assert (refresh_forecasts(short.config, ["r-temp-20260101", "r-temp-20260102"]) or "").startswith(
        "forecasts not refreshed: no series could be forecast")
