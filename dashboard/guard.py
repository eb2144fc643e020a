"""What every request passes before a page, and what every response carries: the Host check (a page of another
site whose name was pointed at 127.0.0.1, DNS rebinding, is not answered), the token when one is set (an
`Authorization: Bearer` header, or the cookie a `?token=` visit sets), and the security headers, the
Content-Security-Policy first: nothing from another origin, no inline script or style."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import RedirectResponse, Response

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
#: The hosts a loopback dashboard answers to (the Host header, without port).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "fusion_dashboard"
#: Paths answered without the token: a load balancer's health check.
OPEN_PATHS = frozenset({"/health"})
NEEDS_TOKEN = ("this dashboard needs its token: send 'Authorization: Bearer <token>', or open any page once as "
               "...?token=<token> (the token given to `fusion serve`)")

#: (request, status, message) -> the response saying so, as a page or as JSON.
Refusal = Callable[[Request, int, str], Response]


class Guard:
    """The app's HTTP middleware. `hosts`: the Host values answered ('*': any); `token`: None for none."""

    def __init__(self, hosts: tuple[str, ...], token: str | None, refuse: Refusal) -> None:
        self._hosts = frozenset(h.strip("[]").lower() for h in hosts)
        self._token = token
        # The cookie holds a MAC of the token, not the token: a cookie read off a disk is no token.
        self._cookie = None if token is None else hmac.new(token.encode(), b"fusion-dashboard-cookie",
                                                           hashlib.sha256).hexdigest()
        self._refuse = refuse

    async def __call__(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # Kept as found: routing rewrites the scope's root path (the /static mount's).
        path = request.scope["dashboard.path"] = app_path(request)
        request.scope["dashboard.root"] = str(request.scope.get("root_path", ""))
        host = host_of(request.headers.get("host", ""))
        if host not in self._hosts and "*" not in self._hosts:
            return secured(Response(f"this dashboard does not answer to host {host!r}\n", status_code=421,
                                    media_type="text/plain"))
        if self._token is not None and path not in OPEN_PATHS:
            refused = self._check_token(request)
            if refused is not None:
                return secured(refused)
        response = await call_next(request)
        response.headers["Cache-Control"] = "public, max-age=3600" if path.startswith("/static/") else "no-store"
        return secured(response)

    def _check_token(self, request: Request) -> Response | None:
        """None when the request carries the token; else the answer (a redirect setting the cookie, or 401)."""
        assert self._token is not None and self._cookie is not None
        offered = request.query_params.get("token")
        if offered is not None and _same(offered, self._token):
            kept = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            # Back to this dashboard's own path: "//host/x" would name another site (a protocol-relative URL).
            local = "/" + request.url.path.lstrip("/")
            answer = RedirectResponse(local + (f"?{urlencode(kept)}" if kept else ""), status_code=303)
            answer.set_cookie(TOKEN_COOKIE, self._cookie, httponly=True, samesite="strict",
                              secure=request.url.scheme == "https", path=app_root(request) or "/")
            return answer
        bearer = request.headers.get("authorization", "")
        if bearer.startswith("Bearer ") and _same(bearer.removeprefix("Bearer ").strip(), self._token):
            return None
        if _same(request.cookies.get(TOKEN_COOKIE, ""), self._cookie):
            return None
        return self._refuse(request, 401, NEEDS_TOKEN)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def host_of(header: str) -> str:
    """The host of a Host header, without port: 'example.org:8050' -> 'example.org', '[::1]:8050' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def app_path(request: Request) -> str:
    """The path within the app, without the root path a reverse proxy serves it under (which the ASGI scope's
    path includes), as the guard found it."""
    if "dashboard.path" in request.scope:
        return str(request.scope["dashboard.path"])
    path, root = str(request.scope["path"]), str(request.scope.get("root_path", ""))
    return path[len(root):] if root and path.startswith(root) else path


def app_root(request: Request) -> str:
    """The root path a reverse proxy serves the app under ('' for none), as the guard found it."""
    return str(request.scope.get("dashboard.root", request.scope.get("root_path", "")))


def wants_json(request: Request) -> bool:
    path = app_path(request)
    return path.startswith("/api/") or path in ("/health", "/openapi.json")


def secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response
