"""Norm-bound Skellam mechanisms (training rounds) in a period's composition: RDP where one is in a group."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from privacy.accountant import (
    Composition,
    NormBoundMechanism,
    ReleaseCharge,
    epsilon_from_rdp,
    mechanism_rdp,
    period_loss,
    skellam_epsilon,
    skellam_rdp,
)
from privacy.pld import SkellamMechanism

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RELEASE = SkellamMechanism(3.16e7, 4, 600)
ROUND = NormBoundMechanism(5e9, 2.1e5, 4300.0)
DELTA = 1e-6


def charge(mechanism: SkellamMechanism | NormBoundMechanism, hours: tuple[int, int]) -> ReleaseCharge:
    return ReleaseCharge(mechanism, T0 + timedelta(hours=hours[0]), T0 + timedelta(hours=hours[1]),
                         Composition.PARALLEL)


def test_a_round_is_its_rdp_bound() -> None:
    np.testing.assert_array_equal(mechanism_rdp(ROUND), skellam_rdp(variance=5e9, l1=2.1e5, l2=4300.0))


def test_disjoint_intervals_take_the_worst_group_each_accounted_as_it_can_be() -> None:
    loss = period_loss([charge(RELEASE, (0, 1)), charge(ROUND, (1, 2)), charge(ROUND, (1, 2))],
                       composition=Composition.PARALLEL, delta=DELTA)
    pld = skellam_epsilon([RELEASE], delta=DELTA)  # the release alone: PLD
    rdp = epsilon_from_rdp(2 * mechanism_rdp(ROUND), delta=DELTA)  # the two rounds: RDP
    assert loss.epsilon == pytest.approx(max(pld, rdp))


def test_overlapping_release_and_round_compose_by_rdp() -> None:
    loss = period_loss([charge(RELEASE, (0, 2)), charge(ROUND, (1, 2))], composition=Composition.PARALLEL,
                       delta=DELTA)
    assert loss.epsilon == pytest.approx(epsilon_from_rdp(mechanism_rdp(RELEASE) + mechanism_rdp(ROUND),
                                                          delta=DELTA))
    assert loss.epsilon <= loss.epsilon_rdp
