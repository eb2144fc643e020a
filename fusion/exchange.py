"""Where parties leave files for each other: keys, contribution and aggregate envelopes, refusals.

All paths go through Beam FileSystems, so the exchange can be a local directory or a bucket (gs://, s3://).
Writes are atomic: a file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from fusion.errors import FusionError

PUBLIC_CONTEXT = "he_public.ctx"
SECRET_CONTEXT = "he_secret.ctx"


@dataclass(frozen=True)
class ReleaseKey:
    """Identifies one release: federation and interval, plus the layout and parameters digests."""

    federation: str
    start: datetime
    end: datetime
    layout_digest: str
    parameters_digest: str

    @property
    def interval_name(self) -> str:
        """A filesystem-safe name for the interval, e.g. 20260101T0000Z-20260102T0000Z."""
        fmt = "%Y%m%dT%H%MZ"
        return f"{self.start.astimezone(UTC).strftime(fmt)}-{self.end.astimezone(UTC).strftime(fmt)}"

    @property
    def release_id(self) -> str:
        doc = "|".join(
            [
                self.federation,
                self.start.isoformat(),
                self.end.isoformat(),
                self.layout_digest,
                self.parameters_digest,
            ]
        )
        return "r-" + hashlib.sha256(doc.encode()).hexdigest()[:24]


def public_context_path(exchange: str) -> str:
    """The federation's public HE context, published by the key holder for everyone to encrypt with."""
    return join(exchange, PUBLIC_CONTEXT)


@dataclass(frozen=True)
class PublicContextRef:
    """The exchange's public HE context by path and SHA-256. DoFns carry this instead of the context itself
    (about 1 MB, which Beam would pickle and compress with every DoFn it ships) and read it once per instance."""

    path: str
    sha256: str

    @classmethod
    def published(cls, exchange: str) -> PublicContextRef:
        path = public_context_path(exchange)
        return cls(path=path, sha256=hashlib.sha256(read_bytes(path)).hexdigest())

    def read(self) -> bytes:
        """The context's bytes; refuses a context that changed since the pipeline was built."""
        data = read_bytes(self.path)
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise FusionError(f"the public HE context {self.path} changed while a pipeline ran; run it again")
        return data


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base, *parts)


def contributions_dir(exchange: str, key: ReleaseKey) -> str:
    return join(exchange, key.interval_name, "contributions")


def contribution_path(exchange: str, key: ReleaseKey, institution: str) -> str:
    return join(contributions_dir(exchange, key), f"{institution}.fenv")


def unmask_dir(exchange: str, key: ReleaseKey) -> str:
    """The institutions' answers to the roster: seed shares and pairwise-mask corrections."""
    return join(exchange, key.interval_name, "unmask")


def unmask_path(exchange: str, key: ReleaseKey, institution: str) -> str:
    return join(unmask_dir(exchange, key), f"{institution}.fenv")


def aggregation_status_path(exchange: str, key: ReleaseKey) -> str:
    """The aggregator's last word on a release: aggregated, refused, waiting or awaiting_unmask."""
    return join(exchange, key.interval_name, "aggregate.status.json")


def roster_path(exchange: str, key: ReleaseKey) -> str:
    """The aggregator's roster for this release: which institutions are included and which absent. Written
    once the contributions are closed; it starts the unmask round."""
    return join(exchange, key.interval_name, "roster.json")


def aggregate_path(exchange: str, key: ReleaseKey) -> str:
    return join(exchange, key.interval_name, "aggregate.fenv")


def refusal_path(exchange: str, key: ReleaseKey) -> str:
    return join(exchange, key.interval_name, "aggregate.refused.json")


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically: to a temporary sibling, then rename over `path`."""
    directory, _ = FileSystems.split(path)
    if "://" not in path:
        os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp-{secrets.token_hex(6)}"
    with FileSystems.create(temporary, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])


def read_bytes(path: str) -> bytes:
    if not FileSystems.exists(path):
        raise FusionError(f"expected file not found: {path}")
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        data: bytes = handle.read()
    return data


def write_json(path: str, doc: object) -> None:
    write_bytes(path, json.dumps(doc, indent=2, sort_keys=True, default=str).encode())


def exists(path: str) -> bool:
    return bool(FileSystems.exists(path))


def delete_if_exists(path: str) -> None:
    if FileSystems.exists(path):
        FileSystems.delete([path])


def list_files(directory: str, suffix: str) -> list[str]:
    pattern = join(directory, f"*{suffix}")
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
