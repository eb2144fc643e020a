"""A `fusion train` run's hold on its model and its claim on its period's budget (training/run_lock.py), on real
lock files: one run of a model at a time, claims counted while their run holds its model, and a crashed run's
claim not counted."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fusion.errors import FusionError
from fusion.release.plan import Period
from privacy.accountant import Composition, NormBoundMechanism, ReleaseCharge
from training.run_lock import RunLock, claimed_charges

START = datetime(2026, 1, 1, tzinfo=UTC)
PERIOD = Period("2026-01-01", START, START + timedelta(days=1))
OTHER = Period("2026-01-02", START + timedelta(days=1), START + timedelta(days=2))
CHARGE = ReleaseCharge(NormBoundMechanism(400.0, 3.0, 2.0), START, START + timedelta(hours=6), Composition.PARALLEL)


def test_a_second_run_of_a_model_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    refused = pytest.raises(FusionError, match=rf"model a is being trained by another process \({os.getpid()}\)")
    with RunLock(tmp_path, "store-1", "a"):
        with refused, RunLock(tmp_path, "store-1", "a"):
            pass
        with RunLock(tmp_path, "store-1", "b"), RunLock(tmp_path, "store-2", "a"):  # other models, other stores
            pass
    with RunLock(tmp_path, "store-1", "a"):  # the first run ended: its lock with it
        pass


def test_the_runs_in_progress_count_each_others_claims_on_their_period(tmp_path: Path) -> None:
    with RunLock(tmp_path, "store-1", "a") as a, RunLock(tmp_path, "store-1", "b") as b:
        with a.claiming(PERIOD, CHARGE) as claimed:
            assert claimed == []
            a.claim(PERIOD, CHARGE, 3)
        with b.claiming(PERIOD, CHARGE) as claimed:
            assert claimed == [CHARGE] * 3  # a's three rounds to come, composed as b's period composes
            b.claim(PERIOD, CHARGE, 2)
        with a.claiming(PERIOD, CHARGE) as claimed:
            assert claimed == [CHARGE] * 2  # b's; a's own claim is not counted against it
        with a.claiming(OTHER, CHARGE) as claimed:
            assert claimed == []  # claims on another period
        assert claimed_charges(tmp_path, "store-2", PERIOD, CHARGE) == []  # nor another store's
    assert claimed_charges(tmp_path, "store-1", PERIOD, CHARGE) == []  # both runs ended: their claims with them


def test_a_crashed_runs_claim_is_not_counted(tmp_path: Path) -> None:
    crashed = RunLock(tmp_path, "store-1", "a").__enter__()
    with crashed.claiming(PERIOD, CHARGE):
        crashed.claim(PERIOD, CHARGE, 4)
    assert claimed_charges(tmp_path, "store-1", PERIOD, CHARGE) == [CHARGE] * 4  # while its process holds a
    assert crashed._descriptor is not None
    os.close(crashed._descriptor)  # the process dies: the kernel lets go of its lock, its claim file stays
    assert crashed.claim_path.exists()
    assert claimed_charges(tmp_path, "store-1", PERIOD, CHARGE) == []
    assert not crashed.claim_path.exists()
    with RunLock(tmp_path, "store-1", "a"):  # and the model can be trained again
        pass
