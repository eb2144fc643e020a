"""How much a JetStream fetch asks for: bounded in bytes, so a backlog of large messages never passes the server's
per-connection max_pending (64 MiB), which closes the connection as a slow consumer and holds the fetched messages
until `ack_wait` redelivers them."""

from __future__ import annotations

from pipelines.broker_sources import FETCH_BYTES, FIRST_FETCH, fetch_size


def test_the_first_fetch_is_small_until_message_sizes_are_known() -> None:
    assert fetch_size(2000, 0, 0) == FIRST_FETCH
    assert fetch_size(4, 0, 0) == 4


def test_a_fetch_of_large_messages_stays_near_its_byte_budget() -> None:
    wanted = fetch_size(2000, 50_000 * 16, 16)  # 50 KB messages (500 JSON lines each)
    assert wanted * 50_000 <= FETCH_BYTES < (wanted + 1) * 50_000
    assert wanted * 50_000 * 3 < 64 << 20  # three institutions' fetches in flight stay under max_pending


def test_small_messages_are_fetched_up_to_the_configured_batch() -> None:
    assert fetch_size(2000, 200 * 100, 100) == 2000
    assert fetch_size(2000, 100 * (FETCH_BYTES + 1), 100) == 1  # a message larger than the budget: one at a time
