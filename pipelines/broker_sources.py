"""Broker sources of `fusion stream`: a reader thread per declared source journals messages, then acknowledges.

A NATS JetStream source is a durable pull consumer (explicit acknowledgements) over the institution's subjects; an MQTT
source subscribes to the institution's topic filters at QoS 1 in a persistent session (clean_session off) and
acknowledges manually; a filter the session already holds (on record in the journal) is not subscribed again, since the
broker sends a filter's retained messages at each subscription, and one it holds that the source no longer declares is
unsubscribed once the new ones are granted; a retained message journalled before is not journalled again when a new
filter brings it (`SourceJournal.retained_before`). A JetStream consumer left filtering other subjects by an earlier
config is created again over the source's (`NatsReader._follow_subjects`). Either way a batch is acknowledged only after
`SourceJournal.append` has made it durable, so a kill redelivers, and nothing the broker saw acknowledged is lost.
Redeliveries are recognised by the broker id (JetStream: the stream sequence, with the stream's creation time, since a
stream created again under the same name numbers from 1 again; MQTT, which has no stable id: a digest of topic and
payload, so an exact duplicate is taken once). The journal files are the institution's inputs from there on: the driver
validates, windows, spools and releases them like feed files. A journal belongs to its source's broker session
(`source_identity`, never its position in the config), and one that no declared source claims is still read while it
holds files the stream has not read (`JournalReader`): the broker has forgotten their messages.

A broker that is down at start or goes down mid-stream is retried with exponential backoff (0.5 s to 30 s); each
change of a source's health is logged and shown in the status line. A reader journals only its source's subjects
or topics, whatever the broker delivers: a JetStream consumer's filter is read back from the server (one before 2.10
ignores `filter_subjects`, so a source over several subjects is refused there), and each message's subject or topic
is checked; one of another is acknowledged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import select
import ssl
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from fusion.config.brokers import MqttSource, NatsSource
from fusion.config.federation import Config, FeedConfig, FeedFormat
from fusion.config.institutions import InstitutionConfig
from fusion.errors import ConfigError
from fusion.release.exchange import glob_escape, join
from fusion.runtime.faults import crash_point
from pipelines.broker_journal import (
    JOURNAL_SUFFIX,
    MQTT_ID_RETENTION_S,
    AckFloor,
    SourceJournal,
    message_lines,
    read_floor,
    read_source,
    record_source,
)

_log = logging.getLogger(__name__)
MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
#: Bytes one JetStream fetch asks for (by message count, from the sizes seen so far). The server closes a connection
#: whose undelivered data passes its max_pending (64 MiB by default) as a slow consumer: the fetched messages are then
#: redelivered only after `ack_wait`, which stalled a backlog of 50 KB messages for 30 s at a time.
FETCH_BYTES = 8 << 20
#: Messages in the first fetch, before any size is known.
FIRST_FETCH = 16
#: An MQTT source counts as caught up (for `--drain`) once no message has come for this long since it subscribed or
#: since its last batch: MQTT does not say how many messages a session holds, and the broker sends a backlog a few
#: unacknowledged messages at a time, so on a loaded machine the gap between two of its batches can pass half a
#: second; closing windows then would make the rest of the backlog late.
MQTT_CAUGHT_UP_S = 2.0
#: An MQTT source whose messages never pause for MQTT_CAUGHT_UP_S counts as caught up once it has been connected this
#: long: MQTT cannot tell a session's backlog from live traffic, and due windows wait for every source to catch up.
MQTT_CATCH_UP_LIMIT_S = 60.0
#: How often a connected reader drops the ids of released segments: an MQTT reader those released more than
#: MQTT_ID_RETENTION_S ago, a JetStream reader those below its consumer's acknowledgement floor (also on connecting).
PRUNE_EVERY_S = 600.0


def fetch_size(limit: int, seen_bytes: int, seen_messages: int) -> int:
    """Messages to ask for next: at most `limit` and, at the mean size seen so far, about `FETCH_BYTES`."""
    if not seen_messages:
        return min(limit, FIRST_FETCH)
    return max(1, min(limit, FETCH_BYTES * seen_messages // max(1, seen_bytes)))


class SourceReader(threading.Thread):
    """One institution's source on a daemon thread: `health` says how it is, `idle` that it has caught up now, and
    `caught_up` that it has at least once since its latest connection (`connections` counts them): everything the
    broker held for it when it connected is journalled. Due windows wait for that (pipelines/stream_driver.py)."""

    def __init__(self, institution: str, label: str, journal: SourceJournal, notice: Callable[[str], None]) -> None:
        super().__init__(name=f"fusion-source-{institution}-{label}", daemon=True)
        self.institution = institution
        self.label = label
        self.journal = journal
        self.health = "connecting"
        self._idle = False
        self.caught_up = False  # idle (or see the subclasses) at least once since the latest connection
        self.connections = 0  # connections made so far: after each, the reader catches up again
        self.messages = 0  # messages journalled by this process (redeliveries of journalled ones aside)
        self.down_since: float | None = time.monotonic()  # monotonic time since when it has not been connected
        self._notice = notice
        self._halt = threading.Event()

    @property
    def idle(self) -> bool:
        """Connected, and the last wait for messages came back empty (JetStream: nothing pending on the broker)."""
        return self._idle

    @idle.setter
    def idle(self, idle: bool) -> None:
        self._idle = idle
        self.caught_up = self.caught_up or idle  # set after the journal took every batch before it

    def stop(self) -> None:
        self._halt.set()

    def _set_health(self, health: str) -> None:
        if health == "connected":
            if self.health != "connected":
                self.caught_up = False
                self.connections += 1
            self.down_since = None
        elif self.down_since is None:
            self.down_since = time.monotonic()
        if health != self.health:
            self.health = health
            text = f"source {self.institution} {self.label}: {health}"
            (_log.info if health == "connected" else _log.warning)(text)
            self._notice(text)

    def _said(self, text: str) -> None:
        """Log and show a change the reader made to its broker session (the config's subscription changed)."""
        text = f"source {self.institution} {self.label}: {text}"
        _log.warning(text)
        self._notice(text)

    def _down(self, exc: BaseException, delay: float) -> float:
        """Report the broker down and wait `delay`; returns the next delay (doubling up to MAX_BACKOFF_S)."""
        self.idle = self.caught_up = False
        self._set_health(f"down ({type(exc).__name__}: {str(exc) or 'no answer'}), retrying with backoff")
        self._halt.wait(delay)
        return min(delay * 2, MAX_BACKOFF_S)


class NatsReader(SourceReader):
    def __init__(
        self,
        institution: str,
        source: NatsSource,
        journal: SourceJournal,
        tls: ssl.SSLContext | None,
        notice: Callable[[str], None],
    ) -> None:
        super().__init__(institution, f"nats {source.stream}", journal, notice)
        self.source = source
        self._tls = tls
        self._life = "0"  # the stream's creation time: with the sequence, a message's id (see `_main`)
        self._backlog_end = 0  # the stream's last sequence when the reader connected: caught up once acknowledged
        self._next_prune = 0.0  # monotonic time of the next `_prune` while connected

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import nats
        from nats.errors import NoServersError
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        source, delay = self.source, MIN_BACKOFF_S
        durable = source.consumer(self.institution)
        subjects = list(source.subjects)
        consumer = ConsumerConfig(
            durable_name=durable,
            # Each message acknowledged on its own: acknowledge-all could cover a message a timed-out fetch dropped.
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=source.ack_wait_s(),
            max_ack_pending=-1,
            **({"filter_subject": subjects[0]} if len(subjects) == 1 else {"filter_subjects": subjects}),
        )
        failures: list[Exception] = []  # what nats-py met connecting: its NoServersError says only that it gave up

        async def failed(exc: Exception) -> None:  # in place of nats-py's, which logs each with a traceback
            failures.append(exc)  # connecting: `_down` says why
            if self.health == "connected":
                _log.warning("source %s %s: %s", self.institution, self.label, exc)

        while not self._halt.is_set():
            client = None
            failures.clear()
            try:
                client = await nats.connect(
                    source.url,
                    user=source.user,
                    password=source.secret(self.institution),
                    token=source.auth_token(self.institution),
                    tls=self._tls,
                    allow_reconnect=False,  # this loop reconnects, with backoff, and says so
                    connect_timeout=2,
                    # nats-py gives up on a server only after more than this many failed attempts (0: never, so a
                    # broker down at start left the source `connecting` for ever); then this loop's backoff waits
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    error_cb=failed,
                )
                stream = client.jetstream()
                refuse_unfiltered(source, client.connected_server_version)
                # A stream deleted and created again under its name numbers its messages from 1 again: an id is
                # the sequence in this life of the stream (its creation time), never taken for an older life's.
                info = await stream.stream_info(source.stream)
                created, self._backlog_end = info.created, info.state.last_seq
                self._life = created.strftime("%Y%m%dT%H%M%S%fZ") if created else "0"
                await self._follow_subjects(stream, durable)
                # The server's record of the consumer, not ours: a server that ignores a field it does not know keeps
                # a consumer over the whole stream, other institutions' subjects included.
                check_filter(source, (await stream.add_consumer(source.stream, consumer)).config)
                subscription = await stream.pull_subscribe_bind(durable, source.stream)
                # the ids of a stream's earlier life, and those below the floor, are never journalled again: their
                # lists go, and only the ids the consumer may still deliver stay in memory
                await self._prune(subscription)
                self._set_health("connected")
                delay = MIN_BACKOFF_S
                await self._pull(client, subscription)
            except Exception as exc:  # any broker or network failure: retry (nothing unacknowledged is lost)
                if self._halt.is_set():
                    break
                delay = self._down(failures[-1] if isinstance(exc, NoServersError) and failures else exc, delay)
            finally:
                if client is not None and not client.is_closed:
                    await client.close()

    async def _follow_subjects(self, stream: Any, durable: str) -> None:
        """Delete the durable consumer if its filter is not the source's subjects (they changed in the config), once
        its acknowledgement floor is on record with its subjects: the server would update the filter in place, and
        the consumer would go on from its place in the stream, never delivering the messages of a new subject before
        it. The consumer created in its place reads the subjects from the stream's start; what the old one journalled
        is recognised by its floor (`SourceJournal.journalled_earlier`) and by the ids above it."""
        from nats.js.errors import NotFoundError

        try:
            old = await stream.consumer_info(self.source.stream, durable)
        except NotFoundError:
            return
        subjects = _filtered_subjects(old.config)
        if sorted(subjects) == sorted(self.source.subjects):
            return
        if subjects:  # one over the whole stream (a server that ignored its filter): the floor on record stands
            acknowledged = old.ack_floor.stream_seq if old.ack_floor is not None and old.ack_floor.stream_seq else 0
            self.journal.prune_acknowledged(AckFloor(self._life, acknowledged, subjects))
        await stream.delete_consumer(self.source.stream, durable)
        before, now = ", ".join(subjects) or "the whole stream", ", ".join(self.source.subjects)
        self._said(
            f"the subjects changed from {before} to {now}: deleted the consumer {durable} and created it again over "
            "them, reading them from the stream's start (what the old one journalled is not journalled again)"
        )

    async def _prune(self, subscription: Any) -> None:
        """Record the consumer's acknowledgement floor in the journal, which drops what the floor covers."""
        floor = (await subscription.consumer_info()).ack_floor
        acknowledged = floor.stream_seq if floor is not None and floor.stream_seq else 0
        self.journal.prune_acknowledged(AckFloor(self._life, acknowledged, tuple(self.source.subjects)))
        self._next_prune = time.monotonic() + PRUNE_EVERY_S

    async def _pull(self, client: Any, subscription: Any) -> None:
        seen_bytes = seen_messages = 0
        while not self._halt.is_set():
            if not client.is_connected:  # a fetch on a dropped connection only times out: say it is down
                raise ConnectionError(f"lost the connection to {self.source.url}")
            if time.monotonic() >= self._next_prune:  # what the driver released meanwhile: a stream may run for months
                await self._prune(subscription)
            try:
                wanted = fetch_size(self.source.batch, seen_bytes, seen_messages)
                batch = await subscription.fetch(wanted, timeout=1.0)
            except TimeoutError:  # nats.errors.TimeoutError, or asyncio's from a fetch that gave up half way
                batch = []
            if not batch:  # caught up once nothing waits, nor waits to be redelivered (fetched by a killed reader)
                info = await subscription.consumer_info()
                self.idle = not info.num_pending and not info.num_ack_pending
                continue
            self.idle = False
            seen_messages += len(batch)
            seen_bytes += sum(len(message.data) for message in batch)
            entries, subjects = [], {}
            for message in batch:
                if not self.source.reads(message.subject):  # acknowledged below, never journalled
                    _log.warning(
                        "source %s %s: dropped a message of %s, not one of its subjects",
                        self.institution,
                        self.label,
                        message.subject,
                    )
                    continue
                sequence = message.metadata.sequence.stream
                message_id = f"{sequence}@{self._life}"
                if self.journal.journalled_earlier(message_id, message.subject):  # before the subjects changed
                    continue
                name = f"{self.source.stream}:{sequence} ({message.subject})"
                lines = message_lines(message.data, name=name, max_bytes=self.source.max_message_bytes)
                entries.append((message_id, lines))
                subjects[message_id] = message.subject  # a floor recognises a message of its own subjects only
            self.messages += self.journal.append(entries, subjects)  # durable before the acknowledgement below
            crash_point("broker_after_journal")
            for message in batch:
                await message.ack()
            if not self.caught_up:  # messages never stop coming (never idle): caught up once the floor passes the
                floor = (await subscription.consumer_info()).ack_floor  # backlog held at connection, acknowledged
                self.caught_up = floor is not None and floor.stream_seq >= self._backlog_end


def refuse_unfiltered(source: NatsSource, version: Any) -> None:
    """Refuse a consumer over several subjects on a server before 2.10: it ignores `filter_subjects` and would
    deliver the whole stream (`version`: nats-py's ServerVersion of the connected server)."""
    if len(source.subjects) > 1 and (version.major, version.minor) < (2, 10):
        server = f"{version.major}.{version.minor}.{version.patch}"
        raise ConnectionError(
            f"nats-server {server} ignores a consumer's filter_subjects (2.10 or later takes several subjects): a "
            f"consumer over {', '.join(source.subjects)} would read the whole stream {source.stream}, other "
            "institutions' subjects included. Declare one source per subject (each with its own durable), or one "
            "subject filter covering them, or upgrade the server"
        )


def _filtered_subjects(config: Any) -> tuple[str, ...]:
    """The subjects a consumer's filter on the server reads (`config`, its ConsumerConfig); none: the whole stream."""
    return tuple(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))


