"""A federation as operators run it: the key holder, the aggregator and three institutions as separate processes,
each with its own directory and only its own key material, exchanging files through a shared exchange."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusion.config.federation import load_config
from fusion.release.exchange import contribution_path
from fusion.release.plan import plan_release
from fusion.store.delta import Store
from pipelines.run import run_contributions
from tests.conftest import END, METRICS, REGIONS, START, readings, write_feed

pytestmark = pytest.mark.e2e

INSTITUTIONS = ("alpha", "beta", "gamma")
INTERVAL = ["--start", START.isoformat(), "--end", END.isoformat()]


def fusion(config: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "fusion.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert result.returncode == expect, f"fusion {args}: {result.stdout}\n{result.stderr}"
    return result


def fusion_background(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fusion.cli", *args, "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def build(root: Path) -> tuple[Path, dict[str, int]]:
    """Separate directories per party; one federation config (absolute paths) that every party reads."""
    rng = np.random.default_rng(9)
    rows = {}
    lines = [
        f"regions = {list(REGIONS)!r}".replace("'", '"'),
        "[federation]",
        'id = "process-federation"',
        'window = "1h"',
        f'exchange = "{root / "shared" / "exchange"}"',
        f'registry = "{root / "shared" / "registry.toml"}"',
        f'keys = "{root / "keyholder" / "keys"}"',
        f'aggregator_keys = "{root / "aggregator" / "keys"}"',
        f'store = "{root / "keyholder" / "store"}"',
        'deadline = "3650d"',
        "[privacy]",
        "epsilon = 1.0",
        "delta = 1e-6",
        "quorum = 2",
        'mode = "test"',
        "noise = false",
    ]
    for name, (unit, lower, upper, res, (low, high)) in METRICS.items():
        lines += [
            "[[metrics]]",
            f'name = "{name}"',
            f'unit = "{unit}"',
            f"lower = {lower}",
            f"upper = {upper}",
            f"resolution = {res}",
            f"plausible = [{low}, {high}]",
        ]
    for inst in INSTITUTIONS:
        home = root / inst
        table = readings(inst, entities=6, rng=rng)
        rows[inst] = table.num_rows
        write_feed(table, home / "feeds" / "readings.parquet", "parquet")
        lines += [
            "[[institutions]]",
            f'id = "{inst}"',
            f'keys = "{home / "keys"}"',
            f'dead_letter = "{home / "deadletter"}"',
            "[[institutions.feeds]]",
            'name = "main"',
            f'path = "{home / "feeds" / "*.parquet"}"',
            'format = "parquet"',
        ]
    config = root / "shared" / "federation.toml"
    config.parent.mkdir(parents=True)
    config.write_text("\n".join(lines) + "\n")
    return config, rows


def test_separate_parties_release_with_and_without_a_missing_institution(tmp_path: Path) -> None:
    config, rows = build(tmp_path)
    made = " ".join(fusion(config, "keys").stdout.split())  # the key holder
    assert "release-signing key (mode 0600, new, registered in" in made
    fusion(config, "keys", "--aggregator")
    for inst in INSTITUTIONS:  # each institution, in its own directory
        made = " ".join(fusion(config, "keys", "--institution", inst).stdout.split())
        assert str(tmp_path / inst / "keys" / "agreement.key") in made
    secret = tmp_path / "keyholder" / "keys" / "he_secret.ctx"
    vault = tmp_path / "vault.ctx"
    assert secret.stat().st_mode & 0o777 == 0o600
    for inst in INSTITUTIONS:
        assert (tmp_path / inst / "keys" / "signing.key").stat().st_mode & 0o777 == 0o600

    # Institutions and the aggregator run while the HE secret key is not on disk at all.
    shutil.move(secret, vault)
    fusion(config, "contribute", "--institution", "alpha", *INTERVAL)
    below_quorum = fusion(config, "aggregate", *INTERVAL, expect=3)  # one of two: not refused, the others may come
    assert "waiting for beta, gamma" in below_quorum.stdout and "refused" not in below_quorum.stdout
    fusion(config, "contribute", "--institution", "beta", *INTERVAL)  # gamma is down today
    waiting = fusion(config, "aggregate", *INTERVAL, expect=3)  # before the deadline: wait for gamma
    assert "waiting for gamma" in waiting.stdout
    declared = fusion(config, "aggregate", "--now", *INTERVAL, expect=3)
    assert "declared absent: gamma" in declared.stdout
    # alpha and beta, at once: each signs the roster and waits for the other's signature, then answers.
    unmasking = [
        fusion_background(config, "contribute", "--institution", inst, "--unmask", "--wait", "120", *INTERVAL)
        for inst in ("alpha", "beta")
    ]
    for process in unmasking:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0 and "answer to the roster written" in out, f"{out}\n{err}"
    fusion(config, "aggregate", *INTERVAL)
    # gamma comes back too late: `fusion contribute` says so and seals nothing; an envelope placed in the
    # exchange anyway (a version before that check) is refused, and the aggregate keeps alpha and beta.
    too_late = fusion(config, "contribute", "--institution", "gamma", *INTERVAL, expect=1)
    assert "without gamma (declared absent" in too_late.stderr
    cfg = load_config(config)
    plan = plan_release(cfg, START, END)
    assert not Path(contribution_path(cfg.exchange_path, plan.key, "gamma")).exists()
    run_contributions(plan, [cfg.institution("gamma")], in_process=True)
    late = fusion(config, "aggregate", *INTERVAL)
    assert "declared_absent" in late.stdout

    # Only the key holder's release needs the secret key.
    shutil.move(vault, secret)
    fusion(config, "release", *INTERVAL)
    released = Store(cfg.store_path).read("releases")
    assert set(released.column("contributors").to_pylist()) == {2}
    assert sum(released.column("count").to_pylist()) == rows["alpha"] + rows["beta"]  # masks all cancelled
    audit = Store(cfg.store_path).read("audit").to_pylist()
    assert [a["reason"] for a in audit if a["action"] == "envelope_refused"] == ["declared_absent"]
    # Each institution's local report stayed in its own directory.
    assert list((tmp_path / "alpha" / "deadletter").rglob("report.json"))
    assert not list((tmp_path / "keyholder").rglob("report.json"))


def test_adversarial_envelopes_against_separate_parties(tmp_path: Path) -> None:
    """Forged, tampered, replayed and unregistered envelopes dropped into the shared exchange, with every party
    a separate process: each is refused with its reason in `audit`, and the release holds exactly the honest."""
    from dataclasses import replace

    from fusion.release.exchange import contribution_path, contributions_dir, join, read_bytes, write_bytes
    from fusion.release.plan import plan_release
    from privacy.envelope import pack_envelope, unpack_envelope
    from privacy.signing import generate_signing_key

    config, rows = build(tmp_path)
    fusion(config, "keys")
    fusion(config, "keys", "--aggregator")
    for inst in INSTITUTIONS:
        fusion(config, "keys", "--institution", inst)
    for inst in INSTITUTIONS:
        fusion(config, "contribute", "--institution", inst, *INTERVAL)
    cfg = load_config(config)
    plan = plan_release(cfg, START, END)
    exchange = cfg.exchange_path
    directory = contributions_dir(exchange, plan.key)
    alpha = read_bytes(contribution_path(exchange, plan.key, "alpha"))
    write_bytes(join(directory, "alpha-replay.fenv"), alpha)  # replayed
    tampered = bytearray(alpha)
    tampered[-5] ^= 0x01
    write_bytes(join(directory, "alpha-tampered.fenv"), bytes(tampered))  # tampered payload
    header, ciphertexts = unpack_envelope(read_bytes(contribution_path(exchange, plan.key, "beta")))
    write_bytes(contribution_path(exchange, plan.key, "beta"), pack_envelope(header, ciphertexts))  # unsigned now
    mallory = replace(header, contributors=("mallory",))
    write_bytes(
        join(directory, "mallory.fenv"), pack_envelope(mallory, ciphertexts, signing_key=generate_signing_key()[0])
    )  # unregistered

    declared = fusion(config, "aggregate", "--now", *INTERVAL, expect=3)
    assert "declared absent: beta" in declared.stdout
    for reason in ("replayed", "tampered", "unsigned", "unregistered_institution"):
        assert reason in declared.stdout
    fusion(config, "contribute", "--institution", "alpha", "--unmask", *INTERVAL, expect=3)  # signed, waiting
    for inst in ("gamma", "alpha"):
        fusion(config, "contribute", "--institution", inst, "--unmask", *INTERVAL)
    fusion(config, "aggregate", *INTERVAL)
    fusion(config, "release", *INTERVAL)
    store = Store(cfg.store_path)
    released = store.read("releases")
    assert sum(released.column("count").to_pylist()) == rows["alpha"] + rows["gamma"]
    refused = {a["reason"] for a in store.read("audit").to_pylist() if a["action"] == "envelope_refused"}
    assert {"replayed", "tampered", "unregistered_institution"} <= refused
    assert refused & {"unsigned", "declared_absent"}
