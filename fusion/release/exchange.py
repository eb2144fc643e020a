"""Where parties leave files for each other: keys, contribution and aggregate envelopes, refusals.

All paths go through Beam FileSystems, so the exchange can be a local directory or a bucket (gs://, s3://).
Writes are atomic: a file is written under a temporary name and renamed into place. Beam is imported on first
use, and a local path is joined, read, written and tested without it, as Beam's local file system would: `fusion
keys` publishes the public context without loading Beam (about a second).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fusion.errors import FusionError


class _BeamOnUse:
    """Stands for a Beam class (FileSystems, CompressionTypes) until an attribute is first read: it then imports
    Beam, which commands that only read the store or create keys never load."""

    def __init__(self, module: str, name: str) -> None:
        self._where = (module, name)

    def __getattr__(self, attribute: str) -> Any:
        import importlib

        module, name = self._where
        return getattr(getattr(importlib.import_module(module), name), attribute)


FileSystems: Any = _BeamOnUse("apache_beam.io.filesystems", "FileSystems")
CompressionTypes: Any = _BeamOnUse("apache_beam.io.filesystem", "CompressionTypes")
#: A path Beam gives to a file system other than the local one: it starts with a scheme (gs://, s3://, ...).
_URL = re.compile(r"^\s*[a-zA-Z][-a-zA-Z0-9+.]*://")


def _local(path: str) -> bool:
    return _URL.match(path) is None


def is_local(path: str) -> bool:
    """Whether `path` is on this machine's file system (no URL scheme), where the OS lists and measures it."""
    return _local(path)

#: An interval_name: start and end, each to the minute or (when either is not on a whole minute) to the second.
_INTERVAL_NAME = re.compile(r"^(\d{8}T\d{4}(?:\d{2})?Z)-(\d{8}T\d{4}(?:\d{2})?Z)$")

PUBLIC_CONTEXT = "he_public.ctx"
SECRET_CONTEXT = "he_secret.ctx"
#: The folder of a release that holds each kind of institution envelope, named `<institution>.fenv`.
ENVELOPE_FOLDERS = {"contribution": "contributions", "unmask": "unmask"}
ENVELOPE_SUFFIX = ".fenv"


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
        """A filesystem-safe name for the interval, e.g. 20260101T0000Z-20260102T0000Z (with seconds, e.g.
        20260101T000015Z, when either end is not on a whole minute, so sub-minute windows get names of their
        own)."""
        start, end = self.start.astimezone(UTC), self.end.astimezone(UTC)
        fmt = "%Y%m%dT%H%M%SZ" if start.second or end.second else "%Y%m%dT%H%MZ"
        return f"{start.strftime(fmt)}-{end.strftime(fmt)}"

    @staticmethod
    def parse_interval_name(name: str) -> tuple[datetime, datetime] | None:
        """(start, end) of an `interval_name`, or None if `name` is not one."""
        match = _INTERVAL_NAME.match(name)
        if match is None:
            return None
        start, end = (
            datetime.strptime(text, "%Y%m%dT%H%M%SZ" if len(text) == 16 else "%Y%m%dT%H%MZ").replace(tzinfo=UTC)
            for text in match.groups()
        )
        return start, end

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


#: path -> ((device, inode, size, modification and change times in ns), its SHA-256): `public_context_sha256`.
_CONTEXT_DIGESTS: dict[str, tuple[tuple[int, ...], str]] = {}


def public_context_sha256(path: str) -> str:
    """The SHA-256 (hex) of the public HE context at `path`. Every envelope names the context it was made under,
    and every party's step checks it: a local file's digest is kept while its device, inode, size, modification
    and change times stay the same (any write to the file, or to its times, changes its change time; a rename
    over it brings another inode), so a burst of windows reads and hashes the megabytes once, not once per step."""
    if not _local(path):
        return hashlib.sha256(read_bytes(path)).hexdigest()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FusionError(f"expected file not found: {path}") from None
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    kept = _CONTEXT_DIGESTS.get(path)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    digest = hashlib.sha256(read_bytes(path)).hexdigest()
    _CONTEXT_DIGESTS[path] = (stamp, digest)
    return digest


def join(base: str, *parts: str) -> str:
    return os.path.join(base, *parts) if _local(base) else FileSystems.join(base, *parts)


def contributions_dir(exchange: str, key: ReleaseKey) -> str:
    return join(exchange, key.interval_name, ENVELOPE_FOLDERS["contribution"])


def contribution_path(exchange: str, key: ReleaseKey, institution: str) -> str:
    return join(contributions_dir(exchange, key), f"{institution}{ENVELOPE_SUFFIX}")


def unmask_dir(exchange: str, key: ReleaseKey) -> str:
    """The institutions' answers to the roster: shares of the self-mask seeds and of the mask keys held with the
    absent."""
    return join(exchange, key.interval_name, ENVELOPE_FOLDERS["unmask"])


def unmask_path(exchange: str, key: ReleaseKey, institution: str) -> str:
    return join(unmask_dir(exchange, key), f"{institution}{ENVELOPE_SUFFIX}")


@dataclass(frozen=True)
class EnvelopePlace:
    """What an envelope's place in the exchange claims: the folder it is in and the institution its file is named
    after. Only a claim: an envelope is its signer's, and counts only in its signer's own place."""

    folder: str  # e.g. "contributions"
    named: str  # the file's name without `.fenv`, e.g. "alpha"

    @classmethod
    def of(cls, path: str) -> EnvelopePlace:
        directory, name = _split(path)
        return cls(_split(directory)[1], name.removesuffix(ENVELOPE_SUFFIX))

    @property
    def relative(self) -> str:
        """The place as folder/file, e.g. contributions/alpha.fenv."""
        return f"{self.folder}/{self.named}{ENVELOPE_SUFFIX}"

    @staticmethod
    def own(kind: str, institution: str) -> EnvelopePlace:
        """The one place where an envelope of `kind` ('contribution' or 'unmask') signed by `institution` counts."""
        return EnvelopePlace(ENVELOPE_FOLDERS.get(kind, ""), institution)


