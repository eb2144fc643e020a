"""Demo federation data built from real public weather records that ship inside the `pvlib` package.

Source (real): the two NREL TMY3 hourly files bundled in pvlib's data directory (BSD-3-Clause package; the
TMY3 data are a US government work): 723170 Greensboro NC and 703165 Sand Point AK. We use their hourly
global horizontal irradiance, dry-bulb temperature, relative humidity and wind speed, keyed by month, day and
hour (TMY3 rows are a "typical year" stitched from several years; we place them in the demo year).

Modelled (synthetic, labelled as such in the README and in demo/README.txt): the many sensors per institution.
Each sensor's reading is the station's hourly value linearly interpolated to the sensor's sampling time, plus
a fixed per-sensor bias and independent measurement noise, rounded to the metric's resolution. A few
deliberately broken rows are added to one feed so the dead-letter path has something to show.

Electric load (real shape, modelled feeders): the utility's feeder meters follow the hourly electricity demand of
Victoria, Australia (AEMO's operational demand, 2012, as aggregated hourly in the `vic_elec` data set of R's
tsibbledata), which ships inside the `statsmodels` package (statsmodels/tsa/stl/tests/results/mstl_elec_vic.csv,
150 days from 2012-01-01). Each region's feeders follow it by the region's local day of year and hour, scaled to
a mean feeder load of LOAD_MEAN_MW x the region's LOAD_FACTORS (modelled), plus a per-feeder bias and noise.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

STATIONS = {  # file in pvlib/data, UTC offset of its local standard time (hours)
    "greensboro": ("723170TYA.CSV", -5),
    "sandpoint": ("703165TY.csv", -9),
}
TMY_COLUMNS = {
    "ghi": "GHI (W/m^2)",
    "air_temp": "Dry-bulb (C)",
    "humidity": "RHum (%)",
    "wind_speed": "Wspd (m/s)",
}
REGIONS = {  # public region -> (station, synthetic regional offset per metric)
    "nc-triad-east": ("greensboro", {"air_temp": 0.4, "humidity": -1.0, "wind_speed": 0.3, "ghi": 0.0}),
    "nc-triad-west": ("greensboro", {"air_temp": -0.6, "humidity": 2.0, "wind_speed": -0.2, "ghi": -10.0}),
    "ak-sandpoint-harbor": ("sandpoint", {"air_temp": 0.5, "humidity": 1.0, "wind_speed": 1.0, "ghi": 0.0}),
    "ak-sandpoint-ridge": ("sandpoint", {"air_temp": -1.2, "humidity": -2.0, "wind_speed": 2.0, "ghi": 5.0}),
}
RESOLUTION = {"ghi": 1.0, "air_temp": 0.1, "humidity": 0.1, "wind_speed": 0.1, "electric_load": 0.01}
LIMITS = {
    "ghi": (0.0, 1500.0),
    "air_temp": (-80.0, 60.0),
    "humidity": (0.0, 100.0),
    "wind_speed": (0.0, 75.0),
    "electric_load": (0.0, 50.0),
}
SENSOR_SPREAD = {"ghi": (15.0, 8.0), "air_temp": (0.5, 0.3), "humidity": (2.0, 1.0), "wind_speed": (0.4, 0.5),
                 "electric_load": (0.3, 0.1)}
#: The utility's feeder load (MW per feeder meter): real demand shape, modelled scale (see the module docstring).
LOAD_METRIC = "electric_load"
LOAD_FILE = ("statsmodels", "tsa/stl/tests/results/mstl_elec_vic.csv")
LOAD_MEAN_MW = 5.0
LOAD_FACTORS = {"nc-triad-east": 1.0, "nc-triad-west": 0.95, "ak-sandpoint-harbor": 0.6, "ak-sandpoint-ridge": 0.4}


@dataclass(frozen=True)
class InstitutionSpec:
    id: str
    kind: str
    metrics: tuple[str, ...]
    sensors_per_region: int
    every_minutes: int
    format: str  # parquet | csv | jsonl
    columns: dict[str, str]  # reading field -> column name in this institution's files
    time_format: str = "iso"


INSTITUTIONS = (
    InstitutionSpec(
        "gridco",
        "electric utility (rooftop PV irradiance sensors, feeder load meters)",
        ("ghi", LOAD_METRIC),
        30,
        15,
        "parquet",
        {
            "entity_id": "site_id",
            "region": "zone",
            "metric": "quantity",
            "event_time": "measured_at",
            "value": "value",
        },
    ),
    InstitutionSpec(
        "metservice",
        "national weather service (automatic stations)",
        ("air_temp", "humidity", "wind_speed"),
        8,
        10,
        "csv",
        {
            "entity_id": "station",
            "region": "region",
            "metric": "element",
            "event_time": "obs_time",
            "value": "obs_value",
            "sensor_id": "instrument",
        },
    ),
    InstitutionSpec(
        "cityworks",
        "city agency (street-furniture sensors)",
        ("air_temp", "humidity"),
        20,
        15,
        "jsonl",
        {
            "entity_id": "device",
            "region": "district",
            "metric": "metric",
            "event_time": "ts_ms",
            "value": "reading",
        },
        time_format="epoch_ms",
    ),
    InstitutionSpec(
        "portlogix",
        "logistics firm (truck-mounted sensors)",
        ("air_temp", "wind_speed"),
        15,
        15,
        "parquet",
        {"entity_id": "vehicle", "region": "area", "metric": "kind", "event_time": "ts", "value": "reading"},
    ),
)


def pvlib_data_dir() -> Path:
    spec = importlib.util.find_spec("pvlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo needs the pvlib package (it ships the TMY3 weather files); run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_station(station: str) -> dict[str, np.ndarray]:
    """Hourly series of one station: 'hour_of_year' (0..8759, local standard time) and each metric."""
    filename, _ = STATIONS[station]
    table = pacsv.read_csv(pvlib_data_dir() / filename, read_options=pacsv.ReadOptions(skip_rows=1))
    dates = table.column("Date (MM/DD/YYYY)").to_pylist()
    hours = np.array([int(t.split(":")[0]) for t in table.column("Time (HH:MM)").to_pylist()])
    day_of_year = np.array([datetime(2026, int(d[:2]), int(d[3:5])).timetuple().tm_yday for d in dates])
    series = {"hour_of_year": (day_of_year - 1) * 24 + hours - 1}
    for metric, column in TMY_COLUMNS.items():
        series[metric] = table.column(column).to_numpy().astype(float)
    return series


@functools.lru_cache(maxsize=1)
def load_series() -> np.ndarray:
    """Victoria's hourly electricity demand (3,600 hours from 2012-01-01 00:00 local time) divided by its mean: the
    shape the demo's feeder loads follow."""
    spec = importlib.util.find_spec(LOAD_FILE[0])
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo needs the statsmodels package (it ships the load data); run `make setup`")
    path = Path(next(iter(spec.submodule_search_locations))) / LOAD_FILE[1]
    demand = pacsv.read_csv(path).column("y").to_numpy().astype(float)
    return demand / demand.mean()


