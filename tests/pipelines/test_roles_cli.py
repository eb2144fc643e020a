"""The role commands, run one after another as separate processes, give the same releases as `fusion batch`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import write_deltalake

from fusion.store.delta import Store
from tests.conftest import END, START

pytestmark = pytest.mark.e2e

FUSION = [sys.executable, "-m", "fusion.cli"]
INTERVAL = ["--start", START.isoformat(), "--end", END.isoformat()]


def fusion(*args: str, cwd: Path | None = None, expect: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*FUSION, *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == expect, f"fusion {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def comparable(table: pa.Table) -> list[dict[str, object]]:
    rows = table.drop_columns(["released_at"]).sort_by([("metric", "ascending"), ("region", "ascending"),
                                                        ("window_start", "ascending")])
    return rows.to_pylist()


def test_role_commands_match_batch(make_federation):
    # Two federations with the same feeds and the same test seed: their noise is identical, their keys are not.
    by_batch = make_federation(noise=True, seed=5, subdir="batch")
    by_roles = make_federation(noise=True, seed=5, subdir="roles")

    out = fusion("batch", "--config", str(by_batch.config_path), *INTERVAL).stdout
    assert "cells released: 36" in out and "epsilon spent" in out

    for institution in ("alpha", "beta", "gamma"):
        fusion("contribute", "--config", str(by_roles.config_path), "--institution", institution, *INTERVAL)
    roster = fusion("aggregate", "--config", str(by_roles.config_path), *INTERVAL, expect=3).stdout
    assert "roster closed; unmask round: alpha, beta, gamma" in roster
    early = fusion("release", "--config", str(by_roles.config_path), *INTERVAL, expect=3).stdout  # not yet
    assert "no aggregate yet" in early
    assert Store(by_roles.config.store_path).read("audit").num_rows == 0  # a poll, not a decision: nothing audited
    unmask = ("contribute", "--config", str(by_roles.config_path), "--unmask", *INTERVAL)
    first = fusion(*unmask, "--institution", "alpha", expect=3).stdout  # the first signature on the roster
    assert "roster acknowledged; 1 of the 2 acknowledgements needed (alpha)" in first
    # Beta's signature makes 2 of 3, enough to answer, but an answer removes its excess noise only once more
    # than (n + c + 1) / 2 have signed: before the deadline beta waits for gamma's, then each answers.
    waiting = fusion(*unmask, "--institution", "beta", expect=3).stdout
    assert "waiting for 3" in waiting and "excess noise" in waiting
    for institution in ("gamma", "beta", "alpha"):
        assert "answer to the roster written" in fusion(*unmask, "--institution", institution).stdout
    fusion("aggregate", "--config", str(by_roles.config_path), *INTERVAL)
    fusion("release", "--config", str(by_roles.config_path), *INTERVAL)

    batch_rows = comparable(Store(by_batch.config.store_path).read("releases"))
    role_rows = comparable(Store(by_roles.config.store_path).read("releases"))
    assert len(batch_rows) == 36
    assert batch_rows == role_rows

    # Re-running the release is a no-op.
    assert "already released" in fusion("release", "--config", str(by_roles.config_path), *INTERVAL).stdout


def test_verify_command_exit_codes(make_federation):
    """`fusion verify`: 0 when every release verifies; 1 for a release whose audit record was removed, and for
    an unknown one."""
    fed = make_federation(noise=False)
    config = str(fed.config_path)
    fusion("batch", "--config", config, *INTERVAL)
    out = fusion("verify", "--config", config, "--format", "json").stdout
    checks = [json.loads(line) for line in out.splitlines()]
    assert [(c["status"], c["rows"], c["sequence"]) for c in checks] == [("verified", 36, 1)]
    assert "(sequence 2)" in fusion("verify", "--config", config, "--seen", "2", expect=1).stdout
    assert "missing" in fusion("verify", "--config", config, "--release", "r-unknown", expect=1).stdout
    rotated = fusion("keys", "--config", config, "--release-signing", "--overwrite").stdout
    assert "stays registered as retired" in " ".join(rotated.split())
    assert "verified" in fusion("verify", "--config", config).stdout  # signed with the retired key: still good
    store = Store(fed.config.store_path)
    audit = store.read("audit")
    write_deltalake(store.table_path("audit"), audit.filter(pc.not_equal(audit.column("action"), "release")),
                    mode="overwrite")
    assert "tampered" in fusion("verify", "--config", config, expect=1).stdout


def test_sql_command_formats_and_refusals(make_federation):
    fed = make_federation(noise=False)
    fusion("batch", "--config", str(fed.config_path), *INTERVAL)
    query = "SELECT metric, region, count FROM releases ORDER BY metric, region, window_start LIMIT 3"
    as_json = [json.loads(line) for line in fusion("sql", "--config", str(fed.config_path), query, "--format",
                                                   "json").stdout.splitlines()]
    assert len(as_json) == 3 and set(as_json[0]) == {"metric", "region", "count"}
    as_csv = fusion("sql", "--config", str(fed.config_path), query, "--format", "csv").stdout.splitlines()
    assert as_csv[0].replace('"', "") == "metric,region,count" and len(as_csv) == 4
    table = fusion("sql", "--config", str(fed.config_path), query).stdout
    assert "3 row(s)" in table

    refused = subprocess.run([*FUSION, "sql", "--config", str(fed.config_path),
                              "SELECT * FROM read_csv('/etc/passwd')"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert "sandboxed" in refused.stderr


def test_bad_config_fails_at_load_naming_the_field(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('regions = ["a"]\n[federation]\nid = "x"\n[privacy]\nepsilon = -1\ndelta = 1e-6\nquorum = 1\n'
                      '[[metrics]]\nname = "m"\nunit = "u"\nlower = 0\nupper = 1\nresolution = 0.1\n'
                      'plausible = [0, 1]\n[[institutions]]\nid = "i"\n[[institutions.feeds]]\nname = "f"\n'
                      'path = "x.csv"\nformat = "xml"\n')
    result = subprocess.run([*FUSION, "batch", "--config", str(config), *INTERVAL], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "privacy.epsilon" in result.stderr and "institutions[0].feeds[0].format" in result.stderr


def test_demo_runs_end_to_end(tmp_path):
    out = fusion("demo", "--dir", str(tmp_path / "demo"), "--days", "1").stdout
    assert "cells released: 480" in out  # 24 hourly windows x 4 regions x 5 metrics
    assert "releases, 2026-01-01" in out and "20 row(s)" in out
    assert "releases verified against the key holder's registered signature: 1 of 1" in out
    assert (tmp_path / "demo" / "README.txt").read_text().startswith("Fusion demo federation")
    # The first "Try:" line runs as printed, from any directory, and its table is narrow enough to read.
    from fusion.cli.demo import DEMO_TRY_QUERY

    config = str((tmp_path / "demo" / "federation.toml").resolve())
    assert f'sql --config {config} "{DEMO_TRY_QUERY}"' in " ".join(out.split())
    # It ends with the dashboard's command (fusion serve).
    assert f"fusion serve --config {config}" in out and out.rstrip().endswith("then open http://127.0.0.1:8050")
    rows = [json.loads(line) for line in fusion("sql", "--config", config, DEMO_TRY_QUERY, "--format", "json",
                                                cwd=tmp_path).stdout.splitlines()]
    assert len(rows) == 5 and len(rows[0]) == 7
