"""`sdaot serve`: the reference image-generation API over HTTP (FastAPI), with auth, limits and metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .admission import Admission
from .api_schema import ApiGenerationRequest, GenerationResponse, error_responses
from .body_limit import BodyLimit
from .errors import SdaotError
from .images import decode_image, encode_image
from .pipeline import Pipeline, Plan
from .registry import get_model
from .request import parse_request
from .weights import BUILT_IN_SOURCES

log = logging.getLogger("sdaot.server")


@dataclass
class ServerConfig:
    """Everything `sdaot serve` can be told; defaults serve the tiny demo models on one worker."""

    models: list[str] = field(default_factory=lambda: ["SD1.5", "SDXL1.0-base", "SDXL-turbo"])
    weights: str = "tiny"
    artifacts_root: Path | None = None
    api_keys: list[str] = field(default_factory=list)
    workers: int = 1
    queue_size: int = 4
    timeout_s: float = 300.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 2048 * 2048
    lora_folder: Path | None = None
    controlnet_folder: Path | None = None


class Cancelled(Exception):
    """Raised inside a generation whose request timed out or whose client went away."""


def error_body(status: int, message: str, param: str | None = None, kind: str | None = None) -> JSONResponse:
    """The reference API's error shape: {object, message, type, param, code}."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
             503: "service_unavailable", 504: "timeout_error"}
    body = {"object": "error", "message": message, "type": kind or kinds.get(status, "api_error"), "param": param,
            "code": status}
    return JSONResponse(body, status_code=status)


