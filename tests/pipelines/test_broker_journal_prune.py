"""MQTT has no acknowledgement floor, so the ids of released segments would pile up for a stream's whole life (in
memory and re-read at every start): an MQTT reader drops those released more than a retention ago. A segment's
release time is when it was released, not when it was written; the newest list stays, so segment numbers are
never reused."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipelines.broker_journal import JOURNAL_SUFFIX, MQTT_ID_RETENTION_S, RELEASED_SUFFIX, SourceJournal

WEEK = MQTT_ID_RETENTION_S


def journal_of(directory: Path, batches: int) -> SourceJournal:
    journal = SourceJournal(directory)
    for b in range(batches):
        assert journal.append([(f"m{b}-{i}", [f'{{"n": {i}}}']) for i in range(3)]) == 3
    return journal


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_ids_of_segments_released_longer_ago_than_the_retention_are_dropped(tmp_path: Path) -> None:
    journal = journal_of(tmp_path, 4)
    segments = journal.segments()
    for segment in segments[:3]:
        journal.remove(segment)
    released = sorted(tmp_path.glob(f"*{RELEASED_SUFFIX}"))
    assert len(released) == 3
    age(released[0], WEEK + 60)
    age(released[1], WEEK - 3600)  # inside the retention
    age(released[2], 10 * WEEK)  # the newest list: kept whatever its age
    assert journal.prune_released(time.time() - WEEK) == 1
    assert not any(i.startswith("m0-") for i in journal.ids)
    assert {f"m{b}-{i}" for b in (1, 2, 3) for i in range(3)} <= journal.ids
    again = SourceJournal(tmp_path)  # a restart re-reads what is left
    assert again.ids == journal.ids
    assert again.append([("fresh", ['{"n": 9}'])]) == 1
    names = sorted(p.stem for p in tmp_path.glob(f"*{JOURNAL_SUFFIX}"))
    assert names[-1] == f"{4:012d}", "a segment number was reused"


def test_a_segment_written_long_ago_counts_from_its_release(tmp_path: Path) -> None:
    journal = journal_of(tmp_path, 3)
    first, second = journal.segments()[:2]
    age(first.with_suffix(".ids"), 3 * WEEK)  # journalled weeks ago (a stream stopped, say), released now
    journal.remove(first)
    journal.remove(second)
    assert journal.prune_released(time.time() - WEEK) == 0
    assert {f"m0-{i}" for i in range(3)} <= journal.ids
