"""Reject counts as noisy tallies of the release (fusion/release/rejects.py)."""

from __future__ import annotations

import math
import tomllib
from datetime import UTC, datetime

import numpy as np
import pytest

from fusion.config.federation import parse_config
from fusion.release.plan import plan_release
from fusion.release.rejects import decode_reject_tallies, pack_reject_tallies, reject_tallies
from privacy.skellam import SkellamNoise, seeded_generator
from schemas.reasons import PUBLISHED_REASONS, RejectReason
from tests.conftest import END, START, config_text

TWO = [("alpha", "csv"), ("beta", "parquet")]


def plan_for(**changes: str):
    text = config_text(institutions=TWO, quorum=2, noise=True)
    for old, new in changes.items():
        text = text.replace(old, new)
    return plan_release(parse_config(tomllib.loads(text)), START, END)


def test_every_institution_has_one_tally_per_published_reason_at_event_level_only():
    plan = plan_for()
    assert plan.layout.tallies == tuple(f"rejects/{i}/{r.value}" for i, _ in TWO for r in PUBLISHED_REASONS)
    assert plan.layout.slots == plan.layout.cells * len(plan.layout.components) + len(plan.layout.tallies)
    entity = plan_for(**{"[privacy]": '[privacy]\nunit = "entity"\nmax_partitions = 2\nmax_readings_per_partition = 2'})
    assert entity.layout.tallies == () and reject_tallies(entity.config) == ()


def test_a_rejected_row_moves_the_vector_no_further_than_an_accepted_one():
    """Neighbouring datasets: a reading is either accepted (its cell's slots move, by up to w each) or rejected
    for one reason (one tally moves by w): the release's sensitivity covers both."""
    plan = plan_for()
    w = plan.params.tally_weight
    vector = np.zeros(plan.layout.slots, dtype=np.int64)
    moved = pack_reject_tallies(
        vector.copy(), layout=plan.layout, institution="beta", rejected={"duplicate": 1}, weight=w
    )
    assert np.count_nonzero(moved) == 1 and np.abs(moved).max() == w
    k = len(plan.layout.components)
    assert math.sqrt(k) * w == pytest.approx(plan.params.sensitivity.l2)  # an accepted reading's worst move
    assert w <= plan.params.sensitivity.l1 / k  # so the per-slot shift the accountant assumes bounds a tally too
    # Only published reasons, only the institution's own tallies.
    counts = {"duplicate": 3, "out_of_range": 2, RejectReason.MALFORMED_RECORD.value: 7, "out_of_interval": 4}
    packed = pack_reject_tallies(vector.copy(), layout=plan.layout, institution="alpha", rejected=counts, weight=w)
    by_name = dict(zip(plan.layout.tallies, plan.layout.tally_slots(packed) // w, strict=True))
    assert by_name["rejects/alpha/duplicate"] == 3 and by_name["rejects/alpha/out_of_range"] == 2
    assert sum(by_name.values()) == 5 and not any(v for n, v in by_name.items() if n.startswith("rejects/beta/"))


def test_decoded_tallies_carry_their_noise_sd_and_cover_the_truth():
    plan = plan_for()
    w = plan.params.tally_weight
    truth = {"alpha": {"duplicate": 40, "unknown_region": 3}, "beta": {"out_of_range": 12}}
    variance = plan.params.layers.total(2)
    rows = []
    for trial in range(300):
        vector = np.zeros(plan.layout.slots, dtype=np.int64)
        for institution, counts in truth.items():
            pack_reject_tallies(vector, layout=plan.layout, institution=institution, rejected=counts, weight=w)
        vector += SkellamNoise(variance, generator=seeded_generator(trial)).sample(plan.layout.slots)
        table = decode_reject_tallies(
            vector, layout=plan.layout, weight=w, noise_variance=variance, release_id="r", recorded_at=datetime.now(UTC)
        )
        rows += table.to_pylist()
    sd = math.sqrt(variance) / w
    assert all(r["count_sd"] == pytest.approx(sd) for r in rows)
    z = np.array([(r["count"] - truth.get(r["institution"], {}).get(r["reason"], 0)) / r["count_sd"] for r in rows])
    assert abs(z.mean()) < 5 / math.sqrt(z.size) and abs(z.std() - 1) < 0.05  # 3,000 z-scores
    covered = np.mean([r["count_ci_low"] <= truth.get(r["institution"], {}).get(r["reason"], 0) <= r["count_ci_high"]
                       for r in rows])
    assert 0.93 < covered < 0.97
    assert rows[0]["interval_start"] == START and rows[0]["interval_end"] == END
