"""An institution's broker sources in the config: MQTT topic filters or a NATS JetStream durable consumer.

Declared beside the institution's file feeds (`[[institutions.sources]]`). Each institution reads only its own
subjects or topics: two institutions whose filters could match the same subject are refused at load, and so is an
MQTT shared subscription (its filter would escape that check); a reader checks each message's subject or topic
again (`reads`). Settings a broker or client library would refuse at run time are refused at load, naming the
field. Credentials come from the config or from environment variables it names (`password_env`, `token_env`),
never from the command line.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Sequence
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fusion.errors import ConfigError
from fusion.runtime.durations import parse_duration

#: A message larger than this is dead-lettered (one malformed record naming its size), never parsed.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
#: The longest MQTT topic filter, in UTF-8 bytes (MQTT 3.1.1, 1.5.3: a string's length is two bytes).
MQTT_TOPIC_BYTES = 65535
#: The URL schemes of a NATS server (nats-py's): plain or TLS, over TCP or websockets.
NATS_SCHEMES = ("nats", "tls", "ws", "wss")
#: A host name: dot-separated labels of letters, digits, '-' and '_' (a container's service name may hold one).
_HOST_NAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")
#: What a JetStream stream name may not hold: whitespace, control characters, '.', '*', '>', path separators.
_NOT_IN_A_NAME = re.compile(r"[\s\x00-\x1f\x7f.*>/\\]")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class SourceKind(StrEnum):
    NATS = "nats"
    MQTT = "mqtt"


class TlsConfig(_Frozen):
    """TLS to the broker: a CA bundle to trust, and a client certificate and key when the broker asks for one."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _key_with_cert(self) -> Self:
        if self.key and not self.cert:
            raise ValueError("key is the private key of a client certificate: set cert (the certificate chain) too")
        return self

    def files(self) -> dict[str, str]:
        """The files named, by field (ca, cert, key)."""
        return {name: path for name, path in (("ca", self.ca), ("cert", self.cert), ("key", self.key)) if path}

    def context(self, resolve: Callable[[str], str] | None = None) -> ssl.SSLContext:
        """An SSL context for these files (paths resolved by `resolve`, e.g. relative to the config)."""
        where = resolve or (lambda path: path)
        context = ssl.create_default_context(cafile=where(self.ca) if self.ca else None)
        if self.cert:
            context.load_cert_chain(where(self.cert), where(self.key) if self.key else None)
        return context


class _Credentials(_Frozen):
    user: str | None = None
    password: str | None = None
    password_env: str | None = None  # the environment variable holding the password
    tls: TlsConfig | None = None
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0)

    @model_validator(mode="after")
    def _password_with_user(self) -> Self:
        if (self.password is not None or self.password_env is not None) and self.user is None:
            field = "password" if self.password is not None else "password_env"
            raise ValueError(f"{field} is set without user: a broker takes a password only with a user name")
        return self

    def secret(self, institution: str, number: int | None = None) -> str | None:
        """The password: from the config, else from the environment variable it names (one not set is refused
        naming the institution's source, `number` its position when known)."""
        return _from_env(self.password, self.password_env, _source_field(institution, number), "password_env")