def check_filter(source: NatsSource, config: Any) -> None:
    """Refuse a consumer whose filter on the server (`config`, its ConsumerConfig) is not the source's subjects."""
    found = sorted(_filtered_subjects(config))
    if found != sorted(source.subjects):
        raise ConnectionError(
            f"the broker's consumer {config.durable_name} of stream {source.stream} filters "
            f"{', '.join(found) or 'nothing (the whole stream)'}, not the source's subjects "
            f"{', '.join(source.subjects)}: nothing is read from it. Delete it (`nats consumer rm {source.stream} "
            f"{config.durable_name}`): `fusion stream` creates it again"
        )


class MqttReader(SourceReader):
    def __init__(
        self,
        institution: str,
        source: MqttSource,
        journal: SourceJournal,
        tls: ssl.SSLContext | None,
        notice: Callable[[str], None],
    ) -> None:
        super().__init__(institution, f"mqtt {source.host}:{source.port}", journal, notice)
        self.source = source
        self._tls = tls

    def run(self) -> None:
        import paho.mqtt.client as mqtt

        source, delay = self.source, MIN_BACKOFF_S
        pending: list[Any] = []
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=source.session(self.institution),
            clean_session=False,  # a persistent session: QoS 1 messages wait for us while we are away
            protocol=mqtt.MQTTv311,
        )
        client.manual_ack_set(True)  # PUBACK only once journalled
        if source.user is not None:
            client.username_pw_set(source.user, source.secret(self.institution))
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.on_message = lambda _client, _data, message: pending.append(message)
        # Connected means subscribed: a broker that refuses the session (credentials) or a subscription (its ACL)
        # is down, not connected, so the status line says why and `--drain` gives up on it after its wait.
        session: dict[str, Any] = {}

        # The session's filters are made the source's topics. A filter is subscribed only when the session does not
        # hold it yet: subscribing again makes the broker send each retained message of the filter again, which, once
        # its id was pruned, was journalled a second time. A filter the session holds that the source no longer
        # declares (its topics changed) is unsubscribed: the broker went on delivering its messages, each one
        # dropped, and queueing them while the stream was stopped, until the session's queue was full and the
        # broker dropped the source's own messages. It is unsubscribed only once the broker has granted the new
        # filters, and the filters held are on record after each step: in between, a topic both read (a/# narrowed
        # to a/b) matched no filter of the session, and the broker dropped its readings (all of them, the stream
        # killed in between).
        def on_connect(c: Any, _data: Any, flags: Any, code: Any, _props: Any) -> None:
            if code.is_failure:
                session["refused"] = f"the broker refused the connection: {code}"
                return
            session["held"] = self.journal.subscriptions() if flags.session_present else set()
            session["wanted"] = [t for t in source.topics if t not in session["held"]]
            session["stale"] = sorted(session["held"] - set(source.topics))
            if session["wanted"]:
                session["subscription"] = c.subscribe([(t, 1) for t in session["wanted"]])[1]
            else:
                unsubscribe(c)

        def unsubscribe(c: Any) -> None:
            if session["stale"]:
                session["unsubscription"] = c.unsubscribe(session["stale"])[1]
            else:
                session["subscribed"] = True

        def on_subscribe(c: Any, _data: Any, mid: int, codes: Any, _props: Any) -> None:
            refused = [t for t, code in zip(session.get("wanted", []), codes, strict=False) if code.is_failure]
            if mid == session.get("subscription") and refused:
                session["refused"] = f"the broker refused the subscription to {', '.join(refused)}"
            elif mid == session.get("subscription"):
                if session["held"]:  # the session held other filters: the topics changed
                    self._said(f"subscribed {', '.join(session['wanted'])}, new among its topics")
                session["held"] |= set(session["wanted"])
                self.journal.record_subscriptions(session["held"])
                unsubscribe(c)

        def on_unsubscribe(_c: Any, _data: Any, mid: int, _codes: Any, _props: Any) -> None:
            if mid == session.get("unsubscription"):  # MQTT 3.1.1 has no refusal of an unsubscription
                session["held"] -= set(session["stale"])
                self.journal.record_subscriptions(session["held"])
                self._said(f"unsubscribed {', '.join(session['stale'])}, no longer among its topics")
                session["subscribed"] = True

        client.on_connect, client.on_subscribe, client.on_unsubscribe = on_connect, on_subscribe, on_unsubscribe
        next_prune = connected_at = time.monotonic()
        while not self._halt.is_set():
            try:
                session.clear()
                client.connect(source.host, source.port, keepalive=15)
                quiet_since = time.monotonic()
                while not self._halt.is_set():
                    code = client.loop(timeout=0.1)
                    while code == mqtt.MQTT_ERR_SUCCESS and len(pending) < 1000 and _readable(client.socket()):
                        code = client.loop_read()  # loop() reads one packet: take what has arrived, as one batch
                    if "refused" in session:
                        raise ConnectionError(session["refused"])
                    if code != mqtt.MQTT_ERR_SUCCESS:
                        raise ConnectionError(mqtt.error_string(code))
                    if session.get("subscribed") and self.health != "connected":
                        self._set_health("connected")
                        delay, quiet_since = MIN_BACKOFF_S, time.monotonic()
                        connected_at = quiet_since
                    if self.health == "connected" and not self.caught_up:
                        self._catch_up_limit(connected_at)
                    if not pending:
                        self.idle = self.health == "connected" and time.monotonic() - quiet_since > MQTT_CAUGHT_UP_S
                        continue
                    self.idle, quiet_since = False, time.monotonic()
                    batch, pending[:] = list(pending), []
                    entries, topics, retained = [], {}, {}
                    for message in batch:
                        if not source.reads(message.topic):  # acknowledged below, never journalled
                            _log.warning(
                                "source %s %s: dropped a message of %s, not one of its topics",
                                self.institution,
                                self.label,
                                message.topic,
                            )
                            continue
                        digest = hashlib.sha256(message.topic.encode() + b"\0" + message.payload).hexdigest()[:32]
                        if message.retain:  # sent at a subscription (a live one comes without the flag)
                            retained[message.topic] = digest
                            if self.journal.retained_before(message.topic, digest):  # its id may be long dropped
                                continue
                        lines = message_lines(
                            message.payload, name=f"{message.topic} {digest[:12]}", max_bytes=source.max_message_bytes
                        )
                        entries.append((digest, lines))
                        topics[digest] = message.topic
                    self.messages += self.journal.append(entries, topics)
                    # on record once journalled (a kill before: the broker redelivers it, retained, and its id is
                    # recognised), never before: one on record but not journalled would never be
                    self.journal.record_retained(retained)
                    crash_point("broker_after_journal")
                    for message in batch:
                        client.ack(message.mid, message.qos)
                    if time.monotonic() >= next_prune:  # without an ack floor, ids go after their retention
                        self.journal.prune_released(time.time() - MQTT_ID_RETENTION_S)
                        next_prune = time.monotonic() + PRUNE_EVERY_S
            except Exception as exc:  # the network, the broker, or paho refusing a setting: down, and retried
                pending.clear()  # not acknowledged: the broker redelivers them in the session
                with contextlib.suppress(Exception):
                    client.disconnect()  # a refused session or subscription: close it before trying again
                delay = self._down(exc, delay)
        client.disconnect()

    def _catch_up_limit(self, connected_at: float) -> None:
        """Count as caught up, saying so, once connected for MQTT_CATCH_UP_LIMIT_S without a pause in messages."""
        if time.monotonic() - connected_at > MQTT_CATCH_UP_LIMIT_S:
            self.caught_up = True
            text = (
                f"source {self.institution} {self.label}: messages did not pause for {MQTT_CAUGHT_UP_S:.0f} s in the "
                f"{MQTT_CATCH_UP_LIMIT_S:.0f} s since it connected; taken as caught up (MQTT does not say how many "
                "messages a session holds), so due windows close"
            )
            _log.warning(text)
            self._notice(f"warning: {text}")


