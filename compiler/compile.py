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
from sdaot.runtime.component_table import COMPONENTS, BatchRule, Modules, component_modules, example_inputs
from sdaot.runtime.components import controlnet_modules
from sdaot.runtime.controlnet import get_controlnet_name, load_controlnet
from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.resolution import Resolution
from sdaot.runtime.targets import target_json, target_key
from sdaot.runtime.weights import ModelBundle

from .export import ExportedGraph, export_component
from .options import DEFAULT_BUILD, BuildOptions
from .tvm_build import build_library


@dataclass(frozen=True)
class CompileJob:
    """One artifact to build: a component at a resolution (None for size-free ones) and a batch size."""

    component: str
    resolution: Resolution | None
    batch: int

    def describe(self) -> str:
        return f"{self.component} {resolution_key(self.resolution)} b{self.batch}"

    def example_inputs(self, bundle: ModelBundle, modules: Modules) -> tuple[torch.Tensor, ...]:
        """Inputs of this job's shapes for tracing its component."""
        return example_inputs(bundle, self.component, self.resolution, self.batch, modules)


def compile_modules(bundle: ModelBundle, controlnet: str | None = None) -> dict[str, torch.nn.Module]:
    """Every module that can be compiled for the model, plus the ControlNet pair when one is named."""
    modules = component_modules(bundle)
    if controlnet:
        modules |= controlnet_modules(bundle, load_controlnet(bundle, get_controlnet_name(controlnet)))
    return modules


def guided_batch(bundle: ModelBundle) -> int:
    """The denoiser's batch for one image at the model's default CFG scale (2 where guidance runs)."""
    return BatchRule.GUIDED.rows(1, bundle.spec.default_cfg_scale > 1.0)


def plan_jobs(bundle: ModelBundle, resolutions: list[Resolution], components: list[str] | None,
              batches: list[int] | None, modules: dict[str, torch.nn.Module] | None = None) -> list[CompileJob]:
    """Every (component, resolution, batch) to build; size-free components once, the denoiser per batch size."""
    available = list(modules or component_modules(bundle))
    components = components or [name for name in available if COMPONENTS[name].built_by_default]
    for name in components:
        if name not in available:
            raise InvalidRequestError(f"{bundle.spec.name} has no component {name!r}; it has {', '.join(available)}",
                                      param="components")
    batches = batches or [guided_batch(bundle)]
    jobs = []
    for name in components:
        spec = COMPONENTS[name]
        for res in [None] if spec.size_free else resolutions:
            jobs += [CompileJob(name, res, batch) for batch in spec.batch.compiled_batches(batches)]
    return jobs


@dataclass(frozen=True)
class CompilePlan:
    """What one `sdaot compile` builds: the checked target, the modules and the jobs, in order."""

    target: Any
    modules: dict[str, torch.nn.Module]
    jobs: list[CompileJob]


def plan_compile(bundle: ModelBundle, resolutions: list[Resolution], components: list[str] | None,
                 batches: list[int] | None, target: Any, root: Path, controlnet: str | None = None,
                 options: BuildOptions = DEFAULT_BUILD, log: Callable[[str], None] = print) -> CompilePlan:
    """Check the options, plan the jobs and remove what killed compiles left in `root`: the start of every
    compile, local or on a cluster."""
    target = options.check(target)
    modules = compile_modules(bundle, controlnet)
    jobs = plan_jobs(bundle, resolutions, components, batches, modules)
    if remove_stale_temporaries(root):
        log("removed temporary folders left by an interrupted compile")
    log(f"compiling {len(jobs)} {options.precision} artifacts of {bundle.spec.name} for {target_key(target)} "
        f"into {root}")
    return CompilePlan(target, modules, jobs)


def compile_model(bundle: ModelBundle, resolutions: list[Resolution], components: list[str] | None,
                  batches: list[int] | None, target: Any, root: Path, controlnet: str | None = None,
                  options: BuildOptions = DEFAULT_BUILD, log: Callable[[str], None] = print) -> list[Path]:
    """`sdaot compile`: every artifact of the model that the arguments ask for, one after another. Returns the
    artifact folders."""
    plan = plan_compile(bundle, resolutions, components, batches, target, root, controlnet, options, log)
    paths = []
    for i, job in enumerate(plan.jobs, 1):
        log(f"[{i}/{len(plan.jobs)}] {job.describe()}")
        start = time.perf_counter()
        paths.append(compile_job(bundle, job, plan.target, root, log=log, modules=plan.modules, options=options))
        log(f"  done in {time.perf_counter() - start:.1f} s -> {paths[-1]}")
    return paths


def compile_job(bundle: ModelBundle, job: CompileJob, target: Any, root: Path,
                log: Callable[[str], None] = print, modules: dict[str, torch.nn.Module] | None = None,
                options: BuildOptions = DEFAULT_BUILD) -> Path:
    """Build one artifact into a temporary folder (for a target `options` were checked against), then rename it
    into place (never a half artifact)."""
    final = artifact_dir(root, bundle.spec.name, job.component, job.resolution, job.batch, target_key(target),
                         options.precision)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / _temporary_name("tmp")
    tmp.mkdir()
    try:
        start = time.perf_counter()
        modules = modules or component_modules(bundle)
        graph = export_component(modules[job.component], job.example_inputs(bundle, modules))
        onnx.save(graph.model, str(tmp / "model.onnx"))
        exported = time.perf_counter()
        log(f"  exported ONNX in {exported - start:.1f} s ({len(graph.weights)} weight inputs)")
        info = build_library(graph.model, target, tmp / "lib.so", options, log=log, num_inputs=len(graph.inputs))
        built = time.perf_counter()
        log(f"  built TVM library in {built - exported:.1f} s ({info.describe(options)})")
        describe_artifact(bundle, job, graph, target, lib_sha256=file_sha256(tmp / "lib.so"),
                          tuned_functions=info.scheduled_functions, total_functions=info.total_functions,
                          tuning=asdict(info.tuning) if info.tuning else None,
                          winograd_convolutions=info.winograd_convolutions, build_seconds=round(built - start, 2),
                          **options.manifest_fields()).write(tmp)
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
