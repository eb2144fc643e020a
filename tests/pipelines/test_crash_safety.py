"""Kill a real `fusion batch` at each step of a release, re-run it: released exactly once, spent exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fusion.keys.registry import load_key_holder_public_keys
from fusion.release.plan import plan_release
from fusion.runtime.faults import CRASH_ENV, CRASH_EXIT_CODE, STEPS
from fusion.store.delta import Store
from fusion.store.verification import verify_releases
from pipelines.run import dead_letter_dir
from tests.conftest import END, START, Federation, build_federation

pytestmark = pytest.mark.e2e

INTERVAL = ["--start", START.isoformat(), "--end", END.isoformat()]


def batch(config: str, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-m", "fusion.cli", "batch", "--config", config, *INTERVAL],
                          capture_output=True, text=True, timeout=300, env=env)


Runs = dict[str, tuple[Federation, subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]]


@pytest.fixture(scope="module")
def crashed_then_rerun(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """For each selected step, its own federation, the batch killed at that step and the re-run after it. The
    federations are independent, so their runs go two at a time (each is its own `fusion batch` process)."""
    selected = [item.nodeid for item in request.session.items if item.nodeid.startswith(f"{request.node.nodeid}::")]
    steps = [step for step in STEPS if any(nodeid.endswith(f"[{step}]") for nodeid in selected)]

    def run(step: str) -> tuple[Federation, subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        fed = build_federation(tmp_path_factory.mktemp(step), noise=True, seed=3)
        crashed = batch(str(fed.config_path), crash_at=step)
        return fed, crashed, batch(str(fed.config_path))

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(steps, pool.map(run, steps), strict=True))


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_any_step_then_a_rerun_releases_and_spends_exactly_once(crashed_then_rerun: Runs,
                                                                           step: str) -> None:
    fed, crashed, rerun = crashed_then_rerun[step]
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stdout + crashed.stderr

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
    for institution in fed.config.institutions:  # each keeps its run report, however its first pass ended
        report = json.loads((Path(dead_letter_dir(plan, institution)) / "report.json").read_text())
        assert report["read"] == report["accepted"] + sum(report["rejected"].values()) > 0
