"""Commands that run no pipeline start without Apache Beam or torch (TenSEAL only where HE keys or parameters
need it): each runs in a fresh interpreter, which then lists the heavy modules it imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fusion.config.federation import load_config
from fusion.keys.registry import create_key_holder_key
from fusion.store.delta import Store
from tests.conftest import config_text
from tests.fusion.store.test_store import release_rows

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("apache_beam", "torch", "tenseal", "statsmodels", "matplotlib", "fastapi", "uvicorn", "altair", "playwright")
#: Runs `fusion` in this interpreter, then prints its exit status and the heavy modules it imported.
SCRIPT = """
import sys
from fusion.cli.core import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("imported:", ",".join(m for m in HEAVY if m in sys.modules), "exit:", code, file=sys.stderr)
""".replace("HEAVY", repr(HEAVY))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config and a store holding one release, published before the key holder's signing key (verifies)."""
    root = tmp_path_factory.mktemp("startup")
    path = root / "federation.toml"
    path.write_text(config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2))
    config = load_config(path)
    store = Store(config.store_path)
    store.insert_new("releases", release_rows("r1", range(3)))
    create_key_holder_key(config, published=store.release_ids())
    return path


def imported_by(*argv: str) -> tuple[set[str], str]:
    """The heavy modules `fusion argv...` imported, and its exit status."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    # The script's own line, not the last: at exit nanobind may list DuckDB objects still alive ("leaked ...").
    lines = [line for line in done.stderr.splitlines() if line.startswith("imported:")]
    assert len(lines) == 1, done.stderr
    last = lines[0]
    modules, code = last.removeprefix("imported: ").split(" exit: ")
    return set(filter(None, modules.split(","))), code


@pytest.mark.parametrize(
    ("argv", "allowed"),
    [
        pytest.param(["--help"], set(), id="help"),
        pytest.param(["forecast", "--help"], set(), id="forecast-help"),
        pytest.param(["backtest", "--help"], set(), id="backtest-help"),
        pytest.param(["serve", "--help"], set(), id="serve-help"),
        pytest.param(["sql", "--help"], set(), id="sql-help"),
        pytest.param(["sql", "--config", "{config}", "SELECT 1"], set(), id="sql-select-1"),
        pytest.param(["sql", "--config", "{config}", "SELECT count(*) AS n FROM releases", "--format", "json"], set(),
                     id="sql-releases"),
        pytest.param(["budget", "--config", "{config}"], set(), id="budget"),
        pytest.param(["verify", "--config", "{config}"], set(), id="verify"),
        pytest.param(["plan", "--config", "{config}"], {"tenseal"}, id="plan"),  # HE parameters' constants
        pytest.param(["keys", "--config", "{config}", "--institution", "alpha"], set(), id="keys-institution"),
        pytest.param(["keys", "--config", "{config}", "--aggregator"], set(), id="keys-aggregator"),
        pytest.param(["keys", "--config", "{config}"], {"tenseal"}, id="keys-he"),  # creates the HE keys
    ],
)
def test_commands_that_run_no_pipeline_import_no_beam_or_torch(federation: Path, argv: list[str],
                                                               allowed: set[str]) -> None:
    modules, code = imported_by(*(a.format(config=federation) for a in argv))
    assert code == "0", f"fusion {' '.join(argv)} exited {code}"
    assert modules <= allowed, f"fusion {' '.join(argv)} imported {sorted(modules - allowed)}"


def test_a_pipeline_command_still_imports_beam(federation: Path) -> None:
    """The check above sees imports at all: `batch --help` parses, and Beam options are checked by Beam."""
    modules, code = imported_by("batch", "--config", str(federation), "--start", "x", "--end", "y", "--runner=Nope")
    assert "apache_beam" in modules and code in ("1", "2")
