"""A broker source whose topics or subjects change between runs: its broker session follows the config.

The journal stays with the broker session (an MQTT client id, a JetStream durable consumer), which redelivers what
was journalled but not acknowledged whatever the config says now; the reader makes the session's subscription the
source's. A test that needs a broker skips, naming it, when it is not reachable; with FUSION_REQUIRE_BROKERS set (CI)
it fails instead.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusion.config.brokers import MqttSource, NatsSource
from pipelines import broker_sources
from pipelines.broker_journal import MQTT_ID_RETENTION_S, AckFloor, SourceJournal
from pipelines.broker_sources import MqttReader, NatsReader, SourceReader
from tests.pipelines.test_broker_stream import MQTT, NATS, mqtt_publish, nats, need_broker

#: The private Mosquitto's queue per offline session (Mosquitto's default is 1000): past it, the broker drops.
QUEUE = 5


def journalled(journal: SourceJournal) -> Counter[str]:
    return Counter("".join(p.read_text() for p in journal.segments()).splitlines())


def read_until_idle(reader: SourceReader, seconds: float = 20) -> SourceReader:
    """Start the reader, wait until it has caught up (idle: nothing came for a while) or was killed, and stop it."""
    reader.start()
    try:
        deadline = time.monotonic() + seconds
        while not reader.idle and reader.is_alive():
            assert time.monotonic() < deadline, reader.health
            time.sleep(0.05)
    finally:
        reader.stop()
        reader.join(5)
    return reader


def test_a_floor_of_earlier_subjects_stays_on_record_beside_the_new_one(tmp_path: Path) -> None:
    """The floor of a consumer over a.> is kept when one over b.> replaces it in the same life of the stream: a
    message of a.> at or below it is journalled, one of b.> or above it is not; a new life of the stream drops it."""
    journal = SourceJournal(tmp_path)
    journal.prune_acknowledged(AckFloor("life", 5, ("a.>",)))
    journal.prune_acknowledged(AckFloor("life", 0, ("b.>",)))
    again = SourceJournal(tmp_path)  # on disk, read back
    assert again.floor == AckFloor("life", 0, ("b.>",)) and again.earlier == (AckFloor("life", 5, ("a.>",)),)
    assert again.journalled_earlier("5@life", "a.x") and again.journalled_earlier("1@life", "a.x.y")
    assert not again.journalled_earlier("6@life", "a.x")  # above the floor
    assert not again.journalled_earlier("3@life", "b.x")  # another subject: never delivered to that consumer
    assert not again.journalled_earlier("3@other", "a.x")  # another life of the stream
    again.prune_acknowledged(AckFloor("life", 2, ("a.>",)))  # back to a.>: both kept, a.> with its higher floor
    assert set(again.earlier) == {AckFloor("life", 5, ("a.>",)), AckFloor("life", 0, ("b.>",))}
    again.prune_acknowledged(AckFloor("next", 0, ("a.>",)))  # the stream created again
    assert again.earlier == ()


@pytest.fixture
def small_queue_mosquitto(tmp_path: Path) -> Iterator[int]:
    """A Mosquitto of the test's own on a free loopback port that queues QUEUE messages per offline session."""
    if shutil.which("mosquitto") is None:
        message = "the mosquitto program is not installed (Debian: mosquitto), for a broker with a small queue"
        if os.environ.get("FUSION_REQUIRE_BROKERS"):
            pytest.fail(message)
        pytest.skip(message)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages {QUEUE}\n"
        f"user {getpass.getuser()}\n"  # as root, Mosquitto would switch to its own user
    )
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert broker.poll() is None and time.monotonic() < deadline, "the private mosquitto did not start"
                time.sleep(0.05)
        yield port
    finally:
        broker.terminate()
        broker.wait(10)