class NatsSource(_Credentials):
    """A durable JetStream pull consumer over `subjects` of `stream`; messages are JSON lines."""

    kind: Literal[SourceKind.NATS] = SourceKind.NATS
    url: str = "nats://127.0.0.1:4222"  # nats://, tls://, ws:// or wss:// <host>[:<port>]
    stream: str  # a JetStream stream name: no whitespace, '.', '*', '>', '/' or '\'
    # subject filters: tokens separated by '.', '*' a whole token, '>' the whole last one; more than one needs
    # nats-server 2.10 or later. Changed, the durable consumer is created again over them (the stream's start).
    subjects: tuple[str, ...] = Field(min_length=1)
    durable: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_\-]{1,64}$")  # default: fusion-<institution>
    token: str | None = None  # or token_env, the variable holding it; a token authenticates instead of a user
    token_env: str | None = None
    # messages per fetch at most (journalled and acknowledged together); a fetch also stays near 8 MiB of messages
    batch: int = Field(default=2000, gt=0)
    # Unacknowledged messages (a reader killed or cut off after the fetch) are redelivered after this; due windows wait
    # for them (pipelines/stream_driver.py), so a long ack_wait delays releases after a crash and makes nothing late.
    ack_wait: str = "30s"

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        try:
            parsed = urlparse(url)
            host, _ = parsed.hostname, parsed.port  # the port raises unless it is a number in range
        except ValueError as exc:
            raise ValueError(f"url {url!r} is not a URL ({exc})") from None
        if parsed.scheme not in NATS_SCHEMES or not host or re.search(r"\s", url):
            raise ValueError(
                f"url {url!r} is not a NATS server URL: write <scheme>://<host>[:<port>] with a scheme of "
                f"{', '.join(NATS_SCHEMES)} (e.g. nats://127.0.0.1:4222)"
            )
        # nats-py ignores a path, a query or a fragment of a nats:// or tls:// URL (a websocket URL keeps its path,
        # for a server behind a proxy): one there is a typo for another server, not a setting
        if parsed.query or parsed.fragment or (parsed.scheme in ("nats", "tls") and parsed.path not in ("", "/")):
            raise ValueError(
                f"url {url!r} holds more than a server: write <scheme>://<host>[:<port>] with no path, query or "
                "fragment (only a ws:// or wss:// URL takes a path)"
            )
        return url

    @field_validator("stream")
    @classmethod
    def _stream(cls, stream: str) -> str:
        if not 0 < len(stream) <= 255 or _NOT_IN_A_NAME.search(stream):
            raise ValueError(
                f"stream {stream!r} is not a JetStream stream name: 1 to 255 characters, none of them whitespace, "
                "'.', '*', '>', '/' or '\\'"
            )
        return stream

    @field_validator("ack_wait")
    @classmethod
    def _ack_wait(cls, text: str) -> str:
        if parse_duration(text) <= timedelta(0):
            raise ValueError(f"ack_wait {text!r} must be positive (e.g. '30s')")
        return text

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> Self:
        token = "token" if self.token is not None else "token_env" if self.token_env is not None else None
        if token and self.user is not None:
            raise ValueError(
                f"{token} is set with user: a NATS server authenticates a client by a token or by a user and "
                "password, not both; keep one"
            )
        if self.token is not None and self.token_env is not None:
            raise ValueError("token and token_env are both set: keep one (token_env names the variable holding it)")
        return self

    def ack_wait_s(self) -> float:
        return parse_duration(self.ack_wait).total_seconds()

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, subjects: tuple[str, ...]) -> tuple[str, ...]:
        for subject in subjects:
            problem = _subject_problem(subject)
            if problem:
                raise ValueError(f"subject {subject!r} is not a NATS subject filter: {problem}")
        return subjects

    def consumer(self, institution: str) -> str:
        return self.durable or f"fusion-{institution}".replace(".", "_")

    def auth_token(self, institution: str, number: int | None = None) -> str | None:
        """The token: from the config, else from the environment variable it names (see `secret`)."""
        return _from_env(self.token, self.token_env, _source_field(institution, number), "token_env")

    def filters(self) -> list[tuple[str, ...]]:
        return [tuple(s.split(".")) for s in self.subjects]

    def reads(self, subject: str) -> bool:
        """Whether a message's subject is one of this source's (a consumer's filter is checked on the broker, and
        again here for each message: nothing of another institution's subjects is journalled)."""
        return nats_subject_matches(self.subjects, subject)


