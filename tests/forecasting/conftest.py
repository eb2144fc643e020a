"""Simulated releases of a known signal with known noise, in a real store, for the forecasting tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fusion.config.federation import Config, load_config
from fusion.store.delta import Store
from schemas.tables import RELEASES_SCHEMA
from tests.conftest import config_text, keyless_registry

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def signal(hours: np.ndarray, *, region: str = "north") -> np.ndarray:
    """The true hourly series: a daily cycle of amplitude 5 around 12 (+1 in the south) and a slow drift."""
    offset = 1.0 if region == "south" else 0.0
    return 12.0 + offset + 5.0 * np.sin(2 * np.pi * (hours % 24) / 24) + 1.5 * np.sin(2 * np.pi * hours / 24 / 9)


def released(hours: np.ndarray, sd: np.ndarray | float, seed: int, *, region: str = "north") -> np.ndarray:
    rng = np.random.default_rng(seed)
    return signal(hours, region=region) + rng.normal(0.0, 1.0, hours.size) * sd


def release_table(
    hours: np.ndarray,
    values: np.ndarray,
    sds: np.ndarray,
    *,
    metric: str = "temp",
    region: str = "north",
    per_day: bool = True,
    withheld: np.ndarray | None = None,
) -> pa.Table:
    """Released cells (RELEASES_SCHEMA) at `hours` after T0 with ratio_mean `values` and mean_sd `sds`; one
    release per UTC day; `withheld` cells have a NULL mean (their count's interval included 0)."""
    n = hours.size
    starts = [T0 + timedelta(hours=int(h)) for h in hours]
    hidden = withheld if withheld is not None else np.zeros(n, dtype=bool)
    mean = [None if w else float(v) for v, w in zip(values, hidden, strict=True)]
    sd = [None if w else float(s) for s, w in zip(sds, hidden, strict=True)]
    ids = [f"r-{metric}-{s:%Y%m%d}" if per_day else f"r-{metric}-{s:%Y%m%d%H}" for s in starts]
    columns = {
        "release_id": ids, "metric": [metric] * n, "unit": ["degC"] * n, "region": [region] * n,
        "window_start": starts, "window_end": [s + timedelta(hours=1) for s in starts], "contributors": [3] * n,
        "count": [100.0] * n, "count_sd": [2.0] * n, "count_ci_low": [96.0] * n, "count_ci_high": [104.0] * n,
        "sum": [100.0 * (v if v is not None else 0.0) for v in mean], "sum_sd": [20.0] * n,
        "sum_ci_low": [0.0] * n, "sum_ci_high": [0.0] * n,
        "mean": mean, "mean_ci_low": mean, "mean_ci_high": mean, "mean_sd": sd, "ratio_mean": mean,
        "epsilon": [1.0] * n, "delta": [1e-6] * n, "noise": ["skellam"] * n, "released_at": starts,
    }
    for name in RELEASES_SCHEMA.names:
        columns.setdefault(name, [None] * n)
    return pa.table(columns, schema=RELEASES_SCHEMA)


@dataclass(frozen=True)
class Federation:
    path: Path
    config: Config
    store: Store


def federation(root: Path, *, forecasting: str = "") -> Federation:
    """A config (no keys: forecasting needs none, only the registry, here holding none) whose store will hold the
    tests' releases."""
    root.mkdir(parents=True, exist_ok=True)
    keyless_registry(root)
    path = root / "federation.toml"
    text = config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2)
    path.write_text(text + (f"\n[forecasting]\n{forecasting}\n" if forecasting else ""))
    config = load_config(path)
    return Federation(path, config, Store(config.store_path))


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    """Three weeks of hourly releases of `temp` in the north, noise SD 1 (daily releases)."""
    made = federation(tmp_path, forecasting='models = ["uc", "seasonal_naive", "same_hour_mean"]\nbacktest_origins = 4')
    hours = np.arange(21 * 24)
    sds = np.full(hours.size, 1.0)
    made.store.insert_new("releases", release_table(hours, released(hours, sds, seed=1), sds))
    return made
