"""The request-body limit, counted on the bytes actually received.

A `Content-Length` check alone lets a chunked upload (no length announced) through at any size. This
ASGI middleware reads the body of every HTTP request up to the limit, answers 413 as soon as it is passed,
and hands the app the body it read (at most the limit, held once; FastAPI would read it whole anyway);
later messages (a client's disconnect) pass through unchanged. Starlette's RequestBodyLimitMiddleware (and
FastAPI's `max_body_size`, built on it) counts the same bytes, but answers an announced oversize body with
its own plain-text 413 from outside the app, not the API's JSON error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
DRAIN_FACTOR = 4


class BodyLimit:
    """Wraps an ASGI app; `too_large(limit)` makes the 413 response (an ASGI app itself)."""

    def __init__(self, app: Any, max_bytes: int, too_large: Callable[[int], Any]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.too_large = too_large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self.too_large(self.max_bytes)(scope, receive, send)
            return
        chunks, size, disconnect = [], 0, None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                disconnect = message
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._drain(receive, message, size)
                await self.too_large(self.max_bytes)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return disconnect or {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, message: Message, size: int) -> None:
        """Read and drop the rest of an upload that is over the limit (up to DRAIN_FACTOR times the limit),
        so the client, still sending, gets to read the 413 instead of a reset connection."""
        while message.get("more_body", False) and size <= DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
