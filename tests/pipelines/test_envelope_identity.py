"""An envelope is its signer's, never its file name's: envelopes swapped in the exchange are refused as misnamed
and audited, and the release goes on without them; a roster an older version closed over swapped envelopes is
answered by no one until they are put back, and `contribute --unmask` and `aggregate` say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from fusion.config.federation import Config, load_config
from fusion.release.exchange import aggregation_status_path, contribution_path, read_bytes
from fusion.release.plan import ReleasePlan, plan_release
from fusion.store.delta import Store
from pipelines.run import run_aggregate, run_contributions
from pipelines.unmask import Roster, acknowledge, write_roster
from tests.conftest import END, START, config_text, readings, write_feed

pytestmark = pytest.mark.e2e

#: Five institutions: with two of them refused, three remain, enough to acknowledge one roster ((5 + 0) / 2 < 3).
INSTITUTIONS = ("alpha", "beta", "gamma", "delta", "epsilon")
HOURS = timedelta(hours=6)


@dataclass(frozen=True)
class Federation:
    config_path: Path
    rows: dict[str, int]  # readings of each institution in [START, END)

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    def fusion(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "fusion.cli", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=300, env=dict(os.environ),
        )
        assert result.returncode == expect, f"fusion {args}: {result.stdout}\n{result.stderr}"
        return result

    def background(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "fusion.cli", *args, "--config", str(self.config_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """Five institutions with keys, small feeds and noise off (so the released counts are exact)."""
    from fusion.keys.holder import create_federation_keys

    root = tmp_path_factory.mktemp("identity")
    rng = np.random.default_rng(18)
    rows = {}
    for inst in INSTITUTIONS:
        table = readings(inst, entities=2, rng=rng)
        rows[inst] = table.num_rows
        write_feed(table, root / "feeds" / inst / "part-0.parquet", "parquet")
    config_path = root / "federation.toml"
    text = config_text(institutions=[(i, "parquet") for i in INSTITUTIONS], quorum=2, noise=False)
    config_path.write_text(text.replace('window = "1h"', 'window = "1h"\ndeadline = "3650d"'))  # waits, unless --now
    config = load_config(config_path)
    create_federation_keys(config, INSTITUTIONS)
    yield Federation(config_path, rows)


def interval(start: datetime) -> list[str]:
    return ["--start", start.isoformat(), "--end", (start + HOURS).isoformat()]


def contributed(fed: Federation, start: datetime) -> ReleasePlan:
    """Every institution's contribution for [start, start + 6h) in the exchange (sealed as `fusion contribute`
    seals it, in this process: the commands under test are the ones that follow)."""
    plan = plan_release(fed.config, start, start + HOURS)
    run_contributions(plan, fed.config.institutions, in_process=True)
    return plan


def swap(plan: ReleasePlan, first: str, second: str) -> tuple[Path, Path]:
    """Swap two institutions' contribution files, as an operator renaming them by hand would."""
    exchange = plan.config.exchange_path
    a, b = Path(contribution_path(exchange, plan.key, first)), Path(contribution_path(exchange, plan.key, second))
    spare = a.with_suffix(".swap")
    a.rename(spare)
    b.rename(a)
    spare.rename(b)
    return a, b


def test_swapped_envelopes_are_refused_audited_and_the_release_goes_on(federation: Federation) -> None:
    fed = federation
    plan = contributed(fed, START)
    alpha_file, beta_file = swap(plan, "alpha", "beta")

    # Before the deadline the aggregator waits for the two, saying why their envelopes do not count.
    waiting = fed.fusion("aggregate", *interval(START), expect=3).stdout
    assert "waiting for alpha, beta" in waiting
    flat = " ".join(waiting.split())
    assert ("misnamed: signed by beta, filed as contributions/alpha.fenv; it counts only as contributions/beta.fenv "
            "(put it back there, then run `fusion aggregate` again)") in flat
    assert "misnamed: signed by alpha, filed as contributions/beta.fenv" in flat
    status = json.loads(read_bytes(aggregation_status_path(plan.config.exchange_path, plan.key)))
    assert sorted((r["source"], r["claimed"], r["institution"]) for r in status["refused"]) == [
        (str(alpha_file), "alpha", "beta"),
        (str(beta_file), "beta", "alpha"),
    ]

    # Past the deadline (--now) the round goes on with the other three: the swapped two are declared absent.
    closed = " ".join(fed.fusion("aggregate", "--now", *interval(START), expect=3).stdout.split())
    assert "declared absent: alpha, beta" in closed and "unmask round: delta, epsilon, gamma" in closed
    answering = [fed.background("contribute", "--institution", inst, "--unmask", "--wait", "120", *interval(START))
                 for inst in ("gamma", "delta", "epsilon")]
    for process in answering:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0 and "answer to the roster written" in out, f"{out}\n{err}"
    fed.fusion("aggregate", *interval(START))
    assert "released" in fed.fusion("release", *interval(START)).stdout

    store = Store(fed.config.store_path)
    released = store.read("releases")
    assert set(released.column("contributors").to_pylist()) == {3}
    assert sum(released.column("count").to_pylist()) == sum(fed.rows[i] for i in ("gamma", "delta", "epsilon"))
    refused = [a for a in store.read("audit").to_pylist() if a["action"] == "envelope_refused"]
    details = sorted((json.loads(a["detail"])["claimed"], json.loads(a["detail"])["institution"],
                      json.loads(a["detail"])["source"]) for a in refused)
    assert details == [("alpha", "beta", str(alpha_file)), ("beta", "alpha", str(beta_file))]
    assert all(a["reason"].startswith("misnamed: signed by") for a in refused)


