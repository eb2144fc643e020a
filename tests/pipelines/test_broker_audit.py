"""`fusion stream` from brokers, on cases the first broker tests did not hold: an MQTT `#` filter that also reads its
parent topic, two sources sharing one broker session, a broker that refuses the credentials, and payloads a
JSON-lines file reads (a byte-order mark, `\\r` line ends, U+2028 inside a string) but a message did not.

A test that needs a broker skips, naming it, when it is not reachable; with FUSION_REQUIRE_BROKERS set (CI) it
fails instead. The credentials test runs its own Mosquitto (the `mosquitto` program) with a password file.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusion.config.brokers import MqttSource, NatsSource, check_sources
from fusion.config.federation import load_config
from fusion.errors import ConfigError, FusionError
from pipelines.broker_journal import message_lines
from pipelines.stream_driver import StreamDriver
from tests.conftest import END
from tests.pipelines.test_broker_stream import MQTT, NATS, json_lines, nats, need_broker, with_sources
from tests.pipelines.test_stream import stream_federation


def test_an_mqtt_filter_ending_in_hash_overlaps_its_parent_topic() -> None:
    """MQTT's `#` matches zero levels too: `t/alpha/#` reads the topic `t/alpha`, so beta may not declare it."""
    with pytest.raises(ValueError, match="both read t/alpha/# / t/alpha"):
        check_sources([("alpha", MqttSource(topics=("t/alpha/#",))), ("beta", MqttSource(topics=("t/alpha",)))])
    with pytest.raises(ValueError, match="both read"):
        check_sources([("alpha", MqttSource(topics=("t/+/#",))), ("beta", MqttSource(topics=("t/beta",)))])
    check_sources([("alpha", MqttSource(topics=("t/alpha/#",))), ("beta", MqttSource(topics=("t/beta",)))])
    # NATS's '>' needs at least one token: `t.alpha.>` does not read `t.alpha`
    check_sources(
        [
            ("alpha", NatsSource(stream="S", subjects=("t.alpha.>",))),
            ("beta", NatsSource(stream="S", subjects=("t.alpha",))),
        ]
    )


@pytest.mark.brokers
def test_the_broker_delivers_the_parent_topic_to_a_hash_filter() -> None:
    """What the refusal above rests on, asked of the real broker."""
    need_broker(MQTT)
    import paho.mqtt.client as mqtt

    tag = uuid.uuid4().hex[:8]
    received: list[str] = []
    reader = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"audit-{tag}")
    reader.on_message = lambda _c, _d, message: received.append(message.topic)
    reader.connect("127.0.0.1", 1883)
    reader.subscribe(f"{tag}/alpha/#", qos=1)
    reader.loop(1)
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"audit-{tag}-pub")
    publisher.connect("127.0.0.1", 1883)
    publisher.loop_start()
    publisher.publish(f"{tag}/alpha", b"beta's reading", qos=1).wait_for_publish(5)
    publisher.loop_stop()
    publisher.disconnect()
    deadline = time.monotonic() + 5
    while not received and time.monotonic() < deadline:
        reader.loop(0.1)
    reader.disconnect()
    assert received == [f"{tag}/alpha"]


