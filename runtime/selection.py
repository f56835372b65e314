"""Which backend runs each component of a request: `torch`, `tvm`, `onnxruntime`, or `auto`.

`auto` takes tvm wherever an artifact matches (model, component, resolution, batch, a target the pipeline's
device runs: on a GPU a CUDA build for its architecture; on the CPU its own target, or an instruction set it
has, such as an AVX2 build on an AVX-512 machine) and loads cleanly, torch elsewhere; a broken artifact
under `auto` logs a warning and falls back to torch, under `tvm`/`onnxruntime` it is an error that says why.

Where artifacts of both precisions fit, the faster one on this CPU runs (`prefers_bf16`): bf16 when its
matmuls run on AMX tiles, fp32 when they run through `vdpbf16ps`, which was slower than fp32 on a Sapphire
Rapids Xeon (SD1.5 UNet 7.99 s against 6.34 s) and on Zen 4 (benchmarks/README.md). AMX artifacts run
only once Linux has granted this process AMX tile state (runtime/amx.py); where it refuses, they are
skipped, so `auto` falls back and `tvm` says why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .amx import amx_refusal
from .artifacts import Artifact, default_root, list_artifacts, resolution_key, uses_amx, warn_if_writable
from .compiled import OnnxRuntimeComponent, TvmComponent, check_artifact
from .components import Component, TorchComponent
from .errors import BackendUnavailableError
from .resolution import Resolution
from .targets import cuda_target_key, device_target_key

log = logging.getLogger(__name__)
COMPILED = {"tvm": TvmComponent, "onnxruntime": OnnxRuntimeComponent}


class ComponentSelector:
    """Finds, checks, loads and caches compiled components for one model."""

    def __init__(self, model: str, torch_components: dict[str, TorchComponent], root: Path | None = None,
                 device: torch.device | None = None) -> None:
        self.model = model
        self.torch_components = torch_components
        self.root = root
        self.device = device or torch.device("cpu")
        self._loaded: dict[tuple[str, str, str, int], Component] = {}
        self._listed: list[Artifact] = []
        self._runnable: list[Artifact] = []
        self.rescan()

    def rescan(self) -> None:
        """List this model's artifacts under the root (at start-up, and when the server gets SIGHUP: never per
        request), warning about any that others than their owner may write."""
        self._listed = [a for a in list_artifacts(self.root) if a.model == self.model]
        self._runnable = [a for a in self._listed if runs_here(a, self.device)]
        warn_if_writable(self.root or default_root(), self._listed)

    def artifacts(self) -> list[Artifact]:
        """This model's artifacts that run on this pipeline's device, as last listed."""
        return list(self._runnable)

    def compiled_resolutions(self) -> list[str]:
        """Resolutions with a compiled UNet, as WIDTHxHEIGHT."""
        return sorted({a.resolution for a in self.artifacts() if a.component == "unet"})

    def select(self, backend: str, needs: dict[str, tuple[Resolution | None, int]],
               extra_torch: dict[str, TorchComponent] | None = None) -> dict[str, Component]:
        """One component per needed name; `needs` maps name -> (resolution or None, total batch).

        `extra_torch` adds per-request torch components (the chosen ControlNet) to the model's own.
        """
        torch_components = self.torch_components | (extra_torch or {})
        if backend == "torch":
            return {name: torch_components[name] for name in needs}
        found = self.artifacts()
        chosen: dict[str, Component] = {}
        for name, (resolution, total) in needs.items():
            kind = "tvm" if backend == "auto" else backend
            artifact = _best(found, name, resolution_key(resolution), total, self.device)
            if artifact is None:
                if backend == "auto":
                    chosen[name] = torch_components[name]
                    continue
                compiled = ", ".join(self.compiled_resolutions()) or "none"
                where = f"at {resolution_key(resolution)}" if resolution else "(size-free)"
                refused = amx_refusal() if any(uses_amx(a) for a in self._listed if a.component == name) else None
                raise BackendUnavailableError(
                    f"no {name} artifact for {self.model} {where} with a batch dividing {total}; compiled "
                    f"resolutions for {self.model}: {compiled}. Build one with `sdaot compile --model {self.model}"
                    + (f" --resolution {resolution_key(resolution)}`" if resolution else "`")
                    + (f". Its AMX artifacts were skipped: {refused}" if refused else ""),
                    param="backend",
                )
            try:
                chosen[name] = self._load(kind, name, artifact, torch_components[name].module)
            except BackendUnavailableError as exc:
                if backend != "auto":
                    raise
                log.warning("falling back to torch for %s %s: %s", self.model, name, exc.message)
                chosen[name] = torch_components[name]
        return chosen

    def _load(self, kind: str, name: str, artifact: Artifact, module) -> Component:
        key = (kind, str(artifact.path), artifact.manifest.created, id(module))
        if key not in self._loaded:
            check_artifact(artifact, module, kind, device_target_key(self.device) or "",
                           runs_here(artifact, self.device))
            self._loaded[key] = COMPILED[kind](name, artifact, module)
            log.info("loaded %s %s from %s", kind, name, artifact.path)
        return self._loaded[key]


def runs_here(artifact: Artifact, device: torch.device | None = None) -> bool:
    """Whether the artifact's library runs on `device` (default: the CPU) and takes its tensors: a CUDA build
    for that GPU's architecture, or a CPU build this CPU runs (False when TVM cannot be imported)."""
    device = device or torch.device("cpu")
    built_for_cuda = artifact.manifest.target.get("kind") == "cuda"
    if device.type == "cuda":
        return built_for_cuda and artifact.target_key == cuda_target_key(device)
    if built_for_cuda:
        return False
    try:
        from .targets import host_has_avx512_bf16, runs_on_this_cpu
    except ImportError:
        return False
    if artifact.precision == "bf16" and not host_has_avx512_bf16():
        return False
    if uses_amx(artifact) and amx_refusal() is not None:
        return False
    return runs_on_this_cpu(artifact.target_key, json.dumps(artifact.manifest.target, sort_keys=True))


