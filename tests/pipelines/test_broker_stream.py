"""`fusion stream` from real brokers (NATS JetStream, MQTT on loopback): journalled, acknowledged, released once.

A test that needs a broker skips, naming it, when it is not reachable; with FUSION_REQUIRE_BROKERS set (CI) it
fails instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from fusion.config.brokers import NatsSource, filters_overlap
from fusion.config.federation import load_config
from fusion.errors import ConfigError
from fusion.feeds.stream_state import WindowStatus, load_state
from fusion.runtime.faults import CRASH_EXIT_CODE
from fusion.store.delta import Store
from pipelines.broker_journal import SourceJournal, message_lines
from pipelines.stream_driver import StreamDriver
from tests.conftest import END, START, Federation
from tests.pipelines.test_stream import (
    STREAM_CONFIG,
    at,
    fusion_stream,
    released_once,
    stream_federation,
    window_starts,
    with_times,
)

NATS = (
    "NATS JetStream",
    "127.0.0.1",
    4222,
    "nats-server -js (Debian: nats-server; or docker run -p 4222:4222 nats -js)",
)
MQTT = (
    "Mosquitto (MQTT)",
    "127.0.0.1",
    1883,
    "mosquitto (Debian: mosquitto; or docker run -p 1883:1883 eclipse-mosquitto)",
)


def need_broker(broker: tuple[str, str, int, str]) -> None:
    """Skip (or, with FUSION_REQUIRE_BROKERS, fail) saying which broker is missing and how to run one."""
    name, host, port, how = broker
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError as exc:
        message = f"{name} is not reachable at {host}:{port} ({exc}): start {how}"
        if os.environ.get("FUSION_REQUIRE_BROKERS"):
            pytest.fail(message)
        pytest.skip(message)


def json_lines(table: pa.Table) -> list[str]:
    return [json.dumps({**row, "event_time": row["event_time"].isoformat()}) for row in table.to_pylist()]


def payloads(table: pa.Table, per_message: int = 50) -> list[bytes]:
    lines = json_lines(table)
    return ["\n".join(lines[i : i + per_message]).encode() for i in range(0, len(lines), per_message)]


def hours(table: pa.Table, first: int, last: int) -> pa.Table:
    import pyarrow.compute as pc

    times = table.column("event_time")
    return table.filter(pc.and_(pc.greater_equal(times, at(first)), pc.less(times, at(last))))


def with_sources(fed: Federation, blocks: dict[str, str]) -> None:
    """Declare `[[institutions.sources]]` after each named institution's feed in the federation's config."""
    text = fed.config_path.read_text()
    for inst, block in blocks.items():
        marker = f'path = "feeds/{inst}/'
        head, _, tail = text.partition(marker)
        line_end = tail.index("\n", tail.index("format = ")) + 1
        text = head + marker + tail[:line_end] + block + tail[line_end:]
    fed.config_path.write_text(text)


#: Not UTF-8, not JSON, wrong fields, over the tests' max_message_bytes, and JSON nested deeper than Python's
#: parser goes (it crashed the stream at every restart): each one dead-lettered and counted.
BAD = [b"\xff\xfe not utf-8", b"{not json", json.dumps({"wrong": "fields"}).encode(), b"x" * 20_000, b"[" * 2_000]


# -- fast: the journal and the config ------------------------------------------------------------------------


def test_the_journal_takes_each_broker_id_once_and_survives_a_restart(tmp_path: Path) -> None:
    journal = SourceJournal(tmp_path)
    assert journal.append([("1", ['{"a": 1}']), ("2", ['{"a": 2}'])]) == 2
    assert journal.append([("2", ['{"a": 2}']), ("3", ['{"a": 3}'])]) == 1  # 2 redelivered: taken once
    (tmp_path / "000000000099.ids").write_text("4")  # a sidecar whose file never landed: 4 was not journalled
    again = SourceJournal(tmp_path)
    assert again.ids == {"1", "2", "3"}
    assert again.append([("3", ["x"]), ("4", ['{"a": 4}'])]) == 1
    text = "".join(p.read_text() for p in sorted(tmp_path.glob("*.jsonl")))
    assert text.count('{"a": 2}') == 1 and '{"a": 4}' in text


def test_a_removed_segment_keeps_its_ids_and_its_number(tmp_path: Path) -> None:
    journal = SourceJournal(tmp_path)
    journal.append([("1", ['{"a": 1}'])])
    journal.append([("2", ['{"a": 2}'])])
    first, newest = journal.segments()
    journal.remove(newest)  # the newest segment stays: its acknowledgement may not have reached the broker
    journal.remove(first)
    assert journal.segments() == [newest]
    again = SourceJournal(tmp_path)
    assert again.ids == {"1", "2"}
    assert again.append([("1", ['{"a": 1}']), ("3", ['{"a": 3}'])]) == 1
    assert [p.name for p in again.segments()] == [newest.name, "000000000002.jsonl"]


def test_a_journal_named_by_position_is_adopted_by_its_source_and_found_again_wherever_it_moves(
    make_federation: Any,
) -> None:
    """A store from before journals were named by their source holds `<position>-<kind>` directories: the source
    of that kind at that position takes its journal (its files and ids), as it did, and records its identity in it,
    so a source declared before it later does not take it. One whose JetStream floor is of other subjects is
    another source's journal: read, while it holds files not read, as a journal no declared source claims."""
    from apache_beam.io.filesystems import FileSystems

    from pipelines.broker_journal import AckFloor
    from pipelines.broker_sources import JournalReader, start_readers

    with socket.socket() as probe:  # a free port on loopback, closed again: the readers stay down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fed = make_federation(subdir="by-position")
    nats_s = f'[[institutions.sources]]\nkind = "nats"\nurl = "nats://127.0.0.1:{port}"\nstream = "S"\n'
    blocks = nats_s + 'subjects = ["s.>"]\n' + nats_s.replace('"S"', '"T"') + 'durable = "t"\nsubjects = ["t.>"]\n'
    with_sources(fed, {"alpha": blocks})
    config = load_config(fed.config_path)
    root = Path(config.stream_state_path) / "brokers" / "alpha"
    for name, subjects in (("0-nats", ("s.>",)), ("1-nats", ("u.>",))):  # 1-nats: of a source declared no more
        journal = SourceJournal(root / name)
        journal.append([("1@life", [f'{{"journal": "{name}"}}'])])
        journal.prune_acknowledged(AckFloor("life", 0, subjects))

    def started(config: Any, processed: set[str]) -> list[tuple[Any, Any]]:
        readers = start_readers(config, lambda _: None, processed)
        for reader, _ in readers:
            reader.stop()
        for reader, _ in readers:
            reader.join(5)
        return readers

    (s, _), (t, _), (orphan, feed) = started(config, set())
    assert s.journal.directory.name == "0-nats" and s.journal.ids == {"1@life"}  # its files and ids
    assert t.journal.directory.name.startswith("nats-")  # T's own, new
    assert isinstance(orphan, JournalReader) and orphan.journal.directory.name == "1-nats" and orphan.idle
    assert "sources[1]" in orphan.label
    matched = [m.path for m in FileSystems.match([feed.path])[0].metadata_list]
    assert matched == [str(root / "1-nats" / "000000000000.jsonl")]
    # An MQTT source declared before both: S and T keep their journals; every file read, 1-nats is left alone.
    mqtt = f'[[institutions.sources]]\nkind = "mqtt"\nport = {port}\ntopics = ["alpha/#"]\n'
    fed.config_path.write_text(fed.config_path.read_text().replace(nats_s, mqtt + nats_s, 1))
    again = started(load_config(fed.config_path), {str(p) for p in root.glob("*/*.jsonl")})
    assert [r.journal.directory for r, _ in again[1:]] == [s.journal.directory, t.journal.directory]
    assert len(again) == 3 and again[0][0].journal.directory.name.startswith("mqtt-")


