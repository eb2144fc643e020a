"""A durable journal of one institution's broker messages: what makes an acknowledgement safe.

A reader thread appends each batch of messages as one JSON-lines file (written to a hidden temporary, fsynced,
renamed in, the directory fsynced) and only then acknowledges the batch to the broker. The file is an ordinary
input of `fusion stream` from that moment on (validated, windowed and spooled like a feed file, read once), so a
crash before the acknowledgement redelivers messages that may already be journalled: the broker ids of each
file's messages are listed in a sidecar (`<file>.ids`, written before the file itself is renamed in, one
`<id> <subject or topic as a JSON string>` a line; a list from before subjects were listed holds the ids alone), and
a message whose id is listed is acknowledged again but not journalled twice.

A message that is not UTF-8, or larger than the source's limit, is journalled as one line that is not JSON
(`!broker message ...: why`), so the stream dead-letters it as a malformed record with that description and
counts it, and the stream goes on.

Once every window a segment fed has been released, the driver removes the segment (`SourceJournal.remove`); the
ids of its messages stay listed, so the journal holds only readings that are not released yet. A JetStream reader
records its consumer's acknowledgement floor (`AckFloor`, kept in the journal's `consumer.floor`, never lowered
while the stream and subjects stay the same): the reader acknowledges only what it journalled, so every message of
the consumer's subjects at or below the floor is journalled, and is recognised by the floor alone, also when a
consumer created again delivers the stream from its start. When the source's subjects change, the floor of the
consumer over the old ones stays on record beside the new consumer's (`earlier`, for the stream's life): a message
of the old subjects at or below it is journalled (`journalled_earlier`), so the new consumer, which reads its
subjects from the stream's start, journals only what the old one did not. A list of ids goes
(`prune_acknowledged`) once a floor on record holds each of its messages, by sequence and subject: a message the
consumer over a.> journalled but never acknowledged is below the floor of a consumer over b.> that replaced it,
which never delivers it, but a consumer over a.> created again later does, and only its id recognises it then.

MQTT has no such floor, so an MQTT reader drops the ids of segments released more than `MQTT_ID_RETENTION_S` ago
(`prune_released`): the broker redelivers a message only when its acknowledgement was lost, at the next session,
so a week covers any outage a stream would ride out. It also sends a filter's retained messages at each subscription,
so the journal records the filters the reader's persistent session holds (`subscriptions`), and a reader subscribes
only the others (and unsubscribes those the source no longer declares). A filter subscribed anew over a topic the
reader read before (its topics changed) brings the topic's retained message again, however old: the journal keeps,
for each topic, the digest of the latest message that arrived retained and of the latest one whose id was dropped
(`retained.topics`), and a retained delivery of one of them is not journalled again (`retained_before`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fusion.config.brokers import nats_subject_matches

JOURNAL_SUFFIX = ".jsonl"
IDS_SUFFIX = ".ids"
RELEASED_SUFFIX = ".released"  # the ids of a segment removed once every window it fed was released
FLOOR_FILE = "consumer.floor"  # a JetStream journal's AckFloor, as JSON
#: The source a journal belongs to (its broker session, `pipelines.broker_sources.source_identity`), as JSON.
SOURCE_FILE = "source.json"
SUBSCRIPTIONS_FILE = "session.topics"  # an MQTT journal's: the topic filters its broker session holds, as JSON
#: An MQTT journal's, as JSON: for each topic, the digests of the latest message that arrived retained ("retained")
#: and of the latest message whose id was dropped ("dropped"), either of which the broker may send again as retained.
RETAINED_FILE = "retained.topics"
#: How long an MQTT reader keeps the ids of a released segment (see the module's docstring).
MQTT_ID_RETENTION_S = 7 * 24 * 3600.0


def message_lines(payload: bytes, *, name: str, max_bytes: int | None) -> list[str]:
    """A message's JSON lines; a refused message (not UTF-8, or over `max_bytes` when there is a limit) is one line
    saying why (it is dead-lettered as malformed). The Kafka and Pub/Sub job splits its messages here too."""
    if max_bytes is not None and len(payload) > max_bytes:
        return [f"!broker message {name}: {len(payload)} bytes, over the source's max_message_bytes = {max_bytes}"]
    try:
        text = payload.decode("utf-8-sig")  # a byte-order mark before the first line is not part of it
    except UnicodeDecodeError as exc:
        return [f"!broker message {name}: not UTF-8 ({len(payload)} bytes; {exc.reason} at byte {exc.start})"]
    # Lines end as in a JSON-lines file (\n, \r\n or \r), not at every character str.splitlines() takes for a
    # line break: U+2028, U+0085 or a form feed inside a JSON string is part of the reading. A line is blank only if
    # it holds JSON's whitespace alone (space, tab): one of a form feed or a no-break space is a malformed record.
    return [line for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip(" \t")]


@dataclass(frozen=True)
class AckFloor:
    """What a JetStream consumer over `subjects` has acknowledged: every message of the stream's life `life` (its
    creation time) with a sequence up to `sequence`. Its reader acknowledges a message only once journalled, so each
    of those messages is in the journal."""

    life: str
    sequence: int
    subjects: tuple[str, ...]

    def covers(self, message_id: str) -> bool:
        """Whether the message of a JetStream id (`<sequence>@<stream's creation time>`) that this floor's consumer
        delivers is journalled or can never be delivered again: of this life at or below the floor, or of an older
        life (that stream is gone). Blind to subjects: a message of others at or below the floor may not be."""
        sequence, at, life = message_id.partition("@")
        if not (at and sequence.isdigit()):
            return False  # not a JetStream id: nothing says it is journalled
        return life != self.life or int(sequence) <= self.sequence

    def holds(self, message_id: str, subject: str) -> bool:
        """Whether the message of a JetStream id on `subject` is journalled by this floor's consumer: of this life, at
        or below the floor, and of one of its subjects (for the floor of subjects the source read before)."""
        sequence, at, life = message_id.partition("@")
        return (
            bool(at and sequence.isdigit())
            and life == self.life
            and int(sequence) <= self.sequence
            and nats_subject_matches(self.subjects, subject)
        )

    def raised_by(self, known: AckFloor | None) -> AckFloor:
        """This floor, or `known` where that is higher for the same life and subjects: a consumer deleted on the
        broker and created again starts from 0, but what the old one acknowledged is journalled all the same."""
        if known is not None and (known.life, known.subjects) == (self.life, self.subjects):
            return replace(self, sequence=max(self.sequence, known.sequence))
        return self


def _floor(record: dict[str, Any]) -> AckFloor:
    return AckFloor(record["life"], int(record["sequence"]), tuple(record["subjects"]))


def _floor_record(floor: AckFloor) -> dict[str, Any]:
    return {"life": floor.life, "sequence": floor.sequence, "subjects": list(floor.subjects)}


def _listed(sidecar: Path) -> list[tuple[str, str | None]]:
    """The (id, subject or topic) of each message a sidecar lists, in order (None: an id listed alone)."""
    listed: list[tuple[str, str | None]] = []
    for line in sidecar.read_text().split("\n"):
        message_id, space, subject = line.partition(" ")  # an id holds no space
        if message_id:
            listed.append((message_id, json.loads(subject) if space else None))
    return listed


def _read_floors(path: Path) -> tuple[AckFloor | None, tuple[AckFloor, ...]]:
    """The floor on record and the earlier floors of other subjects (a journal from before these has none)."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, ()
    return _floor(record), tuple(_floor(r) for r in record.get("earlier", ()))


