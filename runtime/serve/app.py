"""`sdaot serve`: the FastAPI app. Its middleware (auth, Host check, security headers, body limit) and error
shapes are put together here; the routes live in `routers/`, the logic they share in `serving.py`, the work
in `GenerationQueue`; the web page is static files in `web/`."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import BusyError, SdaotError
from ..pipeline import Pipeline
from .access import ApiKeyGate, HostCheck, is_loopback, request_id, route_path
from .body_limit import BodyLimit
from .error_shapes import dialect_of, error_app, error_body
from .protocol import status_of
from .routers import a1111, generation, health, jobs, listing, openai_images
from .security_headers import SecurityHeaders, docs_page
from .serving import Server, ServerConfig

log = logging.getLogger("sdaot.server")
WEB = resources.files("sdaot.runtime.serve") / "web"


def rescan_on_sighup(server: Server) -> None:
    """SIGHUP makes the server list its artifacts again (in a thread: it reads the disk), so an operator can
    add artifacts without a restart; requests never rescan. Only the main thread may take signals: elsewhere
    (Ray Serve's ingress) there is no rescan."""
    def rescan() -> None:
        log.info("SIGHUP: listing the artifacts again")
        threading.Thread(target=server.rescan_artifacts, daemon=True).start()

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, rescan)
    except (RuntimeError, ValueError, NotImplementedError):
        log.info("artifacts are listed at start-up only (signals are not delivered to this thread)")


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
        rescan_on_sighup(server)
        yield
        server.queue.shutdown()
        server.webhooks.shutdown()

    app = FastAPI(title="sdaot", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  swagger_ui_oauth2_redirect_url=None,
                  description="Stable Diffusion with ahead-of-time compiled TVM backends and a PyTorch fallback.")
    app.state.server = server
    add_error_handlers(app)
    app.state.a1111 = a1111.A1111State()
    for area in (health, listing, generation, jobs, openai_images, a1111):
        app.include_router(area.router)
    add_page(app)
    add_guards(app, server, config)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every failure answers in the error shape of the API its path belongs to (`error_shapes`): validation
    (400/422), HTTP (404, 405, ...), sdaot's own errors (their kind's status, Retry-After when busy), and
    anything else as a 500 that names the request id the log has the details under."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        path = route_path(request.scope)
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return error_body(400, f"body is not valid JSON: {err.get('msg')}", None, path=path)
        message = err.get("msg", "invalid value").removeprefix("Value error, ")
        return error_body(dialect_of(path).invalid_status, f"{'.'.join(loc) or 'body'}: {message}",
                          ".".join(loc) or None, path=path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        response = error_body(exc.status_code, str(exc.detail), None, path=route_path(request.scope))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(SdaotError)
    async def _sdaot(request: Request, exc: SdaotError):
        exc = exc.reported(request_id(request.scope))
        response = error_body(status_of(exc), exc.message, exc.param, exc.error_type, path=route_path(request.scope))
        if isinstance(exc, BusyError):
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        rid = request_id(request.scope)
        log.exception("%s: unexpected error on %s", rid, request.url.path)
        return error_body(500, f"internal error (details in the server log under request id {rid})", None,
                          "api_error", path=route_path(request.scope))


def add_page(app: FastAPI) -> None:
    """The web page at /, its static files under /web and the API docs at /docs."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The web page: prompt, options, progress and results, over the jobs API."""
        return FileResponse(str(WEB / "index.html"))

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        """The OpenAPI document in Swagger UI."""
        return docs_page(request, f"{app.title} API")

    app.mount("/web", StaticFiles(directory=str(WEB)), name="web")


def add_guards(app: FastAPI, server: Server, config: ServerConfig) -> None:
    """The middleware every request passes, outermost last: security headers, the Host check (no-key loopback
    mode), the key check, and the body limit inside it, so that no body is read before the key is checked."""
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, too_large=lambda limit: error_app(
        413, f"request body is over {limit} bytes", None))
    app.add_middleware(ApiKeyGate, authorized=server.authorized, count=server.count_answer,
                       refused=lambda: error_app(401, "missing or invalid API key (Authorization: Bearer <key>; on "
                                                 "/sdapi/ also HTTP Basic auth with the key as password)",
                                                 "authorization"))
    if not config.api_keys and config.host is not None and is_loopback(config.host):
        app.add_middleware(HostCheck, bound_host=config.host, refused=lambda host: error_app(
            400, f"Host {host!r} is not this server's name: without API keys it answers only to localhost and "
                 f"loopback addresses (a guard against DNS rebinding); configure API keys to serve other names",
            "host"))
    app.add_middleware(SecurityHeaders)
