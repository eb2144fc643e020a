"""The federation config: a TOML file validated at load into frozen models, with field-level messages."""

from __future__ import annotations

import math
import posixpath
import re
import tomllib
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusion.config.brokers import BrokerSource, check_sources
from fusion.config.forecasting import ForecastingConfig
from fusion.config.mechanisms import MechanismsConfig
from fusion.config.sql_limits import SqlLimits
from fusion.config.training import ModelConfig
from fusion.errors import ConfigError
from fusion.runtime.durations import parse_duration
from fusion.runtime.schedule import ScheduleConfig, check_schedules
from schemas.readings import ALL_FIELDS

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class _Frozen(BaseModel):
    # allow_inf_nan=False: TOML has inf and nan, and an infinite cap or resolution would pass `gt=0`.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


Name = Annotated[str, Field(pattern=_NAME)]


class FeedFormat(StrEnum):
    PARQUET = "parquet"
    CSV = "csv"
    JSONL = "jsonl"


class TimeFormat(StrEnum):
    ISO = "iso"  # ISO 8601 text or a native timestamp column; naive times are UTC
    EPOCH_S = "epoch_s"
    EPOCH_MS = "epoch_ms"


class PrivacyUnit(StrEnum):
    READING = "reading"  # event level: one reading
    ENTITY = "entity"  # one meter, household, vehicle...: contributions bounded per release


class PrivacyMode(StrEnum):
    PRODUCTION = "production"
    TEST = "test"


class FeedConfig(_Frozen):
    """One of an institution's feeds: files (a path or glob, any Beam FileSystems URL) and a column mapping."""

    name: Name
    path: str = Field(min_length=1)
    format: FeedFormat
    time_format: TimeFormat = TimeFormat.ISO
    columns: dict[str, str] = Field(default_factory=dict)

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, columns: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(columns) - set(ALL_FIELDS))
        if unknown:
            raise ValueError(f"unknown reading field(s) {unknown}; map only {list(ALL_FIELDS)}")
        return columns

    def column_for(self, field: str) -> str:
        """The feed's column name that holds a logical reading field (identity unless mapped)."""
        return self.columns.get(field, field)


class InstitutionConfig(_Frozen):
    id: Name
    name: str = ""
    feeds: tuple[FeedConfig, ...] = Field(min_length=1)
    dead_letter: str | None = None  # defaults to <base>/deadletter/<id>
    keys: str | None = None  # the institution's private signing key directory; defaults to <base>/institution-keys/<id>
    # Readings per cell and release; bounds the encrypted totals. Default: the largest that cannot wrap.
    max_readings_per_cell: int | None = Field(default=None, gt=0)
    # Share of an interval's rows rejected (rows of other intervals and exact duplicates aside) above which a run
    # warns, and above which the institution seals nothing unless its operator passes --accept-rejects.
    warn_reject_rate: float = Field(default=0.1, ge=0, le=1)
    max_reject_rate: float = Field(default=0.5, ge=0, le=1)
    sources: tuple[BrokerSource, ...] = ()  # MQTT / NATS JetStream, read by `fusion stream` (fusion/config/brokers.py)

    @model_validator(mode="after")
    def _reject_rates(self) -> Self:
        if self.warn_reject_rate > self.max_reject_rate:
            raise ValueError(
                f"warn_reject_rate {self.warn_reject_rate} is above max_reject_rate {self.max_reject_rate}; "
                "the warning comes first"
            )
        return self


class MetricConfig(_Frozen):
    """A public metric: clamp bounds and resolution fix its encoding; the plausible range rejects nonsense."""

    name: Name
    unit: str = Field(min_length=1)
    lower: float
    upper: float
    resolution: float = Field(gt=0)
    plausible: tuple[float, float]

    @model_validator(mode="after")
    def _ranges(self) -> Self:
        if not (math.isfinite(self.lower) and math.isfinite(self.upper) and self.lower < self.upper):
            raise ValueError(f"need finite lower < upper, got lower={self.lower}, upper={self.upper}")
        if self.resolution > self.upper - self.lower:
            raise ValueError(
                f"resolution {self.resolution} is coarser than the clamp range [{self.lower}, {self.upper}]"
            )
        low, high = self.plausible
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"plausible must be a finite [low, high] with low < high, got {self.plausible}")
        return self


