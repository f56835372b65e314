"""Who may reach what: the API key gate, the short list of public paths, and the Host check of no-key mode.

Every check is made on the path the router matches (the request path with `root_path` removed, as Starlette
routes it), so it holds whatever prefix the app is served under (uvicorn's `--root-path`, a reverse proxy,
Ray Serve's `route_prefix`). Anything not on the public list needs a key: a new route is private unless it is
listed here.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

PUBLIC_PATHS = frozenset({"", "/", "/healthz", "/readyz", "/docs", "/openapi.json"})
PUBLIC_PREFIXES = ("/web/",)
LOOPBACK_NAMES = frozenset({"localhost"})


def route_path(scope: dict[str, Any]) -> str:
    """The path the router matches: `scope["path"]` less a leading `root_path` (the ASGI spec puts the prefix
    in both), the way Starlette's routing computes it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


def is_public(path: str) -> bool:
    """Whether a router path is answered without a key: the web page and its files, health, and API docs."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def request_id(scope: dict[str, Any]) -> str:
    """This request's id (set by `ApiKeyGate`): the key under which its internal errors are logged."""
    return scope.setdefault("state", {}).setdefault("request_id", secrets.token_hex(6))


class ApiKeyGate:
    """ASGI middleware: a valid API key on every path but the public ones (else 401 in the error shape), an
    `X-Request-Id` on every answer, and the generation and jobs routes' answers counted by status.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware hides a client's
    disconnect from the routes, and a generation whose client has left must be cancelled."""

    def __init__(self, app: Any, authorized: Callable[[Request], bool], refused: Callable[[], Any],
                 count: Callable[[str, int], None]) -> None:
        self.app = app
        self.authorized = authorized
        self.refused = refused
        self.count = count

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        rid = request_id(scope).encode()
        status: list[int] = []

        async def noting_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        if is_public(path) or self.authorized(Request(scope)):
            await self.app(scope, receive, noting_status)
        else:
            await self.refused()(scope, receive, noting_status)
        if status:
            self.count(path, status[0])


def host_name(header: str) -> str:
    """The host of a Host header, without its port and IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface: `localhost` or a loopback address."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostCheck:
    """ASGI middleware for no-key mode, which serves loopback only: a request whose Host header is not a
    loopback name or the bound address is refused (400), so a web page whose DNS name was re-pointed at
    127.0.0.1 (DNS rebinding) cannot drive the API from a visitor's browser."""

    def __init__(self, app: Any, bound_host: str, refused: Callable[[str], Any]) -> None:
        self.app = app
        self.bound_host = host_name(bound_host)
        self.refused = refused

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        host = host_name(header)
        if is_loopback(host) or host == self.bound_host:
            await self.app(scope, receive, send)
        else:
            await self.refused(header)(scope, receive, send)
