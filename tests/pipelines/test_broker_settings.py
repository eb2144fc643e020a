"""Broker source settings: refused at load (or, for TLS files that do not load, before any reader starts) naming the
field; a reader whose broker or client library refuses a setting at run time is down, saying why, and retried."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from fusion.config.brokers import MqttSource, NatsSource
from fusion.config.federation import load_config
from fusion.errors import ConfigError
from pipelines.broker_journal import SourceJournal
from pipelines.broker_sources import MqttReader, NatsReader, SourceReader
from pipelines.stream_driver import StreamDriver
from tests.pipelines.test_broker_stream import wait_for, with_sources

NATS = '[[institutions.sources]]\nkind = "nats"\nstream = "S"\nsubjects = ["a.>"]\n'
MQTT = '[[institutions.sources]]\nkind = "mqtt"\ntopics = ["a/#"]\n'
BAD = [
    ("url-scheme", NATS + 'url = "http://127.0.0.1:4222"\n', ["sources[0].nats.url", "nats, tls, ws, wss"]),
    ("url-port", NATS + 'url = "nats://127.0.0.1:abc"\n', ["sources[0].nats.url", "not a URL"]),
    ("url-text", NATS + 'url = "not a url"\n', ["sources[0].nats.url", "not a NATS server URL"]),
    ("stream-name", NATS.replace('"S"', '"A.B C"'), ["sources[0].nats.stream", "not a JetStream stream name"]),
    ("subject-space", NATS.replace('"a.>"', '"a b.>"'), ["sources[0].nats.subjects", "white space"]),
    # a wildcard inside a token is a literal name to the server: the source loaded, connected and read nothing
    ("subject-partial-star", NATS.replace('"a.>"', '"a.b*"'), ["sources[0].nats.subjects", "'b*' holds a wildcard"]),
    ("subject-star-first", NATS.replace('"a.>"', '"*a.b"'), ["sources[0].nats.subjects", "'*a' holds a wildcard"]),
    ("subject-partial-gt", NATS.replace('"a.>"', '"a.b>"'), ["sources[0].nats.subjects", "'b>' holds a wildcard"]),
    ("subject-gt-not-last", NATS.replace('"a.>"', '"a.>.b"'), ["sources[0].nats.subjects", "'>' before the last"]),
    ("subject-dots", NATS.replace('"a.>"', '"a..b"'), ["sources[0].nats.subjects", "an empty token"]),
    ("subject-leading-dot", NATS.replace('"a.>"', '".a"'), ["sources[0].nats.subjects", "an empty token"]),
    ("subject-trailing-dot", NATS.replace('"a.>"', '"a."'), ["sources[0].nats.subjects", "an empty token"]),
    ("subject-tab", NATS.replace('"a.>"', '"a.b\\t"'), ["sources[0].nats.subjects", "white space"]),
    ("subject-second", NATS.replace('"a.>"', '"a.b", "c*.d"'), ["sources[0].nats.subjects", "'c*' holds a wildcard"]),
    ("topic-too-long", MQTT.replace('"a/#"', f'"a/{"é" * 32767}"'), ["sources[0].mqtt.topics", "65536 bytes"]),
    ("topic-partial-plus", MQTT.replace('"a/#"', '"a/b+"'), ["sources[0].mqtt.topics", "not an MQTT topic filter"]),
    ("topic-hash-not-last", MQTT.replace('"a/#"', '"a/#/b"'), ["sources[0].mqtt.topics", "not an MQTT topic filter"]),
    ("mqtt-host", MQTT + 'host = ""\n', ["sources[0].mqtt.host"]),
    # each loaded, then its reader retried for ever (paho takes the host for a name to resolve)
    ("mqtt-host-url", MQTT + 'host = "mqtt://127.0.0.1:1883"\n', ["sources[0].mqtt.host", "without its scheme"]),
    ("mqtt-host-port", MQTT + 'host = "127.0.0.1:1883"\n', ["sources[0].mqtt.host", "without its port"]),
    ("mqtt-host-space", MQTT + 'host = "broker one"\n', ["sources[0].mqtt.host", "not a host name or IP address"]),
    ("url-path", NATS + 'url = "nats://127.0.0.1:4222/x"\n', ["sources[0].nats.url", "no path, query or fragment"]),
    ("token-and-user", NATS + 'user = "u"\npassword = "p"\ntoken = "t"\n',
     ["sources[0].nats", "token is set with user"]),
    ("token-env-and-user", NATS + 'user = "u"\ntoken_env = "T"\n', ["sources[0].nats", "token_env is set with user"]),
    ("token-twice", NATS + 'token = "t"\ntoken_env = "T"\n', ["sources[0].nats", "token and token_env"]),
    ("topic-nul", MQTT.replace('"a/#"', '"a/\\u0000"'), ["sources[0].mqtt.topics", "NUL"]),
    ("password-without-user", MQTT + 'password_env = "P"\n', ["sources[0].mqtt", "password_env is set without user"]),
    ("key-without-cert", MQTT + '[institutions.sources.tls]\nkey = "k.pem"\n', ["mqtt.tls", "set cert"]),
    ("tls-file-missing", NATS + '[institutions.sources.tls]\nca = "certs/typo.pem"\n',
     ["institutions.alpha.sources[0].tls.ca", "certs/typo.pem is not a file"]),
]


@pytest.mark.parametrize(("block", "fragments"), [pytest.param(b, f, id=i) for i, b, f in BAD])
def test_a_bad_source_setting_is_refused_at_load_naming_the_field(make_federation, block, fragments) -> None:
    fed = make_federation()
    with_sources(fed, {"alpha": block})
    with pytest.raises(ConfigError) as error:
        load_config(fed.config_path)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


@pytest.mark.parametrize(
    "block",
    [
        MQTT + 'host = "broker.example.org"\n',
        MQTT + 'host = "::1"\n',
        MQTT + 'host = "mqtt_broker"\n',  # a container's service name
        NATS + 'url = "nats://127.0.0.1:4222/"\n',
        NATS + 'url = "wss://broker.example.org/nats"\n',  # a websocket server behind a proxy, at a path
        NATS + 'user = "u"\npassword_env = "P"\n',
        NATS + 'token_env = "T"\n',
        NATS.replace('"a.>"', '"a.*.c", "d.*", "*.e.>", ">"'),
        NATS.replace('"a.>"', '"gridco-1.readings_2.>"'),
        MQTT.replace('"a/#"', f'"a/{"é" * 32766}"'),  # 65,534 bytes
        MQTT.replace('"a/#"', '"+/b/+", "#", "/a//b"'),
    ],
)
def test_good_source_settings_load(make_federation: Any, block: str) -> None:
    fed = make_federation()
    with_sources(fed, {"alpha": block})
    load_config(fed.config_path)


def test_an_unset_credential_variable_is_refused_at_start_naming_the_source(
    make_federation: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read when the stream starts its readers, not at load: every command loads the config, and only the stream
    needs a broker's credentials."""
    monkeypatch.delenv("FUSION_TEST_UNSET_TOKEN", raising=False)
    fed = make_federation()
    with_sources(fed, {"alpha": MQTT, "beta": NATS.replace("a.>", "b.>") + 'token_env = "FUSION_TEST_UNSET_TOKEN"\n'})
    config = load_config(fed.config_path)
    with pytest.raises(ConfigError, match=r"institutions\.beta\.sources\[0\]: token_env names the environment "
                       r"variable FUSION_TEST_UNSET_TOKEN, which is not set"):
        StreamDriver(config)
    assert not [t for t in threading.enumerate() if t.name.startswith("fusion-source-alpha")]  # nor alpha's


