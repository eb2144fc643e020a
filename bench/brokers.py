"""Broker benchmark: sustained readings/s from NATS JetStream and from MQTT into released windows, beside files.

Publishes hourly readings for several institutions (deterministic seed) as messages of JSON lines (a backlog on
the broker: MQTT to a persistent session created first), then runs `fusion stream --drain --until` in process:
every message is fetched, journalled, acknowledged, validated, windowed, spooled and every window released.
The same readings as Parquet files go through the directory stream for comparison.

    .venv/bin/python -m bench.brokers --readings 300000       # prints a table, writes bench/results/brokers.json

Needs the brokers on loopback (NATS with JetStream on 4222, Mosquitto on 1883). Mosquitto queues at most
`max_queued_messages` (1000 by default) per offline session: keep readings / institutions / per_message under it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.stream import START, config_text, hour_of_readings
from fusion.config.federation import load_config
from fusion.feeds.stream_state import WindowStatus
from fusion.keys.holder import create_federation_keys
from pipelines.stream_driver import StreamDriver

#: Readings per second the stream should sustain from each source (2 cores, the broker on the same machine).
#: Readings/s into released windows from each broker: issue 24's streaming target (issue 14 asked 100k and 50k).
TARGETS = {"nats": 200_000, "mqtt": 200_000}


def messages(table: pa.Table, per_message: int) -> list[bytes]:
    times = [t.isoformat() for t in table.column("event_time").to_pylist()]
    rows = table.drop_columns(["event_time"]).to_pylist()
    lines = [json.dumps({**row, "event_time": t}) for row, t in zip(rows, times, strict=True)]
    return ["\n".join(lines[i : i + per_message]).encode() for i in range(0, len(lines), per_message)]


def source_block(kind: str, institution: str, tag: str) -> str:
    if kind == "nats":
        return (
            f'[[institutions.sources]]\nkind = "nats"\nstream = "BENCH_{tag}"\n'
            f'subjects = ["bench{tag}.{institution}.>"]\n'
        )
    if kind == "mqtt":
        return (
            f'[[institutions.sources]]\nkind = "mqtt"\ntopics = ["bench{tag}/{institution}/#"]\n'
            f'client_id = "bench-{tag}-{institution}"\n'
        )
    return ""


async def publish_nats(tag: str, payloads: dict[str, list[bytes]], *, delete: bool = False) -> None:
    import nats

    client = await nats.connect("nats://127.0.0.1:4222")
    js = client.jetstream()
    if delete:
        await js.delete_stream(f"BENCH_{tag}")
    else:
        await js.add_stream(name=f"BENCH_{tag}", subjects=[f"bench{tag}.>"])
        pending = [js.publish(f"bench{tag}.{i}.r", data) for i, batch in payloads.items() for data in batch]
        for start in range(0, len(pending), 256):
            await asyncio.gather(*pending[start : start + 256])
    await client.close()


def publish_mqtt(tag: str, payloads: dict[str, list[bytes]]) -> None:
    import paho.mqtt.client as mqtt

    for institution in payloads:  # the sessions exist before anything is published
        session = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{tag}-{institution}", clean_session=False
        )
        session.connect("127.0.0.1", 1883)
        session.subscribe(f"bench{tag}/{institution}/#", qos=1)
        session.loop(1)
        session.disconnect()
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{tag}-pub")
    publisher.max_inflight_messages_set(1000)
    publisher.connect("127.0.0.1", 1883)
    publisher.loop_start()
    sent = [publisher.publish(f"bench{tag}/{i}/r", data, qos=1) for i, batch in payloads.items() for data in batch]
    for info in sent:
        info.wait_for_publish(30)
    publisher.loop_stop()
    publisher.disconnect()


def run(
    kind: str, readings: int, institutions: int, hours: int, per_message: int, directory: Path
) -> dict[str, object]:
    """One run: `kind` is nats, mqtt or files (the directory stream, the same readings as Parquet files)."""
    ids = [f"inst{i}" for i in range(institutions)]
    tag = uuid.uuid4().hex[:8]
    text = config_text(ids)
    for institution in ids:
        head, marker, tail = text.partition(f'path = "incoming/{institution}/*.parquet"\nformat = "parquet"\n')
        text = head + marker + source_block(kind, institution, tag) + tail
    (directory / "federation.toml").write_text(text)
    config = load_config(directory / "federation.toml")
    create_federation_keys(config, ids)
    rng = np.random.default_rng(2026)
    per_file = readings // (institutions * hours)
    tables = {i: pa.concat_tables([hour_of_readings(i, h, per_file, rng) for h in range(hours)]) for i in ids}
    for institution in ids:
        (directory / "incoming" / institution).mkdir(parents=True, exist_ok=True)
    if kind == "files":
        for institution, table in tables.items():
            pq.write_table(table, directory / "incoming" / institution / "all.parquet")
    else:
        payloads = {i: messages(t, per_message) for i, t in tables.items()}
        if kind == "nats":
            asyncio.run(publish_nats(tag, payloads))
        else:
            publish_mqtt(tag, payloads)
    started, cpu = time.monotonic(), time.process_time()
    driver = StreamDriver(config, until=START + timedelta(hours=hours))
    try:
        driver.run(drain=True)
    finally:
        if kind == "nats":
            asyncio.run(publish_nats(tag, {}, delete=True))
    total_s, cpu_s = time.monotonic() - started, time.process_time() - cpu
    released = sum(1 for w in driver.state.windows.values() if w.status is WindowStatus.RELEASED)
    return {
        "source": kind,
        "readings": driver.state.readings,
        "windows_released": released,
        "seconds": total_s,
        "readings_per_s_into_released_windows": driver.state.readings / total_s,
        # per second of this process's CPU (every thread): what the rate would be on cores of its own
        "readings_per_cpu_s": driver.state.readings / cpu_s,
        "target_readings_per_s": TARGETS.get(kind),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readings", type=int, default=300_000)
    parser.add_argument("--institutions", type=int, default=3)
    parser.add_argument("--hours", type=int, default=4)
    parser.add_argument("--per-message", type=int, default=500, help="readings (JSON lines) per broker message")
    parser.add_argument("--sources", default="nats,mqtt,files")
    parser.add_argument("--out", default="bench/results/brokers.json")
    args = parser.parse_args()
    results = []
    for kind in args.sources.split(","):
        directory = Path(tempfile.mkdtemp(prefix=f"fusion-bench-{kind}-"))
        try:
            results.append(run(kind, args.readings, args.institutions, args.hours, args.per_message, directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        print(json.dumps(results[-1]))
    doc = {"runs": results, "measured_at": datetime.now(UTC).isoformat()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
