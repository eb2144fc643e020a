"""Rejected-row counts in the shared store: noisy tallies of the release itself, never exact counts.

An institution's exact counts stay in its own dead-letter area. What the federation sees is, per institution and
published reason (schemas.reasons.PUBLISHED_REASONS), one slot of the release's vector that the institution fills
with its count times the layout's tally weight w. One reading is either accepted (it moves its cell's slots, by up
to w each) or rejected for one reason (it moves one tally by w), never both, and each published reason places the
reading in this release's interval: the release's sensitivity is unchanged, the tallies are charged with the
release, and they carry the same Skellam noise as every other slot (sd = sqrt(variance) / w rows).
At entity level an entity's rejected rows are not bounded, so nothing is published there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime

import numpy as np
import pyarrow as pa

from fusion.config.federation import Config, PrivacyUnit
from fusion.release.quantiles import Z95
from privacy.layout import PartitionLayout
from schemas.reasons import PUBLISHED_REASONS
from schemas.tables import REJECTS_SCHEMA

_PREFIX = "rejects"


def reject_tallies(config: Config) -> tuple[str, ...]:
    """The layout's tallies: 'rejects/<institution>/<reason>' for every institution and published reason, at
    event level only."""
    if config.privacy.unit is not PrivacyUnit.READING:
        return ()
    return tuple(f"{_PREFIX}/{i.id}/{reason.value}" for i in config.institutions for reason in PUBLISHED_REASONS)


def pack_reject_tallies(
    vector: np.ndarray, *, layout: PartitionLayout, institution: str, rejected: Mapping[str, int], weight: int
) -> np.ndarray:
    """`vector` (int64, layout.slots) with this institution's published reject counts added to its own tallies,
    each times `weight`; counts of other reasons are not published. Returns the same array."""
    slots = layout.tally_slots(vector)
    for k, name in enumerate(layout.tallies):
        _, owner, reason = name.split("/", 2)
        if owner == institution:
            slots[k] += int(rejected.get(reason, 0)) * weight
    return vector


def decode_reject_tallies(
    totals: np.ndarray,
    *,
    layout: PartitionLayout,
    weight: int,
    noise_variance: float,
    release_id: str,
    recorded_at: datetime,
) -> pa.Table:
    """One `rejects` row per tally of a decrypted total: the noisy count of rows, its sd and 95% interval."""
    counts = layout.tally_slots(totals).astype(float) / weight
    sd = math.sqrt(noise_variance) / weight
    rows = []
    for name, count in zip(layout.tallies, counts, strict=True):
        _, institution, reason = name.split("/", 2)
        rows.append(
            {
                "release_id": release_id,
                "institution": institution,
                "interval_start": layout.start,
                "interval_end": layout.end,
                "reason": reason,
                "count": float(count),
                "count_sd": sd,
                "count_ci_low": float(count) - Z95 * sd,
                "count_ci_high": float(count) + Z95 * sd,
                "recorded_at": recorded_at,
            }
        )
    return pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)
