"""The `[stream]` block: where a stream's readings come from (the feeds' files, Pub/Sub or Kafka), its windows and
lateness, and where its progress and spool are kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Self

from pydantic import Field, field_validator, model_validator

from fusion.config.base import Frozen
from fusion.runtime.durations import parse_duration


def duration_or_zero(text: str) -> timedelta:
    return timedelta(0) if text.strip() in ("0", "0s") else parse_duration(text)


class StreamSource(StrEnum):
    FILES = "files"  # the feeds' files (and stdin), micro-batched by `fusion stream` on this machine
    PUBSUB = "pubsub"  # messages of JSON lines, attribute `institution`; windowed by Beam on a streaming runner
    KAFKA = "kafka"  # records of JSON lines keyed by institution id; windowed by Beam on a streaming runner


class StreamConfig(Frozen):
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
        duration_or_zero(text)
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
