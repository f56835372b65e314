"""`sdaot bench`: every backend timed side by side in one run (reaches into `sdaot.benchmarks`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from ..errors import InvalidRequestError, SdaotError
from ..resolution import Resolution


@click.command()
@click.option("--model", "model_name", default=None, help="The model whose networks are timed (not with --recipes).")
@click.option("--weights", default="random", show_default=True, help="random = full-size architecture.")
@click.option("--resolution", default=None,
              help="WIDTHxHEIGHT (default: the model's native size; with --recipes, each recipe's own).")
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
@click.option("--recipes", is_flag=False, flag_value="all", default=None,
              help="Time to image instead: whole images of each recipe (all, or a comma list of "
                   "sd15-euler-20, sd15-euler-20-deepcache-2/-3/-5, sd15-lcm-4, sd15-lcm-4-tiny-vae, "
                   "sdxl-turbo-1-tiny-vae) on sdaot (auto, with --artifacts), openvino and torch (or those "
                   "--backends names); --repeat images each after a 2-step warm-up.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("benchmarks/results"),
              show_default=True)
def bench(model_name: str, weights: str, resolution: str | None, backends: str | None, components: str, steps: int,
          warmup: int, repeat: int, target: str, artifacts_root: Path | None, profile: bool, quality_steps: int,
          recipes: str | None, out_dir: Path) -> None:
    """Time every backend on the same inputs in one process; write JSON, Markdown and a chart."""
    if recipes is not None:
        bench_recipes(recipes, weights, resolution, backends, artifacts_root, repeat, out_dir)
        return
    if model_name is None:
        raise InvalidRequestError("name the --model whose networks to time, or ask for --recipes", param="model")
    try:
        from sdaot.benchmarks.peers import default_backends
        from sdaot.benchmarks.report import markdown
        from sdaot.benchmarks.runner import BACKENDS, run_bench
    except ImportError as exc:
        raise SdaotError(f"benchmarking needs the bench extra (pip install 'sdaot[bench]'): {exc}") from exc

    from ..loader import quiet_libraries
    from ..registry import get_model
    from ..targets import resolve_target
    from ..weights import load_weights

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



def bench_recipes(names: str, weights: str, resolution: str | None, backends: str | None,
                  artifacts_root: Path | None, repeat: int, out_dir: Path) -> None:
    """`--recipes`: whole images of each named recipe on the recipe backends (all, or those `backends` names;
    at `resolution` instead of each recipe's own size, when given)."""
    try:
        from sdaot.benchmarks.recipes import RECIPE_BACKENDS, RECIPE_NAMES, RECIPES, recipes_markdown, run_recipes
    except ImportError as exc:
        raise SdaotError(f"benchmarking needs the bench extra (pip install 'sdaot[bench]'): {exc}") from exc
    from ..loader import quiet_libraries

    chosen = list(RECIPES) if names == "all" else []
    for name in ([] if names == "all" else [n.strip() for n in names.split(",") if n.strip()]):
        if name not in RECIPE_NAMES:
            raise InvalidRequestError(f"unknown recipe {name!r}; choose from all, {', '.join(RECIPE_NAMES)}",
                                      param="recipes")
        chosen.append(RECIPE_NAMES[name])
    wanted = tuple(b.strip() for b in backends.split(",") if b.strip()) if backends else RECIPE_BACKENDS
    for backend in wanted:
        if backend not in RECIPE_BACKENDS:
            raise InvalidRequestError(f"unknown recipe backend {backend!r}; choose from {', '.join(RECIPE_BACKENDS)}",
                                      param="backends")
    if resolution:
        chosen = [replace(recipe, size=str(Resolution.parse(resolution))) for recipe in chosen]
    if not chosen or repeat < 1:
        raise InvalidRequestError("name at least one recipe, and --repeat >= 1", param="recipes")
    quiet_libraries()
    click.echo(recipes_markdown(run_recipes(chosen, weights, artifacts_root, repeat, out_dir, log=click.echo,
                                            backends=wanted)))