def test_a_refused_message_becomes_one_line_that_is_not_json() -> None:
    assert message_lines(b'{"a": 1}\n\n{"a": 2}\n', name="m", max_bytes=100) == ['{"a": 1}', '{"a": 2}']
    (big,) = message_lines(b"x" * 101, name="m", max_bytes=100)
    (binary,) = message_lines(b"\xff", name="m", max_bytes=100)
    assert big.startswith("!broker message m: 101 bytes") and "not UTF-8" in binary


def test_institutions_reading_overlapping_subjects_are_refused(make_federation) -> None:
    assert filters_overlap(("f", "a", ">"), ("f", "*", "x"))
    assert not filters_overlap(("f", "a", ">"), ("f", "b", ">"))
    assert not filters_overlap(("f", "a"), ("f", "a", "x"))
    fed = make_federation(subdir="overlap")
    source = '[[institutions.sources]]\nkind = "nats"\nstream = "S"\nsubjects = ["fusion.>"]\n'
    with_sources(fed, {"alpha": source, "beta": source})
    with pytest.raises(ConfigError, match="both read"):
        load_config(fed.config_path)


def test_a_password_from_an_unset_environment_variable_is_refused_naming_it(make_federation) -> None:
    fed = make_federation(subdir="env")
    source = (
        '[[institutions.sources]]\nkind = "mqtt"\ntopics = ["alpha/#"]\nuser = "u"\n'
        'password_env = "FUSION_TEST_UNSET_PASSWORD"\n'
    )
    with_sources(fed, {"alpha": source})
    config = load_config(fed.config_path)
    with pytest.raises(ConfigError, match="FUSION_TEST_UNSET_PASSWORD"):
        config.institutions[0].sources[0].secret("alpha")


# -- against the brokers --------------------------------------------------------------------------------------


async def _nats(action: str, stream: str, prefix: str, messages: list[tuple[str, bytes, str | None]]) -> None:
    import nats

    client = await nats.connect("nats://127.0.0.1:4222")
    js = client.jetstream()
    if action == "create":
        await js.add_stream(name=stream, subjects=[f"{prefix}.>"])
    elif action == "delete":
        await js.delete_stream(stream)
    for subject, data, msg_id in messages:  # a publisher's retry carries the same Nats-Msg-Id: stored once
        await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id} if msg_id else None)
    await client.close()