class PrivacyConfig(_Frozen):
    epsilon: float = Field(gt=0, le=20)
    delta: float = Field(gt=0, lt=0.01)
    quorum: int = Field(ge=1)
    # Institutions that might collude with the aggregator, the key holder and one contributor that keeps its own
    # noise draws. Each institution seals a share v/(quorum - 1 - max_colluding), so the noise such a coalition
    # does not know is still v with as few as `quorum` contributors, and removes its excess layers once the roster
    # is known (privacy/noise_shares.py); production needs quorum >= max_colluding + 2; each institution answers
    # only a roster more than (institutions + max_colluding) / 2 have signed, and reveals noise layers only once
    # more than (institutions + max_colluding + 1) / 2 have (docs/concepts/trust-model.md, split views).
    max_colluding: int = Field(default=0, ge=0)
    unit: PrivacyUnit = PrivacyUnit.READING
    # Entity level: each entity contributes to at most `max_partitions` cells (L0) per release and at most
    # `max_readings_per_partition` readings (Linf) per cell; which ones are kept is chosen uniformly at random.
    max_partitions: int | None = Field(default=None, ge=1)
    max_readings_per_partition: int | None = Field(default=None, ge=1)
    # The budget ledger: releases whose intervals fall in one period compose; their total may not pass the cap.
    period: str = "1d"
    epsilon_cap: float | None = Field(default=None, gt=0)  # default: epsilon (one release per period)
    mode: PrivacyMode = PrivacyMode.PRODUCTION
    noise: bool = True  # test mode only: switch noise off to check exact answers
    seed: int | None = None  # test mode only: reproducible noise

    @field_validator("period")
    @classmethod
    def _period(cls, period: str) -> str:
        seconds = parse_duration(period).total_seconds()
        if seconds <= 0 or seconds % 3600:
            raise ValueError(f"period '{period}' must be a positive number of whole hours (e.g. 1d, 7d, 12h)")
        return period

    @property
    def cap(self) -> float:
        """The epsilon cap per period."""
        return self.epsilon_cap if self.epsilon_cap is not None else self.epsilon

    @model_validator(mode="after")
    def _entity_caps(self) -> Self:
        caps = (self.max_partitions, self.max_readings_per_partition)
        if self.unit is PrivacyUnit.ENTITY and None in caps:
            raise ValueError("unit = 'entity' needs max_partitions (L0) and max_readings_per_partition (Linf)")
        if self.unit is PrivacyUnit.READING and caps != (None, None):
            raise ValueError("max_partitions and max_readings_per_partition apply only to unit = 'entity'")
        if self.epsilon > self.cap:
            raise ValueError(f"epsilon {self.epsilon} per release exceeds the period's epsilon_cap {self.cap}")
        return self

    @model_validator(mode="after")
    def _test_only_switches(self) -> Self:
        if self.mode is PrivacyMode.PRODUCTION:
            if not self.noise:
                raise ValueError("noise = false is a test-only switch; production configs must add noise")
            if self.seed is not None:
                raise ValueError("seed is test-only; production noise comes from a secure generator")
        return self


class StatisticsConfig(_Frozen):
    """Optional statistics beyond count, sum and mean. Each is one more vector sum per reading (one more slot
    per cell and a little more noise); all are post-processed from the same noisy release, at no extra budget."""

    variance: bool = False  # sum of squares -> stddev per cell
    quantiles: bool = False  # histogram over `histogram_bins` equal-width bins of the clamp range -> p10, median, p90
    histogram_bins: int = Field(default=16, ge=2, le=256)


class PipelineConfig(_Frozen):
    """Execution knobs; Beam options (e.g. --runner) are passed through on the command line."""

    # Readings per scan shard: an institution's readings are hash-partitioned into ceil(rows / shard_rows) shards,
    # each scanned, de-duplicated, bounded and packed by one worker (peak memory: up to about 250 bytes a reading).
    shard_rows: int = Field(default=4_000_000, ge=1024, le=500_000_000)
    batch_rows: int = Field(default=262_144, ge=1024)  # rows per Arrow batch read from a CSV or JSON lines file


def _duration_or_zero(text: str) -> timedelta:
    return timedelta(0) if text.strip() in ("0", "0s") else parse_duration(text)


