"""A small federation for the mechanisms: a real store holding released cells of a load metric (no pipeline run:
rows inserted as a release writes them), case5 with three buses mapped to the three regions, an operator key and
one authority."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from forecasting.run import ForecastRun, run_forecasts
from fusion.config.federation import Config, load_config
from fusion.store.delta import Store
from mechanisms.authorities import create_operator_key, create_signer_key
from mechanisms.network import load_network, network_path
from schemas.tables import TABLE_SCHEMAS
from tests.conftest import START, config_text
from tests.fusion.store.test_store import release_rows

#: Bus -> (region, scale): with every region's mean load at 10 kW, the buses carry case5's 300, 300 and 400 MW.
MAPPING = {"B": ("north", 30.0), "C": ("south", 30.0), "D": ("east", 40.0)}
HOUR = START + timedelta(hours=1)
#: Days of hourly `load` releases that a real forecast is fitted on (`daily_releases`: two at least), and the first
#: window such a forecast is of.
FORECAST_DAYS = 3
FORECAST_AT = START + timedelta(days=FORECAST_DAYS)


@dataclass(frozen=True)
class MechFederation:
    directory: Path
    config_path: Path

    @property
    def config(self) -> Config:
        return load_config(self.config_path, check_release=False)

    @property
    def store(self) -> Store:
        return Store(self.config.store_path)


def load_releases(region: str, *, mean: float = 10.0, sd: float = 0.25, hours: range = range(3)) -> pa.Table:
    """Released cells of metric `load` for `region` with the given mean and its SD."""
    rows = release_rows(f"release-{region}-{hours.start}", hours, metric="load", region=region)
    for name, value in (("ratio_mean", mean), ("mean", mean), ("mean_sd", sd)):
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array([value] * rows.num_rows))
    return rows


def daily_releases(region: str, day: int, *, release_id: str | None = None) -> pa.Table:
    """One release of `load` for `region` holding day `day`'s 24 hourly cells (day 0 starts at START), released at
    the day's end: a daily cycle of 2 kW around 10 kW with a little weather (SD 0.25), for `fusion forecast` to read."""
    hours = range(24 * day, 24 * day + 24)
    h = np.arange(hours.start, hours.stop)
    mean = 10.0 + 2.0 * np.sin(2 * np.pi * h / 24) + 0.3 * np.sin(1.7 * h)
    rows = load_releases(region, hours=hours)
    for name, values in (("release_id", [release_id or f"load-{region}-d{day}"] * 24), ("ratio_mean", mean),
                         ("mean", mean), ("released_at", [START + timedelta(days=day + 1)] * 24)):
        index = rows.schema.get_field_index(name)
        rows = rows.set_column(index, name, pa.array(values, rows.schema.field(name).type))
    return rows


def with_daily_releases(fed: MechFederation, days: int = FORECAST_DAYS) -> list[str]:
    """`days` days of `daily_releases` of every region inserted; their release ids."""
    tables = [daily_releases(r, d) for r in ("north", "south", "east") for d in range(days)]
    fed.store.insert_new("releases", pa.concat_tables(tables))
    return [t.column("release_id")[0].as_py() for t in tables]


def forecast_ids(run: ForecastRun) -> dict[str, str]:
    """Region -> the id of the forecast `fusion forecast` issued."""
    return {o.key.region: o.forecast.forecast_id for o in run.outcomes if o.forecast is not None}


def forecast_federation(build: Callable[..., MechFederation]) -> tuple[MechFederation, dict[str, str]]:
    """A federation (`build`: the mech_federation fixture) whose key holder registered its release-signing key, with
    FORECAST_DAYS days of releases (legacy) and their forecast, issued by `fusion forecast` at FORECAST_AT for the 24
    hours from then: region -> forecast_id."""
    from fusion.keys.registry import create_key_holder_key

    fed = build(releases=False)
    create_key_holder_key(fed.config, published=with_daily_releases(fed))
    return fed, forecast_ids(run_forecasts(fed.config, metrics=["load"], horizon="24h", now=FORECAST_AT))


