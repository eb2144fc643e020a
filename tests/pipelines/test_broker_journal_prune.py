"""The ids of released segments would pile up for a stream's whole life (on disk, and re-read at every start and
connection). MQTT has no acknowledgement floor: an MQTT reader drops those released more than a retention ago; a
segment's release time is when it was released, not when it was written. A JetStream reader records its consumer's
floor and drops the lists it covers; a restart reads back only the ids above it. Either way the newest list stays,
so segment numbers are never reused."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.broker_journal import (
    FLOOR_FILE,
    JOURNAL_SUFFIX,
    MQTT_ID_RETENTION_S,
    RELEASED_SUFFIX,
    AckFloor,
    SourceJournal,
)

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


def test_the_latest_message_of_each_topic_stays_on_record_once_its_id_is_dropped(tmp_path: Path) -> None:
    """The broker sends a topic's retained message again at a new subscription, however long ago it was journalled:
    the latest message of each topic among the dropped lists stays on record (a topic may hold any character), and
    so does the latest that arrived retained, recorded only where it changes."""
    journal = SourceJournal(tmp_path)
    topics = {"t/a": "t/a", "t/b": "t/b\nwith a line break"}
    for b, newest in enumerate(("t/a", "t/b", "t/a", "t/a")):
        messages = [(f"{b}-old", ["{}"]), (f"{b}-{newest}", ["{}"])]
        assert journal.append(messages, {f"{b}-old": topics["t/b"], f"{b}-{newest}": topics[newest]}) == 2
    for segment in journal.segments():
        journal.remove(segment)
    for released in tmp_path.glob(f"*{RELEASED_SUFFIX}"):
        age(released, WEEK + 60)
    assert journal.prune_released(time.time() - WEEK) == 2  # lists 0 and 1; 2 is the newest, 3 not released
    again = SourceJournal(tmp_path)
    assert again.retained_before("t/a", "0-t/a") and again.retained_before(topics["t/b"], "1-t/b")
    assert not again.retained_before("t/a", "0-old") and not again.retained_before(topics["t/b"], "0-old")
    again.record_retained({"t/a": "r"})
    assert SourceJournal(tmp_path).retained == {
        "t/a": {"dropped": "0-t/a", "retained": "r"},
        topics["t/b"]: {"dropped": "1-t/b"},
    }


# -- JetStream: against the consumer's acknowledgement floor ----------------------------------------------------

LIFE, OLDER = "20261207T000000000000Z", "20261101T000000000000Z"
SUBJECTS = ("fusion.alpha.>",)


def floor_at(sequence: int, life: str = LIFE, subjects: tuple[str, ...] = SUBJECTS) -> AckFloor:
    return AckFloor(life, sequence, subjects)


def stream_journal(directory: Path, batches: list[range], life: str = LIFE) -> SourceJournal:
    """A journal of JetStream batches (sequences), every segment but the newest removed (its windows released)."""
    journal = SourceJournal(directory)
    for batch in batches:
        assert journal.append([(f"{n}@{life}", [f'{{"n": {n}}}']) for n in batch]) == len(batch)
    for segment in journal.segments():
        journal.remove(segment)
    return journal


def listed(directory: Path) -> list[str]:
    return sorted(i for p in directory.glob(f"*{RELEASED_SUFFIX}") for i in p.read_text().split())


def test_a_floor_covers_its_life_up_to_its_sequence_and_every_older_life() -> None:
    floor = floor_at(10)
    assert floor.covers(f"10@{LIFE}") and not floor.covers(f"11@{LIFE}")
    assert floor.covers(f"999@{OLDER}")  # that stream is gone: its messages never come again
    assert not floor.covers("3f2a9c")  # not a JetStream id (an MQTT digest): never taken as journalled


def test_the_lists_below_the_floor_go_and_a_restart_reads_only_the_ids_above_it(tmp_path: Path) -> None:
    older = stream_journal(tmp_path, [range(1, 4)], life=OLDER)  # a life of the stream deleted since
    journal = stream_journal(tmp_path, [range(1, 4), range(4, 7), range(7, 10), range(10, 13), range(13, 15)])
    assert older.segments() == journal.segments()  # one directory: the older life's segment was removed too
    assert len(list(tmp_path.glob(f"*{RELEASED_SUFFIX}"))) == 5
    assert journal.prune_acknowledged(floor_at(7)) == 3  # the older life's, 1-3 and 4-6; 7-9 holds 8 and 9
    assert listed(tmp_path) == sorted(f"{n}@{LIFE}" for n in range(7, 13))  # 7-9, and 10-12 (the newest list)
    live = {f"{n}@{LIFE}" for n in range(8, 15)}  # those the consumer may still deliver, the newest segment's too
    assert journal.ids == live
    again = SourceJournal(tmp_path)  # a restart: the floor is on record, the ids below it are not read
    assert again.floor == floor_at(7) and again.ids == live
    assert again.append([(f"{n}@{LIFE}", ["x"]) for n in range(1, 15)]) == 0  # nothing journalled twice
    assert again.append([(f"15@{LIFE}", ['{"n": 15}'])]) == 1
    assert max(p.stem for p in tmp_path.glob(f"*{JOURNAL_SUFFIX}")) == f"{6:012d}", "a segment number was reused"


def test_released_lists_stop_growing_as_the_floor_follows_the_releases(tmp_path: Path) -> None:
    journal = SourceJournal(tmp_path)
    for b in range(200):  # 200 fetches of 50 messages, each acknowledged, every segment but the newest released
        assert journal.append([(f"{n}@{LIFE}", ["{}"]) for n in range(b * 50 + 1, b * 50 + 51)]) == 50
        for segment in journal.segments():
            journal.remove(segment)
        journal.prune_acknowledged(floor_at(b * 50 + 50))
        assert len(list(tmp_path.glob(f"*{RELEASED_SUFFIX}"))) <= 1
    assert SourceJournal(tmp_path).ids == set()


def test_a_consumer_created_again_does_not_lower_the_floor(tmp_path: Path) -> None:
    journal = stream_journal(tmp_path, [range(1, 4), range(4, 7), range(7, 9)])
    journal.prune_acknowledged(floor_at(8))
    assert listed(tmp_path) == sorted(f"{n}@{LIFE}" for n in range(4, 7))
    journal.prune_acknowledged(floor_at(0))  # deleted on the broker, created again: it delivers from the start
    assert journal.floor == floor_at(8)
    assert journal.append([(f"{n}@{LIFE}", ["x"]) for n in range(1, 9)]) == 0
    assert SourceJournal(tmp_path).floor == floor_at(8)


def test_a_new_life_or_new_subjects_replace_the_floor(tmp_path: Path) -> None:
    journal = stream_journal(tmp_path, [range(1, 4), range(4, 6)])
    journal.prune_acknowledged(floor_at(5))
    renewed = "20261208T000000000000Z"
    journal.prune_acknowledged(floor_at(0, life=renewed))  # the stream created again: numbered from 1 again
    assert journal.floor == floor_at(0, life=renewed)
    assert journal.append([(f"{n}@{renewed}", ['{"n": 1}']) for n in (1, 2)]) == 2
    wider = ("fusion.alpha.>", "fusion.alpha2.>")
    journal.prune_acknowledged(floor_at(0, life=renewed, subjects=wider))  # its messages <= 2 on the new subject
    assert journal.floor == floor_at(0, life=renewed, subjects=wider)  # were never delivered: the floor says so
    assert journal.ids == {f"{n}@{renewed}" for n in (1, 2)}  # and the ids on record are read back instead


def test_a_kill_while_pruning_loses_nothing_and_journals_nothing_twice(tmp_path: Path, monkeypatch) -> None:
    journal = stream_journal(tmp_path, [range(1, 4), range(4, 7), range(7, 9)])

    def killed(self: Path, missing_ok: bool = False) -> None:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):  # the floor is recorded, no list deleted yet
        journal.prune_acknowledged(floor_at(8))
    monkeypatch.undo()
    assert (tmp_path / FLOOR_FILE).exists()
    again = SourceJournal(tmp_path)
    assert again.floor == floor_at(8) and again.ids == set()
    assert again.append([(f"{n}@{LIFE}", ["x"]) for n in range(1, 9)]) == 0
    again.prune_acknowledged(floor_at(8))
    assert listed(tmp_path) == sorted(f"{n}@{LIFE}" for n in range(4, 7))  # only the newest list is left


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 5), st.booleans(), st.booleans(), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
def test_every_journalled_message_is_recognised_whatever_is_pruned(tmp_path_factory, steps) -> None:
    """Against a plain record of every id journalled and acknowledged: after any appends, releases, prunes (the
    floor anywhere up to the last acknowledgement, or back to 0 for a consumer created again) and restarts, each
    journalled id is refused again, and what is in memory is only ids above the floor."""
    directory = tmp_path_factory.mktemp("journal")
    journal, journalled, sequence = SourceJournal(directory), set(), 0
    for size, release, prune, restart in steps:
        batch = [f"{n}@{LIFE}" for n in range(sequence + 1, sequence + size + 1)]
        assert journal.append([(i, ["{}"]) for i in batch]) == size
        journalled.update(batch)
        sequence += size
        if release:
            for segment in journal.segments():
                journal.remove(segment)
        if prune:
            journal.prune_acknowledged(floor_at(sequence if size % 2 else 0))
        if restart:
            journal = SourceJournal(directory)
        floor = journal.floor
        assert all(floor is None or not floor.covers(i) for i in journal.ids)
        assert journal.append([(i, ["again"]) for i in sorted(journalled)]) == 0
    assert "again" not in "".join(p.read_text() for p in directory.glob(f"*{JOURNAL_SUFFIX}"))


def test_a_floor_of_other_subjects_never_drops_the_id_of_a_message_it_never_delivered(tmp_path: Path) -> None:
    """A message of a.x journalled by the consumer over a.> but never acknowledged (the reader killed), then the
    consumer over b.> in its place: its floor passes the message's sequence, but it never delivered it, and the
    consumer over a.> created again later does. The list holding its id stays until a floor of a.> holds it."""
    journal = SourceJournal(tmp_path)
    journal.prune_acknowledged(floor_at(0, subjects=("a.>",)))
    assert journal.append([(f"1@{LIFE}", ['"a.x:1"'])], {f"1@{LIFE}": "a.x"}) == 1
    journal.prune_acknowledged(floor_at(0, subjects=("b.>",)))  # the subjects changed: its floor was 0
    for n in (2, 3, 4):
        assert journal.append([(f"{n}@{LIFE}", [f'"b.x:{n}"'])], {f"{n}@{LIFE}": "b.x"}) == 1
    for segment in journal.segments():
        journal.remove(segment)
    assert journal.prune_acknowledged(floor_at(4, subjects=("b.>",))) == 1  # 2's; 1's stays, 3's is the newest
    assert (tmp_path / f"000000000000{RELEASED_SUFFIX}").read_text() == f'1@{LIFE} "a.x"'
    again = SourceJournal(tmp_path)
    again.prune_acknowledged(floor_at(0, subjects=("a.>",)))  # back to a.>: its consumer delivers 1 again
    assert not again.journalled_earlier(f"1@{LIFE}", "a.x") and f"1@{LIFE}" in again.ids
    assert again.append([(f"1@{LIFE}", ['"a.x:1"'])], {f"1@{LIFE}": "a.x"}) == 0  # not journalled twice
    assert again.prune_acknowledged(floor_at(1, subjects=("a.>",))) == 1  # acknowledged now: its list goes
    assert f"1@{LIFE}" not in SourceJournal(tmp_path).ids


def test_an_id_listed_without_its_subject_goes_only_below_every_floor_of_its_life(tmp_path: Path) -> None:
    """A list written before subjects were listed beside the ids: nothing says which floor's subjects take its
    messages, so it goes only once each floor of the stream's life is at or above them."""
    journal = SourceJournal(tmp_path)
    journal.prune_acknowledged(floor_at(0, subjects=("a.>",)))
    for n in (1, 2):
        journal.append([(f"{n}@{LIFE}", ["{}"])])
    journal.prune_acknowledged(floor_at(0, subjects=("b.>",)))
    for n in (3, 4):
        journal.append([(f"{n}@{LIFE}", ["{}"])])
    for segment in journal.segments():
        journal.remove(segment)
    assert journal.prune_acknowledged(floor_at(4, subjects=("b.>",))) == 0  # the floor of a.> is 0
    assert journal.ids == {f"{n}@{LIFE}" for n in (1, 2, 3, 4)}
    journal.prune_acknowledged(floor_at(1, subjects=("a.>",)))  # back to a.>, then b.> again
    assert journal.prune_acknowledged(floor_at(4, subjects=("b.>",))) == 1  # 1's list; 2's is above the a.> floor
    assert journal.ids == {f"{n}@{LIFE}" for n in (2, 3, 4)}