@pytest.mark.brokers
def test_an_mqtt_source_whose_topics_changed_leaves_the_old_ones(
    tmp_path: Path, small_queue_mosquitto: int, caplog: pytest.LogCaptureFixture
) -> None:
    """alpha's topics change from a/# to b/#. The persistent session kept a/# subscribed: the broker went on
    delivering its messages (each dropped) and, while the stream was stopped, queueing them, until the session's
    queue was full and the broker dropped alpha's own readings. The reader now unsubscribes a filter the source no
    longer declares."""
    import paho.mqtt.client as mqtt

    port, tag = small_queue_mosquitto, uuid.uuid4().hex[:8]
    journal = SourceJournal(tmp_path / "journal")

    def reader(topic: str, notice: Callable[[str], None] = lambda _: None) -> MqttReader:
        source = MqttSource(port=port, topics=(f"{tag}/{topic}",), client_id=f"fusion-test-{tag}")
        return MqttReader("alpha", source, SourceJournal(journal.directory), None, notice)

    read_until_idle(reader("a/#"))
    notices: list[str] = []
    read_until_idle(reader("b/#", notices.append))  # the first run with the new topics
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fusion-test-{tag}-pub")
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    # while the stream is stopped: the old topic's traffic goes on (now another institution's, say), then alpha's
    for level, n in [*(("a", n) for n in range(2 * QUEUE)), *(("b", n) for n in range(3))]:
        publisher.publish(f"{tag}/{level}/r", f'{{"{level}": {n}}}'.encode(), qos=1).wait_for_publish(5)
    publisher.loop_stop()
    publisher.disconnect()
    with caplog.at_level(logging.WARNING, logger="pipelines.broker_sources"):
        read_until_idle(reader("b/#"))
    assert journalled(journal) == Counter(f'{{"b": {n}}}' for n in range(3))  # every reading, once
    assert not [r for r in caplog.records if "dropped a message" in r.getMessage()]  # a/# is not delivered
    assert journal.subscriptions() == {f"{tag}/b/#"}
    assert [n for n in notices if "among its topics" in n] == [
        f"source alpha mqtt 127.0.0.1:{port}: subscribed {tag}/b/#, new among its topics",
        f"source alpha mqtt 127.0.0.1:{port}: unsubscribed {tag}/a/#, no longer among its topics",
    ]


@pytest.mark.brokers
def test_a_jetstream_source_whose_subjects_change_journals_each_message_of_them_once(tmp_path: Path) -> None:
    """alpha's subjects go from a.x to a.>, then b.>, then back to a.> (one durable consumer, one journal). The
    server updated the consumer's filter in place: it went on from its place in the stream (a new subject's earlier
    messages were never read) or, as nats-server 2.9 does when a filter widens, delivered nothing more at all. The
    consumer is now created again over the new subjects, which it reads from the stream's start, and the floor of
    the old one recognises what that journalled: each message of the subjects declared at a run is journalled once,
    none of the others."""
    need_broker(NATS)
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    journal = SourceJournal(tmp_path / "journal")

    def publish(*names: str) -> None:
        nats("publish", stream, prefix, [(f"{prefix}.{n.split(':')[0]}", f'"{n}"'.encode(), None) for n in names])

    def read(subject: str) -> None:
        source = NatsSource(stream=stream, subjects=(f"{prefix}.{subject}",), durable=f"fusion-test-{tag}")
        read_until_idle(NatsReader("alpha", source, SourceJournal(journal.directory), None, lambda _: None))

    nats("create", stream, prefix)
    try:
        publish("a.x:1", "a.y:1", "b.x:1")
        read("a.x")
        publish("a.x:2", "a.y:2")
        read("a.>")  # a.y:1 and a.y:2 are a.> too
        publish("a.x:3", "b.x:2")
        read("b.>")
        publish("a.y:3", "b.x:3")
        read("a.>")  # a.y:3 came while the source read b.>; b.x:3 is not a.> any more
    finally:
        nats("delete", stream, prefix)
    assert journalled(journal) == Counter(
        f'"{n}"' for n in ("a.x:1", "a.y:1", "a.x:2", "a.y:2", "a.x:3", "b.x:1", "b.x:2", "a.y:3")
    )


