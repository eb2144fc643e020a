"""The demo's mechanisms: gridco's feeder load follows the real demand data shipped in statsmodels, the demo
federation carries case5 with its buses mapped to regions, an operator and an authority; and the demo's last step
recommends a dispatch from forecasts and ratifies it (no pipeline run: releases are inserted, signed, and forecast)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from forecasting.run import run_forecasts
from fusion.demo.data import INSTITUTIONS, LOAD_METRIC, STATIONS, load_series, load_station, regional_load
from fusion.demo.federation import DEMO_BUSES, DEMO_START, build_demo
from fusion.store.delta import Store
from mechanisms.network import load_network
from tests.conftest import publish_signed
from tests.forecasting.conftest import release_table


def test_gridcos_feeder_load_follows_the_real_demand_shape() -> None:
    from fusion.demo.data import sensor_readings

    shape = load_series()
    assert shape.size == 3600 and shape.mean() == pytest.approx(1.0)
    gridco = next(spec for spec in INSTITUTIONS if spec.id == "gridco")
    assert LOAD_METRIC in gridco.metrics
    stations = {name: load_station(name) for name in STATIONS}
    table = sensor_readings(gridco, DEMO_START, stations)
    table = table.filter(pc.equal(table.column("quantity"), LOAD_METRIC))
    east = table.filter(pc.equal(table.column("zone"), "nc-triad-east"))
    values = np.array(east.column("value").to_pylist()).reshape(30, -1)  # 30 feeders x 96 readings
    hours = np.arange(96) / 4 - 5  # local (UTC-5) hour of the year at each 15-minute reading
    local_year = hours >= 0  # the first 5 hours are still 2025 locally, read from the series' other end
    np.testing.assert_allclose(values.mean(axis=0)[local_year],
                               regional_load("nc-triad-east", hours[local_year], shape), atol=0.2)


def test_the_demo_step_recommends_a_dispatch_from_forecasts_and_ratifies_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fusion.cli.demo_steps import dispatch_step
    from fusion.config.federation import load_config

    config_path = build_demo(tmp_path / "demo", days=1)
    config = load_config(config_path, check_release=False)
    assert config.mechanisms is not None and config.mechanisms.load_metric == LOAD_METRIC
    network = load_network(tmp_path / "demo" / "network.toml")
    assert {b.id: (b.region, b.scale) for b in network.buses if b.region} == DEMO_BUSES
    store = Store(config.store_path)
    # Two days of the feeder load, 4 MW a feeder but 5 MW at 21:00, released as the key holder signs them; the
    # forecasts of the next day are `fusion forecast`'s, so they replay (a row merely inserted would not).
    regions = [region for region, _ in DEMO_BUSES.values()]
    hours = np.arange(48)
    level = np.where(hours % 24 == 21, 5.0, 4.0)
    publish_signed(config, store, pa.concat_tables([
        release_table(hours, level, np.full(hours.size, 0.01), metric=LOAD_METRIC, region=region)
        for region in regions]))
    run_forecasts(config, metrics=[LOAD_METRIC], regions=regions, horizon="24h")
    # A row appended to `forecasts` without `fusion forecast`, east at 50 MW a feeder at 10:00, does not replay:
    # it does not choose the peak hour, as it gives no load.
    forged = store.read("forecasts").filter((pc.field("region") == "nc-triad-east") & (pc.field("horizon") == 11))
    forged = forged.set_column(forged.schema.get_field_index("mean"), "mean", pa.array([50.0]))
    forged = forged.set_column(forged.schema.get_field_index("issued_at"), "issued_at",
                               pc.add(forged.column("issued_at"), pa.scalar(timedelta(hours=1))))
    store.insert_new("forecasts", forged)
    dispatch_step(config_path, released=2)
    out = capsys.readouterr().out
    assert "case5 for 2026-01-03 21:00Z" in out and "LMPs ($/MWh)" in out
    assert "ratified by grid-operator (duty-officer, 1 of 1 signature)" in out
    decisions = store.read("decisions").to_pylist()
    assert [(d["action"], d["outcome"], d["authority"]) for d in decisions] == [("ratify", "recorded",
                                                                                   "grid-operator")]
    loads = {r["item_key"]: r["value"] for r in store.read("recommendations").to_pylist()
             if r["item_type"] == "load_mw"}
    assert loads == pytest.approx({"A": 0.0, "B": 240.0, "C": 240.0, "D": 550.0, "E": 0.0}, rel=1e-3)  # 5 MW x 48,
    # 48 and 110