def reissued(fed: MechFederation, of: str, **changes: Any) -> pa.Table:
    """The rows of forecast `of` in the store, issued again an hour after FORECAST_AT with `changes`: column -> value,
    or a function of the column's values (a forger's copy)."""
    rows = fed.store.read("forecasts").filter(pc.equal(pc.field("forecast_id"), of))
    changes = {"issued_at": lambda _: [FORECAST_AT + timedelta(hours=1)] * rows.num_rows, **changes}
    for name, change in changes.items():
        index = rows.schema.get_field_index(name)
        values = change(rows.column(name).to_pylist()) if callable(change) else [change] * rows.num_rows
        rows = rows.set_column(index, rows.schema.field(index), pa.array(values, rows.schema.field(index).type))
    return rows


def forecast_rows(values: dict[str, tuple[float, float]], *, at: datetime = HOUR, metric: str = "load",
                  forecast_id: str = "fc-1", issued_at: datetime | None = None,
                  input_release_ids: tuple[str, ...] = ()) -> pa.Table:
    """One forecast window per region (region -> (mean, sd)) in the `forecasts` table's schema (whatever else it
    holds filled with plain values), issued 2 hours before the window unless `issued_at` says otherwise. Such rows do
    not replay (forecasting.replay): where a release-signing key is registered the mechanisms leave them out, and a
    test there forecasts the releases (`with_daily_releases`, then `fusion forecast`)."""
    schema = TABLE_SCHEMAS["forecasts"]
    rows = []
    for region, (mean, sd) in values.items():
        given: dict[str, Any] = {"forecast_id": f"{forecast_id}-{region}", "purpose": "forecast", "metric": metric,
                                 "statistic": "mean", "region": region, "window_start": at,
                                 "window_end": at + timedelta(hours=1),
                                 "issued_at": issued_at or at - timedelta(hours=2),
                                 "origin": at - timedelta(hours=1), "mean": mean, "sd": sd,
                                 "input_release_ids": list(input_release_ids)}
        rows.append({field.name: given.get(field.name, _plain(field.type)) for field in schema})
    return pa.Table.from_pylist(rows, schema=schema)


def _plain(kind: pa.DataType) -> Any:
    if pa.types.is_timestamp(kind):
        return START
    if pa.types.is_floating(kind):
        return 1.0
    if pa.types.is_integer(kind):
        return 1
    if pa.types.is_list(kind):
        return []
    if pa.types.is_boolean(kind):
        return False
    return "x"


@pytest.fixture
def mech_federation(tmp_path: Path) -> Callable[..., MechFederation]:
    def build(*, releases: bool = True, authority_kinds: str | None = None, threshold: int | None = None,
              signers: tuple[str, ...] = ("alice",), regions: list[str] | None = None, extra: str = "",
              subdir: str = "fed") -> MechFederation:
        root = tmp_path / subdir
        root.mkdir()
        network = load_network(network_path("case5")).with_regions(MAPPING)
        (root / "network.toml").write_text(network.to_toml())
        config_path = root / "federation.toml"
        config_path.write_text(
            config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2)
            + '[mechanisms]\nnetwork = "network.toml"\nload_metric = "load"\n' + extra
        )
        config = load_config(config_path, check_release=False)
        if releases:
            store = Store(config.store_path)
            store.insert_new("releases", pa.concat_tables([load_releases(r) for r in ("north", "south", "east")]))
        create_operator_key(config)
        for signer in signers:
            create_signer_key(config, "grid-ops", signer, regions=regions,
                              kinds=authority_kinds.split(",") if authority_kinds else None, threshold=threshold)
        return MechFederation(root, config_path)

    return build


def versions(store: Store) -> dict[str, int | None]:
    return {name: store.version(name) for name in TABLE_SCHEMAS}


def recommendation_ids(store: Store, **where: str) -> list[str]:
    table = store.read("recommendations")
    for column, value in where.items():
        table = table.filter(pc.equal(table.column(column), value))
    return sorted(set(table.column("recommendation_id").to_pylist()))