def _readable(sock: Any) -> bool:
    return sock is not None and bool(select.select([sock], [], [], 0)[0])


#: A journal directory named by its source's position in the config and kind, from before journals were named by
#: their source (`journal_dirs` adopts one, or reads it as a journal of a source no longer declared).
_BY_POSITION = re.compile(r"^(\d+)-(nats|mqtt)$")


def source_identity(institution: str, source: NatsSource | MqttSource) -> dict[str, str]:
    """What a source's journal belongs to: the broker session whose deliveries its ids recognise (a JetStream
    durable consumer of a stream on a server; an MQTT client id on a broker). Not the subjects or topics: a source
    whose filters change keeps its session, which redelivers what was journalled but not acknowledged under the old
    ones, so it keeps its journal too; the reader changes the session's subscription (see the module's docstring)."""
    if isinstance(source, NatsSource):
        return {"kind": "nats", "url": source.url, "stream": source.stream, "durable": source.consumer(institution)}
    return {"kind": "mqtt", "host": source.host, "port": str(source.port), "client_id": source.session(institution)}


def journal_name(identity: dict[str, str]) -> str:
    """The directory name of a source's journal: its kind and a digest of its identity, never its position in the
    config (a source added, removed or reordered before it took another's journal, and unread readings with it)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{identity['kind']}-{digest}"


def described(identity: dict[str, str] | None, directory: Path) -> str:
    """A journal's source in words, for messages."""
    if identity is None:
        match = _BY_POSITION.match(directory.name)
        if match:
            return f"the {match[2]} source once declared at sources[{match[1]}]"
        return f"an unknown source ({directory.name})"
    if identity.get("kind") == "nats":
        return f"nats stream {identity['stream']} at {identity['url']}, durable {identity['durable']}"
    return f"mqtt {identity.get('host')}:{identity.get('port')}, client id {identity.get('client_id')}"