def test_tls_files_that_do_not_load_are_refused_before_any_reader_starts(make_federation) -> None:
    fed = make_federation()
    (fed.directory / "ca.pem").write_text("not a certificate")
    tls = '[institutions.sources.tls]\nca = "ca.pem"\n'
    with_sources(fed, {"alpha": MQTT, "beta": NATS.replace("a.>", "b.>") + tls})
    with pytest.raises(ConfigError, match=r"institutions\.beta\.sources\[0\]\.tls: the TLS files do not load"):
        StreamDriver(load_config(fed.config_path))
    assert not [t for t in threading.enumerate() if t.name.startswith("fusion-source-alpha")]  # nor alpha's


def free_port() -> int:
    with socket.socket() as probe:  # a free port on loopback, closed again: connections are refused
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.brokers
@pytest.mark.parametrize(
    ("make_reader", "why"),
    [
        # nats-py retried a refused connection by itself for ever (max_reconnect_attempts = 0): `connecting`
        (lambda journal: NatsReader("alpha", NatsSource(url=f"nats://127.0.0.1:{free_port()}", stream="S",
                                                        subjects=("a.>",)), journal, None, lambda _: None),
         "down (ConnectionRefusedError"),
        # a host paho refuses (only a config built past its checks has one): its ValueError ended the thread
        (lambda journal: MqttReader("alpha", MqttSource.model_construct(host="", topics=("a/#",)), journal, None,
                                    lambda _: None),
         "down (ValueError"),
    ],
    ids=["nats-refused", "mqtt-host-paho-refuses"],
)
def test_a_source_that_cannot_connect_is_down_saying_why_and_retried(tmp_path: Path, make_reader, why) -> None:
    reader: SourceReader = make_reader(SourceJournal(tmp_path / "journal"))
    reader.start()
    try:
        wait_for(lambda: "down" in reader.health)
        assert reader.health.startswith(why) and reader.health.endswith("retrying with backoff"), reader.health
        assert reader.is_alive()
    finally:
        reader.stop()
        reader.join(5)
