"""Crash points for the crash-safety tests: a named step ends the process when FUSION_CRASH_AT names it.

The release path calls `crash_point(step)` between its durable effects, so tests can kill a real `fusion`
process at each step and check that a re-run releases every interval exactly once and spends exactly once.
Unset (always, outside those tests), a crash point does nothing.
"""

from __future__ import annotations

import os

CRASH_ENV = "FUSION_CRASH_AT"
CRASH_EXIT_CODE = 86

#: Steps in the order a batch release passes them.
STEPS = (
    "before_encrypt",
    "after_seal",  # an institution's envelope kept (sealed record) but not yet published
    "after_encrypt",
    "after_sum",
    "after_charge_record",  # the key holder's own record of the charge written, the store's budget row not yet
    "after_ledger",
    "after_decrypt",
    "after_audit",
    "after_commit",
)

#: Steps of `fusion stream` between its durable effects: readings spooled but progress not yet committed; a
#: window closed (progress committed) but its release not yet started.
STREAM_STEPS = ("stream_after_spool", "stream_after_close", "broker_after_journal")  # the last: before the ack


#: Steps of a training round (`fusion train`, `fusion train --role key_holder`): charged but nothing committed; its
#: signed audit row committed but not its `models` row.
TRAINING_STEPS = ("round_after_charge", "round_after_audit")


def crash_point(step: str) -> None:
    """End the process at once (no cleanup, like a kill) if the environment asks for a crash at `step`."""
    if step not in STEPS + STREAM_STEPS + TRAINING_STEPS:
        raise ValueError(f"unknown crash point '{step}'")
    if os.environ.get(CRASH_ENV) == step:
        os._exit(CRASH_EXIT_CODE)