def journal_dirs(config: Config, institution: InstitutionConfig) -> tuple[list[Path], list[Path]]:
    """The journal directory of each of an institution's sources (in order), and the journal directories present
    that no source declared now claims. A source's journal is the one whose recorded identity is the source's; a
    journal from before identities were recorded (named `<position>-<kind>`) is adopted by the source of that kind
    at that position, as it was read then, unless its JetStream floor is of other subjects (another source's
    journal); otherwise a source's journal is a new directory named after its identity."""
    root = Path(config.stream_state_path) / "brokers" / institution.id
    present = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    recorded = {p: read_source(p) for p in present}
    identities = [source_identity(institution.id, source) for source in institution.sources]
    claimed: dict[int, Path] = {}
    for number, identity in enumerate(identities):
        for directory in present:
            if recorded[directory] == identity:
                claimed[number] = directory
    for number, (source, identity) in enumerate(zip(institution.sources, identities, strict=True)):
        if number in claimed:
            continue
        legacy = root / f"{number}-{source.kind.value}"
        floor = read_floor(legacy) if legacy in recorded else None
        subjects = sorted(source.subjects) if isinstance(source, NatsSource) else []
        if legacy in recorded and recorded[legacy] is None and (floor is None or sorted(floor.subjects) == subjects):
            claimed[number] = legacy
        else:
            claimed[number] = root / journal_name(identity)
    taken = set(claimed.values())
    return [claimed[n] for n in range(len(identities))], [p for p in present if p not in taken]


