"""`sdaot generate`: one request from the command line, images written to files, progress on stderr."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..errors import InvalidRequestError
from .options import CONTROLNET_DIR_HELP, DEVICE_HELP, IMAGE_FORMATS, LORA_DIR_HELP, TINY_VAE_DIR_HELP


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


@click.command()
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
@click.option("--lora-dir", type=click.Path(path_type=Path), default=None, help=LORA_DIR_HELP)
@click.option("--controlnet-dir", type=click.Path(path_type=Path), default=None, help=CONTROLNET_DIR_HELP)
@click.option("--prompt-syntax", type=click.Choice(["a1111", "plain"]), default=None,
              help="a1111 (default): (word:1.3), [word], BREAK, <lora:name:weight>, prompts past 77 tokens; "
                   "plain: the text as it is, cut at 77 tokens.")
@click.option("--vae", type=click.Choice(["full", "tiny"]), default=None,
              help="Decoder: the model's VAE (default) or the tiny TAESD/TAESDXL one.")
@click.option("--tiny-vae-dir", type=click.Path(path_type=Path), default=None, help=TINY_VAE_DIR_HELP)
@click.option("--deepcache-interval", type=int, default=None,
              help="DeepCache: the full UNet every N-th step, a shallow one reusing its deep features between (0: off)")
@click.option("--deepcache-branch", type=int, default=None,
              help="DeepCache's cache_branch_id: where the shallow UNet turns (0, the default, is the shallowest).")
@click.option("-o", "--output", default="out.png", show_default=True, help="PNG, JPEG or WebP by extension.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
def generate(model_name: str, weights: str, refiner_weights: str | None, image_path: str | None, output: str,
             artifacts_root: Path | None, lora_specs: tuple[str, ...], lora_dir: Path | None,
             controlnet_dir: Path | None, controlnet_image_path: str | None, device: str, tiny_vae_dir: Path | None,
             **params) -> None:
    """Generate images from a prompt (txt2img, or img2img with --image)."""
    from tqdm import tqdm

    from ..loader import load_pipeline
    from ..request import parse_request

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