class StreamSource(StrEnum):
    FILES = "files"  # the feeds' files (and stdin), micro-batched by `fusion stream` on this machine
    PUBSUB = "pubsub"  # messages of JSON lines, attribute `institution`; windowed by Beam on a streaming runner
    KAFKA = "kafka"  # records of JSON lines keyed by institution id; windowed by Beam on a streaming runner


class StreamConfig(_Frozen):
    """`fusion stream`: event-time windows on a public grid, each released once the processing clock passes its
    end plus the allowed lateness, whether or not any reading fell in it."""

    source: StreamSource = StreamSource.FILES
    pubsub_subscription: str | None = None  # projects/P/subscriptions/S
    kafka_bootstrap_servers: str | None = None  # host:port,host:port
    kafka_topic: str | None = None
    window: str | None = None  # the release window; default: federation.window (a whole multiple of it)
    # A window [s, e) is released once the processing clock reaches e + allowed_lateness; its readings arriving
    # later are counted as late.
    allowed_lateness: str = "0s"
    # The grid's first window is the one holding this time (UTC if no offset); default: the window holding the
    # moment the stream's state was created. Readings before it are out_of_interval.
    start: datetime | None = None
    # The most windows one step may release: a grid start far in the past is refused, not worked through.
    max_backlog: int = Field(default=168, ge=1)
    # Readings stamped later than the processing clock plus this are rejected (out_of_interval): a sensor clock
    # running ahead must not carry its institution's watermark past windows whose readings are still coming.
    max_clock_skew: str = "1h"
    poll: str = "1s"  # how often to look for new feed files
    state: str = "stream"  # the driver's progress (a local directory, as private as the feeds)
    spool: str | None = None  # windowed readings; default <state>/spool; a URL when a streaming job writes it

    @field_validator("allowed_lateness", "poll", "max_clock_skew")
    @classmethod
    def _durations(cls, text: str) -> str:
        _duration_or_zero(text)
        return text

    @field_validator("window")
    @classmethod
    def _window(cls, window: str | None) -> str | None:
        if window is not None and parse_duration(window).total_seconds() <= 0:
            raise ValueError(f"window '{window}' must be positive")
        return window

    @field_validator("start")
    @classmethod
    def _utc(cls, start: datetime | None) -> datetime | None:
        if start is None:
            return None
        return start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)

    @model_validator(mode="after")
    def _source_settings(self) -> Self:
        if self.source is StreamSource.PUBSUB and not self.pubsub_subscription:
            raise ValueError("stream.source = 'pubsub' needs stream.pubsub_subscription")
        if self.source is StreamSource.KAFKA and not (self.kafka_bootstrap_servers and self.kafka_topic):
            raise ValueError("stream.source = 'kafka' needs stream.kafka_bootstrap_servers and stream.kafka_topic")
        return self


class FederationConfig(_Frozen):
    id: Name
    window: str = "1h"
    store: str = "store"
    exchange: str = "exchange"
    keys: str = "keys"
    aggregator_keys: str = "aggregator-keys"  # the aggregator's private signing key directory
    registry: str = "registry.toml"  # who may contribute: institutions' public signing keys
    # How long after an interval ends the aggregator waits for missing institutions before declaring them
    # absent (which starts the recovery round, so the others are not blocked).
    deadline: str = "15m"

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, deadline: str) -> str:
        if deadline.strip() not in ("0", "0s"):
            parse_duration(deadline)
        return deadline

    @field_validator("window")
    @classmethod
    def _window(cls, window: str) -> str:
        seconds = parse_duration(window).total_seconds()
        if seconds <= 0 or (86400 % seconds != 0 and seconds % 86400 != 0):
            raise ValueError(f"window '{window}' must divide a day (e.g. 15m, 1h) or be whole days")
        return window


