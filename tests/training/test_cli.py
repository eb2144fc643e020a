"""`fusion train`: a [[models]] model trained across a real federation's keys, charged to its store's ledger."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion.cli.core import main
from fusion.config.federation import load_config
from fusion.runtime.faults import CRASH_ENV, CRASH_EXIT_CODE
from fusion.store.delta import Store
from pipelines.release import charge_record
from tests.conftest import Federation
from training.charging import round_charge, terms_for
from training.run_lock import run_lock

MODEL = """
[[models]]
name = "tiny"
rows = "training/{institution}.parquet"
held_out = "training/held_out.parquet"
features = ["x0", "x1", "x2"]
target = "label"
classes = 2
start = "2026-01-01T00:00"
end = "2026-01-01T06:00"
hidden = [4]
rounds = 2
epsilon = 1.0

[[models]]
name = "greedy"
rows = "training/{institution}.parquet"
features = ["x0", "x1", "x2"]
target = "label"
classes = 2
start = "2026-01-01T00:00"
end = "2026-01-01T06:00"
rounds = 3
epsilon = 1.6  # its first round alone fits the period's cap of 1, the whole run does not
"""


def _rows(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, size=30)
    features = rng.normal(size=(30, 3)) + label[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x0": features[:, 0], "x1": features[:, 1], "x2": features[:, 2], "label": label}), path)


def test_train_plans_then_trains_and_resumes(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = make_federation(noise=True, entities=2, extra=MODEL)
    for k, inst in enumerate(("alpha", "beta", "gamma")):
        _rows(fed.directory / "training" / f"{inst}.parquet", k)
    _rows(fed.directory / "training" / "held_out.parquet", 9)
    argv = ["train", "--config", str(fed.config_path), "--model", "tiny"]
    assert main([*argv, "--plan"]) == 0
    out = capsys.readouterr().out
    assert "2 rounds (2 left)" in out and "epsilon 0.0000 ->" in out
    config = load_config(fed.config_path)
    assert Store(config.store_path).read("models").num_rows == 0  # --plan trains nothing
    # `fusion plan` predicts every model's spend too, on the same ledger, before any runs.
    assert main(["plan", "--config", str(fed.config_path), "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert "model tiny: 26 parameters, 2 rounds (2 left)" in out
    assert "model greedy:" in out and "would pass the cap" in out
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "round 1/2: 3 contributors" in out and "round 2/2" in out and "held-out accuracy" in out
    models = Store(config.store_path).read("models").sort_by("round").to_pylist()
    assert [m["round"] for m in models] == [1, 2] and models[-1]["epsilon"] <= 1.0
    budget = Store(config.store_path).read("budget").to_pylist()
    assert budget[0]["release_ids"] == [m["release_id"] for m in models]
    held = charge_record(config, Store(config.store_path)).read(budget[0]["period"])  # the key holder's own record
    assert held is not None and held["release_ids"] == budget[0]["release_ids"]
    # Each round went through the exchange's role path and left an audit row, as a release does.
    audit = [a for a in Store(config.store_path).read("audit").to_pylist() if a["action"] == "training_round"]
    assert sorted(a["release_id"] for a in audit) == sorted(m["release_id"] for m in models)
    assert all(a["actor_role"] == "key_holder" and a["content_sha256"] for a in audit)
    assert (config.base / "exchange" / "training" / "tiny").is_dir()
    assert main(argv) == 0  # everything committed: nothing runs again
    assert "(0 left)" in capsys.readouterr().out
    # The run's inputs and output name it as its hyperparameters do: under its features reordered or fewer, or
    # more classes, it is refused, never stepped on with gradients of other inputs.
    text = fed.config_path.read_text()
    features = 'features = ["x0", "x1", "x2"]'
    changes = [
        (features, 'features = ["x2", "x1", "x0"]'),
        (features, 'features = ["x0", "x1"]'),
        ("classes = 2", "classes = 3"),
    ]
    for old, new in changes:
        fed.config_path.write_text(text.replace(old, new, 1))
        assert main(argv) == 1
        assert "was trained under other settings" in " ".join(capsys.readouterr().err.split())
    fed.config_path.write_text(text)


def test_a_run_sized_to_its_cap_resumes_a_round_lost_after_its_charge(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = make_federation(noise=True, entities=2, extra=MODEL)  # tiny: epsilon 1 for the run, the period's cap
    for k, inst in enumerate(("alpha", "beta", "gamma")):
        _rows(fed.directory / "training" / f"{inst}.parquet", k)
    _rows(fed.directory / "training" / "held_out.parquet", 9)
    argv = ["train", "--config", str(fed.config_path), "--model", "tiny"]
    config = load_config(fed.config_path)
    store = Store(config.store_path)
    # The process ends as round 1 is charged (a kill, a power cut), between the key holder's record of the charge
    # and the store's `budget` row: the round is charged, the store's row behind, nothing committed.
    crashed = subprocess.run(
        [sys.executable, "-m", "fusion.cli", *argv],
        capture_output=True, text=True, timeout=300, env={**os.environ, CRASH_ENV: "after_charge_record"},
    )  # fmt: skip
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
    assert store.read("budget").num_rows == 0
    held = charge_record(config, store).read("2026-01-01")
    assert held is not None
    (lost,) = held["release_ids"]
    # Its aggregate is still in the exchange: the run resumes it, one more charge to come, not two (the charges
    # are read as the ledger charges against them, the key holder's record included).
    assert main([*argv, "--plan"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # however the console wraps it
    assert "2 rounds (2 left), run epsilon 0.9997 at" in out and "epsilon 0.6904 -> 0.9997 of cap 1" in out
    assert main(argv) == 0  # before: "would take period 2026-01-01 to epsilon 1.2428, above its cap 1"
    out = " ".join(capsys.readouterr().out.split())
    assert "round 1/2: 3 contributors, epsilon 0.6904" in out and "round 2/2: 3 contributors, epsilon 0.9997" in out
    models = store.read("models").sort_by("round").to_pylist()
    budget = store.read("budget").to_pylist()[0]
    assert models[0]["release_id"] == lost  # the attempt charged is the attempt committed
    assert budget["release_ids"] == [m["release_id"] for m in models]  # and it was charged once
    assert models[-1]["epsilon"] == pytest.approx(budget["epsilon_spent"]) and budget["epsilon_spent"] <= 1.0
    assert main(["verify", "--config", str(fed.config_path)]) == 0
    assert "superseded" not in capsys.readouterr().out


def test_train_refuses_an_unknown_model_and_missing_rows(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = make_federation(noise=True, entities=2, extra=MODEL)
    assert main(["train", "--config", str(fed.config_path), "--model", "other"]) == 1
    assert "no [[models]] entry named 'other'" in capsys.readouterr().err
    assert main(["train", "--config", str(fed.config_path), "--model", "tiny"]) == 1
    assert "alpha.parquet does not" in " ".join(capsys.readouterr().err.split())  # however the console wraps it


def test_train_names_a_bad_rows_table_and_leaves_out_an_institution_without_rows(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = make_federation(noise=True, entities=2, extra=MODEL)
    rows = fed.directory / "training"
    for k, inst in enumerate(("alpha", "beta", "gamma", "held_out")):
        _rows(rows / f"{inst}.parquet", k)
    argv = ["train", "--config", str(fed.config_path), "--model", "tiny", "--plan"]

    def refused(table: pa.Table, says: str) -> None:
        pq.write_table(table, rows / "beta.parquet")
        assert main(argv) == 1
        assert says in " ".join(capsys.readouterr().err.split())

    good = pq.read_table(rows / "beta.parquet")
    huge = good.set_column(0, "x0", pa.array([1e39, *good.column("x0").to_pylist()[1:]]))  # infinite as float32
    refused(huge, "beyond float32's range")
    refused(good.set_column(1, "x1", pa.array(["x"] * good.num_rows)), "column 'x1' is string, not numbers")
    refused(good.set_column(3, "label", pa.array(["a"] * good.num_rows)), "column 'label' is string")
    # A damaged table, or a directory where the table should be: named, not a traceback.
    (rows / "beta.parquet").write_bytes(b"PAR1 cut short in a copy")
    assert main(argv) == 1
    error = " ".join(capsys.readouterr().err.split())
    assert "institution beta:" in error and "beta.parquet is not a readable Parquet table" in error
    (rows / "beta.parquet").unlink()
    (rows / "beta.parquet").mkdir()
    assert main(argv) == 1
    assert "beta.parquet is not a file" in " ".join(capsys.readouterr().err.split())
    (rows / "beta.parquet").rmdir()
    # No rows at all: that institution takes no part; the other two still make the quorum of 2.
    pq.write_table(good.slice(0, 0), rows / "beta.parquet")
    assert main(argv) == 0
    capsys.readouterr()
    pq.write_table(good.slice(0, 0), rows / "gamma.parquet")
    assert main(argv) == 1
    assert "1 institution(s) hold rows (beta, gamma hold none)" in " ".join(capsys.readouterr().err.split())


def test_train_refuses_a_run_over_the_period_cap_before_its_first_round(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = make_federation(noise=True, entities=2, extra=MODEL)
    for k, inst in enumerate(("alpha", "beta", "gamma")):
        _rows(fed.directory / "training" / f"{inst}.parquet", k)
    assert main(["train", "--config", str(fed.config_path), "--model", "greedy"]) == 1
    assert "above its cap 1" in capsys.readouterr().err.replace("\n", " ")
    config = load_config(fed.config_path)
    assert Store(config.store_path).read("models").num_rows == 0
    assert Store(config.store_path).read("budget").num_rows == 0


PAIR = "".join(
    MODEL.split("[[models]]")[1].replace('name = "tiny"', f'name = "{name}"').replace("epsilon = 1.0", "epsilon = 0.8")
    for name in ("a", "b")
).replace("\nname", "[[models]]\nname")  # two models over the same readings: each fits the period's cap, not both


def test_a_second_run_of_a_model_in_progress_is_refused(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs of one model at once would seal, close and commit the same rounds over each other: while one holds
    the model (as `fusion train` does for its whole run), a second `fusion train` of it, and the key holder's step
    of it, are refused before anything is drawn or charged; `--plan` still reads. The run is taken up once the first
    lets go."""
    fed = make_federation(noise=True, entities=2, extra=MODEL)
    for k, inst in enumerate(("alpha", "beta", "gamma")):
        _rows(fed.directory / "training" / f"{inst}.parquet", k)
    _rows(fed.directory / "training" / "held_out.parquet", 9)
    config = load_config(fed.config_path)
    store = Store(config.store_path)
    argv = ["train", "--config", str(fed.config_path), "--model", "tiny"]
    with run_lock(charge_record(config, store), "tiny"):
        assert main(argv) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"model tiny is being trained by another process ({os.getpid()}) on this store" in err, err
        assert main([*argv, "--role", "key-holder"]) == 1
        assert "model tiny is being trained by another process" in " ".join(capsys.readouterr().err.split())
        assert main([*argv, "--plan"]) == 0
        assert store.read("budget").num_rows == 0 and store.read("models").num_rows == 0
        assert not (fed.directory / "institution-keys" / "alpha" / "training").exists()  # nothing drawn
    assert main(argv) == 0
    assert "round 2/2: 3 contributors" in capsys.readouterr().out


