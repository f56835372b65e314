"""The `sdaot` command line: list models, samplers and presets; generate images; compile; serve; bench."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .errors import InvalidRequestError, SdaotError
from .registry import all_models
from .resolution import Resolution
from .targets import PRECISIONS
from .threads import use_all_cores

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
DEVICE_HELP = ("auto (a CUDA GPU when torch sees one, else the CPU) | cpu | cuda | cuda:N: where the networks run; "
               "compiled artifacts are used when built for that device's target.")
TINY_VAE_DIR_HELP = ("Folder of tiny decoders, DIR/<family>/ each (sd1, sd2, sdxl; diffusers AutoencoderTiny: TAESD, "
                     "TAESDXL) (default: SDAOT_TINY_VAE_DIR); the built-in weights have random ones.")
CONTROLNET_DIR_HELP = ("Folder of ControlNet downloads, DIR/<name>/ each (default: SDAOT_CONTROLNET_DIR); "
                       "needed with real model weights only.")


class SdaotGroup(click.Group):
    """Turns sdaot's own errors into a one-line message and exit status 2 instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SdaotError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=SdaotGroup)
def main() -> None:
    """sdaot: ahead-of-time compiled Stable Diffusion with a PyTorch fallback, served over HTTP."""
    use_all_cores()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models(as_json: bool) -> None:
    """List the model names sdaot serves, with family, native size and defaults."""
    rows = [
        {
            "name": m.name, "family": m.family, "native_resolution": str(m.native_resolution),
            "steps": m.default_steps, "cfg_scale": m.default_cfg_scale, "sampler": m.default_sampler,
            "hub_id": m.hub_id, "tvm_resolutions": [str(r) for r in m.tvm_resolutions], "description": m.description,
        }
        for m in all_models()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    fmt = "{:<17} {:<5} {:<10} {:>5} {:>5}  {:<8} {}"
    click.echo(fmt.format("MODEL", "FAM", "NATIVE", "STEPS", "CFG", "SAMPLER", "WEIGHTS (hub id)"))
    for r in rows:
        click.echo(fmt.format(r["name"], r["family"], r["native_resolution"], r["steps"], r["cfg_scale"],
                              r["sampler"], r["hub_id"]))


@main.command()
def samplers() -> None:
    """List sampler names and the diffusers scheduler each one uses."""
    from .samplers import SAMPLERS

    for spec in SAMPLERS.values():
        opts = ", ".join(f"{k}={v}" for k, v in spec.options.items())
        click.echo(f"{spec.name:<26} {spec.scheduler}" + (f" ({opts})" if opts else ""))


@main.command()
def presets() -> None:
    """List style presets and their prompt templates."""
    from .presets import presets as all_presets

    for name, template in all_presets().items():
        click.echo(f"{name:<22} {template['prompt']}")


def _read_image(path: str, param: str = "image"):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidRequestError(f"cannot read image file {path!r}: {exc}", param=param) from exc


def _parse_loras(specs: tuple[str, ...]) -> dict[str, float]:
    loras = {}
    for spec in specs:
        name, sep, weight = spec.partition("=")
        try:
            loras[name.strip()] = float(weight) if sep else 1.0
        except ValueError as exc:
            raise InvalidRequestError(f"--lora takes NAME=WEIGHT (got {spec!r})", param="loras") from exc
    return loras


def _output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() not in IMAGE_FORMATS:
        raise InvalidRequestError(f"output must end in one of {', '.join(IMAGE_FORMATS)} (got {output!r})",
                                  param="output")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


@main.command()
@click.option("--model", "model_name", required=True, help="Model name, e.g. SD1.5 (see `sdaot models`).")
@click.option("--weights", default=lambda: os.environ.get("SDAOT_WEIGHTS", "tiny"), show_default="tiny",
              help="tiny | random | diffusers folder | .safetensors file | hub[:ID].")
@click.option("--refiner-weights", default=None, help="Weights of the SDXL refiner (folder/file) for --enable-refiner.")
@click.option("--prompt", required=True)
@click.option("--prompt-2", default=None, help="Second prompt (SDXL's second text encoder).")
@click.option("--negative-prompt", default=None)
@click.option("--negative-prompt-2", default=None)
@click.option("--height", type=int, default=None, help="Multiple of 8; default: the model's native size.")
@click.option("--width", type=int, default=None)
@click.option("--steps", type=int, default=None)
@click.option("--cfg-scale", type=float, default=None)
@click.option("--sampler", default=None, help="See `sdaot samplers`.")
@click.option("--seed", type=int, default=None, help="Random when absent; printed at the end.")
@click.option("--image", "image_path", default=None, help="Start image for img2img.")
@click.option("--strength", type=float, default=0.8, show_default=True)
@click.option("--style-preset", default=None, help="See `sdaot presets`.")
@click.option("--enable-refiner", is_flag=True)
@click.option("--refiner-fraction", type=float, default=0.2, show_default=True)
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--backend", default="auto", show_default=True, help="auto | tvm | torch | onnxruntime")
@click.option("--artifacts", "artifacts_root", type=click.Path(path_type=Path), default=None,
              help="Compiled artifacts folder (default: SDAOT_ARTIFACTS or ./artifacts).")
@click.option("--controlnet-name", default=None, help="canny, depth, openpose, scribble, softedge or tile.")
@click.option("--controlnet-image", "controlnet_image_path", default=None,
              help="Control image (canny: any picture, edges are extracted; others: the prepared map).")
@click.option("--controlnet-conditioning-scale", type=float, default=None)
@click.option("--control-guidance-start", type=float, default=None)
@click.option("--control-guidance-end", type=float, default=None)
@click.option("--lora", "lora_specs", multiple=True, help="NAME=WEIGHT, repeatable (LoRA files in --lora-dir).")
@click.option("--lora-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of LoRA .safetensors files (default: SDAOT_LORA_DIR).")
@click.option("--controlnet-dir", type=click.Path(path_type=Path), default=None, help=CONTROLNET_DIR_HELP)
@click.option("--vae", type=click.Choice(["full", "tiny"]), default=None,
              help="Decoder: the model's VAE (default) or the tiny TAESD/TAESDXL one.")
@click.option("--tiny-vae-dir", type=click.Path(path_type=Path), default=None, help=TINY_VAE_DIR_HELP)
@click.option("-o", "--output", default="out.png", show_default=True, help="PNG, JPEG or WebP by extension.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
def generate(model_name: str, weights: str, refiner_weights: str | None, image_path: str | None, output: str,
             artifacts_root: Path | None, lora_specs: tuple[str, ...], lora_dir: Path | None,
             controlnet_dir: Path | None, controlnet_image_path: str | None, device: str, tiny_vae_dir: Path | None,
             **params) -> None:
    """Generate images from a prompt (txt2img, or img2img with --image)."""
    from tqdm import tqdm

    from .loader import load_pipeline
    from .request import parse_request

    data = {k: v for k, v in params.items() if v is not None}
    data["model_name"] = model_name
    if image_path is not None:
        data["image"] = _read_image(image_path)
    if controlnet_image_path is not None:
        data["controlnet_image"] = _read_image(controlnet_image_path, param="controlnet_image")
    if lora_specs:
        data["loras"] = _parse_loras(lora_specs)
    req = parse_request(data)
    paths = _output_paths(output, req.num_images)
    pipe = load_pipeline(model_name, weights, with_refiner=req.enable_refiner, refiner_weights=refiner_weights,
                         artifacts_root=artifacts_root, lora_folder=lora_dir, controlnet_folder=controlnet_dir,
                         tiny_vae_folder=tiny_vae_dir,
                         device=device)
    plan = pipe.plan(req)
    with tqdm(total=None, unit="step", desc=model_name, file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        result = pipe.generate(plan, progress=progress)
    for path, image in zip(paths, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format=IMAGE_FORMATS[path.suffix.lower()])
    backends = ", ".join(f"{k}={v}" for k, v in result.backends.items())
    for path, seed in zip(paths, result.seeds, strict=True):
        click.echo(f"wrote {path} (seed {seed})")
    click.echo(f"time {result.inference_time:.2f} s; backends: {backends}")


@main.command()
@click.option("--model", "model_name", required=True, help="Model name (see `sdaot models`).")
@click.option("--weights", default=lambda: os.environ.get("SDAOT_WEIGHTS", "tiny"), show_default="tiny",
              help="Weights whose architecture the artifacts are built for (the values are not baked in).")
@click.option("--resolution", "resolutions", multiple=True,
              help="WIDTHxHEIGHT, repeatable; default: the model's tvm resolutions (`sdaot models --json`).")
@click.option("--components", default=None,
              help="Comma-separated, e.g. unet,vae_decoder (default: all but vae_decoder_tiny, built when named; "
                   "its weights: SDAOT_TINY_VAE_DIR).")
@click.option("--batch", default=None, help="UNet batch sizes, e.g. 1,2 (default: 2 for CFG models, 1 for turbo).")
@click.option("--target", default="cpu", show_default=True, help="cpu | cuda | a TVM JSON target dict.")
@click.option("--controlnet", default=None,
              help="Also build the ControlNet and the residual-taking UNet (any name: one build serves all).")
@click.option("--tune", is_flag=True, help="Tune with MetaSchedule (CPU) before building.")
@click.option("--tune-budget", default="45m", show_default=True, help="Wall time for tuning, per component.")
@click.option("--tuning-db", type=click.Path(path_type=Path), default=None,
              help="Tuning database folder, shared by every model (default: <out>/tuning/<target>); its records are "
                   "applied to every CPU build, with or without --tune.")
@click.option("--trials-per-task", type=int, default=64, show_default=True)
@click.option("--tune-tasks", type=int, default=None, help="Tune only the N heaviest tasks of each component.")
@click.option("--conv-algorithm", type=click.Choice(["direct", "winograd", "auto"]), default="direct",
              show_default=True, help="3x3 convolutions: direct, Winograd F(4x4,3x3) wherever it fits, or Winograd "
                                      "where it saves time (CPU targets).")
@click.option("--weight-transforms", type=click.Choice(["per-call", "once"]), default="per-call", show_default=True,
              help="Compute what derives from the weights alone (transposes, Winograd weight transforms) on every "
                   "call, or once at load and after a weight changes (faster, more memory).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="bf16: matmuls (linear layers, Winograd's products) in bf16 with fp32 sums: on AMX tiles where the "
                   "CPU has amx_bf16, through vdpbf16ps where it has only AVX-512 BF16. Their artifacts sit beside "
                   "the fp32 ones; where both exist, auto/tvm run bf16 only when it is AMX (see `sdaot artifacts`).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Build each job as a task on a Ray cluster (ADDRESS, else RAY_ADDRESS or a local one); every "
                   "node must see --out and --tuning-db at the same paths. With --tune, each job tunes its own "
                   "copy of the database, merged back when all have ended.")
@click.option("--out", "root", type=click.Path(path_type=Path), default=None,
              help="Artifacts folder (default: SDAOT_ARTIFACTS or ./artifacts).")
def compile(model_name: str, weights: str, resolutions: tuple[str, ...], components: str | None,
            batch: str | None, target: str, controlnet: str | None, tune: bool, tune_budget: str,
            tuning_db: Path | None, trials_per_task: int, tune_tasks: int | None, conv_algorithm: str,
            weight_transforms: str, precision: str, ray_address: str | None, root: Path | None) -> None:
    """Export each component to ONNX, import it into TVM Relax and build it per resolution and batch."""
    from .artifacts import default_root
    from .loader import quiet_libraries
    from .registry import get_model
    from .targets import resolve_target, target_key
    from .weights import load_weights

    try:
        from sdaot.compiler.compile import build_target, compile_model, plan_compile
        from sdaot.compiler.tuning import tuning_options
    except ImportError as exc:
        raise SdaotError(f"compiling needs the compile extra (pip install 'sdaot[compile]'): {exc}") from exc

    quiet_libraries()
    spec = get_model(model_name)
    sizes = [Resolution.parse(r) for r in resolutions] if resolutions else list(spec.tvm_resolutions)
    try:
        batches = [int(b) for b in batch.split(",")] if batch else None
    except ValueError as exc:
        raise InvalidRequestError(f"batch must be comma-separated integers (got {batch!r})", param="batch") from exc
    tvm_target = build_target(resolve_target(target), conv_algorithm, precision)
    root = root or default_root()
    tuning = tuning_options((tuning_db or root / "tuning" / target_key(tvm_target)).resolve(), tune, tune_budget,
                            trials_per_task, tune_tasks, tvm_target.kind.name, log=click.echo)
    if ray_address is not None:
        from sdaot.compiler.ray_compile import RemoteBuild, compile_on_ray

        bundle = load_weights(spec, weights)
        plan = plan_compile(bundle, sizes, components.split(",") if components else None, batches, tvm_target, root,
                            controlnet, conv_algorithm, precision, log=click.echo)
        source = str(Path(weights).resolve()) if Path(weights).exists() else weights
        build = RemoteBuild(spec.name, source, json.loads(str(plan.target)), str(root.resolve()), controlnet,
                            tuning, conv_algorithm, weight_transforms, precision)
        compile_on_ray(plan, build, ray_address, log=click.echo)
        return
    compile_model(load_weights(spec, weights), sizes, components.split(",") if components else None, batches,
                  tvm_target, root, controlnet, tuning, conv_algorithm, weight_transforms, precision=precision,
                  log=click.echo)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--dir", "root", type=click.Path(path_type=Path), default=None, help="Artifacts folder.")
def artifacts(as_json: bool, root: Path | None) -> None:
    """List compiled artifacts: model, component, resolution, batch, target, precision, tuned, size on disk, and
    whether `--backend auto|tvm` runs it on this machine (where fp32 and bf16 twins exist, the faster one here)."""
    from .artifacts import list_artifacts
    from .selection import which_runs

    found = list_artifacts(root)
    runs = which_runs(found)
    rows = [a.summary() | {"runs": runs[a.path]} for a in found]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    fmt = "{:<17} {:<15} {:<10} {:>5}  {:<16} {:<9} {:<5} {:>9}  {}"
    click.echo(fmt.format("MODEL", "COMPONENT", "RESOLUTION", "BATCH", "TARGET", "PRECISION", "TUNED", "SIZE", "RUNS"))
    for r in rows:
        click.echo(fmt.format(r["model"], r["component"], r["resolution"], r["batch"], r["target"], r["precision"],
                              "yes" if r["tuned"] else "no", f"{r['size_bytes'] / 1e6:.1f} MB", r["runs"]))
    if not rows:
        click.echo("(none: build some with `sdaot compile --model SD1.5 --resolution 512x512`)")


@main.command()
@click.option("--model", "model_name", required=True)
@click.option("--weights", default="random", show_default=True, help="random = full-size architecture.")
@click.option("--resolution", default=None, help="WIDTHxHEIGHT (default: the model's native size).")
@click.option("--backends", default=None,
              help="Any of tvm, tvm-bf16 (the --precision bf16 artifact), tvm-untuned, onnxruntime-artifact (the "
                   "runtime's onnxruntime backend), the peers "
                   "onnxruntime, openvino, openvino-f32 (plain exports as their users run them), torch-bf16 (eager "
                   "torch under bf16 autocast), torch, torch-compile. Default: "
                   "tvm,onnxruntime,openvino,openvino-f32,torch, with torch-bf16 after openvino on CPUs with "
                   "avx512_bf16.")
@click.option("--components", default="unet,vae_decoder,text_encoder", show_default=True)
@click.option("--steps", type=int, default=20, show_default=True, help="UNet calls per image, for end-to-end time.")
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True)
@click.option("--target", default="cpu", show_default=True)
@click.option("--artifacts", "artifacts_root", type=click.Path(path_type=Path), default=None,
              help="Where the `tvm` backend finds the artifacts `sdaot compile` built (none: `tvm` is skipped).")
@click.option("--profile", is_flag=True,
              help="Also time each function of one tvm call (kernels and runtime builtins), slowest first.")
@click.option("--quality-steps", type=int, default=0, show_default=True,
              help="Also generate one image with these steps on the --artifacts (backend auto) and on torch, and "
                   "report their PSNR against the 35 dB gate (0: skip).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("benchmarks/results"),
              show_default=True)
def bench(model_name: str, weights: str, resolution: str | None, backends: str | None, components: str, steps: int,
          warmup: int, repeat: int, target: str, artifacts_root: Path | None, profile: bool, quality_steps: int,
          out_dir: Path) -> None:
    """Time every backend on the same inputs in one process; write JSON, Markdown and a chart."""
    try:
        from sdaot.benchmarks.peers import default_backends
        from sdaot.benchmarks.runner import BACKENDS, markdown, run_bench
    except ImportError as exc:
        raise SdaotError(f"benchmarking needs the bench extra (pip install 'sdaot[bench]'): {exc}") from exc

    from .loader import quiet_libraries
    from .registry import get_model
    from .targets import resolve_target
    from .weights import load_weights

    quiet_libraries()
    spec = get_model(model_name)
    chosen = [b.strip() for b in backends.split(",") if b.strip()] if backends is not None else default_backends()
    for b in chosen:
        if b not in BACKENDS:
            raise InvalidRequestError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}", param="backends")
    if repeat < 1 or warmup < 0 or steps < 1:
        raise InvalidRequestError("repeat and steps must be >= 1, warmup >= 0", param="repeat")
    if quality_steps < 0:
        raise InvalidRequestError("must be >= 0", param="quality_steps")
    size = Resolution.parse(resolution) if resolution else spec.native_resolution
    bundle = load_weights(spec, weights)
    report = run_bench(bundle, size, [c.strip() for c in components.split(",")], chosen, resolve_target(target),
                       artifacts_root, steps, warmup, repeat, out_dir, log=click.echo, profile=profile,
                       quality_steps=quality_steps)
    click.echo(markdown(report))


@main.command()
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
@click.option("--lora-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of LoRA .safetensors files (default: SDAOT_LORA_DIR).")
@click.option("--controlnet-dir", type=click.Path(path_type=Path), default=None, help=CONTROLNET_DIR_HELP)
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
def serve(host: str, port: int, root_path: str, weights: str, models: str, artifacts_root: Path | None, workers: int,
          queue_size: int, timeout_s: float, api_key_file: Path | None, insecure_no_auth: bool,
          lora_dir: Path | None, controlnet_dir: Path | None, max_queued_jobs: int, keep_finished_s: float,
          keep_finished: int, keep_finished_bytes: int, max_jobs_per_key: int, max_event_streams: int,
          max_event_streams_per_key: int, webhook_allow: str, device: str, ray_address: str | None, replicas: int,
          min_replicas: int,
          max_replicas: int | None, target_ongoing_requests: float, replica_cpus: float,
          replica_gpus: float) -> None:
    """Serve the web page at /, POST /v1/image/generation (the reference API), the jobs API (/v1/jobs), plus
    /v1/models, /healthz, /readyz, /metrics; with --ray, the same API through Ray Serve."""
    import logging

    from .registry import get_model

    try:
        import uvicorn

        from .access import is_loopback
        from .server import create_app
        from .serving import ServerConfig
    except ImportError as exc:
        raise SdaotError(f"serving needs the serve extra (pip install 'sdaot[serve]'): {exc}") from exc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = [k.strip() for k in os.environ.get("SDAOT_API_KEYS", "").split(",") if k.strip()]
    if api_key_file:
        keys += [line.strip() for line in api_key_file.read_text().splitlines() if line.strip()]
    if not keys and not is_loopback(host):
        if not insecure_no_auth:
            raise InvalidRequestError(f"refusing to serve {host} without API keys: set SDAOT_API_KEYS or "
                                      "--api-key-file, or pass --insecure-no-auth", param="host")
        click.echo(f"WARNING: serving {host} with no authentication", err=True)
    elif not keys:
        click.echo(f"no API keys configured: serving loopback address {host} only, without authentication", err=True)
    if workers < 1 or queue_size < 0:
        raise InvalidRequestError("workers must be >= 1 and queue-size >= 0", param="workers")
    if ray_address is None:
        from .devices import pick_device

        pick_device(device)
    if max_queued_jobs < 0 or keep_finished < 0 or keep_finished_s < 0 or keep_finished_bytes < 0:
        raise InvalidRequestError("must be >= 0", param="max_queued_jobs, keep_finished, keep_finished_count, "
                                  "keep_finished_bytes")
    if min(max_jobs_per_key, max_event_streams, max_event_streams_per_key) < 1:
        raise InvalidRequestError("must be >= 1", param="max_jobs_per_key, max_event_streams, "
                                  "max_event_streams_per_key")
    names = [get_model(n.strip()).name for n in models.split(",") if n.strip()]
    if ray_address is None and workers > len(names):
        click.echo(f"--workers {workers} with {len(names)} model(s): generations of one model run one at a time "
                   f"(its weights hold one LoRA set), so at most {len(names)} run at once", err=True)
    config = ServerConfig(models=names, weights=weights, artifacts_root=artifacts_root, api_keys=keys,
                          workers=workers, queue_size=queue_size, timeout_s=timeout_s, lora_folder=lora_dir,
                          controlnet_folder=controlnet_dir, max_queued_jobs=max_queued_jobs,
                          keep_finished_s=keep_finished_s, keep_finished=keep_finished,
                          keep_finished_bytes=keep_finished_bytes, max_jobs_per_key=max_jobs_per_key,
                          max_event_streams=max_event_streams, max_event_streams_per_key=max_event_streams_per_key,
                          webhook_allow=[h.strip() for h in webhook_allow.split(",") if h.strip()], device=device,
                          host=host)
    root_path = root_path.rstrip("/")
    if root_path and not root_path.startswith("/"):
        raise InvalidRequestError(f"must start with / (got {root_path!r})", param="root_path")
    if root_path and ray_address is not None:
        raise InvalidRequestError("is for a proxy in front of uvicorn; under Ray Serve set the application's "
                                  "route_prefix instead", param="root_path")
    if ray_address is not None:
        try:
            from .ray_app import Scaling, build_app, serve_on_ray
        except ImportError as exc:
            raise SdaotError(f"--ray needs the ray extra (pip install 'sdaot[ray]'): {exc}") from exc
        scaling = Scaling(replicas, min_replicas, max_replicas, target_ongoing_requests, replica_cpus, replica_gpus)
        serve_on_ray(build_app(config, scaling), ray_address, host, port, say=click.echo)
        return
    uvicorn.run(create_app(config), host=host, port=port, root_path=root_path, log_level="info",
                timeout_graceful_shutdown=60)


if __name__ == "__main__":
    main()