class Server:
    """The app state: pipelines, the bounded worker pool and the metrics."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.pipelines: dict[str, Pipeline] = {}
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.registry = CollectorRegistry()
        self.requests = Counter("sdaot_requests", "HTTP requests by status", ["status"], registry=self.registry)
        self.latency = Histogram("sdaot_request_seconds", "Generation request latency", registry=self.registry,
                                 buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
        self.queue_depth = Gauge("sdaot_queue_depth", "Requests admitted and not finished", registry=self.registry)
        self.step_time = Histogram("sdaot_step_seconds", "Sampler step time by UNet backend", ["backend"],
                                   registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30))
        self.admission = Admission(config.workers, config.queue_size, on_change=self.queue_depth.set)

    def load(self) -> None:
        """Load every configured model (with the refiner where one exists for SDXL and the source allows)."""
        from .loader import load_pipeline

        try:
            for name in self.config.models:
                spec = get_model(name)
                refiner = spec.refiner is not None and self.config.weights in BUILT_IN_SOURCES
                self.pipelines[spec.name] = load_pipeline(spec.name, self.config.weights, with_refiner=refiner,
                                                          artifacts_root=self.config.artifacts_root,
                                                          lora_folder=self.config.lora_folder,
                                                          controlnet_folder=self.config.controlnet_folder)
                compiled = self.pipelines[spec.name].selector.compiled_resolutions()
                log.info("serving %s (%s weights; tvm resolutions: %s)", spec.name, self.config.weights,
                         ", ".join(compiled) or "none compiled")
            if self.config.workers > len(self.pipelines):
                log.warning("--workers %d with %d model(s): generations of one model run one at a time (its "
                            "weights hold one LoRA set), so at most %d run at once", self.config.workers,
                            len(self.pipelines), len(self.pipelines))
            self.ready.set()
        except Exception as exc:  # any load failure must surface as 503 + message, not a silent thread death
            self.load_error = f"cannot load models: {exc}"
            log.error(self.load_error)

    def authorized(self, request: Request) -> bool:
        """Bearer key check in constant time; open when no keys are configured (loopback only)."""
        if not self.config.api_keys:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        matches = [hmac.compare_digest(token.encode(), key.encode()) for key in self.config.api_keys]
        return any(matches)

    def run(self, pipe: Pipeline, plan: Plan, cancel: threading.Event):
        """Worker-thread body: skip work whose client is gone, stop between steps when cancelled."""
        if cancel.is_set():
            raise Cancelled()
        steps: list[float] = []

        def progress(done: int, total: int) -> None:
            steps.append(time.perf_counter())
            if cancel.is_set():
                raise Cancelled()

        result = pipe.generate(plan, progress=progress)
        backend = result.backends.get("unet") or result.backends.get("unet_controlnet", "unknown")
        for earlier, later in zip(steps, steps[1:], strict=False):
            self.step_time.labels(backend).observe(later - earlier)
        return result


def create_app(config: ServerConfig, load_in_background: bool = True) -> FastAPI:
    """The FastAPI app; models load in a background thread so /healthz answers at once."""
    server = Server(config)
    app = FastAPI(title="sdaot", version=__version__,
                  description="Stable Diffusion with ahead-of-time compiled TVM backends and a PyTorch fallback.")
    app.state.server = server

    @app.on_event("startup")
    async def _start() -> None:
        if load_in_background:
            threading.Thread(target=server.load, daemon=True).start()
        else:
            server.load()

    @app.on_event("shutdown")
    async def _stop() -> None:
        server.admission.shutdown()

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if request.url.path.startswith("/v1/") and not server.authorized(request):
            response = error_body(401, "missing or invalid API key (Authorization: Bearer <key>)", "authorization")
        else:
            response = await call_next(request)
        if request.url.path.startswith("/v1/image"):
            server.requests.labels(str(response.status_code)).inc()
        return response

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
        return error_body(exc.status_code, exc.message, exc.param, exc.error_type)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_body(500, f"internal error: {type(exc).__name__}", None, "api_error")

    @app.get("/healthz")
    async def healthz() -> dict:
        """Alive (the process answers)."""
        return {"status": "ok"}

    @app.get("/readyz", responses=error_responses(503))
    async def readyz():
        """Ready once every configured model is loaded."""
        if server.ready.is_set():
            return {"status": "ready", "models": list(server.pipelines)}
        return error_body(503, server.load_error or "models are still loading", None)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=error_responses(401))
    def models() -> dict:
        """Served models with family, weight source, compiled resolutions per backend and LoRA files (how many
        of each file's tensors match the model). Generations of one model run one at a time."""
        from .controlnet import controlnet_registry

        controlnets = [{"name": n, "preprocessor": c["preprocessor"]} for n, c in controlnet_registry().items()]
        rows = []
        for name, pipe in server.pipelines.items():
            compiled = pipe.selector.compiled_resolutions()
            rows.append({"name": name, "family": pipe.spec.family, "weights": pipe.bundle.source,
                         "native_resolution": str(pipe.spec.native_resolution),
                         "default_tvm_resolutions": [str(r) for r in pipe.spec.tvm_resolutions],
                         "compiled_resolutions": {"tvm": compiled, "onnxruntime": compiled, "torch": "any"},
                         "loras": pipe.loras.names(),
                         "lora_files": pipe.loras.describe(),
                         "max_concurrent_generations": 1,
                         "controlnets": controlnets if pipe.spec.default_controlnet else []})
        return {"object": "list", "data": rows}

    @app.get("/v1/samplers", responses=error_responses(401))
    async def samplers() -> dict:
        """Sampler names accepted in `sampler`, with the diffusers scheduler and options each one uses."""
        from .samplers import SAMPLERS

        return {"object": "list", "data": [{"name": s.name, "scheduler": s.scheduler, "options": s.options}
                                           for s in SAMPLERS.values()]}

    @app.get("/v1/style-presets", responses=error_responses(401))
    async def style_presets() -> dict:
        """Style preset names accepted in `style_preset`, with their templates."""
        from .presets import presets

        return {"object": "list", "data": [{"name": name, **template} for name, template in presets().items()]}

    @app.post("/v1/image/generation", response_model=GenerationResponse,
              responses=error_responses(400, 401, 404, 413, 422, 429, 499, 503, 504))
    async def generation(body: ApiGenerationRequest, request: Request) -> Any:
        """Generate images: the reference API's request and response."""
        if not server.ready.is_set():
            return error_body(503, server.load_error or "models are still loading", None)
        spec = get_model(body.model_name)
        pipe = server.pipelines.get(spec.name)
        if pipe is None:
            return error_body(404, f"model {spec.name} is not served here; served: {', '.join(server.pipelines)}",
                              "model_name")
        fields = body.model_dump(exclude={"output_format"}, exclude_none=True)
        if body.image is not None:
            for side in ("height", "width"):
                if side not in body.model_fields_set:
                    fields.pop(side)
        plan = await run_in_threadpool(_prepare, pipe, fields, config.max_pixels)
        cancel = threading.Event()
        submitted = server.admission.submit(server.run, pipe, plan, cancel)
        if submitted is None:
            response = error_body(429, "the server is busy: queue is full, retry later", None)
            response.headers["Retry-After"] = "5"
            return response
        start = time.perf_counter()
        future = asyncio.wrap_future(submitted)
        watcher = asyncio.ensure_future(_watch_disconnect(request, cancel))
        try:
            result = await asyncio.wait_for(future, timeout=config.timeout_s)
        except asyncio.TimeoutError:
            cancel.set()
            return error_body(504, f"generation took longer than {config.timeout_s:.0f} s and was cancelled", None)
        except Cancelled:
            return error_body(499 if await request.is_disconnected() else 504, "generation cancelled", None)
        finally:
            watcher.cancel()
        server.latency.observe(time.perf_counter() - start)
        images = [{"image": encode_image(img, body.output_format), "index": i, "random_seed": seed}
                  for i, (img, seed) in enumerate(zip(result.images, result.seeds, strict=True))]
        return {"images": images, "inference_time": round(result.inference_time, 4), "backends": result.backends,
                "model_name": spec.name, "width": result.plan.width, "height": result.plan.height,
                "steps": result.plan.steps, "sampler": result.plan.sampler.name,
                "output_format": body.output_format}

    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, too_large=lambda limit: error_body(
        413, f"request body is over {limit} bytes", None))
    return app


def _prepare(pipe: Pipeline, fields: dict[str, Any], max_pixels: int) -> Plan:
    """Decode the images, validate and plan the request: CPU work kept off the event loop (a 2048x2048
    PNG takes a while to decode), so other clients are answered meanwhile."""
    for key in ("image", "controlnet_image"):
        if key in fields:
            fields[key] = decode_image(fields[key], key, max_pixels)
    return pipe.plan(parse_request(fields))


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Drop queued or running work of a client that went away."""
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.5)
