"""`sdaot serve --ray`: the HTTP API as a Ray Serve application, its models' replicas spread over a cluster.

Two kinds of deployment:
1. **`Ingress`** (one replica): the same FastAPI app as `sdaot serve` (routes, auth, errors, OpenAPI, the web
   page), through `@serve.ingress`. It holds no weights: it plans each request itself and hands it to the
   model's deployment (`RemotePipeline`). Jobs live here, in its generation queue, so every jobs request
   sees every job; it is one replica for that reason (its work is parsing and encoding, light next to a
   generation), and jobs do not outlive it.
2. **`ModelReplica`**, one deployment per served model: each replica loads the pipeline from the artifact
   root, selects artifacts by its own hardware as `sdaot serve` does (falling back to torch where none
   fits), and streams each generation's steps back. A cancelled generation holds its worker until it has
   really stopped (at its next step), and a request that arrives meanwhile waits for that worker instead
   of being refused: Ray counts a cancelled call as ended at once, and a 429 then would be false.
   `--workers` is its `max_ongoing_requests`; `--queue-size` requests may wait for the model's replicas;
   past that the client gets a 429 with Retry-After (from the ingress, or from Ray's back-pressure: see
   `build_app`). Replicas are a fixed number, or autoscaled on ongoing requests, and reserve `num_cpus`
   (and `num_gpus`) each. A job whose replica dies runs once more on another (`RemotePipeline`); a
   synchronous call gets a 503 instead, for its client to retry.

Every node must see the artifact root, the LoRA and ControlNet folders and the weights at the same paths (a
shared filesystem, or the same image). `app` builds the application for `serve run` / `serve deploy`;
`serve_on_ray` runs it from the CLI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from ray import serve
from ray.serve import Application

from ...artifacts import default_root
from ...controlnet import controlnet_dir
from ...errors import BusyError, InvalidRequestError
from ...lora import lora_dir
from ...pipeline import GenerationResult, Plan
from ...planning import Planner
from ...registry import get_model
from ...weights import tiny_vae_dir
from ..generation_queue import GenerationQueue
from ..protocol import LivePreview
from ..serving import ServerConfig, load_served_pipeline
from .remote_pipeline import RemotePipeline

log = logging.getLogger("sdaot.ray")
APP_NAME = "sdaot"
STEP_POLL_S = 0.05
INGRESS_MAX_ONGOING = 1000


@dataclass(frozen=True)
class Scaling:
    """How many replicas each model's deployment runs and what each reserves: `replicas` of them, or, with
    `max_replicas`, between `min_replicas` and `max_replicas` as ongoing requests per replica stay near
    `target_ongoing_requests`."""

    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 1.0
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    @property
    def most_replicas(self) -> int:
        """The most replicas a model can have at once."""
        return self.max_replicas if self.max_replicas is not None else self.replicas

    def check(self, config: ServerConfig) -> None:
        """Refuse settings Ray Serve would refuse later, less clearly, naming the flag."""
        if config.workers < 1:
            raise InvalidRequestError("must be >= 1 (it is each replica's max_ongoing_requests)", param="workers")
        if config.queue_size < 1:
            raise InvalidRequestError("must be >= 1 under Ray (Ray Serve's max_queued_requests cannot be 0)",
                                      param="queue_size")
        if self.replicas < 1 or self.min_replicas < 0:
            raise InvalidRequestError("replicas must be >= 1 and min_replicas >= 0", param="replicas")
        if self.max_replicas is not None and not max(1, self.min_replicas) <= self.max_replicas:
            raise InvalidRequestError(f"max_replicas ({self.max_replicas}) must be >= 1 and >= min_replicas "
                                      f"({self.min_replicas})", param="max_replicas")
        if self.target_ongoing_requests <= 0 or self.replica_cpus <= 0 or self.replica_gpus < 0:
            raise InvalidRequestError("target_ongoing_requests and replica_cpus must be > 0, replica_gpus >= 0",
                                      param="replica_cpus")

    def deployment_options(self, config: ServerConfig) -> dict[str, Any]:
        """Ray Serve options of a model's deployment."""
        options: dict[str, Any] = {
            "max_ongoing_requests": config.workers,
            "max_queued_requests": config.queue_size + self.most_replicas * config.workers,
            "ray_actor_options": {"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus},
        }
        if self.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": self.target_ongoing_requests}
        return options


@serve.deployment
class ModelReplica:
    """One replica of one served model: its pipeline and a local queue that runs, times and cancels its work."""

    def __init__(self, name: str, config: ServerConfig) -> None:
        import ray
        import torch

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))
        self.pipe = load_served_pipeline(name, config)
        self.queue = replica_queue(config.workers)

    def summary(self) -> dict:
        """What this replica offers (its artifacts as its hardware selects them, its LoRA files)."""
        return self.pipe.summary()

    async def generate(self, plan: Plan) -> AsyncIterator[tuple[int, int] | LivePreview | GenerationResult]:
        """(step, steps) after each sampler step, each new live preview, then the GenerationResult. Cancelling
        the stream (the client
        left, the request timed out, the job was cancelled) stops the generation at its next step, and the
        stream ends only once it has stopped."""
        job = self.queue.run_now(self.pipe, plan, owner="ingress")
        if job is None:
            raise BusyError(f"every worker of this {self.pipe.spec.name} replica is taken")
        sent = previewed = 0
        try:
            while True:
                finished = job.future.done()
                steps = list(job.step_log)
                for step, total, _, _ in steps[sent:]:
                    yield step, total
                sent = len(steps)
                preview = job.preview
                if preview is not None and preview.step != previewed:
                    previewed = preview.step
                    yield preview
                if finished:
                    break
                await asyncio.sleep(STEP_POLL_S)
            job.future.result()  # raises the generation's error
            yield job.result
        finally:
            if not job.done:
                self.queue.cancel(job)
            while not job.future.done():  # the stream ends when the worker is free: once the work has stopped
                await asyncio.sleep(STEP_POLL_S)


