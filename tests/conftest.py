"""Shared fixtures: small, real federations on disk (Parquet/CSV/JSONL feeds, HE keys, exchange, store)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from fusion.config.federation import Config, load_config
from fusion.store.delta import Store

logging.getLogger().setLevel(logging.ERROR)

# Modules holding a test of 30 s or more (separate party processes, crash-and-rerun federations, the bench
# harness): run first, so that the two workers (`make test`, pytest-xdist's load scheduling) do not end on one of
# them while the other sits idle. Order within a module, and of the rest, is unchanged.
SLOW_FIRST = (
    "tests/pipelines/test_federation_processes.py",
    "tests/pipelines/test_roles_cli.py",
    "tests/pipelines/test_crash_safety.py",
    "tests/training/test_exchange_round.py",
    "tests/training/test_signed_rounds.py",
    "tests/bench/test_run.py",
    "tests/pipelines/test_envelope_identity.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = item.nodeid.split("::", 1)[0]
        return SLOW_FIRST.index(module) if module in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: every worker collects the same order

START = datetime(2026, 1, 1, tzinfo=UTC)
END = START + timedelta(hours=6)
REGIONS = ("north", "south", "east")
METRICS = {  # name: (unit, lower, upper, resolution, plausible)
    "temp": ("degC", -20.0, 40.0, 0.1, (-60.0, 60.0)),
    "load": ("kW", 0.0, 500.0, 1.0, (-100.0, 2000.0)),  # plausible below the clamp: clamping is exercised
}


@dataclass(frozen=True)
class Federation:
    """A federation built in a temporary directory, with the raw readings each institution holds."""

    directory: Path
    config_path: Path
    raw: dict[str, pa.Table]  # institution -> its readings in the logical schema (before any validation)

    @property
    def config(self) -> Config:
        return load_config(self.config_path)


def readings(institution: str, *, entities: int, rng: np.random.Generator, start: datetime = START,
             hours: int = 6, every_minutes: int = 20) -> pa.Table:
    """Readings on the resolution grid (so encoding is exact) for every entity, metric and sampling time."""
    rows: dict[str, list[object]] = {k: [] for k in ("entity_id", "region", "metric", "event_time", "value")}
    steps = hours * 60 // every_minutes
    for e in range(entities):
        region = REGIONS[e % len(REGIONS)]
        for metric, (_, lower, upper, res, _) in METRICS.items():
            values = rng.uniform(lower - 0.1 * (upper - lower), upper, size=steps)  # some below the clamp
            values = np.round(values / res) * res
            for i in range(steps):
                rows["entity_id"].append(f"{institution}-{e:03d}")
                rows["region"].append(region)
                rows["metric"].append(metric)
                jitter = timedelta(seconds=int(rng.integers(0, 60)))
                rows["event_time"].append(start + timedelta(minutes=every_minutes * i) + jitter)
                rows["value"].append(float(values[i]))
    return pa.table({**rows, "event_time": pa.array(rows["event_time"], pa.timestamp("us", tz="UTC"))})


def write_feed(table: pa.Table, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        text = table.set_column(table.schema.get_field_index("event_time"), "event_time",
                                pa.array([t.isoformat() for t in table.column("event_time").to_pylist()]))
        pacsv.write_csv(text, path)
    else:
        with path.open("w") as handle:
            for row in table.to_pylist():
                row["event_time"] = row["event_time"].isoformat()
                handle.write(json.dumps(row) + "\n")


def config_text(*, institutions: list[tuple[str, str]], quorum: int, noise: bool = True, seed: int | None = None,
                mode: str = "test", epsilon: float = 1.0, extra_privacy: str = "", statistics: str = "") -> str:
    lines = [
        f"regions = {json.dumps(list(REGIONS))}",
        "[federation]", 'id = "test-federation"', 'window = "1h"',
        "[privacy]", f"epsilon = {epsilon}", "delta = 1e-6", f"quorum = {quorum}", f'mode = "{mode}"',
        f"noise = {'true' if noise else 'false'}",
    ]
    if seed is not None:
        lines.append(f"seed = {seed}")
    lines.append(extra_privacy)
    for name, (unit, lower, upper, res, plausible) in METRICS.items():
        lines += ["[[metrics]]", f'name = "{name}"', f'unit = "{unit}"', f"lower = {lower}", f"upper = {upper}",
                  f"resolution = {res}", f"plausible = [{plausible[0]}, {plausible[1]}]"]
    for inst, fmt in institutions:
        ext = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}[fmt]
        lines += ["[[institutions]]", f'id = "{inst}"', "[[institutions.feeds]]", 'name = "main"',
                  f'path = "feeds/{inst}/*.{ext}"', f'format = "{fmt}"']
    if statistics:
        lines += ["[statistics]", statistics]
    return "\n".join(lines) + "\n"


def keyless_registry(root: Path) -> None:
    """A registry holding no key (`root`/registry.toml): a federation whose key holder has no release-signing key,
    whose readers (forecasts, mechanisms, the dashboard) take every release as it stands. A missing registry is
    refused instead (fusion.keys.registry.require_registry)."""
    (root / "registry.toml").write_text("# Fusion federation registry: no keys registered yet\n")


def publish_signed(config: Config, store: Store, rows: pa.Table) -> None:
    """Insert `rows` (RELEASES_SCHEMA) as the key holder publishes releases: each release's rows signed with the
    registered release-signing key (`create_key_holder_key` first), chained after the store's signed releases, and
    its audit record holding the signature; `fusion verify` then calls them verified."""
    import json

    import pyarrow.compute as pc

    from fusion.keys.registry import load_key_holder_signing_key
    from fusion.store.provenance import SIGNATURE_FIELD, ChainLink, ReleaseSignature, sign_release
    from schemas.tables import AUDIT_SCHEMA

    key = load_key_holder_signing_key(config)
    chain = [ReleaseSignature.from_doc(json.loads(d)[SIGNATURE_FIELD]) for d in store.read("audit").filter(
        pc.equal(pc.field("action"), "release")).column("detail").to_pylist()]
    previous = max(chain, key=lambda c: c.sequence or 0, default=None)
    sequence, last = (previous.sequence or 0, (previous.release_id,)) if previous else (0, ())
    for release_id in dict.fromkeys(rows.column("release_id").to_pylist()):
        mine = rows.filter(pc.equal(rows["release_id"], release_id))
        sequence += 1
        signature = sign_release(mine, release_id=release_id, aggregate_sha256="0" * 64, signing_key=key,
                                 link=ChainLink(sequence, last))
        last = (release_id,)
        store.insert_new("audit", pa.Table.from_pylist([{
            "event_id": f"{release_id}:released", "at": mine["released_at"][0].as_py(), "actor_role": "key_holder",
            "actor": "key-holder", "action": "release", "release_id": release_id,
            "interval_start": mine["window_start"][0].as_py(), "interval_end": mine["window_end"][-1].as_py(),
            "reason": None, "content_sha256": "0" * 64, "detail": json.dumps({SIGNATURE_FIELD: signature.to_doc()}),
        }], schema=AUDIT_SCHEMA))
        store.insert_new("releases", mine)


@pytest.fixture
def make_federation(tmp_path: Path) -> Callable[..., Federation]:
    """Build a federation: `institutions` as (id, format) pairs; keys created; feeds written."""

    def build(*, subdir: str = "", **options: Any) -> Federation:
        return build_federation(tmp_path / subdir if subdir else tmp_path, **options)

    return build


def build_federation(root: Path, *, institutions: list[tuple[str, str]] | None = None, quorum: int = 2,
                     noise: bool = False, seed: int | None = 7, entities: int = 12, mode: str = "test",
                     epsilon: float = 1.0, statistics: str = "", extra_privacy: str = "",
                     extra: str = "") -> Federation:
    """`make_federation` in the directory `root` (for fixtures wider than one test)."""
    from fusion.keys.holder import create_federation_keys

    institutions = institutions or [("alpha", "parquet"), ("beta", "csv"), ("gamma", "jsonl")]
    rng = np.random.default_rng(2026)
    raw = {}
    for inst, fmt in institutions:
        table = readings(inst, entities=entities, rng=rng)
        raw[inst] = table
        ext = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}[fmt]
        half = table.num_rows // 2  # two files per institution
        write_feed(table.slice(0, half), root / "feeds" / inst / f"part-0.{ext}", fmt)
        write_feed(table.slice(half), root / "feeds" / inst / f"part-1.{ext}", fmt)
    config_path = root / "federation.toml"
    config_path.write_text(config_text(institutions=institutions, quorum=quorum, noise=noise,
                                       seed=seed if mode == "test" else None, mode=mode, epsilon=epsilon,
                                       statistics=statistics, extra_privacy=extra_privacy) + extra)
    config = load_config(config_path)
    create_federation_keys(config, [inst for inst, _ in institutions])
    return Federation(directory=root, config_path=config_path, raw=raw)