class Config(_Frozen):
    """A whole federation. Relative paths resolve against `base` (the config file's directory)."""

    federation: FederationConfig
    privacy: PrivacyConfig
    metrics: tuple[MetricConfig, ...] = Field(min_length=1)
    regions: tuple[Name, ...] = Field(min_length=1)
    institutions: tuple[InstitutionConfig, ...] = Field(min_length=1)
    statistics: StatisticsConfig = StatisticsConfig()
    pipeline: PipelineConfig = PipelineConfig()
    stream: StreamConfig = StreamConfig()
    sql: SqlLimits = SqlLimits()  # `fusion sql` and the Python API: time and result-size limits of a query
    schedules: tuple[ScheduleConfig, ...] = ()  # when `fusion schedule` runs batch releases
    forecasting: ForecastingConfig | None = None  # `fusion forecast`/`backtest`; None: defaults, no refresh
    mechanisms: MechanismsConfig | None = None  # `fusion recommend`/`decide`: network, load metric, keys
    models: tuple[ModelConfig, ...] = ()  # `fusion train`: models trained across the institutions (training/)
    base: Path = Path(".")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for label, names in (
            ("metrics", [m.name for m in self.metrics]),
            ("regions", list(self.regions)),
            ("institutions", [i.id for i in self.institutions]),
        ):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{label}: duplicate names {duplicates}")
        check_sources([(i.id, source) for i in self.institutions for source in i.sources])
        dead = [_directory_key(self.dead_letter_path(i)) for i in self.institutions]
        for index, institution in enumerate(self.institutions):
            for first in range(index):
                if dead[index] == dead[first] or dead[index].startswith(dead[first] + "/") or (
                    dead[first].startswith(dead[index] + "/")
                ):
                    raise ValueError(
                        f"institutions[{index}].dead_letter: {institution.id}'s dead-letter directory "
                        f"{self.dead_letter_path(institution)} is, or holds, or lies in institutions[{first}] "
                        f"({self.institutions[first].id})'s; each institution keeps its rejected rows, run reports "
                        "and staged files apart"
                    )
        shared_dirs = {
            label: _directory_key(self.resolve(path))
            for label, path in (("exchange", self.federation.exchange), ("store", self.federation.store))
        }
        for index, institution in enumerate(self.institutions):
            for field_name, private in (
                ("dead_letter", self.dead_letter_path(institution)),
                ("keys", self.institution_keys_path(institution)),
            ):
                mine = _directory_key(private)
                for label, other in shared_dirs.items():
                    if mine == other or mine.startswith(other + "/") or other.startswith(mine + "/"):
                        raise ValueError(
                            f"institutions[{index}].{field_name}: {institution.id}'s {private} overlaps "
                            f"federation.{label} ({self.resolve(getattr(self.federation, label))}), which other "
                            "parties read; an institution's keys and rejected rows stay private"
                        )
        self._private_apart()
        keys = self.federation.keys
        if "://" in keys:
            raise ValueError(f"federation.keys = '{keys}': the HE secret key lives in a local directory, not a URL")
        keys_dir = (self.base / keys).resolve()
        for label, shared in (("exchange", self.federation.exchange), ("store", self.federation.store)):
            if "://" not in shared:
                shared_dir = (self.base / shared).resolve()
                if keys_dir == shared_dir or shared_dir in keys_dir.parents or keys_dir in shared_dir.parents:
                    raise ValueError(
                        f"federation.keys ({keys}) overlaps federation.{label} ({shared}); the secret key must "
                        "live apart from what other parties read"
                    )
        if self.period % self.window:
            raise ValueError(
                f"privacy.period {self.privacy.period} is not a whole number of {self.federation.window} windows"
            )
        if self.stream.window and (self.stream_window % self.window or self.period % self.stream_window):
            raise ValueError(
                f"stream.window {self.stream.window} must be a whole number of {self.federation.window} windows "
                f"that divides privacy.period {self.privacy.period}"
            )
        if self.privacy.mode is PrivacyMode.PRODUCTION and self.privacy.quorum < self.privacy.max_colluding + 2:
            raise ValueError(
                f"privacy.quorum = {self.privacy.quorum} must be at least privacy.max_colluding + 2 = "
                f"{self.privacy.max_colluding + 2}: otherwise the colluders and one honest institution could form a "
                "quorate release that reveals that institution's contribution"
            )
        if self.privacy.quorum > len(self.institutions):
            raise ValueError(
                f"privacy.quorum = {self.privacy.quorum} exceeds the {len(self.institutions)} institutions; "
                "no release could ever meet it"
            )
        check_schedules(self.schedules, window=self.window, period=self.period)
        if self.forecasting is not None:
            self.forecasting.check_window(self.window)
        if self.mechanisms is not None:
            self.mechanisms.check(self)
        return self

    def _private_apart(self) -> None:
        """Refuse directories that overlap where they must not: the exchange and the store (each party reads
        its own layout there), a private directory and one other parties read, and another party's private
        directory inside the key holder's."""
        shared = {"exchange": self.exchange_path, "store": self.store_path}
        if _overlap(shared["exchange"], shared["store"]):
            raise ValueError(
                f"federation.exchange ({shared['exchange']}) is, holds or lies in federation.store "
                f"({shared['store']}): envelopes in flight and published tables need directories of their own"
            )
        private = [
            ("federation.aggregator_keys", self.aggregator_keys_path, "the aggregator's signing key"),
            ("stream.state", self.stream_state_path, "the stream's progress and validated readings"),
            ("stream.spool", self.stream_spool_path, "the stream's windowed readings"),
        ]
        for field_name, path, what in private:
            for label, other in shared.items():
                if _overlap(path, other):
                    raise ValueError(
                        f"{field_name} ({path}) overlaps federation.{label} ({other}), which other parties read; "
                        f"{what} stay private"
                    )
        for index, institution in enumerate(self.institutions):
            for number, feed in enumerate(institution.feeds):
                files = _glob_base(self.resolve(feed.path))
                for label, other in shared.items():
                    if _within(files, other):
                        raise ValueError(
                            f"institutions[{index}].feeds[{number}].path ({feed.path}) lies in federation.{label} "
                            f"({other}), which other parties read; an institution's raw readings stay private"
                        )
        holder = self.keys_path
        others = [("federation.aggregator_keys", self.aggregator_keys_path)] + [
            (f"institutions[{index}].{field_name}", path)
            for index, institution in enumerate(self.institutions)
            for field_name, path in (
                ("keys", self.institution_keys_path(institution)),
                ("dead_letter", self.dead_letter_path(institution)),
            )
        ]
        for field_name, path in others:
            if _overlap(path, holder):
                raise ValueError(
                    f"{field_name} ({path}) overlaps federation.keys ({holder}), the key holder's private directory "
                    "(its HE secret key): each party keeps its keys and files apart from the key holder's"
                )

    @property
    def window(self) -> timedelta:
        return parse_duration(self.federation.window)

    @property
    def deadline(self) -> timedelta:
        text = self.federation.deadline.strip()
        return timedelta(0) if text in ("0", "0s") else parse_duration(text)

    @property
    def stream_window(self) -> timedelta:
        return parse_duration(self.stream.window) if self.stream.window else self.window

    @property
    def allowed_lateness(self) -> timedelta:
        return _duration_or_zero(self.stream.allowed_lateness)

    @property
    def max_clock_skew(self) -> timedelta:
        return _duration_or_zero(self.stream.max_clock_skew)

    @property
    def stream_poll(self) -> timedelta:
        return _duration_or_zero(self.stream.poll)

    @property
    def stream_state_path(self) -> str:
        return self.resolve(self.stream.state)

    @property
    def stream_spool_path(self) -> str:
        return self.resolve(self.stream.spool) if self.stream.spool else str(Path(self.stream_state_path) / "spool")

    @property
    def period(self) -> timedelta:
        return parse_duration(self.privacy.period)

    def resolve(self, path: str) -> str:
        """Resolve a config path: URLs (scheme://) and absolute paths as given, others against `base`."""
        if "://" in path or Path(path).is_absolute():
            return path
        return str((self.base / path).resolve())

    @property
    def store_path(self) -> str:
        return self.resolve(self.federation.store)

    @property
    def exchange_path(self) -> str:
        return self.resolve(self.federation.exchange)

    @property
    def keys_path(self) -> str:
        return self.resolve(self.federation.keys)

    def schedule(self, name: str | None) -> ScheduleConfig:
        """A schedule by name; without a name, the only one."""
        if name is None and len(self.schedules) == 1:
            return self.schedules[0]
        for schedule in self.schedules:
            if schedule.name == name:
                return schedule
        known = ", ".join(s.name for s in self.schedules) or "none; add a [[schedules]] section"
        if name is None:
            raise ConfigError(f"name a schedule (--schedule); the config declares: {known}")
        raise ConfigError(f"unknown schedule '{name}'; the config declares: {known}")

    def institution(self, institution_id: str) -> InstitutionConfig:
        for inst in self.institutions:
            if inst.id == institution_id:
                return inst
        known = ", ".join(i.id for i in self.institutions)
        raise ConfigError(f"unknown institution '{institution_id}'; the config declares: {known}")

    @property
    def aggregator_keys_path(self) -> str:
        return self.resolve(self.federation.aggregator_keys)

    def institution_keys_path(self, institution: InstitutionConfig) -> str:
        return self.resolve(institution.keys or f"institution-keys/{institution.id}")

    @property
    def registry_path(self) -> str:
        return self.resolve(self.federation.registry)

    def dead_letter_path(self, institution: InstitutionConfig) -> str:
        return self.resolve(institution.dead_letter or f"deadletter/{institution.id}")


