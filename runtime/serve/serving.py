"""What the HTTP routes share: the server's configuration and state, and the request -> plan -> answer logic
that the synchronous route and the jobs routes both use (the routes themselves stay thin). Answers are the
declared models of `protocol`; what the HTTP side wants done with a job's outcome (its image format, its
webhook) is kept here, beside the job (`HttpDelivery`), not in the queue."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.concurrency import run_in_threadpool

from ..errors import BusyError, InvalidRequestError, NotFoundError, SdaotError, ServiceUnavailableError
from ..images import decode_image, encode_image
from ..pipeline import GenerationResult, Pipeline, Plan
from ..registry import get_model
from ..request import parse_request
from ..weights import BUILT_IN_SOURCES
from .a1111_protocol import A1111_PREFIX
from .access import route_path
from .error_shapes import error_body
from .generation_queue import Cancelled, GenerationQueue, Job, owner_of
from .protocol import (
    ApiGenerationRequest,
    ErrorBody,
    GeneratedImage,
    GenerationResponse,
    JobState,
    OutputFormat,
    error_shape,
)
from .streams import StreamLimit
from .webhooks import WebhookSender

log = logging.getLogger("sdaot.server")
COUNTED_PATHS = ("/v1/image", "/v1/jobs", "/sdapi/v1/txt2img", "/sdapi/v1/img2img")
"""Prefixes of the generation routes whose answers are counted (`/v1/image` covers OpenAI's `/v1/images/`)."""


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
    max_queued_jobs: int = 32
    keep_finished_s: float = 3600.0
    keep_finished: int = 256
    keep_finished_bytes: int = 256 * 1024 * 1024
    max_jobs_per_key: int = 8
    max_event_streams: int = 64
    max_event_streams_per_key: int = 4
    webhook_allow: list[str] = field(default_factory=list)
    webhook_workers: int = 4
    webhook_backlog: int = 64
    device: str = "auto"
    host: str | None = None
    tiny_vae_folder: Path | None = None

    def check(self) -> None:
        """Refuse values no server can run with, naming the setting."""
        if self.workers < 1 or self.queue_size < 0:
            raise InvalidRequestError("workers must be >= 1 and queue-size >= 0", param="workers")
        if min(self.max_queued_jobs, self.keep_finished, self.keep_finished_s, self.keep_finished_bytes) < 0:
            raise InvalidRequestError("must be >= 0", param="max_queued_jobs, keep_finished, keep_finished_count, "
                                      "keep_finished_bytes")
        if min(self.max_jobs_per_key, self.max_event_streams, self.max_event_streams_per_key) < 1:
            raise InvalidRequestError("must be >= 1", param="max_jobs_per_key, max_event_streams, "
                                      "max_event_streams_per_key")

    def serves_refiner(self, model: str) -> bool:
        """Whether `model` is served with its refiner: an SDXL base with a built-in weight source."""
        return get_model(model).refiner is not None and self.weights in BUILT_IN_SOURCES


def load_served_pipeline(name: str, config: ServerConfig) -> Pipeline:
    """Model `name`'s pipeline loaded in this process as `config` serves it (with the refiner where the model
    has one and the weight source provides it)."""
    from ..loader import load_pipeline

    return load_pipeline(name, config.weights, with_refiner=config.serves_refiner(name),
                         artifacts_root=config.artifacts_root, lora_folder=config.lora_folder,
                         controlnet_folder=config.controlnet_folder, device=config.device,
                         tiny_vae_folder=config.tiny_vae_folder)


class Server:
    """The app state: pipelines, the generation queue and the metrics. `open_pipeline` makes the pipeline of a
    served model (by default loaded here; under Ray Serve a stand-in for the model's replicas)."""

    def __init__(self, config: ServerConfig, open_pipeline: Callable[[str], Pipeline] | None = None) -> None:
        self.config = config
        self.open_pipeline = open_pipeline or (lambda name: load_served_pipeline(name, config))
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
        self.webhook_outcomes = Counter("sdaot_webhooks", "Webhook deliveries by outcome (dropped: the delivery "
                                        "pool was full)", ["outcome"], registry=self.registry)
        self.webhooks = WebhookSender(config.webhook_allow, config.webhook_workers, config.webhook_backlog,
                                      on_outcome=lambda outcome: self.webhook_outcomes.labels(outcome).inc())
        self.streams = StreamLimit(config.max_event_streams, config.max_event_streams_per_key)
        self.queue = GenerationQueue(config.workers, config.queue_size, config.max_queued_jobs,
                                     config.keep_finished_s, config.keep_finished, on_depth=self.queue_depth.set,
                                     on_step=lambda backend, s: self.step_time.labels(backend).observe(s),
                                     max_jobs_per_key=config.max_jobs_per_key,
                                     keep_finished_bytes=config.keep_finished_bytes)

    def load(self) -> None:
        """Open every configured model's pipeline; a failure is kept as the reason /readyz and requests give."""
        try:
            for name in self.config.models:
                spec = get_model(name)
                self.pipelines[spec.name] = self.open_pipeline(spec.name)
                compiled = self.pipelines[spec.name].compiled_resolutions()
                log.info("serving %s (%s weights; tvm resolutions: %s)", spec.name, self.config.weights,
                         ", ".join(compiled) or "none compiled")
            self.ready.set()
        except Exception as exc:  # any load failure must surface as 503 + message, not a silent thread death
            reason = exc.message if isinstance(exc, SdaotError) else type(exc).__name__
            self.load_error = f"cannot load models: {reason}"
            log.error("cannot load models: %s", exc)

    @property
    def default_model(self) -> str:
        """The model of a request that names none (OpenAI's and A1111's APIs): the first configured."""
        return get_model(self.config.models[0]).name

    def count_answer(self, path: str, status: int) -> None:
        """Count an answer of the generation and jobs routes (router path `path`) by status."""
        if path.startswith(COUNTED_PATHS):
            self.requests.labels(str(status)).inc()

    def rescan_artifacts(self) -> None:
        """Read the artifacts root again for every loaded model (on SIGHUP): artifacts are listed at start-up
        and on this signal only, never per request."""
        for pipe in self.pipelines.values():
            if isinstance(pipe, Pipeline):  # under Ray Serve each replica lists its own, at its start
                pipe.selector.rescan()

    def delivery(self, output_format: OutputFormat = "png", webhook_url: str | None = None) -> HttpDelivery:
        """What to do with the outcome of a request that asked for this image format and webhook."""
        return HttpDelivery(self, output_format, webhook_url)

    def owner(self, request: Request) -> str:
        """Whose work a request creates or may see: the hash of its API key (the same however it was sent)."""
        return owner_of(_api_key(request) if self.config.api_keys else None)

    def authorized(self, request: Request) -> bool:
        """Key check in constant time; open when no keys are configured (loopback only)."""
        if not self.config.api_keys:
            return True
        token = _api_key(request)
        if token is None:
            return False
        matches = [hmac.compare_digest(token.encode(), key.encode()) for key in self.config.api_keys]
        return any(matches)


def _api_key(request: Request) -> str | None:
    """The key a request presents: `Authorization: Bearer <key>`, or on the AUTOMATIC1111 routes, whose
    clients send A1111's `--api-auth` credentials, the password of HTTP Basic auth (the user name is ignored)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return token
    if scheme.lower() == "basic" and route_path(request.scope).startswith(A1111_PREFIX):
        try:
            return base64.b64decode(token, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def served_pipeline(server: Server, name: str, param: str = "model_name") -> Pipeline:
    """The pipeline serving model `name`: 503 while loading, 404 for a model not served here (naming `param`,
    the field the name came from), raised as SdaotError."""
    if not server.ready.is_set():
        raise ServiceUnavailableError(server.load_error or "models are still loading")
    spec = get_model(name, param)
    pipe = server.pipelines.get(spec.name)
    if pipe is None:
        raise NotFoundError(f"model {spec.name} is not served here; served: {', '.join(server.pipelines)}",
                            param=param)
    return pipe


async def plan_request(server: Server, body: ApiGenerationRequest) -> tuple[Pipeline, Plan]:
    """The served pipeline of the body's model and the planned request: 503 while loading, 404 for a model
    not served here, 400/422 for bad fields (raised as SdaotError)."""
    pipe = served_pipeline(server, body.model_name)
    fields = body.model_dump(exclude={"output_format", "webhook_url"}, exclude_none=True)
    if body.image is not None:
        for side in ("height", "width"):
            if side not in body.model_fields_set:
                fields.pop(side)
    return pipe, await run_in_threadpool(_prepare, pipe, fields, server.config.max_pixels)


def _prepare(pipe: Pipeline, fields: dict[str, Any], max_pixels: int) -> Plan:
    """Decode the images, validate and plan the request: CPU work kept off the event loop (a 2048x2048
    PNG takes a while to decode), so other clients are answered meanwhile."""
    for key in ("image", "controlnet_image"):
        if key in fields:
            fields[key] = decode_image(fields[key], key, max_pixels)
    return pipe.plan(parse_request(fields))


async def wait_sync(server: Server, request: Request, job: Job | None) -> JSONResponse | None:
    """Wait for a synchronous request's job (None: it was not admitted, 429), cancelling it if its client
    leaves: None once it has succeeded (its answer is in `job.answer`), else the error answer, shaped for the
    route: 504 past the server's time limit, 499 if the client left, 504 if it was cancelled otherwise. A
    failed generation raises its error."""
    if job is None:
        raise BusyError("the server is busy: every worker and queue slot is taken; retry later, or POST the "
                        "request to /v1/jobs (the reference body) to wait in the job queue")
    path = route_path(request.scope)
    start = time.perf_counter()
    watcher = asyncio.ensure_future(_cancel_when_client_leaves(request, server, job))
    try:
        await server.queue.outcome(job, server.config.timeout_s)
    except asyncio.TimeoutError:
        return error_body(504, f"generation took longer than {server.config.timeout_s:.0f} s and was cancelled",
                          path=path)
    except Cancelled:
        return error_body(499 if await request.is_disconnected() else 504, "generation cancelled", path=path)
    finally:
        watcher.cancel()
    server.latency.observe(time.perf_counter() - start)
    return None


async def _cancel_when_client_leaves(request: Request, server: Server, job: Job) -> None:
    """Drop queued or running work of a client that went away."""
    while not job.done:
        if await request.is_disconnected():
            server.queue.cancel(job)
            return
        await asyncio.sleep(0.5)


def generation_response(result: GenerationResult, model_name: str, output_format: OutputFormat) -> GenerationResponse:
    """The answer of a finished generation (of the model served as `model_name`): the reference's fields plus
    what ran where."""
    plan = result.plan
    assert plan is not None
    images = [GeneratedImage(image=encode_image(img, output_format), index=i, random_seed=seed)
              for i, (img, seed) in enumerate(zip(result.images, result.seeds, strict=True))]
    return GenerationResponse(images=images, inference_time=round(result.inference_time, 4),
                              backends=result.backends, model_name=model_name, width=plan.width, height=plan.height,
                              steps=plan.steps, sampler=plan.sampler.name, output_format=output_format)


def job_state(server: Server, job: Job) -> JobState:
    """A job's state as GET /v1/jobs/{id}, the events stream and the webhook report it, with the fields of its
    status only (the answer was encoded on the worker thread: nothing here encodes an image)."""
    state = JobState(id=job.id, status=job.status, created=round(job.created, 3), model_name=job.pipe.spec.name)
    if job.status == "queued":
        state.queue_position = server.queue.position(job)
    else:
        state.step, state.steps, state.elapsed = job.step, job.steps, round(job.elapsed(), 3)
    if job.status == "running":
        state.eta = job.eta()
    if job.preview is not None and job.status != "succeeded":
        state.preview = job.preview
    if job.status == "succeeded" and isinstance(job.answer, GenerationResponse):
        state.result = job.answer
    if job.status == "failed" and job.error is not None:
        state.error = ErrorBody.model_validate(error_shape(job.error))
    return state


@dataclass(frozen=True)
class HttpDelivery:
    """What the HTTP side keeps beside a job: the image format its answer is encoded in (on the worker thread,
    so no route encodes an image on the event loop) and the webhook that hears of its end."""

    server: Server
    output_format: OutputFormat = "png"
    webhook_url: str | None = None

    def encode(self, job: Job, result: GenerationResult) -> GenerationResponse:
        """The answer the job keeps instead of its images."""
        return generation_response(result, job.pipe.spec.name, self.output_format)

    def finished(self, job: Job) -> None:
        """Queue the webhook, if the job has one; its body is built on the delivery pool."""
        if self.webhook_url:
            self.server.webhooks.send(self.webhook_url, lambda: job_state(self.server, job).wire(), job.id)


def get_server(request: Request) -> Server:
    """FastAPI dependency: the app's Server."""
    return request.app.state.server


ServerDep = Annotated[Server, Depends(get_server)]
"""A route parameter of this type receives the app's Server."""
