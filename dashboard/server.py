"""Serving the dashboard: where it may listen, the token, and the uvicorn server (in the foreground for `fusion
serve`, or in a thread for tests and benchmarks).

A dashboard listens on loopback unless told otherwise. Any other address needs `allow_remote` and a token of at
least MIN_TOKEN characters; the usual way to serve it further is a reverse proxy on the same machine that
terminates TLS and forwards to the loopback address (docs/dashboard.md)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fusion.config.federation import Config
from fusion.errors import FusionError

DEFAULT_PORT = 8050
#: The shortest token accepted: about 96 bits of a random base64 text.
MIN_TOKEN = 16
TOKEN_ENV = "FUSION_SERVE_TOKEN"

if TYPE_CHECKING:  # the web stack loads only when the dashboard is served
    import uvicorn

    from dashboard.snapshot import HeldStores


def is_loopback(host: str) -> bool:
    """'127.0.0.1', '::1', 'localhost' and the rest of 127.0.0.0/8."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeOptions:
    """Where and how `fusion serve` listens. `token`: required of every request but /health; `allowed_hosts`:
    Host header names answered besides loopback's (behind a proxy that passes its own); `root_path`: the path
    prefix a reverse proxy serves the dashboard under."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow_remote: bool = False
    token: str | None = field(default=None, repr=False)
    allowed_hosts: tuple[str, ...] = ()
    root_path: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise FusionError(f"--port {self.port} is not a port (0 to 65535; 0: any free port)")
        if not is_loopback(self.host):
            if not self.allow_remote:
                raise FusionError(
                    f"--host {self.host} is not a loopback address: the dashboard serves only this machine unless "
                    "you pass --allow-remote and a token (--token-file, or the FUSION_SERVE_TOKEN variable); behind "
                    "a reverse proxy, keep the loopback address and let the proxy serve further"
                )
            if self.token is None:
                raise FusionError(f"--allow-remote needs a token: give --token-file PATH (mode 600) or set "
                                  f"{TOKEN_ENV}; every request must then carry it")
        if self.token is not None and (len(self.token) < MIN_TOKEN or not self.token.isprintable()
                                       or self.token != self.token.strip()):
            raise FusionError(f"the token must be at least {MIN_TOKEN} printable characters without surrounding "
                              "spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise FusionError(f"--root-path {self.root_path!r} must start with '/' and not end with one, e.g. /fusion")

    @property
    def hosts(self) -> tuple[str, ...]:
        """The Host header values answered: loopback's and the allowed ones; with a token, any ('*') unless
        some are named (the token, not the Host, then keeps other sites' pages out)."""
        from dashboard.guard import LOOPBACK_HOSTS

        if self.token is not None and not self.allowed_hosts:
            return ("*",)
        named = () if self.host in ("0.0.0.0", "::") else (self.host,)
        return (*LOOPBACK_HOSTS, *named, *self.allowed_hosts)


def read_token(token_file: str | None) -> str | None:
    """The token from `token_file` (owner-only, one line) or else the FUSION_SERVE_TOKEN variable; None if
    neither is given."""
    if token_file:
        from fusion.api import read_private

        return read_private(Path(token_file), "--token-file").decode().strip()
    return os.environ.get(TOKEN_ENV) or None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line refusal."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise FusionError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another program may hold the "
                          "port: choose another with --port)") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """The address the socket serves (a reverse proxy adds its own root path in front)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _server(config: Config, options: ServeOptions, *, warm: bool, seen: int = 0
            ) -> tuple[uvicorn.Server, HeldStores]:
    """The uvicorn server of a new app, and the stores the app's threads will hold (closed when it stops)."""
    import uvicorn

    from dashboard.app import create_app

    app = create_app(config, token=options.token, allowed_hosts=options.hosts, warm=warm, seen=seen)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, root_path=options.root_path, server_header=False,
        proxy_headers=False, lifespan="off",
    ))
    return server, app.state.cache.stores


def serve(config: Config, options: ServeOptions, sock: socket.socket, *, seen: int = 0) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM), on an already bound socket; `seen`: the highest release
    sequence number seen before (`create_app`)."""
    server, stores = _server(config, options, warm=True, seen=seen)
    if threading.current_thread() is threading.main_thread():
        # uvicorn stops on SIGINT, then raises it again under the handler it found: Python's own, so that the
        # command ends as an interrupted one (exit 130), even where SIGINT was inherited ignored (a background job).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.run(sockets=[sock])
    finally:
        stores.release_all()  # a connection left open in a worker thread at exit can abort the process


@contextmanager
def running(config: Config, options: ServeOptions | None = None, *, timeout: float = 30.0) -> Iterator[str]:
    """A dashboard served from a thread of this process on a free loopback port (tests, benchmarks); yields its
    base URL and stops it on leaving."""
    options = options or ServeOptions(port=0)
    sock = bind(options.host, options.port)
    server, stores = _server(config, options, warm=False)  # each first request computes what it needs
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="fusion-dashboard")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise FusionError("the dashboard did not start")
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
        stores.release_all()