def killed_at(reader: SourceReader, what: str) -> None:
    """Stand in for a kill -9 of the reader's process: its thread ends, nothing more is acknowledged or recorded."""
    reader._halt.set()
    raise RuntimeError(f"killed {what}")


@pytest.mark.brokers
def test_a_jetstream_message_not_acknowledged_at_a_subject_change_is_journalled_once_when_they_change_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alpha's reader over a.> is killed after journalling a.x:1, before acknowledging it; its subjects then change to
    b.> for three runs (their segments released, as the driver does), then back to a.>. The floor of the consumer
    over b.> passed a.x:1's sequence and, blind to subjects, deleted the list holding its id, while the floor of the
    consumer over a.> on record was below it: the consumer over a.> created again journalled it a second time (a
    reading counted twice). A list goes only once a floor of subjects that take each of its messages holds them."""
    need_broker(NATS)
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    directory = tmp_path / "journal"
    lines: list[str] = []  # every line a journal file held (the driver reads each once)

    def run(subject: str, publish: str, *, killed: bool = False) -> None:
        nats("publish", stream, prefix, [(f"{prefix}.{publish.split(':')[0]}", f'"{publish}"'.encode(), None)])
        source = NatsSource(stream=stream, subjects=(f"{prefix}.{subject}",), durable=f"fusion-test-{tag}")
        reader = NatsReader("alpha", source, SourceJournal(directory), None, lambda _: None)

        def crash_point(step: str) -> None:
            if step == "broker_after_journal":
                killed_at(reader, "after journalling, before the acknowledgement")

        if killed:
            monkeypatch.setattr(broker_sources, "crash_point", crash_point)
        read_until_idle(reader)
        monkeypatch.undo()
        journal = SourceJournal(directory)
        for segment in journal.segments()[:-1]:  # released; the newest stays (see SourceJournal.remove)
            lines.extend(segment.read_text().splitlines())
            journal.remove(segment)

    nats("create", stream, prefix)
    try:
        run("a.>", "a.x:1", killed=True)
        for n in (1, 2, 3):
            run("b.>", f"b.x:{n}")
        run("a.>", "a.x:2")
    finally:
        nats("delete", stream, prefix)
    lines.extend("".join(p.read_text() for p in SourceJournal(directory).segments()).splitlines())
    assert Counter(lines) == Counter(f'"{n}"' for n in ("a.x:1", "b.x:1", "b.x:2", "b.x:3", "a.x:2"))


def forget_mqtt_session(client_id: str) -> None:
    """End a persistent session on the broker (a connection with a clean session), so no test leaves one behind."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    with contextlib.suppress(OSError):
        client.connect("127.0.0.1", 1883)
        client.loop(0.5)
        client.disconnect()


@pytest.mark.brokers
def test_an_mqtt_source_whose_topics_narrow_holds_a_filter_over_them_throughout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alpha's topics narrow from a/# to a/b, a topic both read. The reader unsubscribed a/# before it subscribed
    a/b: in between the session held no filter over a/b, and the broker dropped its readings (3 to 9 in a row under
    a steady publisher); killed there, the session held none at all, and none of 5 readings published while the
    stream was stopped arrived. The new filter is subscribed first and the old one unsubscribed once the broker has
    granted it, each step on record: killed in between, the session holds both."""
    need_broker(MQTT)
    tag = uuid.uuid4().hex[:8]
    client_id, directory = f"fusion-test-{tag}", tmp_path / "journal"

    def reader(topic: str) -> MqttReader:
        source = MqttSource(topics=(f"{tag}/{topic}",), client_id=client_id)
        return MqttReader("alpha", source, SourceJournal(directory), None, lambda _: None)

    try:
        read_until_idle(reader("a/#"))
        changing, record = reader("a/b"), SourceJournal.record_subscriptions

        def recorded_then_killed(journal: SourceJournal, topics: set[str]) -> None:  # the change's first step
            record(journal, topics)
            killed_at(changing, "changing the topics")

        monkeypatch.setattr(SourceJournal, "record_subscriptions", recorded_then_killed)
        read_until_idle(changing)
        monkeypatch.undo()
        assert SourceJournal(directory).subscriptions() == {f"{tag}/a/#", f"{tag}/a/b"}
        mqtt_publish(f"{tag}/a/b", [f'{{"n": {n}}}'.encode() for n in range(5)])  # while the stream is stopped
        read_until_idle(reader("a/b"))
    finally:
        forget_mqtt_session(client_id)
    journal = SourceJournal(directory)
    assert journalled(journal) == Counter(f'{{"n": {n}}}' for n in range(5))  # each, once
    assert journal.subscriptions() == {f"{tag}/a/b"}


def digest(topic: str, payload: bytes) -> str:
    """An MQTT message's id in the journal (see MqttReader)."""
    return hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()[:32]