class MqttSource(_Credentials):
    """MQTT topic filters read at QoS 1 in a persistent session; messages are JSON lines."""

    kind: Literal[SourceKind.MQTT] = SourceKind.MQTT
    host: str = Field(default="127.0.0.1", min_length=1)  # a host name or IP address: no scheme, no port
    port: int = Field(default=1883, gt=0, lt=65536)
    # topic filters ('+' a whole level, '#' the whole last one; 65,535 bytes at most); no shared subscription.
    # Changed, the persistent session subscribes the new ones (read from then on), then unsubscribes the old ones.
    topics: tuple[str, ...] = Field(min_length=1)
    client_id: str | None = Field(default=None, min_length=1, max_length=64)  # default: fusion-<institution>

    @field_validator("host")
    @classmethod
    def _host(cls, host: str) -> str:
        if _is_address(host) or (len(host) <= 253 and _HOST_NAME.match(host)):
            return host
        hint = ""
        if "://" in host:
            hint = " without its scheme (TLS is the source's [institutions.sources.tls] table)"
        elif re.fullmatch(r"[^:\s]+:\d*", host):
            hint = " without its port (that is `port`)"
        raise ValueError(
            f"host {host!r} is not a host name or IP address: write the broker's name or address alone{hint}, "
            "e.g. 127.0.0.1 or broker.example.org, and its port in `port`"
        )

    @field_validator("topics")
    @classmethod
    def _topics(cls, topics: tuple[str, ...]) -> tuple[str, ...]:
        for topic in topics:
            levels = topic.split("/")
            if not topic or "#" in levels[:-1] or any(("+" in x or "#" in x) and len(x) > 1 for x in levels):
                raise ValueError(f"topic {topic!r} is not an MQTT topic filter ('+' a level, '#' last)")
            if "\0" in topic:
                raise ValueError(f"topic {topic!r} holds a NUL character, which MQTT does not allow in a topic")
            if len(topic.encode()) > MQTT_TOPIC_BYTES:
                raise ValueError(
                    f"topic {topic[:40]!r}... is {len(topic.encode())} bytes in UTF-8: MQTT allows at most "
                    f"{MQTT_TOPIC_BYTES} (its length is a 16-bit field)"
                )
            shared = {"$share": 2, "$queue": 1}.get(levels[0])  # the levels before the filter itself
            if shared:
                raise ValueError(
                    f"topic {topic!r} is a shared subscription: the broker hands each of its messages to one client "
                    "of the group only, and the filter inside it would escape the check that each institution reads "
                    f"only its own topics; declare the filter itself ({'/'.join(levels[shared:]) or '...'})"
                )
        return topics

    def session(self, institution: str) -> str:
        return self.client_id or f"fusion-{institution}"

    def filters(self) -> list[tuple[str, ...]]:
        # MQTT's '+' and '#' play NATS's '*' and '>' for the overlap check
        return [tuple({"+": "*", "#": ">"}.get(x, x) for x in t.split("/")) for t in self.topics]

    def reads(self, topic: str) -> bool:
        """Whether a message's topic matches one of this source's filters ('#' also matches the level above it)."""
        name = topic.split("/")
        return any(_matches(t.split("/"), name, one="+", rest="#", rest_may_be_empty=True) for t in self.topics)


def _subject_problem(subject: str) -> str | None:
    """What makes `subject` no NATS subject filter (None: nothing). The server takes a token such as `b*` or `>x` for
    a literal one, so a filter meant as a wildcard read nothing."""
    tokens = subject.split(".")
    if any(not token for token in tokens):
        return "an empty token (a '.' at the start or the end, or two together): tokens are separated by one '.'"
    if re.search(r"[\s\x00-\x1f\x7f]", subject):
        return "it holds white space or a control character"
    partial = [t for t in tokens if len(t) > 1 and ("*" in t or ">" in t)]
    if partial:
        return (
            f"the token {partial[0]!r} holds a wildcard: '*' (one token) and '>' (the tokens left) are wildcards only "
            f"as a whole token, and the server takes {partial[0]!r} for a literal name, so nothing would be read"
        )
    if ">" in tokens[:-1]:
        return "'>' before the last token: it stands for every token after it, so it comes last"
    return None


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def nats_subject_matches(filters: Sequence[str], subject: str) -> bool:
    """Whether a NATS subject matches one of the subject filters ('*' one token, '>' the one or more left)."""
    name = subject.split(".")
    return any(_matches(f.split("."), name, one="*", rest=">", rest_may_be_empty=False) for f in filters)


def _matches(tokens: Sequence[str], name: Sequence[str], *, one: str, rest: str, rest_may_be_empty: bool) -> bool:
    """Whether the subject or topic `name` (its tokens) matches a filter's `tokens`: `one` matches one token, `rest`
    (last) the tokens left, at least one unless `rest_may_be_empty`."""
    for n, token in enumerate(tokens):
        if token == rest:
            return len(name) > n or rest_may_be_empty
        if n >= len(name) or token not in (one, name[n]):
            return False
    return len(name) == len(tokens)


