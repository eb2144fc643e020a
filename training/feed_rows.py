"""Training rows from an institution's own feeds: its sensors' readings of the config's metrics, validated as a
release validates them (schemas/validation.py), averaged per entity over steps of `horizon`, then one row per
entity and every other step s: the features at s, the target at s + 1 step (e.g. a region's air temperature or
load an hour ahead from the current readings).

Rows start on even steps only, so the readings of step s + 1 that make a row's target are in no other row: each
reading is in exactly one example, and clipping each example bounds what one reading can move (the privacy unit
`reading`). Features: each metric scaled to [0, 1] by its clamp bounds, the region one-hot and the hour of day
(sine, cosine); the target's class is where its value (or its change, `change`) falls among `target_bins`. A
damaged feed file is skipped whole and reported, as a release skips it (fusion/feeds/scan.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

import duckdb
import numpy as np
import pyarrow as pa

from fusion.config.federation import Config, FeedConfig, InstitutionConfig
from fusion.config.training import ModelConfig
from fusion.errors import FusionError
from fusion.feeds.files import feed_listing, mapped_columns, read_feed_file
from fusion.feeds.scan import DAMAGE_ERRORS, TRANSIENT_ERRORS, FeedUnavailable, file_damaged
from fusion.release.plan import parse_time
from fusion.runtime.durations import parse_duration
from schemas.validation import ROW_COLUMN, ReadingRules, checked_sql, connect, register_rules
from training.charging import feature_width
from training.trainer import Institution

EMPTY_MEANS = pa.table(
    {
        "entity_id": pa.array([], pa.string()),
        "region": pa.array([], pa.string()),
        "metric": pa.array([], pa.string()),
        "step": pa.array([], pa.int64()),
        "value": pa.array([], pa.float64()),
    }
)


@dataclass(frozen=True)
class StepMeans:
    """An institution's readings averaged per entity and step, and the feed files it could not read."""

    means: pa.Table  # (entity_id, region, metric, step, value)
    unreadable: Mapping[str, str]  # feed file -> what failed: damaged, none of its readings used


def step_means(
    config: Config,
    institution: InstitutionConfig,
    metrics: tuple[str, ...],
    start: datetime,
    end: datetime,
    step_s: float,
) -> StepMeans:
    """The mean of each entity's accepted readings of `metrics` per step (floor(epoch seconds / step_s)), clamped
    to the metric's bounds first. A damaged feed file is skipped whole, as a release skips it (fusion/feeds/scan.py
    `file_damaged`: none of its readings is used), and named in `unreadable`; one that cannot be read now
    (permissions, moved away) stops the run (FeedUnavailable)."""
    rules = ReadingRules(
        plausible={m.name: m.plausible for m in config.metrics}, regions=tuple(config.regions), start=start, end=end
    )
    con = connect()
    names = tuple(m.name for m in config.metrics)
    register_rules(con, rules, names)
    bounds = pa.table(
        {
            "metric": [m.name for m in config.metrics],
            "lower": [m.lower for m in config.metrics],
            "upper": [m.upper for m in config.metrics],
        }
    )
    con.register("fusion_bounds", bounds)
    con.register("fusion_wanted", pa.table({"metric": list(metrics)}))
    parts: list[pa.Table] = []
    unreadable: dict[str, str] = {}
    for feed in institution.feeds:
        columns = mapped_columns(feed)
        for path in feed_listing(config.resolve(feed.path), start, end).paths:
            batch_rows = config.pipeline.batch_rows
            try:
                # (entity_id, region, metric, step, value) of the file's accepted readings, each batch's
                parts += [
                    con.sql(f"""
                    SELECT c.entity_id, c.region, c.metric,
                           CAST(floor(epoch(c.event_time) / {step_s}) AS BIGINT) AS step,
                           least(greatest(c.value, b.lower), b.upper) AS value
                    FROM ({checked}) c JOIN fusion_bounds b ON c.metric = b.metric
                    WHERE c.reason IS NULL AND c.metric IN (SELECT metric FROM fusion_wanted)
                    """).to_arrow_table()
                    for checked in _checked_batches(con, path, feed, rules, columns, batch_rows)
                ]
            except TRANSIENT_ERRORS as exc:  # not the file's fault: say which file, and stop, as a release does
                raise FeedUnavailable(
                    f"feed file {path} cannot be read now ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                    "check that it exists and this user may read it, then train again"
                ) from None
            except DAMAGE_ERRORS as exc:  # damaged: none of its readings is used, as a release skips it
                if not file_damaged(exc, path, feed, batch_rows=batch_rows):
                    raise
                unreadable[path] = " ".join(f"{type(exc).__name__}: {exc}".split())
            finally:
                con.unregister("fusion_raw")
    if not parts:
        return StepMeans(EMPTY_MEANS, unreadable)
    con.register("fusion_readings", pa.concat_tables(parts))
    means = con.sql("""
        SELECT entity_id, region, metric, step, avg(value) AS value FROM fusion_readings
        GROUP BY ALL ORDER BY entity_id, metric, step
        """).to_arrow_table()
    return StepMeans(means, unreadable)


