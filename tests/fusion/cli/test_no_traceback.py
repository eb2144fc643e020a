"""Every command, fed inputs a user can get wrong, answers with one clear line and a non-zero status: never a
traceback. Run in-process through `main` (what the console entry point calls); an exception that escapes it is
what the entry point would print as a traceback."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from fusion.cli.core import main
from fusion.demo.federation import build_demo

COMMANDS_WITH_CONFIG = [
    ["keys"],
    ["keys", "--institution", "gridco"],
    ["batch", "--start", "2026-01-01T00:00", "--end", "2026-01-02T00:00"],
    ["stream", "--drain", "--until", "2026-01-01T02:00"],
    ["contribute", "--institution", "gridco", "--start", "2026-01-01T00:00", "--end", "2026-01-02T00:00"],
    ["aggregate", "--start", "2026-01-01T00:00", "--end", "2026-01-02T00:00"],
    ["release", "--start", "2026-01-01T00:00", "--end", "2026-01-02T00:00"],
    ["verify"],
    ["budget"],
    ["plan"],
    ["sql", "SELECT 1"],
    ["schedule", "--once"],
    ["backfill", "--from", "2026-01-01T00:00", "--to", "2026-01-02T00:00"],
]

BAD_CONFIGS = {
    "missing": None,
    "directory": "<dir>",
    "not_utf8": b"regions = [\"a\"]\n\xff\xfe\x00garbage\n",
    "not_toml": b"[federation\nid = ",
    "empty": b"",
    "wrong_types": b'regions = "north"\n[federation]\nid = 3\nwindow = "soon"\n',
    "unknown_field": b'regions = ["north"]\nbogus = 1\n[federation]\nid = "f"\n',
    "binary": bytes(range(256)) * 4,
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo federation with keys and feeds, nothing released."""
    return build_demo(tmp_path_factory.mktemp("demo") / "demo", days=1)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors: one line, status 2
        code = exc.code if isinstance(exc.code, int) else 2
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _one_clear_line(code: int, output: str, argv: list[str]) -> None:
    assert code != 0, (argv, output)
    assert "Traceback" not in output, (argv, output)
    assert output.strip(), (argv, output)


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("command", COMMANDS_WITH_CONFIG, ids=lambda c: "-".join(c[:2]))
def test_a_bad_config_file_fails_in_one_line_for_every_command(
    kind: str, command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "federation.toml"
    content = BAD_CONFIGS[kind]
    if content == "<dir>":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    argv = [command[0], "--config", str(path), *command[1:]]
    code, output = _run(argv, capsys)
    _one_clear_line(code, output, argv)
    assert str(path.name) in output, (argv, output)


BAD_ARGUMENTS = [
    ["batch", "--start", "yesterday", "--end", "2026-01-02T00:00"],
    ["batch", "--start", "2026-01-02T00:00", "--end", "2026-01-01T00:00"],
    ["batch", "--start", "2026-01-01T00:17", "--end", "2026-01-01T01:17"],
    ["batch", "--start", "2026-01-01T00:00", "--end", "2026-01-01T00:00"],
    ["contribute", "--institution", "nobody", "--start", "2026-01-01T00:00", "--end", "2026-01-02T00:00"],
    ["contribute", "--institution", "gridco", "--start", "2026-01-01", "--end", "2026-01-02", "--wait", "-1"],
    ["aggregate", "--start", "2026-13-01T00:00", "--end", "2026-01-02T00:00"],
    ["release", "--start", "2026-01-01T00:00", "--end", "2026-01-01T00:30"],
    ["keys", "--institution", "../../etc"],
    ["verify", "--release", "r-does-not-exist"],
    ["verify", "--seen", "-5"],
    ["plan", "--contributors", "0"],
    ["plan", "--contributors", "1000"],
    ["sql", "SELEC 1"],
    ["sql", "DROP TABLE releases"],
    ["sql", "SELECT * FROM no_such_table"],
    ["sql", "SELECT * FROM read_csv('/etc/passwd')"],
    ["sql", ""],
    ["sql", "SELECT 1; SELECT 2"],
    ["stream", "--until", "not a time"],
    ["stream", "--stdin", "nobody", "--drain"],
    ["schedule", "--once", "--schedule", "nope"],
    ["backfill", "--from", "2026-01-02T00:00", "--to", "2026-01-01T00:00"],
    ["backfill", "--from", "whenever", "--to", "2026-01-01T00:00"],
]


@pytest.mark.parametrize("command", BAD_ARGUMENTS, ids=lambda c: " ".join(c)[:60])
def test_bad_arguments_on_a_good_config_fail_in_one_line(
    command: list[str], demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command[0], "--config", str(demo), *command[1:]]
    code, output = _run(argv, capsys)
    _one_clear_line(code, output, argv)


STORE_COMMANDS = [
    ["batch", "--start", "2026-01-01T00:00", "--end", "2026-01-02T00:00"],
    ["schedule", "--once"],
    ["backfill", "--from", "2026-01-01T00:00", "--to", "2026-01-02T00:00"],
    ["stream", "--drain", "--until", "2026-01-01T02:00"],
]


@pytest.mark.parametrize("where", ["the store", "the store's parent", "a table's directory"])
@pytest.mark.parametrize("command", STORE_COMMANDS, ids=lambda c: c[0])
def test_a_store_that_cannot_be_written_fails_in_one_line_naming_it(
    where: str, command: list[str], demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file where the store, or one of its tables, needs a directory (it refuses a write as root too, unlike a
    read-only directory): Delta's error, its writer's panic and a traceback became one line naming the store and
    the cause, before anything is sealed, claimed or released."""
    import shutil

    directory = tmp_path / "demo"
    shutil.copytree(demo.parent, directory)
    config = directory / "federation.toml"
    store = {"the store": directory / "a-file", "the store's parent": directory / "a-file" / "store",
             "a table's directory": directory / "store"}[where]
    (directory / "a-file").write_text("")
    if where == "a table's directory":
        store.mkdir()
        (store / "budget").write_text("")
    schedule = '[[schedules]]\nname = "daily"\ncron = "5 0 * * *"\ninterval = "1d"\nstart = 2026-01-01T00:00:00Z\n'
    config.write_text(config.read_text().replace('store = "store"', f'store = "{store}"') + schedule)
    argv = [command[0], "--config", str(config), *command[1:]]
    code, output = _run(argv, capsys)
    _one_clear_line(code, output, argv)
    said = " ".join(output.split())
    assert f"error: the store {store} cannot be used now: Not a directory (os error 20)." in said, said
    exchange = {path.name for path in (directory / "exchange").iterdir()}
    assert exchange == {path.name for path in (demo.parent / "exchange").iterdir()}  # nothing sealed


@pytest.mark.parametrize("command", [["verify"], ["forecast"], ["sql", "SELECT count(*) FROM releases"]],
                         ids=lambda c: c[0])
def test_a_damaged_data_file_of_the_store_fails_in_one_line_naming_the_table_and_file(
    command: list[str], demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data file of `releases` cut short outside Delta: `fusion verify` (which reads every release) and
    `fusion forecast` (which reads only the releases verify calls good) said nothing but Arrow's traceback
    ("Parquet magic bytes not found"); now one line naming the table and the file, and status 1."""
    import shutil

    from fusion.store.delta import Store
    from tests.fusion.store.test_store import release_rows

    directory = tmp_path / "demo"
    shutil.copytree(demo.parent, directory)
    Store(directory / "store").insert_new("releases", release_rows("r-damaged", range(3), metric="ghi"))
    (damaged,) = (directory / "store" / "releases").glob("*.parquet")
    damaged.write_bytes(damaged.read_bytes()[:100])
    argv = [command[0], "--config", str(directory / "federation.toml"), *command[1:]]
    code, output = _run(argv, capsys)
    _one_clear_line(code, output, argv)
    said = " ".join(output.split())
    assert code == 1 and "error: the store's table releases cannot be read: a data file is damaged, missing or " \
        "was rewritten outside Delta" in said, said
    assert damaged.name in said or command[0] == "sql", said  # SQL names no file (fusion/store/sql.py)
    assert str(directory) not in said, said


class _Refused:
    """A table's dataset whose data files the system refuses to read (`code`: an errno other than ENOENT)."""

    def __init__(self, dataset: Any, code: int) -> None:
        self._dataset, self._code = dataset, code

    def to_table(self) -> Any:
        file = self._dataset.files[0] if self._dataset.files else "part-0.parquet"
        raise OSError(self._code, f"Failed to open local file '{file}'. Detail: [errno {self._code}] "
                      f"{os.strerror(self._code)}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dataset, name)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO], ids=errno.errorcode.get)
@pytest.mark.parametrize("command", [["verify"], ["forecast"]], ids=lambda c: c[0])
def test_a_data_file_the_system_refuses_to_read_fails_in_one_line_naming_the_store(
    command: list[str], code: int, demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A data file of `releases` that cannot be read for a reason other than its absence (permission denied, an I/O
    error; simulated, since root reads a file whatever its mode): Arrow's OSError was a traceback; now one line
    naming the store and the cause, with what to check, and status 1."""
    import shutil

    from fusion.store.delta import Store
    from tests.fusion.store.test_store import release_rows

    directory = tmp_path / "demo"
    shutil.copytree(demo.parent, directory)
    Store(directory / "store").insert_new("releases", release_rows("r-refused", range(3), metric="ghi"))
    dataset = Store.dataset

    def refused(self: Store, name: str, **kwargs: Any) -> Any:
        found = dataset(self, name, **kwargs)
        return _Refused(found, code) if name == "releases" else found

    monkeypatch.setattr(Store, "dataset", refused)
    argv = [command[0], "--config", str(directory / "federation.toml"), *command[1:]]
    code_, output = _run(argv, capsys)
    _one_clear_line(code_, output, argv)
    said = " ".join(output.split())
    assert code_ == 1, said
    assert (f"error: the store {directory / 'store'} cannot be read now: table releases: {os.strerror(code)} "
            f"(os error {code}); check that this user may read its files") in said, said


def test_demo_into_a_file_or_a_foreign_directory_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("keep me")
    for target in ("a-file", "foreign"):
        argv = ["demo", "--dir", str(tmp_path / target)]
        code, output = _run(argv, capsys)
        _one_clear_line(code, output, argv)
    assert (tmp_path / "foreign" / "thesis.tex").read_text() == "keep me"


def test_third_party_warnings_never_reach_the_terminal(demo: Path) -> None:
    """A library's warnings (such as Opacus's "optimal order" notice) go to the log, not to the user."""
    import subprocess
    import sys

    script = (
        "import sys, warnings\nimport fusion.cli.core as cli\nimport fusion.cli.inspection as inspection\n"
        "loaded = inspection.load_config\n"
        "def noisy(path):\n"
        "    warnings.warn('Optimal order is the largest alpha. Please consider expanding the range', UserWarning)\n"
        "    print('config loaded', file=sys.stderr)\n"
        "    return loaded(path)\n"
        "inspection.load_config = noisy\n"
        "sys.exit(cli.main(['plan', '--config', sys.argv[1]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(demo)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "config loaded" in done.stderr  # the warning was raised
    assert "Optimal order" not in done.stderr + done.stdout


@pytest.mark.e2e  # runs `fusion batch`: a whole Beam pipeline
def test_an_error_inside_a_beam_step_is_one_line_without_beams_log_or_context(demo: Path) -> None:
    """Beam logs an error raised in a pipeline step with its traceback, and appends "[while running ...]" when it
    re-raises it: the user sees Fusion's one line only (here a feed file that cannot be read now)."""
    import subprocess
    import sys

    script = (
        "import sys\nimport fusion.feeds.scan as scan\n"
        "def denied(self, *args, **kwargs):\n"
        "    raise PermissionError(13, 'Permission denied')\n"
        "    yield\n"
        "scan.FeedScanner._scanned = denied\n"
        "from fusion.cli.core import main\n"
        "interval = ['--start', '2026-01-01T00:00', '--end', '2026-01-02T00:00']\n"
        "sys.exit(main(['batch', '--config', sys.argv[1], *interval]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(demo)], capture_output=True, text=True, timeout=300)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, output
    assert "error: feed file" in output and "cannot be read now (PermissionError" in output
    assert "Traceback" not in output and "while running" not in output
