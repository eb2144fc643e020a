"""`fusion serve`: the read-only web dashboard over a federation's store (dashboard/). The web stack (FastAPI,
uvicorn, Altair) is imported only when the command runs, so other commands start without it."""

from __future__ import annotations

import argparse

from rich.markup import escape

from fusion.cli.options import non_negative
from fusion.cli.output import console
from fusion.config.federation import load_config


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve", help="a read-only web dashboard over the store: releases, budget, provenance, forecasts, decisions"
    )
    serve.add_argument("--config", required=True, help="federation config (TOML)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; any other needs "
                            "--allow-remote and a token)")
    serve.add_argument("--port", type=int, default=8050, help="port (default 8050; 0: any free port)")
    serve.add_argument("--allow-remote", action="store_true",
                       help="listen on a non-loopback address; every request must then carry the token")
    serve.add_argument("--token-file",
                       help="file (mode 600) holding the token requests must carry (default: the FUSION_SERVE_TOKEN "
                            "variable; none on loopback)")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a Host header name to answer besides loopback's (repeat for more): the name a reverse "
                            "proxy passes on")
    serve.add_argument("--root-path", default="",
                       help="the path prefix a reverse proxy serves the dashboard under, e.g. /fusion")
    serve.add_argument("--seen", type=non_negative(int), default=0, metavar="SEQUENCE",
                       help="the highest release sequence number seen before (as for `fusion verify --seen`): "
                            "releases up to it must still be there; the dashboard raises it as it shows newer ones")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM; refuses a non-loopback address without --allow-remote and a token."""
    from dashboard.server import ServeOptions, bind, read_token, serve, url_of

    options = ServeOptions(
        host=args.host, port=args.port, allow_remote=args.allow_remote, token=read_token(args.token_file),
        allowed_hosts=tuple(args.allowed_host), root_path=args.root_path,
    )
    config = load_config(args.config, check_release=False)  # reads the store only
    sock = bind(options.host, options.port)
    url = url_of(sock)
    access = "any host that reaches it, with the token" if options.allow_remote else "this machine only"
    token_note = "; requests carry the token (header 'Authorization: Bearer ...', or open a page once with ?token=...)"
    console.print(
        f"Fusion dashboard for {escape(config.federation.id)} (read-only): {url}/releases\n"
        f"  serving {access}{token_note if options.token else ''}; JSON API: {url}/api, OpenAPI: {url}/openapi.json\n"
        + (f"  its links carry --root-path {options.root_path}: open it through the reverse proxy\n"
           if options.root_path else "")
        + "  Ctrl-C stops it",
        soft_wrap=True, highlight=False,
    )
    serve(config, options, sock, seen=args.seen)
    return 0
