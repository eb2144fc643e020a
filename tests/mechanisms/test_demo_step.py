"""The demo's mechanisms: gridco's feeder load follows the real demand data shipped in statsmodels, the demo
federation carries case5 with its buses mapped to regions, an operator and an authority; and the demo's last step
recommends a dispatch from forecasts and ratifies it (no pipeline run: forecast rows are inserted)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from fusion.demo.data import INSTITUTIONS, LOAD_METRIC, STATIONS, load_series, load_station, regional_load
from fusion.demo.federation import DEMO_BUSES, DEMO_START, build_demo
from fusion.store.delta import Store
from mechanisms.network import load_network
from tests.mechanisms.conftest import forecast_rows


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
    day = DEMO_START + timedelta(days=1)
    store = Store(config.store_path)
    for hour, level in ((17, 4.0), (21, 5.0)):  # 21:00 is the peak of what is forecast
        store.insert_new("forecasts", forecast_rows(
            {region: (level, 0.1) for region, _ in DEMO_BUSES.values()}, at=day + timedelta(hours=hour),
            metric=LOAD_METRIC, forecast_id=f"fc-{hour}"))
    dispatch_step(config_path, released=1)
    out = capsys.readouterr().out
    assert "case5 for 2026-01-02 21:00Z" in out and "LMPs ($/MWh)" in out
    assert "ratified by grid-operator (duty-officer, 1 of 1 signature)" in out
    decisions = store.read("decisions").to_pylist()
    assert [(d["action"], d["outcome"], d["authority"]) for d in decisions] == [("ratify", "recorded",
                                                                                   "grid-operator")]
    loads = {r["item_key"]: r["value"] for r in store.read("recommendations").to_pylist()
             if r["item_type"] == "load_mw"}
    assert loads == {"A": 0.0, "B": 240.0, "C": 240.0, "D": 550.0, "E": 0.0}  # 5 MW x 48, 48 and 110