def read_source(directory: Path) -> dict[str, str] | None:
    """The identity of the source whose journal `directory` is (None: not on record, a journal named by its
    source's position in the config, from before journals were named by their source)."""
    try:
        return dict(json.loads((directory / SOURCE_FILE).read_text()))
    except FileNotFoundError:
        return None


def record_source(directory: Path, identity: dict[str, str]) -> None:
    _write_durably(directory / SOURCE_FILE, json.dumps(identity, sort_keys=True).encode())
    _fsync_directory(directory)


def read_floor(directory: Path) -> AckFloor | None:
    """A JetStream journal's acknowledgement floor on record (None: none)."""
    return _read_floors(directory / FLOOR_FILE)[0]


def _write_durably(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


class SourceJournal:
    """The journal directory of one institution's source; remembers the broker ids already journalled."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ids: set[str] = set()
        # A JetStream journal's: ids the floor covers are journalled, and so are the messages an earlier floor (of
        # subjects the source read before) holds
        self.floor, self.earlier = _read_floors(directory / FLOOR_FILE)
        # An MQTT journal's: topic -> {"retained": digest, "dropped": digest} (see RETAINED_FILE)
        try:
            self.retained: dict[str, dict[str, str]] = json.loads((directory / RETAINED_FILE).read_text())
        except FileNotFoundError:
            self.retained = {}
        self._next = 0
        self.reload()

    def reload(self) -> None:
        """Read the journalled ids from the sidecars again, but those the floors on record recognise for good
        (`recognised`): what a JetStream reader keeps in memory is what a consumer of the source may still deliver
        unrecognised. Safe beside the driver's `remove`: a sidecar renamed while the `.ids` are read is found among
        the `.released`."""
        listed: list[tuple[str, str | None]] = []
        numbers = [self._next]
        for sidecar in self.directory.glob(f"*{IDS_SUFFIX}"):
            journal = sidecar.with_suffix(JOURNAL_SUFFIX)
            if journal.exists():  # a sidecar without its file: the kill came before the rename, nothing journalled
                with contextlib.suppress(FileNotFoundError):
                    listed += _listed(sidecar)
                numbers.append(int(journal.stem) + 1)
        for sidecar in self.directory.glob(f"*{RELEASED_SUFFIX}"):  # removed segments: numbers never reused
            with contextlib.suppress(FileNotFoundError):  # pruned meanwhile by another process's journal
                listed += _listed(sidecar)
            numbers.append(int(sidecar.stem) + 1)
        self.ids = {i for i, subject in listed if not self.recognised(i, subject)}
        self._next = max(numbers)

    def recognised(self, message_id: str, subject: str | None) -> bool:
        """Whether the JetStream floors on record recognise a journalled message for as long as its stream lives, so
        its id need not be kept: one holds it (the current floor or an earlier one, of subjects that take its
        subject; they stay on record for the stream's life), or it is of an older life (that stream is gone). A
        consumer over any subjects may come to deliver it from the stream's start: a floor of other subjects,
        below which its consumer never delivered it, says nothing of it. An id listed without its subject (a list
        from before subjects were listed) is recognised only at or below every floor of its life."""
        floor = self.floor
        if floor is None:
            return False
        floors = (floor, *self.earlier)
        if subject is None:
            return all(f.covers(message_id) for f in floors)
        older_life = floor.covers(message_id) and message_id.partition("@")[2] != floor.life
        return older_life or any(f.holds(message_id, subject) for f in floors)

    def subscriptions(self) -> set[str]:
        """The topic filters an MQTT reader subscribed in its persistent broker session (none on record: none)."""
        try:
            return set(json.loads((self.directory / SUBSCRIPTIONS_FILE).read_text()))
        except FileNotFoundError:
            return set()

    def record_subscriptions(self, topics: set[str]) -> None:
        """Record (durably) the topic filters the broker session holds once it has granted them."""
        _write_durably(self.directory / SUBSCRIPTIONS_FILE, json.dumps(sorted(topics)).encode())
        _fsync_directory(self.directory)

    def retained_before(self, topic: str, digest: str) -> bool:
        """Whether an MQTT message that arrived retained (sent at a subscription) is journalled whatever ids were
        dropped: it arrived retained before, or it is the latest message of its topic whose id was dropped."""
        return digest in self.retained.get(topic, {}).values()

    def record_retained(self, digests: dict[str, str]) -> None:
        """Record (durably, where it changes) the digest of the message that arrived retained on each topic, once
        it is journalled: the broker keeps one retained message a topic, so the latest one is enough."""
        self._record_topics("retained", digests)

    def _record_topics(self, kind: str, digests: dict[str, str]) -> None:
        changed = {t: {**self.retained.get(t, {}), kind: d} for t, d in digests.items()}
        if any(self.retained.get(t) != entry for t, entry in changed.items()):
            self.retained = {**self.retained, **changed}
            _write_durably(self.directory / RETAINED_FILE, json.dumps(self.retained, sort_keys=True).encode())
            _fsync_directory(self.directory)

    def segments(self) -> list[Path]:
        """The journal files present, oldest first."""
        return sorted(self.directory.glob(f"*{JOURNAL_SUFFIX}"))

    def remove(self, journal: Path) -> None:
        """Remove a segment whose readings are all released (or counted late): its ids stay on record (a broker
        redelivering one of its messages is still recognised), its file goes. The newest segment is kept: until
        the reader journals another batch, its acknowledgement may not have reached the broker."""
        if journal == max(self.segments(), default=None):
            return
        sidecar = journal.with_suffix(IDS_SUFFIX)
        if sidecar.exists():
            os.utime(sidecar)  # its time is now the release's (`prune_released`), before it is seen as released
            sidecar.replace(journal.with_suffix(RELEASED_SUFFIX))
            _fsync_directory(self.directory)
        journal.unlink(missing_ok=True)
        _fsync_directory(self.directory)

    def prune_released(self, released_before: float) -> int:
        """Delete the id lists of segments released before `released_before` (a time.time()) and drop their ids
        from memory; returns how many lists. The newest list is kept whatever its age: segment numbers are never
        reused, and the next number is found from the lists and files present. The latest message of each topic
        among them stays on record (`retained_before`) before any list goes: the broker may send it again as the
        topic's retained message."""
        old: dict[Path, list[tuple[str, str | None]]] = {}
        for sidecar in sorted(self.directory.glob(f"*{RELEASED_SUFFIX}"))[:-1]:
            with contextlib.suppress(FileNotFoundError):
                if sidecar.stat().st_mtime < released_before:
                    old[sidecar] = _listed(sidecar)
        # oldest list first: a later message of a topic takes the place of an earlier one
        self._record_topics("dropped", {t: i for listed in old.values() for i, t in listed if t is not None})
        for sidecar, listed in old.items():
            sidecar.unlink(missing_ok=True)
            self.ids.difference_update(i for i, _ in listed)
        if old:
            _fsync_directory(self.directory)
        return len(old)

    def journalled_earlier(self, message_id: str, subject: str) -> bool:
        """Whether a consumer over subjects the source read before journalled the message of this id and subject."""
        return any(floor.holds(message_id, subject) for floor in self.earlier)

    def prune_acknowledged(self, floor: AckFloor) -> int:
        """Record a JetStream consumer's acknowledgement floor (durably, raised by the one on record), read the ids
        again against it, and delete the id lists of removed segments whose every id the floors on record now
        recognise (`recognised`); returns how many lists.
        The newest list is kept, as by `prune_released`. The floor on record of other subjects in the same life of
        the stream (the source's subjects changed) is kept as an earlier floor; those of an older life go."""
        floor = floor.raised_by(self.floor)
        earlier = {e.subjects: e for e in self.earlier if e.life == floor.life}
        known = self.floor
        if known is not None and known.life == floor.life and known.subjects != floor.subjects:
            kept = earlier.get(known.subjects)
            earlier[known.subjects] = known if kept is None or kept.sequence < known.sequence else kept
        if (floor, tuple(earlier.values())) != (self.floor, self.earlier):
            # on disk before any list goes: a list's ids are recognised by one or the other
            record = {**_floor_record(floor), "earlier": [_floor_record(e) for e in earlier.values()]}
            _write_durably(self.directory / FLOOR_FILE, json.dumps(record).encode())
            _fsync_directory(self.directory)
            self.floor, self.earlier = floor, tuple(earlier.values())
        pruned = 0
        for sidecar in sorted(self.directory.glob(f"*{RELEASED_SUFFIX}"))[:-1]:
            try:
                if all(self.recognised(i, subject) for i, subject in _listed(sidecar)):
                    sidecar.unlink()
                    pruned += 1
            except FileNotFoundError:
                continue
        if pruned:
            _fsync_directory(self.directory)
        self.reload()
        return pruned

    def append(self, messages: Sequence[tuple[str, list[str]]], subjects: Mapping[str, str] | None = None) -> int:
        """Journal (id, lines) messages not journalled before, durably; returns how many were new. `subjects` gives
        each id's JetStream subject or MQTT topic, listed beside it (a JetStream floor recognises a message of its
        own subjects only; a topic's latest message stays on record once its id is dropped). Acknowledge all of
        `messages` to the broker only after this returns."""
        floor = self.floor
        fresh = [
            (i, lines)
            for i, lines in dict(messages).items()
            if i not in self.ids and not (floor is not None and floor.covers(i))
        ]
        if not fresh:
            return 0
        journal = self.directory / f"{self._next:012d}{JOURNAL_SUFFIX}"
        subjects = subjects or {}
        # a topic may hold any character but NUL: as a JSON string, one line
        listed = (f"{i} {json.dumps(subjects[i])}" if i in subjects else i for i, _ in fresh)
        _write_durably(journal.with_suffix(IDS_SUFFIX), "\n".join(listed).encode())
        body = "".join(line + "\n" for _, lines in fresh for line in lines)
        _write_durably(journal, body.encode())
        _fsync_directory(self.directory)
        self._next += 1
        self.ids.update(i for i, _ in fresh)
        return len(fresh)
