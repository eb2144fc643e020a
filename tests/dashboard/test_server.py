"""`fusion serve`: loopback by default; anything else needs --allow-remote and a token; refusals are one line;
the command serves the store and prints where."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dashboard.server import ServeOptions, bind, is_loopback, read_token
from fusion.cli.core import main
from fusion.errors import FusionError

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "a-token-of-enough-length"


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False), ("::", False),
                                                ("192.168.1.5", False), ("example.org", False)])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("options", "message"), [
    ({"host": "0.0.0.0"}, "--host 0.0.0.0 is not a loopback address"),
    ({"host": "0.0.0.0", "token": TOKEN}, "--host 0.0.0.0 is not a loopback address"),
    ({"host": "0.0.0.0", "allow_remote": True}, "--allow-remote needs a token"),
    ({"host": "0.0.0.0", "allow_remote": True, "token": "short"}, "the token must be at least 16"),
    ({"token": " " + TOKEN}, "the token must be at least 16 printable characters without surrounding spaces"),
    ({"port": 70000}, "--port 70000 is not a port"),
    ({"root_path": "fusion/"}, "--root-path 'fusion/' must start with '/'"),
])
def test_serving_beyond_loopback_needs_the_flag_and_a_token(options: dict[str, object], message: str) -> None:
    with pytest.raises(FusionError, match=message.replace("(", r"\(")):
        ServeOptions(**options)  # type: ignore[arg-type]
    remote = ServeOptions(host="0.0.0.0", allow_remote=True, token=TOKEN)
    assert remote.hosts == ("*",)  # the token keeps other sites out
    assert ServeOptions().hosts == ("127.0.0.1", "localhost", "::1", "127.0.0.1")
    assert "proxy.example" in ServeOptions(allowed_hosts=("proxy.example",)).hosts


def test_the_cli_refuses_in_one_line(federation: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(federation), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0 is not a loopback address") and "Traceback" not in err


def test_a_token_file_must_be_owner_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o644)
    with pytest.raises(FusionError, match="accessible to group or others"):
        read_token(str(path))
    path.chmod(0o600)
    assert read_token(str(path)) == TOKEN
    monkeypatch.setenv("FUSION_SERVE_TOKEN", "from-the-environment")
    assert read_token(None) == "from-the-environment"


def test_a_port_in_use_is_refused_in_one_line() -> None:
    held = bind("127.0.0.1", 0)
    try:
        port = held.getsockname()[1]
        with pytest.raises(FusionError, match=f"cannot listen on 127.0.0.1:{port}: .*choose another with --port"):
            bind("127.0.0.1", port)
    finally:
        held.close()


def test_fusion_serve_serves_the_store_until_interrupted(federation: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", "from fusion.cli.core import run; run()", "serve", "--config",
                                str(federation), "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("Fusion dashboard for test-federation (read-only): http://127.0.0.1:"), first
        url = first.split(": ", 1)[1].strip().removesuffix("/releases")
        with urllib.request.urlopen(url + "/health", timeout=30) as answer:
            assert answer.status == 200
        process.send_signal(signal.SIGINT)  # Ctrl-C: in-flight requests finish, then exit 130 like any command
        code = process.wait(timeout=30)
        assert code == 130, (code, process.stderr.read() if process.stderr else "")
    finally:
        process.kill()


@pytest.mark.parametrize("kind", ["missing", "not_toml", "wrong_types"])
def test_a_bad_config_fails_in_one_line(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.fusion.cli.test_no_traceback import BAD_CONFIGS

    path = tmp_path / "federation.toml"
    content = BAD_CONFIGS[kind]
    if isinstance(content, bytes):
        path.write_bytes(content)
    assert main(["serve", "--config", str(path), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "federation.toml" in err and "Traceback" not in err


#: A process that serves a few pages from a thread, then exits as scripts do (interpreter finalization).
SERVED_THEN_EXIT = """
import sys, urllib.request
from dashboard.server import running
from fusion.config.federation import load_config
with running(load_config(sys.argv[1], check_release=False)) as url:
    for page in ("/releases", "/budget", "/provenance"):
        urllib.request.urlopen(url + page).read()
"""


def test_a_process_that_served_pages_exits_cleanly(federation: Path) -> None:
    """The stores the server's worker threads hold are closed when it stops: one left open aborted about every
    other such process at exit ("terminate called ...", status 134)."""
    def serve_then_exit(_: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", SERVED_THEN_EXIT, str(federation)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(2) as pool:  # the two processes side by side
        for done in pool.map(serve_then_exit, range(2)):
            assert done.returncode == 0, done.stderr[-2000:]