def replica_queue(workers: int) -> GenerationQueue:
    """A replica's queue: `workers` run, and as many more may wait. Ray sends a replica at most `workers` calls
    at once, but counts a cancelled call as ended as soon as it is cancelled, while its generation runs on to
    its next step; the call Ray sends next then waits for that worker rather than being refused (a false 429)."""
    return GenerationQueue(workers, workers, 0, 0, 0)


@serve.deployment(num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP API; `models` are the handles of the model deployments by model name."""

    def __init__(self, config: ServerConfig, models: dict[str, Any]) -> None:
        self.config = config
        self.models = models

    def __serve_build_asgi_app__(self) -> Any:
        from ..app import create_app

        return create_app(self.config, open_pipeline=self.open_remote)

    def open_remote(self, name: str) -> RemotePipeline:
        """The stand-in for model `name`'s pipeline; waits for a replica to report what it offers."""
        handle = self.models[name]
        summary = handle.summary.remote().result()
        planner = Planner(get_model(name), self.config.serves_refiner(name), lora_dir(self.config.lora_folder))
        return RemotePipeline(get_model(name), handle, planner, summary)


def build_app(config: ServerConfig, scaling: Scaling) -> Application:
    """The Serve application: the ingress bound to one deployment per model.

    Folders are made absolute here, where the command was given (`absolute_folders`). The ingress gets as many
    generation threads as the models' replicas can hold at full scale, running and waiting: past that it answers
    429 itself. Ray's queue for a model (`max_queued_requests`) is longer by the requests its replicas run,
    because Ray counts a request as queued until a replica takes it: a burst that the replicas can take is not
    refused. Ray refuses (and the client gets a 429 too) when fewer replicas run than the most, while scaling up
    or replacing one."""
    scaling.check(config)
    config = absolute_folders(config)
    replica_config = replace(config, api_keys=[])
    options = scaling.deployment_options(config)
    models = {name: ModelReplica.options(name=f"model-{name}", **options).bind(name, replica_config)
              for name in config.models}
    threads = len(config.models) * (scaling.most_replicas * config.workers + config.queue_size)
    return Ingress.bind(replace(config, workers=threads, queue_size=0), models)


def absolute_folders(config: ServerConfig) -> ServerConfig:
    """The config with every folder it names (given, or defaulted by an environment variable) made absolute: a
    replica's working folder is not the driver's."""
    return replace(config, artifacts_root=(config.artifacts_root or default_root()).absolute(),
                   lora_folder=_absolute(lora_dir(config.lora_folder)),
                   controlnet_folder=_absolute(controlnet_dir(config.controlnet_folder)),
                   tiny_vae_folder=_absolute(tiny_vae_dir(config.tiny_vae_folder)))


def _absolute(path: Path | None) -> Path | None:
    """The path as every process sees it: a replica's working folder is not the driver's."""
    return path.absolute() if path is not None else None


SCALING_FIELDS = {f.name for f in fields(Scaling)}
CONFIG_FIELDS = {f.name for f in fields(ServerConfig)}


def app(args: dict[str, Any]) -> Application:
    """The application for `serve run sdaot.runtime.serve.ray.deployments:app models=SD1.5 replicas=2` and for a
    `serve deploy` YAML's `import_path` and `args`: ServerConfig's fields and Scaling's, by name. API keys come
    from `api_keys` or from SDAOT_API_KEYS (comma-separated; set it in the YAML's runtime_env); without any it
    refuses to start unless `insecure_no_auth` is true, as `sdaot serve` refuses a non-loopback address (Ray's
    proxy is one)."""
    args = dict(args)
    try:
        insecure_no_auth = TypeAdapter(bool).validate_python(args.pop("insecure_no_auth", False))
    except ValidationError as exc:
        raise InvalidRequestError("must be true or false", param="insecure_no_auth") from exc
    unknown = sorted(set(args) - SCALING_FIELDS - CONFIG_FIELDS)
    if unknown:
        known = CONFIG_FIELDS | SCALING_FIELDS | {"insecure_no_auth"}
        raise InvalidRequestError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
                                  param=unknown[0])
    values = dict(args)
    for listed in ("models", "api_keys", "webhook_allow"):
        if isinstance(values.get(listed), str):
            values[listed] = [v.strip() for v in values[listed].split(",") if v.strip()]
    if not values.get("api_keys"):
        values["api_keys"] = [k.strip() for k in os.environ.get("SDAOT_API_KEYS", "").split(",") if k.strip()]
    scaling = _validated(Scaling, {k: v for k, v in values.items() if k in SCALING_FIELDS})
    config = _validated(ServerConfig, {k: v for k, v in values.items() if k in CONFIG_FIELDS})
    config.models = [get_model(name, param="models").name for name in config.models]
    if not config.api_keys:
        if not insecure_no_auth:
            raise InvalidRequestError("refusing to start without API keys: set api_keys or SDAOT_API_KEYS, or pass "
                                      "insecure_no_auth=true to open the API to whoever reaches the proxy",
                                      param="api_keys")
        log.warning("no API keys (insecure_no_auth): the API is open to whoever reaches the proxy")
    return build_app(config, scaling)


def _validated(kind: type, values: dict[str, Any]) -> Any:
    """`kind(**values)` with each value converted from text where it came as text (`serve run k=v`)."""
    try:
        return TypeAdapter(kind).validate_python(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"])
        raise InvalidRequestError(f"{err['msg']} (got {err.get('input')!r})", param=name) from exc


def serve_on_ray(application: Application, address: str | None, host: str, port: int,
                 say: Callable[[str], None]) -> None:
    """Deploy on the cluster at `address` (a new local one when empty) with Serve's HTTP proxy on host:port,
    and keep it up until SIGINT or SIGTERM; then delete the application (the cluster stays up)."""
    import ray

    ray.init(address=address or None, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.run(application, name=APP_NAME, route_prefix="/")
        say(f"serving on http://{host}:{port} (Ray Serve application {APP_NAME!r}); Ctrl-C stops it")
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        ray.shutdown()
