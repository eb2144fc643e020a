"""The federation config: a TOML file validated at load into frozen models, with field-level messages. Here the
whole (`Config`, the `[federation]` and `[pipeline]` blocks, `parse_config`, `load_config`); the blocks' models
live beside it (`institutions`, `privacy`, `stream`, ...) and are re-exported from here."""

from __future__ import annotations

import math
import posixpath
import re
import tomllib
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Self

from pydantic import Field, ValidationError, field_validator, model_validator

from fusion.config.base import Frozen, Name
from fusion.config.brokers import check_sources, check_tls_files
from fusion.config.forecasting import ForecastingConfig
from fusion.config.institutions import FeedConfig, FeedFormat, InstitutionConfig, TimeFormat
from fusion.config.mechanisms import MechanismsConfig
from fusion.config.privacy import MetricConfig, PrivacyConfig, PrivacyMode, PrivacyUnit, StatisticsConfig
from fusion.config.sql_limits import SqlLimits
from fusion.config.stream import StreamConfig, StreamSource, duration_or_zero
from fusion.config.training import ModelConfig, check_models
from fusion.errors import ConfigError
from fusion.runtime.durations import parse_duration
from fusion.runtime.schedule import ScheduleConfig, check_schedules
from privacy.masking_graph import MAX_NEIGHBOURS, neighbour_count

#: Readings per scan shard when `pipeline.shard_rows` is unset. A running shard holds its readings while it is
#: de-duplicated and, at entity level, bounded (about 70 bytes a reading at event level, 140 at entity level, on top
#: of the process's ~0.3 GiB); an institution with more is split, its files first staged (scanned once, written out
#: per shard), which cost 15-20% of the throughput at 30M readings. Peaks with the default 2 workers (bench data, 5
#: institutions): event level 1.3 GiB at 8M readings an institution, entity level 1.35 GiB at 8M in two 4M shards
#: (2.0 GiB at 6M in one).
DEFAULT_SHARD_ROWS: dict[PrivacyUnit, int] = {PrivacyUnit.READING: 8_000_000, PrivacyUnit.ENTITY: 4_000_000}


class PipelineConfig(Frozen):
    """Execution knobs; Beam options (e.g. --runner) are passed through on the command line."""

    # Readings per scan shard: an institution's readings are hash-partitioned into ceil(rows / shard_rows) shards,
    # each scanned, de-duplicated, bounded and packed by one worker (each running shard holds about 70 bytes a
    # reading at event level, 140 at entity level). Unset: 8M at event level, 4M at entity level.
    shard_rows: int | None = Field(default=None, ge=1024, le=500_000_000)
    batch_rows: int = Field(default=262_144, ge=1024)  # rows per Arrow batch read from a CSV or JSON lines file
    # Steps run at a time when `fusion batch` runs the contributions in process (no Beam options): files to stage,
    # scan shards, institutions' seals. Each running shard holds its rows (see shard_rows): memory grows with it.
    workers: int = Field(default=2, ge=1, le=64)


class FederationConfig(Frozen):
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
    # How long the shared exchange keeps a released interval's files (contributions, unmask answers, roster,
    # aggregate: about 1.5 MB an institution a release) after its release is published; then `fusion batch`,
    # `fusion stream` and `fusion prune-exchange` remove them. Unset: kept until removed by hand. Nothing a
    # published release needs is there: `fusion verify` checks the store alone.
    exchange_retention: str | None = None

    @field_validator("exchange_retention")
    @classmethod
    def _exchange_retention(cls, retention: str | None) -> str | None:
        if retention is not None:
            duration_or_zero(retention)
        return retention

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