def regional_load(region: str, hour_of_year: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """A region's mean feeder load (MW) at fractional local hours of the year: the demand shape by the same day
    of year and hour (periodic over its 150 days), times the region's modelled scale."""
    return LOAD_MEAN_MW * LOAD_FACTORS[region] * np.interp(hour_of_year, np.arange(shape.size), shape,
                                                           period=shape.size)


def _rng(*labels: str) -> np.random.Generator:
    digest = hashlib.sha256("|".join(labels).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))  # demo data only, not noise


def sensor_readings(spec: InstitutionSpec, day: datetime, stations: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """One UTC day of an institution's readings, in its own column names."""
    steps = 24 * 60 // spec.every_minutes
    times = np.array([day + timedelta(minutes=spec.every_minutes * i) for i in range(steps)])
    columns: dict[str, list[object]] = {c: [] for c in spec.columns.values()}
    for region, (station, offsets) in REGIONS.items():
        series = stations[station]
        _, utc_offset = STATIONS[station]
        # Fractional hour of the (typical) year in the station's local standard time at each sampling time.
        local = [(t + timedelta(hours=utc_offset)) for t in times]
        hour = np.array([(lt.timetuple().tm_yday - 1) * 24 + lt.hour + lt.minute / 60 for lt in local])
        for metric in spec.metrics:
            if metric == LOAD_METRIC:
                base = regional_load(region, hour, load_series())
            else:
                base = np.interp(hour, series["hour_of_year"], series[metric], period=8760) + offsets[metric]
            bias_sd, noise_sd = SENSOR_SPREAD[metric]
            rng = _rng(spec.id, region, metric, day.isoformat())
            bias = _rng(spec.id, region, metric).normal(0, bias_sd, size=spec.sensors_per_region)
            for s in range(spec.sensors_per_region):
                value = base + bias[s] + rng.normal(0, noise_sd, size=steps)
                if metric == "ghi":
                    value = np.where(base <= 0, 0.0, value)  # night: sensors read zero
                low, high = LIMITS[metric]
                value = np.clip(np.round(value / RESOLUTION[metric]) * RESOLUTION[metric], low, high)
                entity = f"{spec.id}-{region}-{s:03d}"
                columns[spec.columns["entity_id"]] += [entity] * steps
                columns[spec.columns["region"]] += [region] * steps
                columns[spec.columns["metric"]] += [metric] * steps
                columns[spec.columns["value"]] += np.round(value, 6).tolist()
                if spec.time_format == "epoch_ms":
                    columns[spec.columns["event_time"]] += [int(t.timestamp() * 1000) for t in times]
                elif spec.format == "parquet":
                    columns[spec.columns["event_time"]] += list(times)
                else:
                    columns[spec.columns["event_time"]] += [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in times]
                if "sensor_id" in spec.columns:
                    columns[spec.columns["sensor_id"]] += [f"{entity}/{metric}"] * steps
    return pa.table(columns)


def faulty_rows(spec: InstitutionSpec, day: datetime) -> list[dict[str, object]]:
    """Deliberately broken rows (synthetic), one per reason: they land in metservice's dead letters (and, for the
    published reasons, in its noisy tallies in `rejects`)."""
    c = spec.columns
    when = (day + timedelta(hours=12)).strftime("%Y-%m-%dT%H:%M:%SZ")
    good = {
        c["entity_id"]: f"{spec.id}-broken-000",
        c["region"]: "nc-triad-east",
        c["metric"]: "air_temp",
        c["event_time"]: when,
        c["value"]: "12.5",
    }
    return [
        {**good, c["value"]: "n/a"},  # mistyped_field
        {**good, c["value"]: "NaN"},  # non_finite_value
        {**good, c["value"]: "140.0"},  # out_of_range
        {**good, c["region"]: "atlantis"},  # unknown_region
        {**good, c["metric"]: "soil_moisture"},  # unknown_metric
        {**good, c["event_time"]: "yesterday"},  # unparseable_time
        {**good, c["entity_id"]: ""},  # missing_field
        {**good, c["entity_id"]: f"{spec.id}-broken-001"},  # accepted ...
        {**good, c["entity_id"]: f"{spec.id}-broken-001"},  # ... and its exact duplicate
    ]