def aggregation_status_path(exchange: str, key: ReleaseKey) -> str:
    """The aggregator's last word on a release: aggregated, refused, waiting or awaiting_unmask."""
    return join(exchange, key.interval_name, "aggregate.status.json")


def roster_path(exchange: str, key: ReleaseKey) -> str:
    """The aggregator's roster for this release: which institutions are included and which absent. Written
    once the contributions are closed; it starts the unmask round."""
    return join(exchange, key.interval_name, "roster.json")


def acknowledgement_path(exchange: str, key: ReleaseKey, institution: str) -> str:
    """An institution's signature on the roster it was shown (the consistency round, before any answer)."""
    return join(exchange, key.interval_name, "acknowledgements", f"{institution}.json")


def aggregate_path(exchange: str, key: ReleaseKey) -> str:
    return join(exchange, key.interval_name, "aggregate.fenv")


def refusal_path(exchange: str, key: ReleaseKey) -> str:
    return join(exchange, key.interval_name, "aggregate.refused.json")


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically: to a temporary sibling, then rename over `path` (locally one atomic replace, so a
    reader or a crash never finds `path` missing; elsewhere delete, then rename, as object stores need)."""
    if _local(path):
        temporary = f"{path}.tmp-{secrets.token_hex(6)}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
        return
    directory, _ = FileSystems.split(path)
    if "://" not in path:
        os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp-{secrets.token_hex(6)}"
    with FileSystems.create(temporary, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(data)
    if "://" not in path:
        os.replace(temporary, path)
        return
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])


def read_bytes(path: str) -> bytes:
    if not exists(path):
        raise FusionError(f"expected file not found: {path}")
    if _local(path):
        with open(path, "rb") as local:
            return local.read()
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        data: bytes = handle.read()
    return data


def read_bounded(path: str, limit: int) -> bytes:
    """A file's bytes, refused (FileTooLarge, which names no path: the caller does) without reading it when it
    holds more than `limit`: a reader that knows how large a file it expects never loads whatever lies there."""
    if not exists(path):
        raise FusionError(f"expected file not found: {path}")
    size = os.path.getsize(path) if _local(path) else FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    if size > limit:
        raise FileTooLarge(f"the file holds {size} bytes, more than the {limit} expected")
    return read_bytes(path)


class FileTooLarge(FusionError):
    """A file in the exchange is larger than any the reader expects there (`read_bounded`)."""


def read_head(path: str, size: int) -> bytes:
    """The first `size` bytes of a file (all of it if it is shorter)."""
    if not exists(path):
        raise FusionError(f"expected file not found: {path}")
    if _local(path):
        with open(path, "rb") as local:
            return local.read(size)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        data: bytes = handle.read(size)
    return data


def write_json(path: str, doc: object) -> None:
    write_bytes(path, json.dumps(doc, indent=2, sort_keys=True, default=str).encode())


def exists(path: str) -> bool:
    return os.path.exists(path) if _local(path) else bool(FileSystems.exists(path))


def remove_tree(directory: str) -> None:
    """Delete `directory` and everything under it, on any Beam file system: a local tree with shutil (no glob
    patterns involved), elsewhere every object listed under it, each by its exact name (object stores have no
    directories, and `exists` on a directory's name is false there)."""
    if "://" not in directory or directory.startswith("file://"):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(directory.removeprefix("file://"))
        return
    remove_listed(directory)


def remove_listed(directory: str) -> None:
    """Delete every file listed under `directory` (recursively), each by its exact name. Nothing to do when the
    directory does not exist (file systems with directories refuse to list one that is absent)."""
    base = directory.rstrip("/")
    try:
        results = FileSystems.match([join(glob_escape(base), "**")])
    except _beam_io_error():
        if not FileSystems.exists(base):
            return
        raise
    paths = [m.path for result in results for m in result.metadata_list if m.path.startswith(base + "/")]
    if paths:
        FileSystems.delete([glob_escape(path) for path in paths])  # delete() matches its paths as patterns too


def _beam_io_error() -> type[Exception]:
    from apache_beam.io.filesystem import BeamIOError

    return BeamIOError


def glob_escape(path: str) -> str:
    """`path` as a Beam FileSystems pattern that matches only itself: each of * ? [ ] in a class of its own."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in path)


def delete_if_exists(path: str) -> None:
    if FileSystems.exists(path):
        FileSystems.delete([path])


def _split(path: str) -> tuple[str, str]:
    """(directory, last component), as Beam's FileSystems.split, without Beam for a local path."""
    return os.path.split(os.path.abspath(path)) if _local(path) else FileSystems.split(path)


def list_files(directory: str, suffix: str) -> list[str]:
    """The files directly in `directory` whose names end with `suffix`, sorted; none if it does not exist.
    A local directory is listed by the OS (as Beam's local file system would, which walks the whole tree and
    matches `*suffix`: a release's folders are listed a few times per window, by every party)."""
    if _local(directory):
        try:
            with os.scandir(directory) as entries:
                names = [e.name for e in entries if e.name.endswith(suffix) and e.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(os.path.join(directory, name) for name in names)
    pattern = join(directory, f"*{suffix}")
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