def publish_retained(topic: str, data: bytes) -> None:
    import paho.mqtt.client as mqtt

    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fusion-test-pub-{uuid.uuid4().hex[:8]}")
    publisher.connect("127.0.0.1", 1883)
    publisher.loop_start()
    publisher.publish(topic, data, qos=1, retain=True).wait_for_publish(10)
    publisher.loop_stop()
    publisher.disconnect()


@pytest.mark.brokers
@pytest.mark.parametrize("published", ["before the source subscribed", "while the stream was stopped"])
def test_a_retained_mqtt_reading_is_journalled_once_when_a_new_filter_takes_its_topic(
    tmp_path: Path, published: str
) -> None:
    """A retained reading R on a/b, journalled long ago (its id list released over a week ago and dropped: the test
    ages the lists), is sent again when the topics narrow to a/b and when a/# is subscribed anew: the broker sends
    a filter's retained messages at each subscription: R was journalled a second time. The journal keeps, for each
    topic, the digest of the latest message that arrived retained (R before the source subscribed) and of the latest
    one whose id was dropped (R delivered as a live message, without the retain flag), and journals neither again."""
    need_broker(MQTT)
    tag = uuid.uuid4().hex[:8]
    client_id, directory = f"fusion-test-{tag}", tmp_path / "journal"
    lines: list[str] = []  # every line a journal file held (the driver reads each once)

    def run(topic: str) -> None:
        live = f"{tag}/{topic.replace('#', 'live')}"
        mqtt_publish(live, [f'{{"live": "{uuid.uuid4().hex}"}}'.encode()])  # a batch each run
        source = MqttSource(topics=(f"{tag}/{topic}",), client_id=client_id)
        read_until_idle(MqttReader("alpha", source, SourceJournal(directory), None, lambda _: None))
        journal = SourceJournal(directory)
        for segment in journal.segments()[:-1]:  # released; the newest stays (see SourceJournal.remove)
            lines.extend(segment.read_text().splitlines())
            journal.remove(segment)
        week_ago = time.time() - MQTT_ID_RETENTION_S - 3600
        for released in directory.glob("*.released"):
            os.utime(released, (week_ago, week_ago))  # released over a week ago: the reader drops their ids
        journal.prune_released(time.time() - MQTT_ID_RETENTION_S)  # as a reader does every ten minutes

    retained = b'{"retained": "R"}'
    try:
        if published == "before the source subscribed":
            publish_retained(f"{tag}/a/b", retained)
        run("a/#")
        if published == "while the stream was stopped":
            publish_retained(f"{tag}/a/b", retained)
        for _ in range(3):
            run("a/#")
        assert digest(f"{tag}/a/b", retained) not in SourceJournal(directory).ids  # R's id was dropped
        run("a/b")  # the broker sends R, retained, at the subscription of a/b
        run("a/#")  # and again at that of a/#
    finally:
        publish_retained(f"{tag}/a/b", b"")  # no retained message left behind
        forget_mqtt_session(client_id)
    lines.extend("".join(p.read_text() for p in SourceJournal(directory).segments()).splitlines())
    assert lines.count(retained.decode()) == 1
