"""The federation's institutions and their feeds: each feed's files (or broker source), their format, and how their
columns map to a reading's fields."""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import Field, field_validator, model_validator

from fusion.config.base import Frozen, Name
from fusion.config.brokers import BrokerSource
from schemas.readings import ALL_FIELDS, folded_name


class FeedFormat(StrEnum):
    PARQUET = "parquet"
    CSV = "csv"
    JSONL = "jsonl"


class TimeFormat(StrEnum):
    ISO = "iso"  # ISO 8601 text or a native timestamp column; naive times are UTC
    EPOCH_S = "epoch_s"
    EPOCH_MS = "epoch_ms"


class FeedConfig(Frozen):
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

    @model_validator(mode="after")
    def _columns_apart(self) -> Self:
        """Refuse two fields mapped to columns whose names differ only in ASCII case (`value` and `Value`): DuckDB,
        which validates every batch, matches names ignoring that case, so it would read one column for both."""
        seen: dict[str, tuple[str, str]] = {}
        for field in ALL_FIELDS:
            column = self.column_for(field)
            other = seen.setdefault(folded_name(column), (field, column))
            if other[1] != column:
                raise ValueError(
                    f"columns: {other[0]} is read from column '{other[1]}' and {field} from '{column}', names that "
                    "differ only in case, which validation (DuckDB) cannot tell apart; map one of them to a column "
                    "named otherwise"
                )
        return self

    def column_for(self, field: str) -> str:
        """The feed's column name that holds a logical reading field (identity unless mapped)."""
        return self.columns.get(field, field)


DEFAULT_MAX_REJECT_RATE = 0.5  # at reading level, where max_reject_rate is unset


class InstitutionConfig(Frozen):
    id: Name
    name: str = ""
    feeds: tuple[FeedConfig, ...] = Field(min_length=1)
    dead_letter: str | None = None  # defaults to <base>/deadletter/<id>
    keys: str | None = None  # the institution's private signing key directory; defaults to <base>/institution-keys/<id>
    # Readings per cell and release; bounds the encrypted totals. Default: the largest that cannot wrap.
    max_readings_per_cell: int | None = Field(default=None, gt=0)
    # Share of an interval's rows rejected (rows of other intervals and exact duplicates aside) above which a run
    # warns, and above which the institution seals nothing unless its operator passes --accept-rejects. Unset,
    # max_reject_rate is 0.5 at reading level and 1 (never withhold) at entity level, where rejected rows are not
    # bounded per entity and one entity's bad rows alone could withhold the contribution, a public fact
    # (stop_rate).
    warn_reject_rate: float = Field(default=0.1, ge=0, le=1)
    max_reject_rate: float | None = Field(default=None, ge=0, le=1)
    sources: tuple[BrokerSource, ...] = ()  # MQTT / NATS JetStream, read by `fusion stream` (fusion/config/brokers.py)

    def stop_rate(self, *, entity_level: bool) -> float:
        """The reject rate above which the institution seals nothing: max_reject_rate, or its default for the
        privacy unit (0.5 for a reading, 1 for an entity)."""
        if self.max_reject_rate is not None:
            return self.max_reject_rate
        return 1.0 if entity_level else DEFAULT_MAX_REJECT_RATE

    @model_validator(mode="after")
    def _reject_rates(self) -> Self:
        if self.max_reject_rate is not None and self.warn_reject_rate > self.max_reject_rate:
            raise ValueError(
                f"warn_reject_rate {self.warn_reject_rate} is above max_reject_rate {self.max_reject_rate}; "
                "the warning comes first"
            )
        return self