def _directory_key(path: str) -> str:
    """A directory's path in one spelling, to compare directories: without file://, a trailing slash, `.` or
    `..` parts (a URL's scheme and host kept as they are)."""
    path = path.removeprefix("file://")
    scheme, separator, rest = path.partition("://")
    if not separator:
        return posixpath.normpath(path)
    return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"


def _within(inner: str, outer: str) -> bool:
    """Whether `inner` is the directory `outer` or lies in it (both compared in one spelling)."""
    inner, outer = _directory_key(inner), _directory_key(outer)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _overlap(first: str, second: str) -> bool:
    """Whether two directories are one, or one holds the other."""
    return _within(first, second) or _within(second, first)


def _glob_base(path: str) -> str:
    """The directory a feed's files lie in whatever its wildcards or {date} placeholders match: the path up to
    the last separator before the first of them (a path without any: the file itself)."""
    wild = re.search(r"[*?\[{]", path)
    return path if wild is None else path[: wild.start()].rpartition("/")[0] or "/"


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_config(data: dict[str, Any], *, base: Path = Path("."), check_release: bool = True) -> Config:
    """Validate a config mapping. Raises ConfigError naming every bad field, then checks encoding safety (unless
    `check_release` is false: commands that only read the store skip the noise calibration it needs, and with it
    the accountants' imports, torch among them, about 2 s)."""
    if "base" in data:  # set from the file's location, never from its contents
        raise ConfigError(
            "invalid federation config:\n  base: Extra inputs are not permitted (paths are relative to the config file)"
        )
    try:
        config = Config.model_validate({**data, "base": base})
    except ValidationError as exc:
        errors = exc.errors()
        # A bad item inside a tuple also makes pydantic report the tuple as too short: keep the real error only.
        locations = [tuple(err["loc"]) for err in errors]
        errors = [
            err
            for err in errors
            if not (
                err["type"] == "too_short"
                and any(loc != tuple(err["loc"]) and loc[: len(err["loc"])] == tuple(err["loc"]) for loc in locations)
            )
        ]
        lines = [f"  {_field_path(err['loc'])}: {err['msg']}" for err in errors]
        raise ConfigError("invalid federation config:\n" + "\n".join(lines)) from None
    if not check_release:
        return config
    # Imported here: the encoding check needs the config types, and privacy/ must not import fusion/.
    from fusion.config.parameters import release_parameters

    try:
        release_parameters(config)  # refuses configs whose encrypted sums could wrap
    except ConfigError:
        raise
    except ArithmeticError as exc:  # a resolution so fine that the encoding's integers overflow
        raise ConfigError(
            f"invalid federation config:\n  metrics[*].resolution: too fine to encode in 64-bit integers ({exc})"
        ) from None
    except ValueError as exc:  # e.g. no noise level reaches epsilon at this sensitivity
        raise ConfigError(f"invalid federation config:\n  privacy.epsilon / privacy.delta: {exc}") from None
    return config


def load_config(path: str | Path, *, check_release: bool = True) -> Config:
    """Load and validate a federation config file (see `parse_config` for `check_release`)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; --config names the federation's TOML file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); TOML files are "
            "UTF-8: re-save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        return parse_config(data, base=path.resolve().parent, check_release=check_release)
    except ConfigError as exc:  # name the file: a federation's roles often hold several configs
        text = str(exc)
        if text.startswith("invalid federation config"):
            text = text.replace("invalid federation config", f"invalid federation config {path}", 1)
        raise ConfigError(text) from None


__all__ = [
    "Config",
    "FeedConfig",
    "FeedFormat",
    "InstitutionConfig",
    "MetricConfig",
    "PrivacyConfig",
    "PrivacyMode",
    "ScheduleConfig",
    "TimeFormat",
    "load_config",
    "parse_config",
    "parse_duration",
]
