"""`sdaot serve`: the HTTP API and web page, in this process (uvicorn) or through Ray Serve."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import InvalidRequestError, SdaotError
from .options import CONTROLNET_DIR_HELP, DEVICE_HELP, LORA_DIR_HELP, TINY_VAE_DIR_HELP


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--root-path", default="", metavar="PREFIX",
              help="Path prefix the server is reached under, behind a proxy that strips it (e.g. /sdaot): "
                   "links, the web page and the API docs use it. Not with --ray.")
@click.option("--weights", default=lambda: os.environ.get("SDAOT_WEIGHTS", "tiny"), show_default="tiny",
              help="tiny (built-in demo) | random | a diffusers folder or file (then serve one model).")
@click.option("--models", default="SD1.5,SDXL1.0-base,SDXL-turbo", show_default=True,
              help="Comma-separated model names to load.")
@click.option("--artifacts", "artifacts_root", type=click.Path(path_type=Path), default=None,
              help="Compiled artifacts folder (default: SDAOT_ARTIFACTS or ./artifacts).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Concurrent generations, at most one per model (a model's weights hold one LoRA set at a time).")
@click.option("--queue-size", type=int, default=4, show_default=True, help="Requests waiting beyond the workers.")
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True,
              help="Seconds before a request answers 504 and its work is cancelled.")
@click.option("--api-key-file", type=click.Path(exists=True, path_type=Path), default=None,
              help="File with one API key per line (also: SDAOT_API_KEYS, comma-separated).")
@click.option("--insecure-no-auth", is_flag=True, help="Allow serving a non-loopback address without API keys.")
@click.option("--lora-dir", "lora_folder", type=click.Path(path_type=Path), default=None, help=LORA_DIR_HELP)
@click.option("--controlnet-dir", "controlnet_folder", type=click.Path(path_type=Path), default=None,
              help=CONTROLNET_DIR_HELP)
@click.option("--max-queued-jobs", type=int, default=32, show_default=True,
              help="Unfinished jobs (POST /v1/jobs) that may wait beyond the workers; more answer 429.")
@click.option("--keep-finished", "keep_finished_s", type=float, default=3600.0, show_default=True,
              help="Seconds a finished job's result stays readable (GET /v1/jobs/{id}); 404 after that.")
@click.option("--keep-finished-count", "keep_finished", type=int, default=256, show_default=True,
              help="Finished jobs kept at most per API key; the key's oldest are dropped first.")
@click.option("--keep-finished-bytes", type=int, default=256 * 1024 * 1024, show_default=True,
              help="Bytes of finished jobs' encoded images kept per API key; the key's oldest jobs are dropped "
                   "first (its newest finished job always stays).")
@click.option("--max-jobs-per-key", type=int, default=8, show_default=True,
              help="Unfinished jobs one API key may have; more answer 429.")
@click.option("--max-event-streams", type=int, default=64, show_default=True,
              help="Job event streams (GET /v1/jobs/{id}/events) open at once; more answer 429.")
@click.option("--max-event-streams-per-key", type=int, default=4, show_default=True,
              help="Job event streams one API key may have open; more answer 429.")
@click.option("--webhook-allow", default="",
              help="Comma-separated hosts webhooks may be sent to, even when private or loopback (default: any "
                   "host with only public addresses; loopback, private, link-local and other internal addresses "
                   "are refused in every spelling).")
@click.option("--tiny-vae-dir", "tiny_vae_folder", type=click.Path(path_type=Path), default=None,
              help=TINY_VAE_DIR_HELP)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Serve through Ray Serve on a cluster (ADDRESS, else RAY_ADDRESS or a new local one): one "
                   "deployment per model, --workers its max_ongoing_requests, --queue-size Ray's queue for it.")
@click.option("--replicas", type=int, default=1, show_default=True, help="With --ray: replicas per model.")
@click.option("--min-replicas", type=int, default=1, show_default=True,
              help="With --ray and --max-replicas: autoscaling's lower bound.")
@click.option("--max-replicas", type=int, default=None,
              help="With --ray: autoscale each model between --min-replicas and this (instead of --replicas).")
@click.option("--target-ongoing-requests", type=float, default=1.0, show_default=True,
              help="With --ray and --max-replicas: ongoing requests per replica that autoscaling aims at.")
@click.option("--replica-cpus", type=float, default=1.0, show_default=True,
              help="With --ray: CPUs each model replica reserves (its torch threads).")
@click.option("--replica-gpus", type=float, default=0.0, show_default=True,
              help="With --ray: GPUs each model replica reserves.")
def serve(host: str, port: int, root_path: str, models: str, insecure_no_auth: bool, api_key_file: Path | None,
          webhook_allow: str, ray_address: str | None, replicas: int, min_replicas: int, max_replicas: int | None,
          target_ongoing_requests: float, replica_cpus: float, replica_gpus: float, **settings) -> None:
    """Serve the web page at /, POST /v1/image/generation (the reference API), the jobs API (/v1/jobs), plus
    /v1/models, /healthz, /readyz, /metrics; with --ray, the same API through Ray Serve."""
    import logging

    from ..registry import get_model

    try:
        import uvicorn

        from ..serve.app import create_app
        from ..serve.keys import guard_exposure, load_api_keys
        from ..serve.serving import ServerConfig
    except ImportError as exc:
        raise SdaotError(f"serving needs the serve extra (pip install 'sdaot[serve]'): {exc}") from exc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = load_api_keys(api_key_file)
    guard_exposure(host, keys, insecure_no_auth, say=lambda line: click.echo(line, err=True))
    names = [get_model(n.strip()).name for n in models.split(",") if n.strip()]
    config = ServerConfig(models=names, api_keys=keys, host=host,
                          webhook_allow=[h.strip() for h in webhook_allow.split(",") if h.strip()], **settings)
    config.check()
    root_path = _checked_root_path(root_path, on_ray=ray_address is not None)
    if ray_address is not None:
        try:
            from ..serve.ray.deployments import Scaling, build_app, serve_on_ray
        except ImportError as exc:
            raise SdaotError(f"--ray needs the ray extra (pip install 'sdaot[ray]'): {exc}") from exc
        scaling = Scaling(replicas, min_replicas, max_replicas, target_ongoing_requests, replica_cpus, replica_gpus)
        serve_on_ray(build_app(config, scaling), ray_address, host, port, say=click.echo)
        return
    from ..devices import pick_device

    pick_device(config.device)
    if config.workers > len(names):
        click.echo(f"--workers {config.workers} with {len(names)} model(s): generations of one model run one at a "
                   f"time (its weights hold one LoRA set), so at most {len(names)} run at once", err=True)
    uvicorn.run(create_app(config), host=host, port=port, root_path=root_path, log_level="info",
                timeout_graceful_shutdown=60)


def _checked_root_path(root_path: str, on_ray: bool) -> str:
    root_path = root_path.rstrip("/")
    if root_path and not root_path.startswith("/"):
        raise InvalidRequestError(f"must start with / (got {root_path!r})", param="root_path")
    if root_path and on_ray:
        raise InvalidRequestError("is for a proxy in front of uvicorn; under Ray Serve set the application's "
                                  "route_prefix instead", param="root_path")
    return root_path