def test_a_run_counts_the_rounds_another_run_in_progress_claims_on_its_period(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    """Models a and b (epsilon 0.8 each, over the same readings) each fit the period's cap of 1 alone, not together.
    While a run of a is in progress, holding its model and claiming its remaining rounds' charges as `fusion train`
    does, a run of b is refused before its first round, rather than both passing the check at their start and one
    stopping midway with its rounds' budget spent on a model it cannot finish. Once a's run has ended (its claim
    with it), b trains."""
    fed = make_federation(noise=True, entities=2, extra=PAIR)
    for k, inst in enumerate(("alpha", "beta", "gamma")):
        _rows(fed.directory / "training" / f"{inst}.parquet", k)
    _rows(fed.directory / "training" / "held_out.parquet", 9)
    config = load_config(fed.config_path)
    store = Store(config.store_path)
    a = next(m for m in config.models if m.name == "a")
    charge, period = round_charge(config, a), terms_for(config, a).period
    argv = ["train", "--config", str(fed.config_path), "--model", "b"]
    with run_lock(charge_record(config, store), "a") as run:
        with run.claiming(period, charge):
            run.claim(period, charge, 2)
        assert main(argv) == 1  # before: both runs passed their start, and a was refused its second round
        out, err = (" ".join(text.split()) for text in capsys.readouterr())
        assert "counting 2 round charge(s) other runs in progress claim" in out, out
        assert "above its cap 1, counting the 2 round charge(s) other runs in progress claim on it" in err, err
        assert store.read("budget").num_rows == 0 and store.read("models").num_rows == 0
        assert not (fed.directory / "institution-keys" / "alpha" / "training").exists()  # nothing drawn
    assert main(argv) == 0
    assert "round 2/2: 3 contributors, epsilon 0.7997" in capsys.readouterr().out


FEED_MODEL = """
[[models]]
name = "air-temp-next-hour"
features = ["air_temp"]
target = "air_temp"
horizon = "1h"
target_bins = [1.0, 6.0]
start = "2026-01-01T00:00"
end = "2026-01-01T06:00"
hidden = []
rounds = 2
learning_rate = 4.0
momentum = 0.9
"""


def test_train_learns_from_the_demo_federations_feeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fusion.demo.federation import build_demo

    config_path = build_demo(tmp_path / "demo", days=1)
    config_path.write_text(config_path.read_text() + FEED_MODEL)
    assert main(["train", "--config", str(config_path), "--model", "air-temp-next-hour"]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    # The utility measures no air temperature: it takes no part, and every round completes without it.
    assert "rows from the feeds: gridco 0, metservice 96, cityworks 240, portlogix 180" in out
    assert "round 1/2: 3 contributors" in out and "round 2/2: 3 contributors" in out
    models = Store(load_config(config_path).store_path).read("models").sort_by("round").to_pylist()
    assert [m["contributors"] for m in models] == [["cityworks", "metservice", "portlogix"]] * 2
    assert len(models[-1]["parameters"]) == (1 + 4 + 2) * 3 + 3
