"""`sdaot compile`: build a model's artifacts (the only command that reaches into `sdaot.compiler`)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import click

from ..build_choices import CONV_ALGORITHMS, PRECISIONS, WEIGHT_TRANSFORMS
from ..errors import InvalidRequestError, SdaotError
from ..resolution import Resolution


@click.command()
@click.option("--model", "model_name", required=True, help="Model name (see `sdaot models`).")
@click.option("--weights", default=lambda: os.environ.get("SDAOT_WEIGHTS", "tiny"), show_default="tiny",
              help="Weights whose architecture the artifacts are built for (the values are not baked in).")
@click.option("--resolution", "resolutions", multiple=True,
              help="WIDTHxHEIGHT, repeatable; default: the model's tvm resolutions (`sdaot models --json`).")
@click.option("--components", default=None,
              help="Comma-separated, e.g. unet,vae_decoder (default: all but vae_decoder_tiny, built when named, "
                   "its weights: SDAOT_TINY_VAE_DIR; and DeepCache's unet_cached,unet_shallow, for branch 0).")
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
@click.option("--conv-algorithm", type=click.Choice(CONV_ALGORITHMS), default=CONV_ALGORITHMS[0],
              show_default=True, help="3x3 convolutions: direct, Winograd F(4x4,3x3) wherever it fits, or Winograd "
                                      "where it saves time (CPU targets).")
@click.option("--weight-transforms", type=click.Choice(WEIGHT_TRANSFORMS), default=WEIGHT_TRANSFORMS[0],
              show_default=True,
              help="Compute what derives from the weights alone (transposes, Winograd weight transforms) on every "
                   "call, or once at load and after a weight changes (faster, more memory).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=PRECISIONS[0], show_default=True,
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
    from ..artifacts import default_root
    from ..loader import quiet_libraries
    from ..registry import get_model
    from ..targets import resolve_target, target_key
    from ..weights import load_weights

    try:
        from sdaot.compiler.compile import compile_model, plan_compile
        from sdaot.compiler.options import BuildOptions
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
    options = BuildOptions(conv_algorithm, weight_transforms, precision)
    tvm_target = options.check(resolve_target(target))
    root = root or default_root()
    options = replace(options, tuning=tuning_options(
        (tuning_db or root / "tuning" / target_key(tvm_target)).resolve(), tune, tune_budget, trials_per_task,
        tune_tasks, tvm_target.kind.name, log=click.echo))
    names = components.split(",") if components else None
    if ray_address is not None:
        from .ray_compile import RemoteBuild, compile_on_ray

        plan = plan_compile(load_weights(spec, weights), sizes, names, batches, tvm_target, root, controlnet, options,
                            log=click.echo)
        source = str(Path(weights).resolve()) if Path(weights).exists() else weights
        build = RemoteBuild(spec.name, source, json.loads(str(plan.target)), str(root.resolve()), controlnet, options)
        compile_on_ray(plan, build, ray_address, log=click.echo)
        return
    compile_model(load_weights(spec, weights), sizes, names, batches, tvm_target, root, controlnet, options,
                  log=click.echo)