BrokerSource = Annotated[NatsSource | MqttSource, Field(discriminator="kind")]


def check_tls_files(sources: Sequence[tuple[str, int, NatsSource | MqttSource]], resolve: Callable[[str], str]) -> None:
    """Refuse a TLS file that is not there ((institution, number of its source, source) triples; paths resolved by
    `resolve`): a typo would otherwise show only as a source that never connects."""
    for institution, number, source in sources:
        for name, path in (source.tls.files() if source.tls else {}).items():
            if not Path(resolve(path)).is_file():
                raise ValueError(
                    f"institutions.{institution}.sources[{number}].tls.{name}: {resolve(path)} is not a file (paths "
                    "are relative to the config file)"
                )


def _source_field(institution: str, number: int | None) -> str:
    return f"institutions.{institution}.sources" + ("" if number is None else f"[{number}]")


def _from_env(value: str | None, variable: str | None, source: str, field: str) -> str | None:
    """`value`, else the environment variable `variable`. It is read when `fusion stream` starts its readers (before
    any of them starts), not at load: every command loads the config, and only the stream needs a broker's
    credentials (a query, a batch run or the dashboard runs where they are not exported)."""
    if value is not None or variable is None:
        return value
    found = os.environ.get(variable)
    if found is None:
        raise ConfigError(
            f"{source}: {field} names the environment variable {variable}, which is not set; export it before "
            "`fusion stream` (credentials never go on the command line)"
        )
    return found


def filters_overlap(first: Sequence[str], second: Sequence[str], *, mqtt: bool = False) -> bool:
    """Whether some subject matches both filters (tokens; '*' one token, '>' one or more at the end). With `mqtt`,
    '>' stands for MQTT's '#', which also matches zero levels: `a/#` matches the topic `a` itself."""
    for a, b in zip(first, second, strict=False):
        if a == ">" or b == ">":
            return True
        if a != b and "*" not in (a, b):
            return False
    if len(first) == len(second):
        return True
    longer = first if len(first) > len(second) else second
    return mqtt and len(longer) == min(len(first), len(second)) + 1 and longer[-1] == ">"


def _shown(tokens: Sequence[str], kind: SourceKind) -> str:
    if kind is SourceKind.MQTT:
        return "/".join({"*": "+", ">": "#"}.get(x, x) for x in tokens)
    return ".".join(tokens)


def check_sources(sources: Sequence[tuple[str, NatsSource | MqttSource]]) -> None:
    """Refuse two institutions whose filters on the same broker could match the same subject or topic, and two
    sources that would share one broker session (an MQTT client id on one broker: each connection takes the
    session from the other, over and over; a JetStream durable consumer on one stream: they split its messages)."""
    sessions: dict[tuple[str, ...], str] = {}
    for institution, source in sources:
        if isinstance(source, MqttSource):
            key: tuple[str, ...] = ("mqtt", source.host, str(source.port), source.session(institution))
            what = f"MQTT client id {key[-1]} on {source.host}:{source.port}"
        else:
            key = ("nats", source.url, source.stream, source.consumer(institution))
            what = f"JetStream durable consumer {key[-1]} of stream {source.stream} at {source.url}"
        field = "client_id" if key[0] == "mqtt" else "durable"
        if key in sessions:
            owner = sessions[key]
            who = f"two sources of {owner}" if owner == institution else f"sources of {owner} and {institution}"
            raise ValueError(f"{who} share the {what}: give each source its own {field}")
        sessions[key] = institution
    for n, (first_id, first) in enumerate(sources):
        for second_id, second in sources[n + 1 :]:
            if first_id == second_id or first.kind != second.kind:
                continue
            for a in first.filters():
                for b in second.filters():
                    if filters_overlap(a, b, mqtt=first.kind is SourceKind.MQTT):
                        shown = [_shown(f, first.kind) for f in (a, b)]
                        raise ValueError(
                            f"institutions {first_id} and {second_id} both read {shown[0]} / {shown[1]} "
                            f"({first.kind.value}): each institution reads only its own subjects or topics; "
                            "give each its own prefix (e.g. fusion.<institution>.>)"
                        )
