"""Each institution's broker source journals its own subjects or topics only, whatever the broker delivers.

A test that needs a broker skips, naming it, when it is not reachable; with FUSION_REQUIRE_BROKERS set (CI) it
fails instead.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from fusion.config.brokers import MqttSource, NatsSource
from pipelines.broker_journal import SourceJournal
from pipelines.broker_sources import MqttReader, NatsReader, check_filter
from tests.pipelines.test_broker_stream import MQTT, NATS, nats, need_broker, wait_for


def journalled(journal: SourceJournal) -> list[str]:
    return sorted("".join(p.read_text() for p in journal.segments()).splitlines())


def test_a_message_is_read_only_if_its_subject_or_topic_is_the_sources() -> None:
    nats_source = NatsSource(stream="S", subjects=("t.alpha.*", "t.gauges.>"))
    assert [nats_source.reads(s) for s in ("t.alpha.r", "t.gauges.a.b", "t.alpha.r.x", "t.gauges", "t.beta.r")] == [
        True, True, False, False, False
    ]
    mqtt_source = MqttSource(topics=("t/alpha/+", "t/gauges/#"))
    assert [mqtt_source.reads(t) for t in ("t/alpha/r", "t/gauges", "t/gauges/a/b", "t/alpha", "t/beta/r")] == [
        True, True, True, False, False
    ]


@pytest.mark.parametrize("topic", ["$share/fusion/t/#", "$queue/t/alpha/#"])
def test_a_shared_subscription_is_refused_naming_the_filter_inside_it(topic: str) -> None:
    """`$share/<group>/t/#` reads every topic under t/ (other institutions' too) but escaped the overlap check,
    which took `$share` for a topic level of its own."""
    with pytest.raises(ValueError, match=r"is a shared subscription: .* declare the filter itself \(t/"):
        MqttSource(topics=(topic,))


@pytest.mark.brokers
def test_a_nats_source_over_several_subjects_never_journals_another_institutions(tmp_path: Path) -> None:
    """alpha declares two subjects of a stream beta publishes to as well. A server before 2.10 ignores a consumer's
    filter_subjects and delivers the whole stream: alpha journalled beta's readings. There the source is now down,
    saying why, and the broker's record of a consumer is checked against the subjects; on a later server it reads
    its two subjects."""
    need_broker(NATS)
    import nats as nats_client
    from nats.js.api import ConsumerConfig

    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"FUSION_{tag}", f"fusion{tag}"
    source = NatsSource(stream=stream, subjects=(f"{prefix}.alpha.a", f"{prefix}.alpha.b"))
    journal = SourceJournal(tmp_path / "journal")

    async def server_version_and_consumer() -> tuple[tuple[int, int], ConsumerConfig]:
        client = await nats_client.connect("nats://127.0.0.1:4222")
        version = client.connected_server_version
        made = await client.jetstream().add_consumer(
            stream, ConsumerConfig(durable_name=f"other-{tag}", filter_subjects=list(source.subjects))
        )
        await client.close()
        return (version.major, version.minor), made.config

    nats("create", stream, prefix)
    try:
        messages = [(f"{prefix}.{s}", f'{{"from": "{s}"}}'.encode(), None) for s in ("alpha.a", "alpha.b", "beta.x")]
        nats("publish", stream, prefix, messages)
        version, made = asyncio.run(server_version_and_consumer())
        reader = NatsReader("alpha", source, journal, None, lambda _: None)
        reader.start()
        try:
            wait_for(lambda: reader.idle or "down" in reader.health)
        finally:
            reader.stop()
            reader.join(5)
    finally:
        nats("delete", stream, prefix)
    if version < (2, 10):
        assert "ignores a consumer's filter_subjects" in reader.health and journalled(journal) == []
        with pytest.raises(ConnectionError, match="filters nothing \\(the whole stream\\)"):
            check_filter(source, made)
    else:
        assert journalled(journal) == ['{"from": "alpha.a"}', '{"from": "alpha.b"}']


@pytest.mark.brokers
def test_an_mqtt_session_subscribed_to_more_than_the_source_journals_only_its_topics(tmp_path: Path) -> None:
    """A persistent session keeps the subscriptions of an earlier config (here `t/#`): the broker delivers beta's
    topic to alpha's session. The reader acknowledges such a message and drops it, unjournalled."""
    need_broker(MQTT)
    import paho.mqtt.client as mqtt

    tag = uuid.uuid4().hex[:8]
    session = f"fusion-test-{tag}"
    earlier = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=session, clean_session=False)
    earlier.connect("127.0.0.1", 1883)
    earlier.subscribe(f"{tag}/#", qos=1)
    earlier.loop(1)
    earlier.disconnect()
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{session}-pub")
    publisher.connect("127.0.0.1", 1883)
    publisher.loop_start()
    for who in ("beta", "alpha"):
        publisher.publish(f"{tag}/{who}/r", f'{{"from": "{who}"}}'.encode(), qos=1).wait_for_publish(5)
    publisher.loop_stop()
    publisher.disconnect()
    journal = SourceJournal(tmp_path / "journal")
    source = MqttSource(topics=(f"{tag}/alpha/#",), client_id=session)
    reader = MqttReader("alpha", source, journal, None, lambda _: None)
    reader.start()
    try:
        wait_for(lambda: reader.messages and reader.idle)  # idle: nothing came for a while
    finally:
        reader.stop()
        reader.join(5)
    assert journalled(journal) == ['{"from": "alpha"}']