def test_sources_sharing_a_broker_session_are_refused(make_federation) -> None:
    """Two MQTT sources of one institution on one broker would both connect as `fusion-<institution>` and take
    the session from each other, over and over; two institutions naming one durable consumer would split its
    messages. Both are refused at load, naming the shared session."""
    fed = make_federation(subdir="session")
    mqtt_source = '[[institutions.sources]]\nkind = "mqtt"\ntopics = ["{}/#"]\n'
    with_sources(fed, {"alpha": mqtt_source.format("a") + mqtt_source.format("b")})
    with pytest.raises(ConfigError, match="two sources of alpha share the MQTT client id fusion-alpha"):
        load_config(fed.config_path)
    with pytest.raises(ValueError, match="sources of alpha and beta share the JetStream durable consumer shared"):
        check_sources(
            [
                ("alpha", NatsSource(stream="S", subjects=("a.>",), durable="shared")),
                ("beta", NatsSource(stream="S", subjects=("b.>",), durable="shared")),
            ]
        )
    check_sources(  # the same client id on two brokers: two sessions
        [("alpha", MqttSource(topics=("a/#",))), ("alpha", MqttSource(port=1884, topics=("b/#",)))]
    )


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[int]:
    """A Mosquitto of the test's own on a free loopback port: user `gateway`, password `right`, no anonymous."""
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None:
        message = "the mosquitto program is not installed (Debian: mosquitto), for a broker with a password file"
        if os.environ.get("FUSION_REQUIRE_BROKERS"):
            pytest.fail(message)
        pytest.skip(message)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    passwords = tmp_path / "passwords"
    passwords.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "gateway", "right"], check=True)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\npersistence false\n"
        f"user {getpass.getuser()}\n"  # as root, Mosquitto would switch to its own user, who cannot read tmp_path
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
def test_a_broker_refusing_the_credentials_is_down_and_drain_gives_up(
    make_federation, private_mosquitto: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The password comes from the environment. A wrong one: the broker accepts the TCP connection and then
    refuses the session; the source used to say `connected` until the refusal and start over, so it was never
    down for long and `--drain` waited for it forever. It is down now, saying why, and `--drain` ends. The right
    one: connected, and a published reading is journalled."""
    import paho.mqtt.client as mqtt

    port = private_mosquitto
    fed = make_federation(subdir="credentials")
    with_sources(
        fed,
        {
            "alpha": f'[[institutions.sources]]\nkind = "mqtt"\nport = {port}\ntopics = ["a/#"]\nuser = "gateway"\n'
            'password_env = "FUSION_AUDIT_MQTT_PASSWORD"\n'
        },
    )
    monkeypatch.setenv("FUSION_AUDIT_MQTT_PASSWORD", "wrong")
    notices: list[str] = []
    driver = StreamDriver(load_config(fed.config_path), until=END, drain_wait_s=1.0, on_notice=notices.append)
    ended: list[BaseException] = []

    def drain() -> None:
        try:
            driver.run(drain=True, sleep=lambda s: time.sleep(min(s, 0.2)))
        except BaseException as exc:  # handed to the test's thread
            ended.append(exc)

    draining = threading.Thread(target=drain, daemon=True)
    draining.start()
    draining.join(60)  # a bound on a hang, not a timing: it ends in about drain_wait_s
    if draining.is_alive():
        driver.stop_requested = True
        pytest.fail(f"--drain still waits for a source the broker refuses: {driver.status().sources}")
    assert len(ended) == 1 and isinstance(ended[0], FusionError), ended
    assert re.search(r"--drain: source alpha mqtt .* refused the connection: Not authorized", str(ended[0]))
    assert not any(n.endswith(": connected") for n in notices), notices
    assert not [w for w in driver.state.windows.values() if w.release_id]

    monkeypatch.setenv("FUSION_AUDIT_MQTT_PASSWORD", "right")
    driver = StreamDriver(load_config(fed.config_path), until=END)
    try:
        deadline = time.monotonic() + 10
        while driver.status().sources != (f"alpha mqtt 127.0.0.1:{port}: connected",):
            assert time.monotonic() < deadline, driver.status().sources
            time.sleep(0.05)
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="audit-publisher")
        publisher.username_pw_set("gateway", "right")
        publisher.connect("127.0.0.1", port)
        publisher.loop_start()
        publisher.publish("a/readings", b'{"n": 1}', qos=1).wait_for_publish(5)
        publisher.loop_stop()
        publisher.disconnect()
        while driver._readers[0].messages != 1:
            assert time.monotonic() < deadline, "the reading was not journalled"
            time.sleep(0.05)
    finally:
        driver.close()


def test_a_message_splits_into_lines_as_a_json_lines_file_does() -> None:
    """A byte-order mark is dropped, `\\r\\n` and `\\r` end lines; U+2028, U+0085 and a form feed do not (inside a
    JSON string they are part of the value). `str.splitlines` took them all for line ends."""
    payload = '\ufeff{"a": 1}\r\n{"b": "x\u2028y\x85z"}\r{"c": "\x0c"}\n\n'.encode()
    assert message_lines(payload, name="m", max_bytes=1000) == ['{"a": 1}', '{"b": "x\u2028y\x85z"}', '{"c": "\x0c"}']


def test_a_message_of_white_space_json_does_not_know_is_one_malformed_record() -> None:
    """Only JSON's white space makes a message (or a line of it) blank: one of a form feed, a no-break space, U+2028
    or an information separator vanished uncounted; it is kept, and dead-lettered as a malformed record."""
    assert [message_lines(blank, name="m", max_bytes=100) for blank in (b"", b" \t\r\n", b"\n\n")] == [[], [], []]
    for other in ("\x0c", "\u00a0", "\u2028", "\x1c", " \x0c\t"):
        assert message_lines(other.encode(), name="m", max_bytes=100) == [other]


@pytest.mark.e2e
@pytest.mark.brokers
def test_payloads_a_file_would_accept_are_accepted_from_jetstream(make_federation) -> None:
    """beta's readings over JetStream in messages a JSON-lines file reads alike: a byte-order mark, CRLF and CR
    line ends, an entity id holding U+2028; beside them an empty message and a JSON array (one malformed record).
    Every reading is accepted once and released, the array counted as malformed."""
    need_broker(NATS)
    fed = stream_federation(make_federation, subdir="edges")
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    with_sources(
        fed,
        {
            inst.id: f'[[institutions.sources]]\nkind = "nats"\nstream = "{stream}"\n'
            f'subjects = ["{prefix}.{inst.id}.>"]\n'
            for inst in fed.config.institutions
        },
    )
    config = load_config(fed.config_path)
    messages = []
    for inst, table in fed.raw.items():
        lines = json_lines(table)
        marked = json.loads(lines[3])
        marked["entity_id"] += "\u2028"
        edges = [
            b"\xef\xbb\xbf" + "\n".join(lines[:2]).encode(),
            lines[2].encode() + b"\r\n" + json.dumps(marked, ensure_ascii=False).encode() + b"\r\n",
            "\r".join(lines[4:6]).encode(),
            b"",
            "\n".join(lines[6:]).encode(),
        ]
        messages += [(f"{prefix}.{inst}.r", data, None) for data in edges]
    messages.append((f"{prefix}.alpha.r", ("[" + ",".join(json_lines(fed.raw["alpha"])[:2]) + "]").encode(), None))
    nats("create", stream, prefix)
    try:
        nats("publish", stream, prefix, messages)
        driver = StreamDriver(config, until=END)
        driver.run(drain=True)
    finally:
        nats("delete", stream, prefix)
    total = sum(t.num_rows for t in fed.raw.values())
    assert driver.state.readings == total
    assert driver.state.unwindowed == {"alpha": {"malformed_record": 1}}
    from fusion.store.delta import Store

    assert sum(Store(config.store_path).read("releases").column("count").to_pylist()) == total


@pytest.mark.brokers
def test_a_jetstream_stream_created_again_under_its_name_loses_nothing(tmp_path: Path) -> None:
    """A stream deleted and created again numbers its messages from 1 again. Its ids used to be the bare
    sequence, so the new life's first messages were taken for redeliveries of journalled ones: acknowledged and
    dropped. An id now carries the stream's creation time with the sequence."""
    need_broker(NATS)
    from pipelines.broker_journal import SourceJournal
    from pipelines.broker_sources import NatsReader

    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    source = NatsSource(stream=stream, subjects=(f"{prefix}.alpha.>",))

    def journalled(expected: int) -> int:
        reader = NatsReader("alpha", source, SourceJournal(tmp_path / "journal"), None, lambda _: None)
        reader.start()
        try:
            deadline = time.monotonic() + 10
            while not (reader.idle and reader.messages >= expected):
                assert time.monotonic() < deadline, f"{reader.messages} of {expected} journalled"
                time.sleep(0.05)
        finally:
            reader.stop()
            reader.join(5)
        return reader.messages

    try:
        nats("create", stream, prefix)
        nats("publish", stream, prefix, [(f"{prefix}.alpha.r", f'{{"old": {n}}}'.encode(), None) for n in range(3)])
        assert journalled(3) == 3
        nats("delete", stream, prefix)
        nats("create", stream, prefix)
        nats("publish", stream, prefix, [(f"{prefix}.alpha.r", f'{{"new": {n}}}'.encode(), None) for n in range(5)])
        assert journalled(5) == 5
    finally:
        nats("delete", stream, prefix)
    text = "".join(p.read_text() for p in sorted((tmp_path / "journal").glob("*.jsonl")))
    assert sorted(text.splitlines()) == sorted(
        [f'{{"old": {n}}}' for n in range(3)] + [f'{{"new": {n}}}' for n in range(5)]
    )


@pytest.mark.brokers
def test_a_durable_consumer_deleted_on_the_broker_redelivers_nothing_twice(tmp_path: Path) -> None:
    """A restarted reader forgets the ids below its consumer's acknowledgement floor (they are never redelivered).
    The consumer then deleted on the broker (`nats consumer rm`, or an expiry), the reader creates it again, which
    delivers the stream from its first message: those ids used to be forgotten, and each message was journalled
    twice. The journal records the floor, and a consumer created again never lowers it: what is below is journalled."""
    need_broker(NATS)
    import nats as nats_client

    from pipelines.broker_journal import SourceJournal
    from pipelines.broker_sources import NatsReader

    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    source = NatsSource(stream=stream, subjects=(f"{prefix}.alpha.>",))

    def caught_up(reader: NatsReader, journalled: int) -> None:
        deadline = time.monotonic() + 15
        while not (reader.idle and reader.messages >= journalled):
            assert time.monotonic() < deadline, f"{reader.messages} of {journalled} journalled, {reader.health}"
            time.sleep(0.05)

    async def delete_consumer() -> None:
        client = await nats_client.connect("nats://127.0.0.1:4222")
        await client.jetstream().delete_consumer(stream, source.consumer("alpha"))
        await client.close()

    nats("create", stream, prefix)
    try:
        nats("publish", stream, prefix, [(f"{prefix}.alpha.r", f'{{"n": {n}}}'.encode(), None) for n in range(5)])
        first = NatsReader("alpha", source, SourceJournal(tmp_path / "journal"), None, lambda _: None)
        first.start()
        caught_up(first, 5)  # idle: nothing pending nor waiting for an acknowledgement
        first.stop()
        first.join(5)
        restarted = NatsReader("alpha", source, SourceJournal(tmp_path / "journal"), None, lambda _: None)
        restarted.start()
        try:
            caught_up(restarted, 0)  # connected: it forgot the five ids below the floor
            asyncio.run(delete_consumer())
            nats("publish", stream, prefix, [(f"{prefix}.alpha.r", f'{{"n": {n}}}'.encode(), None) for n in (5, 6)])
            caught_up(restarted, 2)  # idle after them: every message of the new consumer is acknowledged
        finally:
            restarted.stop()
            restarted.join(5)
    finally:
        nats("delete", stream, prefix)
    lines = "".join(p.read_text() for p in sorted((tmp_path / "journal").glob("*.jsonl"))).splitlines()
    assert sorted(lines) == sorted(f'{{"n": {n}}}' for n in range(7))