def nats(action: str, stream: str, prefix: str, messages: Sequence[tuple[str, bytes, str | None]] = ()) -> None:
    asyncio.run(_nats(action, stream, prefix, list(messages)))


@pytest.mark.e2e
@pytest.mark.brokers
def test_jetstream_readings_survive_a_kill_and_are_released_exactly_once(make_federation) -> None:
    """Every institution's readings arrive over JetStream (one durable consumer each), with malformed messages
    and a publisher's retries; the stream is killed after journalling a batch but before acknowledging it (the
    broker redelivers it: taken once), restarted, and later readings of a released window are late."""
    need_broker(NATS)
    fed = stream_federation(make_federation, subdir="nats")
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    with_sources(
        fed,
        {
            inst.id: (
                f'[[institutions.sources]]\nkind = "nats"\nstream = "{stream}"\n'
                f'subjects = ["{prefix}.{inst.id}.>"]\nmax_message_bytes = 16384\nack_wait = "2s"\n'
            )
            for inst in fed.config.institutions
        },
    )
    config = load_config(fed.config_path)
    nats("create", stream, prefix)
    try:
        early = [
            (f"{prefix}.{i}.r", p, f"{i}-{n}")
            for i, t in fed.raw.items()
            for n, p in enumerate(payloads(hours(t, 0, 3)))
        ]
        bad = [(f"{prefix}.alpha.r", data, None) for data in BAD]
        nats("publish", stream, prefix, early + early[:3] + bad)  # the first three again: a publisher's retry
        crashed = fusion_stream(
            fed.config_path, "--drain", "--until", at(3).isoformat(), crash_at="broker_after_journal"
        )
        assert crashed.returncode == CRASH_EXIT_CODE, crashed.stdout + crashed.stderr
        first = StreamDriver(config, until=at(3))
        first.run(drain=True)
        late = with_times(fed.raw["beta"], *(START + timedelta(minutes=m) for m in range(5)))
        rest = [(f"{prefix}.{i}.r", p, None) for i, t in fed.raw.items() for p in payloads(hours(t, 3, 6))]
        nats("publish", stream, prefix, [*rest, (f"{prefix}.beta.r", "\n".join(json_lines(late)).encode(), None)])
        second = StreamDriver(config, until=END)
        second.run(drain=True)
    finally:
        nats("delete", stream, prefix)
    total = sum(t.num_rows for t in fed.raw.values())
    releases = Store(config.store_path).read("releases")
    assert sum(releases.column("count").to_pylist()) == total  # every accepted reading counted once
    released_once(config.store_path, 6)  # every window released once, every release charged once
    state = load_state(Path(config.stream_state_path) / "state.json")
    assert state.readings == total
    assert state.windows[START.isoformat()].rejects == {"beta": {"late": 5}}
    assert state.unwindowed["alpha"] == {"malformed_record": 4, "missing_field": 1}
    # Every window is released: of each source's journal only its newest segment is left, the ids of the removed
    # ones stay on record (a redelivery is still recognised).
    journals = Path(config.stream_state_path) / "brokers"
    assert len(list(journals.rglob("*.jsonl"))) == len(fed.config.institutions)
    assert list(journals.rglob("*.released"))
    assert not [p for p in state.processed if "/brokers/" in p and not Path(p).exists()]


@pytest.mark.e2e
@pytest.mark.brokers
def test_mqtt_readings_beside_file_feeds_are_released_and_bad_messages_dead_lettered(make_federation) -> None:
    """alpha publishes over MQTT (QoS 1, persistent session), beta and gamma land files. A message sent twice, a
    10 MB payload, bytes that are not UTF-8, and a line that is not JSON: the bad ones are dead-lettered and
    counted, the duplicate taken once, and the stream goes on. A stream killed after journalling but before its
    acknowledgement gets the messages again in the session, and takes them once."""
    need_broker(MQTT)
    import paho.mqtt.client as mqtt

    from tests.pipelines.test_stream import land

    fed = stream_federation(make_federation, subdir="mqtt")
    tag = uuid.uuid4().hex[:8]
    session = f"fusion-test-{tag}"
    with_sources(
        fed,
        {
            "alpha": (
                f'[[institutions.sources]]\nkind = "mqtt"\ntopics = ["{tag}/alpha/#"]\n'
                f'client_id = "{session}"\nmax_message_bytes = 16384\n'
            )
        },
    )
    for hour in range(6):
        land(fed, hour)
    for path in (fed.directory / "feeds" / "alpha").iterdir():
        path.unlink()
    config = load_config(fed.config_path)
    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=session, clean_session=False)
    subscriber.connect("127.0.0.1", 1883)  # the persistent session exists before anything is published
    subscriber.subscribe(f"{tag}/alpha/#", qos=1)
    subscriber.loop(1)
    subscriber.disconnect()
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{session}-pub")
    publisher.connect("127.0.0.1", 1883)
    publisher.loop_start()
    good = payloads(fed.raw["alpha"])
    for data in [*good, good[0], *BAD[:3], b"x" * 10_000_000]:
        publisher.publish(f"{tag}/alpha/readings", data, qos=1).wait_for_publish(10)
    publisher.loop_stop()
    publisher.disconnect()
    crashed = fusion_stream(fed.config_path, "--drain", "--until", END.isoformat(), crash_at="broker_after_journal")
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stdout + crashed.stderr  # journalled, not acknowledged
    driver = StreamDriver(config, until=END)
    driver.run(drain=True)
    total = sum(t.num_rows for t in fed.raw.values())
    assert sum(Store(config.store_path).read("releases").column("count").to_pylist()) == total
    assert window_starts(config.store_path) == [at(h) for h in range(6)]
    assert driver.state.unwindowed == {"alpha": {"malformed_record": 3, "missing_field": 1}}
    assert driver.state.readings == total
    dead = list((fed.directory / "deadletter" / "alpha" / "stream").glob("*malformed*.parquet"))
    assert dead


