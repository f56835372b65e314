"""`sdaot compile`: export, import and build each component per resolution and batch, written atomically."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from sdaot.runtime import __version__
from sdaot.runtime.artifacts import (
    FORMAT_VERSION,
    Manifest,
    artifact_dir,
    file_sha256,
    resolution_key,
    weights_signature,
)
from sdaot.runtime.components import component_modules, controlnet_modules
from sdaot.runtime.controlnet import get_controlnet_name, load_controlnet
from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.targets import target_json, target_key
from sdaot.runtime.weights import ModelBundle

from .export import ExportedGraph, export_component
from .tvm_build import TuningOptions, build_library

SIZE_FREE = ("text_encoder", "text_encoder_2")
BATCHED = ("unet", "controlnet", "unet_controlnet")


@dataclass(frozen=True)
class CompileJob:
    """One artifact to build: a component at a resolution (None for size-free ones) and a batch size."""

    component: str
    resolution: tuple[int, int] | None
    batch: int

    def describe(self) -> str:
        return f"{self.component} {resolution_key(self.resolution)} b{self.batch}"


def parse_resolution(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height), both multiples of 8."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise InvalidRequestError(f"resolution must look like 512x768 (got {text!r})", param="resolution") from exc
    if width % 8 or height % 8 or min(width, height) < 64:
        raise InvalidRequestError(f"resolution sides must be multiples of 8, at least 64 (got {text})",
                                  param="resolution")
    return width, height


def compile_modules(bundle: ModelBundle, controlnet: str | None = None) -> dict[str, torch.nn.Module]:
    """Every module that can be compiled for the model, plus the ControlNet pair when one is named."""
    modules = component_modules(bundle)
    if controlnet:
        modules |= controlnet_modules(bundle, load_controlnet(bundle, get_controlnet_name(controlnet)))
    return modules


def plan_jobs(bundle: ModelBundle, resolutions: list[tuple[int, int]], components: list[str] | None,
              batches: list[int] | None, modules: dict[str, torch.nn.Module] | None = None) -> list[CompileJob]:
    """Every (component, resolution, batch) to build; text encoders once, the UNet per CFG batch size."""
    available = list(modules or component_modules(bundle))
    components = components or available
    for name in components:
        if name not in available:
            raise InvalidRequestError(f"{bundle.spec.name} has no component {name!r}; it has {', '.join(available)}",
                                      param="components")
    if batches is None:
        batches = [1] if bundle.spec.default_cfg_scale <= 1.0 else [2]
    jobs = []
    for name in components:
        if name in SIZE_FREE:
            jobs.append(CompileJob(name, None, 1))
            continue
        for res in resolutions:
            for batch in batches if name in BATCHED else [1]:
                jobs.append(CompileJob(name, res, batch))
    return jobs


def example_inputs(bundle: ModelBundle, job: CompileJob,
                   modules: dict[str, torch.nn.Module] | None = None) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shape and dtype for tracing one component."""
    b = job.batch
    if job.component in SIZE_FREE:
        return (torch.zeros(b, 77, dtype=torch.int64),)
    width, height = job.resolution
    latent = (b, bundle.unet.config.in_channels, height // 8, width // 8)
    if job.component == "vae_decoder":
        return (torch.randn(latent),)
    if job.component == "vae_encoder":
        return (torch.randn(b, 3, height, width),)
    unet = bundle.unet.config
    args = [torch.randn(latent), torch.full((b,), 500.0), torch.randn(b, 77, unet.cross_attention_dim)]
    if unet.addition_embed_type == "text_time":
        time_ids = 5 if bundle.spec.requires_aesthetics_score else 6
        pooled = unet.projection_class_embeddings_input_dim - time_ids * unet.addition_time_embed_dim
        args += [torch.randn(b, pooled), torch.randn(b, time_ids)]
    if job.component == "unet":
        return tuple(args)
    control = [torch.rand(b, 3, height, width), torch.ones(b)]
    controlnet_args = (*args[:3], *control, *args[3:])
    if job.component == "controlnet":
        return controlnet_args
    with torch.inference_mode():
        residuals = modules["controlnet"](*controlnet_args)
    return (*args, *residuals)


def compile_job(bundle: ModelBundle, job: CompileJob, target: Any, root: Path,
                log: Callable[[str], None] = print, modules: dict[str, torch.nn.Module] | None = None,
                tuning: TuningOptions | None = None, conv_algorithm: str = "direct",
                weight_transforms: str = "per-call") -> Path:
    """Build one artifact into a temporary folder, then rename it into place (never a half artifact)."""

    final = artifact_dir(root, bundle.spec.name, job.component, job.resolution, job.batch, target_key(target))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / _temporary_name("tmp")
    tmp.mkdir()
    try:
        start = time.perf_counter()
        modules = modules or component_modules(bundle)
        graph = export_component(modules[job.component], example_inputs(bundle, job, modules))
        onnx.save(graph.model, str(tmp / "model.onnx"))
        exported = time.perf_counter()
        log(f"  exported ONNX in {exported - start:.1f} s ({len(graph.weights)} weight inputs)")
        info = build_library(graph.model, target, tmp / "lib.so", tuning=tuning, log=log,
                             conv_algorithm=conv_algorithm, weight_transforms=weight_transforms,
                             num_inputs=len(graph.inputs))
        built = time.perf_counter()
        tuned_note = f", {info.scheduled_functions} with tuned schedules" if tuning else ""
        winograd_note = f", {info.winograd_convolutions} convolutions by Winograd" if conv_algorithm != "direct" else ""
        log(f"  built TVM library in {built - exported:.1f} s ({info.total_functions} kernels{tuned_note}"
            f"{winograd_note})")
        describe_artifact(bundle, job, graph, target, lib_sha256=file_sha256(tmp / "lib.so"),
                          tuned_functions=info.scheduled_functions, total_functions=info.total_functions,
                          tuning=asdict(info.tuning) if info.tuning else None,
                          tuning_database=str(tuning.database) if tuning else None, conv_algorithm=conv_algorithm,
                          winograd_convolutions=info.winograd_convolutions, weight_transforms=weight_transforms,
                          build_seconds=round(built - start, 2)).write(tmp)
        if final.exists():
            old = final.parent / _temporary_name("old")
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe_artifact(bundle: ModelBundle, job: CompileJob, graph: ExportedGraph, target: Any,
                      lib_sha256: str | None, **build: Any) -> Manifest:
    """The manifest of an artifact of `job` holding `graph` (and a library of that hash, if any); `build`
    holds the build facts (tuning, algorithms, seconds)."""
    import tvm

    return Manifest(
        format_version=FORMAT_VERSION, sdaot_version=__version__, tvm_version=tvm.__version__,
        model=bundle.spec.name, family=bundle.spec.family, component=job.component,
        resolution=resolution_key(job.resolution), batch=job.batch, inputs=graph.inputs, outputs=graph.outputs,
        weights=graph.weights, weights_signature=weights_signature(graph.weights), weight_source=bundle.source,
        target=target_json(target), target_key=target_key(target), onnx_sha256=graph.sha256,
        lib_sha256=lib_sha256, tuned=build.get("tuned_functions", 0) > 0,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **build)


def _temporary_name(kind: str) -> str:
    """`.tmp-<pid>-<random>` (being written) or `.old-<pid>-<random>` (being replaced): the pid says whose."""
    return f".{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temporaries(root: Path) -> int:
    """Delete the temporary folders that killed compiles left, and only those: a folder whose writer is
    still running (another compile into the same root) is left alone. Returns how many were deleted.

    The writer is known by the pid in the folder's name, so this holds for compiles on one machine; compiles
    on several machines into one shared root must not overlap."""
    stale = [p for kind in ("tmp", "old") for p in root.glob(f"*/*/.{kind}-*")
             if p.is_dir() and not _writer_alive(p.name)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def _writer_alive(name: str) -> bool:
    pid = name.split("-")[1]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