def test_a_roster_closed_over_swapped_envelopes_says_how_to_go_on(federation: Federation) -> None:
    """A roster an older version closed over two swapped envelopes (it identified them by signer alone): no
    institution can answer it, and `contribute --unmask` and `aggregate` say which files to put back; once they
    are, the round completes."""
    fed = federation
    start = END + HOURS  # an interval of its own in the shared federation
    plan = contributed(fed, start)
    alpha_file, beta_file = swap(plan, "alpha", "beta")
    write_roster(plan, Roster(tuple(sorted(INSTITUTIONS)), (), plan.key.release_id, datetime.now(UTC).isoformat()))
    for inst in ("gamma", "delta"):  # two signatures on the roster; the third lets epsilon answer
        acknowledge(plan, inst)

    stuck = fed.fusion("contribute", "--institution", "epsilon", "--unmask", *interval(start), expect=1)
    message = " ".join(stuck.stderr.split())
    assert f"the roster includes alpha, but the contribution at {alpha_file} is beta's" in message
    assert f"alpha's own lies at {beta_file}" in message
    assert "put each envelope back as contributions/<its signer>.fenv, then run `fusion contribute --unmask` again" in (
        message
    )
    assert "Traceback" not in stuck.stderr
    refused = fed.fusion("aggregate", *interval(start), expect=1)
    assert ("['alpha', 'beta'] (alpha's lies at contributions/beta.fenv, beta's lies at contributions/alpha.fenv: put "
            "each back as contributions/<its signer>.fenv") in " ".join(refused.stderr.split())

    swap(plan, "alpha", "beta")  # put back
    for inst in ("epsilon", "gamma"):  # any quorum of answers removes the masks
        assert "answer to the roster written" in fed.fusion(
            "contribute", "--institution", inst, "--unmask", *interval(start)
        ).stdout
    assert "aggregated 5 contribution(s)" in fed.fusion("aggregate", "--now", *interval(start)).stdout
    fed.fusion("release", *interval(start))


def test_an_envelope_counts_only_in_its_signers_own_place(federation: Federation) -> None:
    """Renamed alone, copied over another institution's, or copied under a name of no institution: only the copy
    in its signer's own place counts; one envelope never counts twice."""
    fed = federation
    start = END + 3 * HOURS
    plan = contributed(fed, start)
    exchange = plan.config.exchange_path
    directory = Path(contribution_path(exchange, plan.key, "alpha")).parent
    Path(contribution_path(exchange, plan.key, "alpha")).rename(directory / "alpha-old.fenv")  # alpha's only copy
    gamma = Path(contribution_path(exchange, plan.key, "gamma")).read_bytes()
    Path(contribution_path(exchange, plan.key, "delta")).write_bytes(gamma)  # over delta's: delta's is lost
    (directory / "gamma-copy.fenv").write_bytes(gamma)  # a replay under a name of no institution

    status = run_aggregate(plan, may_declare_absent=False, in_process=True)
    assert status["status"] == "waiting" and status["absent"] == ["alpha", "delta"]
    assert status["contributors"] == ["beta", "epsilon", "gamma"]
    assert sorted((r["claimed"], r["institution"], r["reason"].split(":")[0]) for r in status["refused"]) == [
        ("alpha-old", "alpha", "misnamed"),
        ("delta", "gamma", "misnamed"),
        ("gamma-copy", "gamma", "replayed"),
    ]

    # delta runs `fusion contribute` again: its kept envelope replaces what lies in its place, and counts.
    run_contributions(plan, [plan.config.institution("delta")], in_process=True)
    status = run_aggregate(plan, may_declare_absent=False, in_process=True)
    assert status["contributors"] == ["beta", "delta", "epsilon", "gamma"]
