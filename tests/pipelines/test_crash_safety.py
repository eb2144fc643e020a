"""Kill a real `fusion batch` at each step of a release, re-run it: released exactly once, spent exactly once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fusion.faults import CRASH_ENV, CRASH_EXIT_CODE, STEPS
from fusion.plan import plan_release
from fusion.provenance import verify_releases
from fusion.registry import load_key_holder_public_keys
from fusion.store import Store
from tests.conftest import END, START

pytestmark = pytest.mark.e2e

INTERVAL = ["--start", START.isoformat(), "--end", END.isoformat()]


def batch(config: str, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-m", "fusion.cli", "batch", "--config", config, *INTERVAL],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_any_step_then_a_rerun_releases_and_spends_exactly_once(make_federation, step: str) -> None:
    fed = make_federation(noise=True, seed=3)
    config = str(fed.config_path)
    crashed = batch(config, crash_at=step)
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stdout + crashed.stderr

    rerun = batch(config)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert ("already released" in rerun.stdout) == (step == "after_commit")

    plan = plan_release(fed.config, START, END)
    store = Store(fed.config.store_path)
    releases = store.read("releases")
    assert set(releases.column("release_id").to_pylist()) == {plan.key.release_id}
    assert releases.num_rows == plan.layout.cells  # every cell exactly once
    budget = store.read("budget").to_pylist()
    assert len(budget) == 1
    assert budget[0]["releases"] == 1 and budget[0]["release_ids"] == [plan.key.release_id]
    assert budget[0]["epsilon_spent"] == pytest.approx(plan.params.epsilon, rel=1e-12)
    actions = store.read("audit").column("action").to_pylist()
    assert actions.count("release") == 1 and actions.count("budget_spend") == 1
    # What was published is exactly what the key holder signed, however the first pass ended.
    checks = verify_releases(store, load_key_holder_public_keys(fed.config))
    assert [(c.release_id, c.status) for c in checks] == [(plan.key.release_id, "verified")]
    rejects = store.read("rejects")
    assert rejects.num_rows == len(plan.layout.tallies) > 0  # one noisy tally per institution and reason, once
