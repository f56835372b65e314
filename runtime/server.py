"""`sdaot serve`: the FastAPI app. Auth, limits and error shapes here; the routes live in `routers/`, the
logic they share in `serving.py`, the work in `GenerationQueue`; the web page is static files in `web/`."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .body_limit import BodyLimit
from .errors import BusyError, SdaotError
from .pipeline import Pipeline
from .routers import generation, health, jobs, listing
from .serving import Server, ServerConfig, error_body

log = logging.getLogger("sdaot.server")
WEB = resources.files("sdaot.runtime") / "web"
COUNTED_PATHS = ("/v1/image", "/v1/jobs")


class ApiKeyGate:
    """ASGI middleware: /v1/ paths need a valid API key (401 in the error shape), and the answers of the
    generation and jobs routes are counted by status.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware hides a client's
    disconnect from the routes, and a generation whose client has left must be cancelled."""

    def __init__(self, app: Any, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status: list[int] = []

        async def noting_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        if path.startswith("/v1/") and not self.server.authorized(Request(scope)):
            refused = error_body(401, "missing or invalid API key (Authorization: Bearer <key>)", "authorization")
            await refused(scope, receive, noting_status)
        else:
            await self.app(scope, receive, noting_status)
        if path.startswith(COUNTED_PATHS) and status:
            self.server.requests.labels(str(status[0])).inc()


def create_app(config: ServerConfig, load_in_background: bool = True,
               open_pipeline: Callable[[str], Pipeline] | None = None) -> FastAPI:
    """The FastAPI app; models load in a background thread so /healthz answers at once. `open_pipeline`
    replaces loading a model here (Ray Serve's ingress passes stand-ins for the model replicas)."""
    server = Server(config, open_pipeline)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if load_in_background:
            threading.Thread(target=server.load, daemon=True).start()
        else:
            server.load()
        yield
        server.queue.shutdown()
        server.webhooks.shutdown()

    app = FastAPI(title="sdaot", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion with ahead-of-time compiled TVM backends and a PyTorch fallback.")
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return error_body(400, f"body is not valid JSON: {err.get('msg')}", None)
        message = err.get("msg", "invalid value").removeprefix("Value error, ")
        return error_body(422, f"{'.'.join(loc) or 'body'}: {message}", ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        response = error_body(exc.status_code, str(exc.detail), None)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(SdaotError)
    async def _sdaot(request: Request, exc: SdaotError):
        response = error_body(exc.status_code, exc.message, exc.param, exc.error_type)
        if isinstance(exc, BusyError):
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_body(500, f"internal error: {type(exc).__name__}", None, "api_error")

    for area in (health, listing, generation, jobs):
        app.include_router(area.router)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The web page: prompt, options, progress and results, over the jobs API."""
        return FileResponse(str(WEB / "index.html"))

    app.mount("/web", StaticFiles(directory=str(WEB)), name="web")
    # Added first, so it runs inside the key check: no body is read before the request is authorized.
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, too_large=lambda limit: error_body(
        413, f"request body is over {limit} bytes", None))
    app.add_middleware(ApiKeyGate, server=server)
    return app
