"""A small federation for the mechanisms: a real store holding released cells of a load metric (no pipeline run:
rows inserted as a release writes them), case5 with three buses mapped to the three regions, an operator key and
one authority."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

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


def forecast_rows(values: dict[str, tuple[float, float]], *, at: datetime = HOUR, metric: str = "load",
                  forecast_id: str = "fc-1", issued_at: datetime | None = None,
                  input_release_ids: tuple[str, ...] = ()) -> pa.Table:
    """One forecast window per region (region -> (mean, sd)) in the `forecasts` table's schema (whatever else it
    holds filled with plain values), issued 2 hours before the window unless `issued_at` says otherwise."""
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