def prefers_bf16(artifact: Artifact) -> bool:
    """Whether this artifact is the faster of two precisions on this CPU: a bf16 one whose matmuls run on AMX.
    A bf16 artifact through `vdpbf16ps` loses to its fp32 twin (the module docstring gives the timings)."""
    return uses_amx(artifact)


def _best(found: list[Artifact], component: str, resolution: str, total: int, device: torch.device) -> Artifact | None:
    """The largest fitting batch; where there is a choice, the faster precision on this CPU (`prefers_bf16`), then
    one built for this very device."""
    matches = [a for a in found if a.component == component and a.resolution == resolution and total % a.batch == 0]
    key = device_target_key(device)
    return max(matches, key=lambda a: (a.batch, prefers_bf16(a), a.target_key == key), default=None)


def which_runs(artifacts: list[Artifact], device: torch.device | None = None) -> dict[Path, str]:
    """For `sdaot artifacts`: per artifact, whether `auto`/`tvm` runs it on `device` (default: the CPU) for its
    model, component, resolution and batch (`yes`), or why not."""
    device = device or torch.device("cpu")
    runnable = [a for a in artifacts if runs_here(a, device)]
    notes = {}
    for artifact in artifacts:
        if artifact not in runnable:
            refused = amx_refusal() if uses_amx(artifact) else None
            notes[artifact.path] = "no: AMX refused" if refused else "no: not this device"
            continue
        twins = [a for a in runnable if (a.model, a.component, a.resolution, a.batch) ==
                 (artifact.model, artifact.component, artifact.resolution, artifact.batch)]
        best = _best(twins, artifact.component, artifact.resolution, artifact.batch, device)
        if best is artifact:
            notes[artifact.path] = "yes (bf16 on AMX)" if uses_amx(artifact) else "yes"
        elif best is not None and prefers_bf16(best) and not prefers_bf16(artifact):
            notes[artifact.path] = "no: bf16 on AMX is faster"
        elif best is not None and best.precision != artifact.precision:
            notes[artifact.path] = "no: fp32 is faster here"
        else:
            notes[artifact.path] = "no: a twin fits better"
    return notes