class JournalReader(SourceReader):
    """The journal of a source no longer declared (removed, or its broker session changed: another url, stream,
    durable, host, port or client id) that holds files the stream has not read: the broker acknowledged their
    messages, so they are read like any journal's and removed once released; nothing is read from a broker."""

    def __init__(self, institution: str, journal: SourceJournal, what: str, notice: Callable[[str], None]) -> None:
        super().__init__(institution, f"journal of {what}", journal, notice)
        self.health = "no longer declared, reading what it journalled"
        self.idle = True
        self.down_since = None

    def run(self) -> None:
        return


def journal_feed(journal: SourceJournal, name: str, first: FeedConfig) -> FeedConfig:
    """A journal as a feed: JSON lines with the institution's first feed's column mapping and time format."""
    return FeedConfig(
        name=name,
        path=join(glob_escape(str(journal.directory)), f"*{JOURNAL_SUFFIX}"),  # a state path may hold [ ] * ?
        format=FeedFormat.JSONL,
        time_format=first.time_format,
        columns=first.columns,
    )


def start_readers(
    config: Config, notice: Callable[[str], None], processed: Collection[str] = ()
) -> list[tuple[SourceReader, FeedConfig]]:
    """A started reader per declared source, each with the feed its journal is read as (JSON lines with the
    institution's first feed's column mapping and time format). Every source's credentials and TLS context are
    checked before any reader starts: a bad one is refused here, naming it, not retried for ever. A journal no
    declared source claims that holds files not `processed` (inputs the stream has read) is read too, by a
    `JournalReader`: its messages were acknowledged, and the broker has them no more."""
    readers: list[tuple[SourceReader, FeedConfig]] = []
    for institution in config.institutions:
        first = institution.feeds[0]
        directories, unclaimed = journal_dirs(config, institution)
        for number, (source, directory) in enumerate(zip(institution.sources, directories, strict=True)):
            source.secret(institution.id, number)
            if isinstance(source, NatsSource):
                source.auth_token(institution.id, number)
            tls = tls_context(source, f"institutions.{institution.id}.sources[{number}].tls", config.resolve)
            journal = SourceJournal(directory)
            identity = source_identity(institution.id, source)
            if read_source(directory) != identity:
                record_source(directory, identity)
            reader: SourceReader
            if isinstance(source, NatsSource):
                reader = NatsReader(institution.id, source, journal, tls, notice)
            else:
                reader = MqttReader(institution.id, source, journal, tls, notice)
            readers.append((reader, journal_feed(journal, f"source-{number}", first)))
        for directory in unclaimed:
            journal = SourceJournal(directory)
            unread = [p for p in journal.segments() if str(p) not in processed]
            if not unread:  # left as it is: its ids recognise a redelivery should the source be declared again
                continue
            what = described(read_source(directory), directory)
            text = (
                f"source {institution.id} journal of {what} ({directory}): no source declared now is its source; "
                f"reading the {len(unread)} file(s) of acknowledged messages it holds that the stream has not read"
            )
            _log.warning(text)
            notice(text)
            orphan = JournalReader(institution.id, journal, what, notice)
            readers.append((orphan, journal_feed(journal, directory.name, first)))
    known = {institution.id for institution in config.institutions}
    root = Path(config.stream_state_path) / "brokers"
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        unread = [p for p in directory.glob(f"*/*{JOURNAL_SUFFIX}") if str(p) not in processed]
        if directory.name not in known and unread:
            text = (
                f"broker journals {directory}: {directory.name} is not an institution of the config; the "
                f"{len(unread)} file(s) of readings they hold that the stream has not read are not read"
            )
            _log.warning(text)
            notice(text)
    for reader, _ in readers:
        reader.start()
    return readers


def tls_context(source: NatsSource | MqttSource, field: str, resolve: Callable[[str], str]) -> ssl.SSLContext | None:
    """The source's SSL context (None without TLS); a file that cannot be loaded is refused naming `field`."""
    if source.tls is None:
        return None
    try:
        return source.tls.context(resolve)
    except OSError as exc:  # a file gone, or an ssl.SSLError: not PEM, a key that does not match its certificate
        files = ", ".join(f"{name} = {resolve(path)}" for name, path in source.tls.files().items())
        raise ConfigError(
            f"{field}: the TLS files do not load ({exc}; {files}): ca a PEM bundle of CA certificates, cert a PEM "
            "certificate chain, key its PEM private key"
        ) from None
