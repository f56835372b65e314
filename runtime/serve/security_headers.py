"""Browser-facing hardening: security headers on every answer, and an API docs page that runs under a CSP.

The web page keeps an API key in the browser, so nothing may run on its origin but its own script file: the
Content-Security-Policy allows scripts from the server only (no inline script, no eval), and the page is
not framed (clickjacking), not MIME-sniffed, and sends no Referer. The Swagger UI page FastAPI writes has
one inline script; it is served with a policy that allows exactly that script by its hash.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

from fastapi import Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_CDN = "https://cdn.jsdelivr.net"
HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"no-referrer"))
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


class SecurityHeaders:
    """ASGI middleware: nosniff, DENY framing, no Referer, and the page's CSP on every HTTP answer that sets
    no CSP of its own."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"content-security-policy" for name, _ in headers):
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                message["headers"] = headers + list(HEADERS)
            await send(message)

        await self.app(scope, receive, with_headers)


def docs_page(request: Request, title: str) -> HTMLResponse:
    """FastAPI's Swagger UI page (under the app's root path) with a CSP naming its one inline script's hash."""
    root = request.scope.get("root_path", "").rstrip("/")
    page = get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=title)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                      for s in INLINE_SCRIPT.findall(bytes(page.body).decode()))
    page.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src {DOCS_CDN} {hashes}; style-src {DOCS_CDN} 'unsafe-inline'; "
        f"img-src 'self' data: {DOCS_CDN} https://fastapi.tiangolo.com; connect-src 'self'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'")
    return page