def _checked_batches(
    con: duckdb.DuckDBPyConnection,
    path: str,
    feed: FeedConfig,
    rules: ReadingRules,
    columns: Mapping[str, str],
    batch_rows: int,
) -> Iterator[str]:
    """The feed file's batches in turn, each registered as `fusion_raw`: the SQL of its readings validated."""
    for batch in read_feed_file(path, feed, batch_rows=batch_rows):
        table = batch.table
        if table.num_rows == 0 or batch.missing_columns:
            continue
        table = table.append_column(ROW_COLUMN, pa.array(np.arange(table.num_rows, dtype=np.int64)))
        types = {f: table.schema.field(c).type for f, c in columns.items() if c in table.column_names}
        con.register("fusion_raw", table)
        yield checked_sql("fusion_raw", rules=rules, columns=columns, types=types, time_format=feed.time_format.value)


def held_metrics(institution: InstitutionConfig, model: ModelConfig, means: pa.Table) -> bool:
    """Whether the institution's readings hold every metric the model needs (otherwise it does not take part)."""
    found = set(means.column("metric").to_pylist())
    return all(m in found for m in (*model.features, model.target))


def feature_count(config: Config, model: ModelConfig) -> int:
    """Inputs of a model on the feeds: its metrics, the region one-hot, the hour of day (sine, cosine)."""
    return feature_width(config, model)


@dataclass(frozen=True)
class FeedRows:
    """An institution's rows for a model from its feeds, each row's step start (epoch seconds), and the feed files
    it could not read (path -> what failed; none of their readings is used)."""

    rows: Institution
    times: np.ndarray
    unreadable: Mapping[str, str]

    def report(self, institution_id: str) -> list[str]:
        """A line per unreadable feed file, as a release reports it."""
        return [
            f"institution {institution_id}: feed file {path}: unreadable ({error}); none of its readings is used"
            for path, error in sorted(self.unreadable.items())
        ]


def feed_rows(config: Config, model: ModelConfig, institution: InstitutionConfig) -> FeedRows:
    """The institution's rows for `model` from its feeds; none when its feeds lack a metric the model needs."""
    assert model.horizon is not None and model.target_bins is not None
    step_s = parse_duration(model.horizon).total_seconds()
    start, end = parse_time(model.start), parse_time(model.end)
    metrics = tuple(dict.fromkeys((*model.features, model.target)))
    read = step_means(config, institution, metrics, start, end, step_s)
    means = read.means
    width = feature_count(config, model)
    empty = FeedRows(Institution(np.zeros((0, width), np.float32), np.zeros(0, np.int64)), np.zeros(0), read.unreadable)
    if means.num_rows == 0 or not held_metrics(institution, model, means):
        return empty
    entities = means.column("entity_id").to_numpy(zero_copy_only=False)
    regions = means.column("region").to_numpy(zero_copy_only=False)
    metric = means.column("metric").to_numpy(zero_copy_only=False)
    steps = means.column("step").to_numpy()
    values = means.column("value").to_numpy()
    table: dict[tuple[str, str, int], dict[str, float]] = {}
    for e, r, m, s, v in zip(entities, regions, metric, steps, values, strict=True):
        table.setdefault((e, r, int(s)), {})[m] = float(v)
    first = math.floor(start.timestamp() / step_s)
    bounds = {m.name: (m.lower, m.upper) for m in config.metrics}
    region_index = {r: k for k, r in enumerate(config.regions)}
    features, targets, times = [], [], []
    for (entity, region, step), now in sorted(table.items()):
        ahead = table.get((entity, region, step + 1))
        if (step - first) % 2 or ahead is None or model.target not in ahead:
            continue
        if any(f not in now for f in model.features) or (model.change and model.target not in now):
            continue
        row = [(now[f] - bounds[f][0]) / (bounds[f][1] - bounds[f][0]) for f in model.features]
        one_hot = [0.0] * len(config.regions)
        one_hot[region_index[region]] = 1.0
        hour = ((step * step_s) % 86400) / 86400 * 2 * math.pi
        features.append(row + one_hot + [math.sin(hour), math.cos(hour)])
        value = ahead[model.target] - (now[model.target] if model.change else 0.0)
        targets.append(int(np.searchsorted(model.target_bins, value, side="right")))
        times.append(step * step_s)
    if not features:
        return empty
    rows = Institution(np.asarray(features, np.float32), np.asarray(targets, np.int64))
    return FeedRows(rows, np.asarray(times, np.float64), read.unreadable)


def split_at(rows: Institution, times: np.ndarray, cut: datetime) -> tuple[Institution, Institution]:
    """(the rows before `cut`, the rows from it on): a time split for held-out evaluation."""
    before = times < cut.timestamp()
    return (
        Institution(rows.features[before], rows.targets[before]),
        Institution(rows.features[~before], rows.targets[~before]),
    )


def check_feed_model(config: Config, model: ModelConfig) -> None:
    """Refuse a feed model the config cannot serve: unknown metrics, or an entity privacy unit (an entity is in
    many rows, which per-example clipping does not bound)."""
    known = {m.name for m in config.metrics}
    unknown = [m for m in (*model.features, model.target) if m not in known]
    if unknown:
        raise FusionError(f"models.{model.name}: {unknown} are not among the config's metrics {sorted(known)}")
    if config.privacy.unit.value != "reading":
        raise FusionError(
            f"models.{model.name}: a model trained on the feeds needs privacy.unit = 'reading' (one reading is in one "
            "row; an entity is in many, which per-example clipping does not bound); train it on `rows` instead"
        )