@pytest.mark.brokers
def test_a_journal_under_a_state_path_holding_glob_characters_is_read(make_federation: Any) -> None:
    """stream.state in a directory named `st[1]`: the journal's pattern took `[1]` for a class of characters, so
    every message was journalled and acknowledged and no reading was ever read."""
    need_broker(NATS)
    from tests.pipelines.test_stream import STREAM_CONFIG

    fed = stream_federation(make_federation, subdir="nats-brackets", stream=STREAM_CONFIG + 'state = "st[1]"\n')
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    with_sources(
        fed,
        {
            inst.id: (
                f'[[institutions.sources]]\nkind = "nats"\nstream = "{stream}"\nsubjects = ["{prefix}.{inst.id}.>"]\n'
            )
            for inst in fed.config.institutions
        },
    )
    config = load_config(fed.config_path)
    nats("create", stream, prefix)
    try:
        nats("publish", stream, prefix, [(f"{prefix}.{i}.r", p, None) for i, t in fed.raw.items() for p in payloads(t)])
        driver = StreamDriver(config, until=END)
        driver.run(drain=True)
    finally:
        nats("delete", stream, prefix)
    total = sum(t.num_rows for t in fed.raw.values())
    assert driver.state.readings == total
    assert sum(Store(config.store_path).read("releases").column("count").to_pylist()) == total


@pytest.mark.brokers
@pytest.mark.parametrize("change", ["source-added-before", "source-removed", "kind-changed"])
def test_journalled_readings_not_yet_read_survive_a_change_of_the_sources(make_federation: Any, change: str) -> None:
    """The stream stops after the reader journalled (and the broker was told) every message, before it read the
    journal; then alpha's sources change. Journals were named by position and kind, so an MQTT source declared
    before the JetStream one took position 0 and the JetStream journal's readings were never read (and a source
    removed, or replaced by one of another kind, left its journal unread): now a journal is named by its source's
    broker session, and one no declared source claims is read while it holds files not read."""
    need_broker(NATS)
    need_broker(MQTT)
    fed = stream_federation(make_federation, subdir=f"position-{change}")
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    block = f'[[institutions.sources]]\nkind = "nats"\nstream = "{stream}"\nsubjects = ["{prefix}.alpha.>"]\n'
    with_sources(fed, {"alpha": block})
    declared = fed.config_path.read_text()
    mqtt = f'[[institutions.sources]]\nkind = "mqtt"\ntopics = ["{tag}/alpha/#"]\nclient_id = "fusion-test-{tag}"\n'
    changed = {"source-added-before": mqtt + block, "source-removed": "", "kind-changed": mqtt}[change]
    nats("create", stream, prefix)
    try:
        nats("publish", stream, prefix, [(f"{prefix}.alpha.r", p, None) for p in payloads(fed.raw["alpha"])])
        stopped = StreamDriver(load_config(fed.config_path), until=END)
        wait_for(lambda: stopped._readers[0].idle, 30)  # journalled and acknowledged, not read
        stopped.close()
        fed.config_path.write_text(declared.replace(block, changed))
        config = load_config(fed.config_path)
        notices: list[str] = []
        driver = StreamDriver(config, until=END, on_notice=notices.append)
        driver.run(drain=True)
    finally:
        nats("delete", stream, prefix)
        if change != "source-removed":
            import paho.mqtt.client as paho

            cleaner = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"fusion-test-{tag}", clean_session=True)
            with contextlib.suppress(OSError):
                cleaner.connect("127.0.0.1", 1883)
                cleaner.loop(0.5)
                cleaner.disconnect()
    assert driver.state.readings == fed.raw["alpha"].num_rows
    assert sum(Store(config.store_path).read("releases").column("count").to_pylist()) == fed.raw["alpha"].num_rows
    if change != "source-added-before":  # the old journal is read, saying so
        assert any("no source declared now is its source" in n and f"stream {stream}" in n for n in notices), notices


@pytest.mark.brokers
def test_a_broker_down_at_start_is_reported_and_retried(make_federation) -> None:
    """Nothing listens on the source's port: the reader says so (status line, log) and keeps retrying."""
    fed = make_federation(subdir="down")
    with socket.socket() as probe:  # a free port on loopback, closed again: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with_sources(fed, {"alpha": f'[[institutions.sources]]\nkind = "mqtt"\nport = {port}\ntopics = ["a/#"]\n'})
    notices: list[str] = []
    driver = StreamDriver(load_config(fed.config_path), on_notice=notices.append)
    deadline = time.monotonic() + 5
    while not any("down" in s for s in driver.status().sources) and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.close()
    assert any("alpha mqtt" in s and "retrying" in s for s in driver.status().sources), driver.status().sources
    assert any("down" in n for n in notices)