class Config(Frozen):
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
        check_tls_files([(i.id, n, s) for i in self.institutions for n, s in enumerate(i.sources)], self.resolve)
        shared_dirs = {
            label: _directory_key(self.resolve(path))
            for label, path in (("exchange", self.federation.exchange), ("store", self.federation.store))
        }
        entity_level = self.privacy.unit is PrivacyUnit.ENTITY
        for index, institution in enumerate(self.institutions):
            stop = institution.stop_rate(entity_level=entity_level)
            if institution.max_reject_rate is None and institution.warn_reject_rate > stop:
                raise ValueError(
                    f"institutions[{index}].warn_reject_rate: warn_reject_rate {institution.warn_reject_rate} is above "
                    f"max_reject_rate {stop} (its default at {self.privacy.unit.value} level); the warning comes first"
                )
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
        neighbours = neighbour_count(len(self.institutions), max_colluding=self.privacy.max_colluding)
        if neighbours > MAX_NEIGHBOURS:
            raise ValueError(
                f"privacy.max_colluding = {self.privacy.max_colluding}: each of the {len(self.institutions)} "
                f"institutions would mask with {neighbours} others and put {neighbours * (neighbours + 1):,} Shamir "
                f"shares in its envelope's header, more than a header holds (k at most {MAX_NEIGHBOURS}: "
                f"max_colluding at most {MAX_NEIGHBOURS // 2 - 1})"
            )
        if self.privacy.quorum > len(self.institutions):
            raise ValueError(
                f"privacy.quorum = {self.privacy.quorum} exceeds the {len(self.institutions)} institutions; "
                "no release could ever meet it"
            )
        check_schedules(self.schedules, window=self.window, period=self.period)
        check_models(
            self.models, metrics=[m.name for m in self.metrics], regions=len(self.regions), delta=self.privacy.delta,
            period=self.period,
        )  # fmt: skip
        if self.forecasting is not None:
            self.forecasting.check_window(self.window)
        if self.mechanisms is not None:
            self.mechanisms.check(self)
        return self

    def _private_apart(self) -> None:
        """Refuse directories that overlap where they must not: the exchange and the store (each party reads
        its own layout there), a private directory and one other parties read, and two parties' private
        directories (`_parties_apart`)."""
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
        self._parties_apart()

    def _parties_apart(self) -> None:
        """Refuse one party's private directory that is, holds or lies in another party's: key files of one name
        would collide (the aggregator's and each institution's signing key is `signing.key`; an institution's
        sealed records are `<keys>/sealed/<interval>.json`, without its id), and one party's files would sit where
        another keeps its secrets. The parties: the key holder, the aggregator, each institution (its keys and dead
        letters), the stream's driver (its state and spool, by default inside the state) and the mechanisms'
        operator."""
        # (field, directory, the party it is private to)
        private = [
            ("federation.keys", self.keys_path, "the key holder (its HE secret key)"),
            ("federation.aggregator_keys", self.aggregator_keys_path, "the aggregator"),
            ("stream.state", self.stream_state_path, "the stream's driver"),
            ("stream.spool", self.stream_spool_path, "the stream's driver"),
        ]
        if self.mechanisms is not None:
            private.append(("mechanisms.keys", self.resolve(self.mechanisms.keys), "the mechanisms' operator"))
        for index, institution in enumerate(self.institutions):
            party = f"institutions[{index}] ({institution.id})"
            private += [
                (f"institutions[{index}].keys", self.institution_keys_path(institution), party),
                (f"institutions[{index}].dead_letter", self.dead_letter_path(institution), party),
            ]
        for later, (field_name, path, party) in enumerate(private):
            for other_field, other_path, other_party in private[:later]:
                if party != other_party and _overlap(path, other_path):
                    raise ValueError(
                        f"{field_name} ({path}) is, holds or lies in {other_field} ({other_path}), private to "
                        f"{other_party}: each party keeps its keys and files in a directory of its own"
                    )

    @property
    def window(self) -> timedelta:
        return parse_duration(self.federation.window)

    @property
    def exchange_retention(self) -> timedelta | None:
        """`federation.exchange_retention` as a duration (None: released intervals' files are kept)."""
        text = self.federation.exchange_retention
        return None if text is None else duration_or_zero(text)

    @property
    def shard_rows(self) -> int:
        """Readings per scan shard: `pipeline.shard_rows`, or the privacy unit's default (DEFAULT_SHARD_ROWS)."""
        configured = self.pipeline.shard_rows
        return DEFAULT_SHARD_ROWS[self.privacy.unit] if configured is None else configured

    @property
    def deadline(self) -> timedelta:
        text = self.federation.deadline.strip()
        return timedelta(0) if text in ("0", "0s") else parse_duration(text)

    @property
    def stream_window(self) -> timedelta:
        return parse_duration(self.stream.window) if self.stream.window else self.window

    @property
    def allowed_lateness(self) -> timedelta:
        return duration_or_zero(self.stream.allowed_lateness)

    @property
    def max_clock_skew(self) -> timedelta:
        return duration_or_zero(self.stream.max_clock_skew)

    @property
    def stream_poll(self) -> timedelta:
        return duration_or_zero(self.stream.poll)

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
        return _resolved(self.base, path)

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


@lru_cache(maxsize=4096)
def _resolved(base: Path, path: str) -> str:
    """`base / path`, resolved (symbolic links followed), once per process: every exchange, spool and key path of
    a release goes through here, hundreds of times a window."""
    return str((base / path).resolve())


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
    except ArithmeticError as exc:  # a range so wide, or a resolution so fine, that the encoding's integers overflow
        metric = _overflowing_metric(config)
        if metric is None:  # the encoding fits: the noise's arithmetic failed (an epsilon far too small)
            raise ConfigError(f"invalid federation config:\n  privacy.epsilon / privacy.delta: {exc}") from None
        raise ConfigError(f"invalid federation config:\n  {metric}: {exc}") from None
    except ValueError as exc:  # e.g. no noise level reaches epsilon at this sensitivity
        metric = _overflowing_metric(config)  # a resolution so fine that no noise covers one reading
        also = f"\n  {metric}" if metric else ""
        raise ConfigError(f"invalid federation config:\n  privacy.epsilon / privacy.delta: {exc}{also}") from None
    return config


def _overflowing_metric(config: Config) -> str | None:
    """The field to blame for an encoding that overflows: the metric whose (upper - lower) / resolution is the
    largest, named with its values (None when every metric's encoding fits in 64-bit integers)."""
    from privacy.encoding import units_bound

    def steps(metric: MetricConfig) -> float:
        try:
            return float(units_bound(metric.lower, metric.upper, metric.resolution))
        except (ArithmeticError, ValueError):
            return math.inf

    worst = max(config.metrics, key=steps)
    if steps(worst) < 2.0**53:
        return None
    return (
        f"metrics.{worst.name} (lower = {worst.lower}, upper = {worst.upper}, resolution = {worst.resolution}): "
        "its range over its resolution is too large to encode in 64-bit integers; narrow the range or coarsen the "
        "resolution"
    )


def load_config(path: str | Path, *, check_release: bool = True) -> Config:
    """Load and validate a federation config file (see `parse_config` for `check_release`)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a byte order mark (Windows editors) is no TOML
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
    "PrivacyUnit",
    "ScheduleConfig",
    "StreamSource",
    "TimeFormat",
    "load_config",
    "parse_config",
    "parse_duration",
]