@pytest.mark.brokers
def test_draining_with_a_broker_down_ends_saying_why(make_federation) -> None:
    """`fusion stream --drain` waits for each source to catch up; one that stays unreachable ends the run with a
    message naming it, instead of waiting for it forever, and releases nothing."""
    from fusion.errors import FusionError

    fed = make_federation(subdir="drain-down")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with_sources(fed, {"alpha": f'[[institutions.sources]]\nkind = "mqtt"\nport = {port}\ntopics = ["a/#"]\n'})
    driver = StreamDriver(load_config(fed.config_path), until=END, drain_wait_s=1.0)
    with pytest.raises(FusionError, match=r"--drain: source alpha mqtt 127.0.0.1:\d+ is down .* run `fusion stream"):
        driver.run(drain=True, sleep=lambda s: time.sleep(min(s, 0.2)))
    assert not [w for w in driver.state.windows.values() if w.release_id]
    assert not driver._readers[0].is_alive() or driver._readers[0]._halt.is_set()


class Proxy:
    """A TCP relay to a real broker that the test can sever (every connection dropped) and restore."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._open: list[socket.socket] = []
        self.accepting = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._server.accept()
            if not self.accepting:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self._target))
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def sever(self) -> None:
        self.accepting = False
        for connection in self._open:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._open.clear()


def wait_for(predicate: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.brokers
def test_a_connection_severed_mid_stream_is_reported_retried_and_loses_nothing(make_federation, tmp_path) -> None:
    """The JetStream reader's connection is cut mid-stream: it says so, retries with backoff, and once the broker
    is reachable again every message is journalled exactly once (acknowledged ones are not fetched again)."""
    need_broker(NATS)
    from pipelines.broker_sources import NatsReader

    fed = make_federation(subdir="sever")
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    proxy = Proxy(4222)
    with_sources(
        fed,
        {
            "alpha": f'[[institutions.sources]]\nkind = "nats"\nurl = "nats://127.0.0.1:{proxy.port}"\n'
            f'stream = "{stream}"\nsubjects = ["{prefix}.alpha.>"]\n'
        },
    )
    config = load_config(fed.config_path)
    nats("create", stream, prefix)
    notices: list[str] = []
    journal = SourceJournal(tmp_path / "journal")
    reader = NatsReader("alpha", config.institutions[0].sources[0], journal, None,
                        notices.append)  # type: ignore[arg-type]
    reader.start()
    try:
        nats("publish", stream, prefix, [(f"{prefix}.alpha.r", f'{{"n": {n}}}'.encode(), None) for n in range(5)])
        wait_for(lambda: reader.messages == 5)
        proxy.sever()
        wait_for(lambda: "down" in reader.health)
        assert not reader.caught_up  # due windows wait for it again
        nats("publish", stream, prefix, [(f"{prefix}.alpha.r", f'{{"n": {n}}}'.encode(), None) for n in range(5, 9)])
        proxy.accepting = True
        wait_for(lambda: reader.messages == 9)
        wait_for(lambda: reader.caught_up)
        assert reader.connections == 2
    finally:
        reader.stop()
        reader.join(5)
        nats("delete", stream, prefix)
    lines = "".join(p.read_text() for p in sorted(journal.directory.glob("*.jsonl"))).splitlines()
    assert sorted(lines) == sorted(f'{{"n": {n}}}' for n in range(9))  # each once, none lost
    assert any("down" in n and "retrying" in n for n in notices) and notices[-1].endswith("connected")


@pytest.mark.brokers
def test_jetstream_id_lists_stop_growing_and_a_restart_reads_only_live_ids(tmp_path, monkeypatch) -> None:
    """Segments released as a running reader journals: the id lists below the consumer's acknowledgement floor are
    deleted (they used to stay on disk for ever, and be read back at every start and connection). A restart reads
    no id back, and a consumer then deleted on the broker redelivers every message: none is journalled again."""
    need_broker(NATS)
    import nats as nats_client

    from pipelines import broker_sources
    from pipelines.broker_sources import NatsReader

    monkeypatch.setattr(broker_sources, "PRUNE_EVERY_S", 0.0)  # prune at each fetch, not every ten minutes
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    source = NatsSource(stream=stream, subjects=(f"{prefix}.alpha.>",))
    directory = tmp_path / "journal"

    def reader_of() -> NatsReader:
        reader = NatsReader("alpha", source, SourceJournal(directory), None, lambda _: None)
        reader.start()
        return reader

    def stopped(reader: NatsReader) -> None:
        reader.stop()
        reader.join(5)

    def publish(numbers: range) -> None:
        nats("publish", stream, prefix, [(f"{prefix}.alpha.r", f'{{"n": {n}}}'.encode(), None) for n in numbers])

    async def delete_consumer() -> None:
        client = await nats_client.connect("nats://127.0.0.1:4222")
        await client.jetstream().delete_consumer(stream, source.consumer("alpha"))
        await client.close()

    lines: list[str] = []
    nats("create", stream, prefix)
    try:
        reader = reader_of()
        try:
            for r in range(15):  # 15 batches, each released (as the driver does) once journalled
                publish(range(r * 10, r * 10 + 10))
                wait_for(lambda: reader.messages == r * 10 + 10)  # noqa: B023
                *released, _newest = reader.journal.segments()  # the newest stays (see SourceJournal.remove)
                for segment in released:
                    lines += segment.read_text().splitlines()
                    reader.journal.remove(segment)
            wait_for(lambda: len(list(directory.glob("*.released"))) == 1)  # the newest list only
            wait_for(lambda: reader.journal.floor is not None and reader.journal.floor.sequence == 150)
        finally:
            stopped(reader)
        assert len(list(directory.glob("*.jsonl"))) == 1
        assert SourceJournal(directory).ids == set()  # every id is below the floor: none read back
        restarted = reader_of()
        try:
            wait_for(lambda: restarted.idle)
            asyncio.run(delete_consumer())  # created again by the reader: it delivers the stream from the start
            publish(range(150, 152))
            wait_for(lambda: restarted.idle and restarted.messages >= 2)
        finally:
            stopped(restarted)
    finally:
        nats("delete", stream, prefix)
    assert restarted.messages == 2  # the 150 redelivered ones are recognised by the floor alone
    lines += "".join(p.read_text() for p in sorted(directory.glob("*.jsonl"))).splitlines()
    assert sorted(lines) == sorted(f'{{"n": {n}}}' for n in range(152))  # each once, none lost


def mqtt_session(session: str, topic: str) -> None:
    """Create the persistent session `session` subscribed to `topic` (QoS 1), as a stream that ran before would."""
    import paho.mqtt.client as mqtt

    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=session, clean_session=False)
    subscriber.connect("127.0.0.1", 1883)
    subscriber.subscribe(topic, qos=1)
    subscriber.loop(1)
    subscriber.disconnect()


def mqtt_publish(topic: str, messages: Sequence[bytes]) -> None:
    import paho.mqtt.client as mqtt

    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fusion-test-pub-{uuid.uuid4().hex[:8]}")
    publisher.connect("127.0.0.1", 1883)
    publisher.loop_start()
    for data in messages:
        publisher.publish(topic, data, qos=1).wait_for_publish(10)
    publisher.loop_stop()
    publisher.disconnect()


@pytest.mark.brokers
@pytest.mark.parametrize("kind", ["nats", "mqtt"])
def test_a_restarted_stream_reads_the_brokers_backlog_before_it_releases_due_windows(
    make_federation: Any, kind: str
) -> None:
    """alpha's readings of the window 00:00 wait on the broker while the stream is stopped; it comes back at 01:15,
    past the window's end and its 10 minutes of lateness. Its first step used to release the window before the
    reader had fetched anything, and every one of those readings, on time, was counted late (the same readings
    landed as a file were released). The window now waits for the reader to catch up."""
    need_broker(NATS if kind == "nats" else MQTT)
    fed = stream_federation(
        make_federation, subdir=f"backlog-{kind}", stream=STREAM_CONFIG.replace('"0s"', '"10m"')
    )
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    alpha = hours(fed.raw["alpha"], 0, 1)
    if kind == "nats":
        source = f'kind = "nats"\nstream = "{stream}"\nsubjects = ["{prefix}.alpha.>"]\nack_wait = "2s"\n'
        nats("create", stream, prefix)
        nats("publish", stream, prefix, [(f"{prefix}.alpha.r", p, None) for p in payloads(alpha, 10)])
    else:
        source = f'kind = "mqtt"\ntopics = ["{tag}/alpha/#"]\nclient_id = "fusion-test-{tag}"\n'
        mqtt_session(f"fusion-test-{tag}", f"{tag}/alpha/#")
        mqtt_publish(f"{tag}/alpha/readings", payloads(alpha, 10))
    with_sources(fed, {"alpha": f"[[institutions.sources]]\n{source}"})
    config = load_config(fed.config_path)
    notices: list[str] = []
    driver = StreamDriver(config, clock=lambda: at(1) + timedelta(minutes=15), on_notice=notices.append)
    deadline = time.monotonic() + 60
    window = START.isoformat()

    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, 0.2))
        released = window in driver.state.windows and driver.state.windows[window].status is WindowStatus.RELEASED
        driver.stop_requested = released or time.monotonic() > deadline

    try:
        driver.run(sleep=sleep)
    finally:
        if kind == "nats":
            nats("delete", stream, prefix)
    state = load_state(Path(config.stream_state_path) / "state.json")
    assert state.windows[window].status is WindowStatus.RELEASED
    assert state.windows[window].rejects == {}  # none late
    assert state.readings == alpha.num_rows
    assert sum(Store(config.store_path).read("releases").column("count").to_pylist()) == alpha.num_rows
    if kind == "mqtt":  # caught up after 2 s without a message: the first steps said why the window waited
        assert any("wait for source alpha mqtt 127.0.0.1:1883 (" in n for n in notices), notices


@pytest.mark.brokers
def test_due_windows_wait_for_what_a_killed_reader_fetched_until_ack_wait_redelivers_it(make_federation: Any) -> None:
    """A reader killed after its fetch, before journalling: JetStream redelivers those messages only after
    `ack_wait` (3 s here, longer than the stream's allowed lateness of 0 s). The restarted stream's due window waits
    for them instead of counting them late, so ack_wait need not stay below allowed_lateness."""
    need_broker(NATS)
    import nats as nats_client
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    fed = stream_federation(make_federation, subdir="ack-wait")
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    alpha = hours(fed.raw["alpha"], 0, 1)
    source = f'kind = "nats"\nstream = "{stream}"\nsubjects = ["{prefix}.alpha.>"]\nack_wait = "3s"\n'
    with_sources(fed, {"alpha": f"[[institutions.sources]]\n{source}"})
    config = load_config(fed.config_path)
    nats_source = config.institutions[0].sources[0]
    assert isinstance(nats_source, NatsSource)

    async def fetch_and_die() -> int:  # what the killed reader did: the consumer's config is the reader's
        client = await nats_client.connect("nats://127.0.0.1:4222")
        js = client.jetstream()
        consumer = ConsumerConfig(
            durable_name=nats_source.consumer("alpha"),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=nats_source.ack_wait_s(),
            max_ack_pending=-1,
            filter_subject=nats_source.subjects[0],
        )
        await js.add_consumer(stream, consumer)
        fetched = await (await js.pull_subscribe_bind(consumer.durable_name, stream)).fetch(100, timeout=2)
        await client.close()  # never acknowledged
        return len(fetched)

    nats("create", stream, prefix)
    try:
        nats("publish", stream, prefix, [(f"{prefix}.alpha.r", p, None) for p in payloads(alpha, 10)])
        assert asyncio.run(fetch_and_die()) == 8
        started = time.monotonic()
        driver = StreamDriver(config, clock=lambda: at(1) + timedelta(minutes=1))
        deadline = started + 30
        window = START.isoformat()

        def sleep(seconds: float) -> None:
            time.sleep(min(seconds, 0.2))
            released = window in driver.state.windows and driver.state.windows[window].status is WindowStatus.RELEASED
            driver.stop_requested = released or time.monotonic() > deadline

        driver.run(sleep=sleep)
        waited = time.monotonic() - started
    finally:
        nats("delete", stream, prefix)
    state = load_state(Path(config.stream_state_path) / "state.json")
    assert state.windows[window].status is WindowStatus.RELEASED and state.windows[window].rejects == {}
    assert state.readings == alpha.num_rows
    assert waited > 2  # for the redelivery


@pytest.mark.brokers
def test_due_windows_wait_for_a_broker_source_that_is_down(make_federation: Any) -> None:
    """A source whose broker is down holds the due windows, as a file that cannot be read now does: nothing is
    released while its backlog may hold readings on time, and the status line and a notice name it."""
    fed = stream_federation(make_federation, subdir="held-down")  # the grid from START: every window is due at END
    with socket.socket() as probe:  # a free port on loopback, closed again: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with_sources(fed, {"alpha": f'[[institutions.sources]]\nkind = "mqtt"\nport = {port}\ntopics = ["a/#"]\n'})
    notices: list[str] = []
    driver = StreamDriver(load_config(fed.config_path), clock=lambda: END, on_notice=notices.append)
    try:
        driver.step()
        driver.step()
    finally:
        driver.close()
    assert not driver.state.windows  # none closed, none released
    (held,) = driver.status().held
    assert held.startswith(f"source alpha mqtt 127.0.0.1:{port} (")
    assert len([n for n in notices if "wait for source alpha" in n]) == 1, notices  # said once, not at every step


@pytest.mark.brokers
def test_a_jetstream_reader_whose_messages_never_pause_catches_up_by_its_acknowledgement_floor(tmp_path: Path) -> None:
    """A message every 0.1 s: no fetch comes back empty, so the reader is never idle; it has caught up once the
    consumer's acknowledgement floor passes what the stream held when the reader connected."""
    need_broker(NATS)
    from pipelines.broker_sources import NatsReader

    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    source = NatsSource(stream=stream, subjects=(f"{prefix}.alpha.>",))
    nats("create", stream, prefix)
    nats("publish", stream, prefix, [(f"{prefix}.alpha.r", f'{{"n": {n}}}'.encode(), None) for n in range(50)])
    publishing = threading.Event()
    publishing.set()

    def publish() -> None:
        n = 50
        while publishing.is_set():
            nats("publish", stream, prefix, [(f"{prefix}.alpha.r", f'{{"n": {n}}}'.encode(), None)])
            n += 1
            time.sleep(0.1)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    reader = NatsReader("alpha", source, SourceJournal(tmp_path / "journal"), None, lambda _: None)
    was_idle: list[bool] = []
    reader.start()
    try:
        deadline = time.monotonic() + 15
        while not reader.caught_up:
            was_idle.append(reader.idle)
            assert time.monotonic() < deadline, "never caught up"
            time.sleep(0.01)
        assert reader.messages >= 50 and reader.connections == 1
    finally:
        reader.stop()
        reader.join(5)
        publishing.clear()
        publisher.join(5)
        nats("delete", stream, prefix)
    assert not any(was_idle)


@pytest.mark.brokers
def test_an_mqtt_reader_whose_messages_never_pause_is_taken_as_caught_up_after_a_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MQTT does not say how many messages a session holds: a source whose messages never pause for 2 s counts as
    caught up once connected for MQTT_CATCH_UP_LIMIT_S (saying so), instead of holding due windows for ever."""
    need_broker(MQTT)
    from pipelines import broker_sources
    from pipelines.broker_sources import MqttReader

    monkeypatch.setattr(broker_sources, "MQTT_CATCH_UP_LIMIT_S", 3.0)
    tag = uuid.uuid4().hex[:8]
    publishing = threading.Event()
    publishing.set()

    def publish() -> None:
        while publishing.is_set():
            mqtt_publish(f"{tag}/alpha/readings", [b'{"n": 1}'])
            time.sleep(0.2)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    notices: list[str] = []
    source = broker_sources.MqttSource(topics=(f"{tag}/alpha/#",), client_id=f"fusion-test-{tag}")
    reader = MqttReader("alpha", source, SourceJournal(tmp_path / "journal"), None, notices.append)
    reader.start()
    try:
        wait_for(lambda: reader.health == "connected")
        connected = time.monotonic()
        wait_for(lambda: reader.caught_up, 10)
        assert time.monotonic() - connected > 2.5 and reader.messages > 0 and not reader.idle
    finally:
        reader.stop()
        reader.join(5)
        publishing.clear()
        publisher.join(5)
    assert any("did not pause" in n and "taken as caught up" in n for n in notices), notices


@pytest.mark.brokers
def test_a_retained_mqtt_message_is_journalled_once_across_reconnections_and_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker sends a filter's retained message at each subscription. The reader subscribed at every
    connection of its persistent session, so once the id list of the message's released segment was pruned (after
    MQTT_ID_RETENTION_S; at once here) a reconnection journalled it again. Now a filter the session holds is not
    subscribed again; a filter added to the source is, and its retained message is taken."""
    need_broker(MQTT)
    import paho.mqtt.client as mqtt

    from fusion.config.brokers import MqttSource
    from pipelines import broker_sources
    from pipelines.broker_sources import MqttReader

    monkeypatch.setattr(broker_sources, "PRUNE_EVERY_S", 0.0)
    monkeypatch.setattr(broker_sources, "MQTT_ID_RETENTION_S", 0.0)
    tag = uuid.uuid4().hex[:8]
    session = f"fusion-test-{tag}"
    proxy = Proxy(1883)
    directory = tmp_path / "journal"
    released: list[str] = []

    def reader_of(*topics: str) -> MqttReader:
        source = MqttSource(port=proxy.port, topics=topics, client_id=session)
        reader = MqttReader("alpha", source, SourceJournal(directory), None, lambda _: None)
        reader.start()
        wait_for(lambda: reader.health == "connected")
        return reader

    def release(reader: MqttReader) -> None:  # as the driver does once every window a segment fed is released
        for segment in reader.journal.segments()[:-1]:
            released.extend(segment.read_text().splitlines())
            reader.journal.remove(segment)

    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{session}-pub")
    publisher.connect("127.0.0.1", 1883)
    publisher.loop_start()

    def publish(topic: str, data: bytes, retain: bool = False) -> None:
        publisher.publish(f"{tag}/{topic}", data, qos=1, retain=retain).wait_for_publish(10)

    try:
        reader = reader_of(f"{tag}/a/#")
        try:
            publish("a/status", b'{"retained": "a"}', retain=True)
            wait_for(lambda: reader.messages == 1)
            for n in range(3):
                publish("a/r", f'{{"n": {n}}}'.encode())
                wait_for(lambda: reader.messages == 2 + n)  # noqa: B023
                release(reader)  # the ids of released segments go with the next batch (retention 0)
            proxy.sever()  # the reader reconnects to its session
            proxy.accepting = True
            wait_for(lambda: "down" in reader.health or reader.messages > 4)
            wait_for(lambda: reader.health == "connected", 30)
            time.sleep(2)
        finally:
            reader.stop()
            reader.join(5)
        assert reader.messages == 4
        publish("b/status", b'{"retained": "b"}', retain=True)
        restarted = reader_of(f"{tag}/a/#", f"{tag}/b/#")  # a filter added: only that one is subscribed
        try:
            wait_for(lambda: restarted.messages == 1)
            time.sleep(2)
        finally:
            restarted.stop()
            restarted.join(5)
        assert restarted.messages == 1
        lines = released + [line for p in restarted.journal.segments() for line in p.read_text().splitlines()]
        assert sorted(lines) == sorted(['{"retained": "a"}', '{"retained": "b"}', *(f'{{"n": {n}}}' for n in range(3))])
    finally:
        for topic in ("a/status", "b/status"):  # no retained message left on the broker
            publish(topic, b"", retain=True)
        publisher.loop_stop()
        publisher.disconnect()
        cleaner = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=session, clean_session=True)
        cleaner.connect("127.0.0.1", 1883)
        cleaner.loop(0.5)
        cleaner.disconnect()
