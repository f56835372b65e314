"""`sdaot bench`, the measuring half: every backend side by side on the same inputs, in one process
(`report.py` turns the measurements into JSON, Markdown and a chart).

For each component it builds what a backend needs in a scratch folder (`tvm` runs the artifact
`sdaot compile` wrote under --artifacts, with the tuning records it applied, `tvm-bf16` the one compiled
with `--precision bf16`; `tvm-untuned` a build
without them; `onnxruntime-artifact` the runtime's own onnxruntime backend on the artifact's graph, weights
fed from torch's tensors; the peers of peers.py a plain export as their users run it), warms up, repeats,
and reports the median and spread, the precision each ran at, achieved GFLOP/s against this machine's
measured matmul peak, and ratios to the fastest backend.
"""

from __future__ import annotations

import math
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import psutil
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from sdaot.compiler.compile import CompileJob, compile_job, compile_modules, describe_artifact
from sdaot.compiler.export import export_component
from sdaot.compiler.kernels import cpu_profile
from sdaot.runtime.artifacts import Artifact, Manifest, list_artifacts, resolution_key
from sdaot.runtime.compiled import OnnxRuntimeComponent, TvmComponent
from sdaot.runtime.component_table import COMPONENTS
from sdaot.runtime.components import TorchComponent
from sdaot.runtime.resolution import Resolution
from sdaot.runtime.targets import target_key
from sdaot.runtime.weights import ModelBundle

from .peers import PEERS, isa_limits, load_peer
from .report import end_to_end, machine_line, write_outputs

PROFILE_ROWS = 15
QUALITY_GATE_DB = 35.0
QUALITY_PROMPT = "a lighthouse on a cliff at sunset, oil painting"
COMPILED_PRECISIONS = {"tvm": "fp32", "tvm-bf16": "bf16"}
BACKENDS = (*COMPILED_PRECISIONS, "tvm-untuned", "onnxruntime-artifact", *PEERS, "torch", "torch-compile")


@dataclass
class Measurement:
    """The timings of one component on one backend."""

    component: str
    backend: str
    status: str
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    runs: list[float] = field(default_factory=list)
    setup_s: float | None = None
    gflops_per_s: float | None = None
    percent_of_peak: float | None = None
    ratio_to_fastest: float | None = None
    rss_after_mb: float | None = None
    kernel_sum_s: float | None = None
    profile: list[dict] = field(default_factory=list)
    profile_total_s: float | None = None
    conv_algorithm: str | None = None
    weight_transforms: str | None = None
    rel_err_vs_torch: float | None = None
    precision: str | None = None


def matmul_peak_gflops(size: int = 2048, repeat: int = 5) -> float:
    """fp32 matmul throughput of torch on this machine: the practical ceiling for dense arithmetic."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeat))
    return 2 * size**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def count_gflop(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    """FLOPs of one call, counted once by torch's FLOP counter."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        module(*inputs)
    return counter.get_total_flops() / 1e9


class Runner:
    """Builds and times each backend of one model's components at one resolution."""

    def __init__(self, bundle: ModelBundle, resolution: Resolution, target, artifacts_root: Path | None,
                 warmup: int, repeat: int, log: Callable[[str], None] = print, profile: bool = False) -> None:
        self.bundle, self.resolution, self.target, self.profile = bundle, resolution, target, profile
        self.artifacts_root, self.warmup, self.repeat, self.log = artifacts_root, warmup, repeat, log
        self.modules = compile_modules(bundle)
        self.scratch = Path(tempfile.mkdtemp(prefix="sdaot-bench-"))
        self.outputs: dict[tuple[str, str], torch.Tensor] = {}
        self.plain_exports: dict[int, Path] = {}

    def job(self, component: str) -> CompileJob:
        """What one image at the model's default CFG costs this component: its resolution and batch."""
        spec = COMPONENTS[component]
        batch = spec.batch.rows(1, self.bundle.spec.default_cfg_scale > 1.0)
        return CompileJob(component, None if spec.size_free else self.resolution, batch)

    def _compiled(self, job: CompileJob, precision: str) -> Artifact | None:
        """The artifact of this precision `sdaot compile` wrote under --artifacts for this job (with whatever records
        it applied)."""
        for artifact in list_artifacts(self.artifacts_root):
            if (artifact.model, artifact.component, artifact.resolution, artifact.batch, artifact.precision) == (
                    self.bundle.spec.name, job.component, resolution_key(job.resolution), job.batch, precision) \
                    and artifact.target_key == target_key(self.target):
                return artifact
        return None

    def _untuned(self, job: CompileJob) -> tuple[Artifact, float]:
        start = time.perf_counter()
        path = compile_job(self.bundle, job, self.target, self.scratch, log=self.log, modules=self.modules)
        return Artifact(path, Manifest.read(path)), time.perf_counter() - start

    def _exported(self, job: CompileJob) -> tuple[Artifact, float]:
        """The artifact's ONNX graph alone, for onnxruntime-artifact when no untuned TVM build was asked for."""
        start = time.perf_counter()
        graph = export_component(self.modules[job.component], job.example_inputs(self.bundle, self.modules))
        folder = self.scratch / f"{job.component}-onnx"
        folder.mkdir(parents=True, exist_ok=True)
        onnx.save(graph.model, str(folder / "model.onnx"))
        manifest = describe_artifact(self.bundle, job, graph, self.target, lib_sha256=None)
        return Artifact(folder, manifest), time.perf_counter() - start

    def component_backend(self, component: str, backend: str, built: dict):
        """(a callable for the backend or a string saying why it is not available, setup seconds, tuning report)."""
        module = self.modules[component]
        job = self.job(component)
        if backend == "torch":
            return TorchComponent(component, module), 0.0, {}
        if backend == "torch-compile":
            compiled = torch.compile(module)
            return (lambda *xs: compiled(*xs)), 0.0, {}
        if backend in COMPILED_PRECISIONS:
            precision = COMPILED_PRECISIONS[backend]
            compiled = self._compiled(job, precision)
            if compiled is None:
                return f"no {precision} artifact under --artifacts (run `sdaot compile --precision {precision}`)", \
                    None, {}
            loaded = TvmComponent(component, compiled, module)
            return (loaded, compiled.manifest.build_seconds + loaded.transform_seconds,
                    compiled.manifest.tuning or {})
        if backend == "tvm-untuned":
            if component not in built:
                built[component] = self._untuned(job)
            artifact, seconds = built[component]
            return TvmComponent(component, artifact, module), seconds, {}
        if backend in PEERS:
            start = time.perf_counter()
            peer = load_peer(backend, module, job.example_inputs(self.bundle, self.modules), self.scratch,
                             self.plain_exports)
            return peer, time.perf_counter() - start, {}
        artifact, seconds = built[component] if component in built else self._exported(job)
        return OnnxRuntimeComponent(component, artifact, module), seconds, {}

    def measure(self, component: str, backend: str, built: dict) -> Measurement:
        """Warm up, then time `repeat` calls on identical inputs."""
        torch.manual_seed(0)
        inputs = self.job(component).example_inputs(self.bundle, self.modules)
        try:
            runner, setup, tuning = self.component_backend(component, backend, built)
        except Exception as exc:  # a backend that cannot build or load is reported, not fatal
            return Measurement(component, backend, _failure(exc))
        if isinstance(runner, str):
            return Measurement(component, backend, runner)
        last: list[object] = [None]

        def call() -> None:
            last[0] = runner(*inputs)

        try:
            with torch.inference_mode():
                first = _timed(call)
                for _ in range(max(self.warmup - 1, 0)):
                    call()
                runs = [_timed(call) for _ in range(self.repeat)]
                profile = runner.profile(*inputs) if self.profile and isinstance(runner, TvmComponent) else []
        except Exception as exc:  # a backend that fails on the inputs is reported in its row; the others go on
            return Measurement(component, backend, _failure(exc))
        self.outputs[(component, backend)] = flat_output(last[0])
        setup = (setup or 0.0) + (first if backend == "torch-compile" else 0.0)
        build = runner.artifact.manifest.model_dump() if isinstance(runner, TvmComponent) else {}
        return Measurement(component, backend, "ok", statistics.median(runs), min(runs), max(runs), runs,
                           round(setup, 2), rss_after_mb=psutil.Process().memory_info().rss / 2**20,
                           kernel_sum_s=tuning.get("kernel_sum_s"), profile=profile[:PROFILE_ROWS],
                           profile_total_s=sum(row["seconds"] for row in profile) or None,
                           conv_algorithm=build.get("conv_algorithm"), weight_transforms=build.get("weight_transforms"),
                           precision=getattr(runner, "precision", "fp32"))


def _failure(exc: Exception) -> str:
    """A backend's failure as one line of a results table."""
    return " ".join(f"failed: {type(exc).__name__}: {exc}".split())[:300]


def flat_output(output: object) -> torch.Tensor:
    """A component's outputs (a tensor or a tuple of them) as one flat fp32 vector, for comparing backends."""
    tensors = [output] if isinstance(output, torch.Tensor) else list(output)
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference||: the per-call deviation the quality gate bounds (1e-2)."""
    return float(torch.linalg.vector_norm(output - reference) / torch.linalg.vector_norm(reference))


def image_psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB between two 8-bit images of one size (inf when identical)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def image_quality(bundle: ModelBundle, resolution: Resolution, artifacts_root: Path | None, steps: int,
                  out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """One image with the compiled artifacts (backend auto) and one with torch, same prompt and seed, and the
    PSNR between them: the end-to-end quality gate for anything the compiler changes in the arithmetic."""
    from sdaot.runtime.pipeline import Pipeline
    from sdaot.runtime.request import parse_request

    pipeline = Pipeline(bundle, artifacts_root=artifacts_root)
    request = {"model_name": bundle.spec.name, "prompt": QUALITY_PROMPT, "width": resolution.width,
               "height": resolution.height, "steps": steps, "seed": 0}
    images, report = {}, {"steps": steps, "seed": 0, "prompt": QUALITY_PROMPT, "gate_db": QUALITY_GATE_DB}
    for backend in ("auto", "torch"):
        log(f"quality: {steps}-step image on backend {backend} ...")
        result = pipeline.generate(parse_request(request | {"backend": backend}))
        images[backend] = result.images[0]
        result.images[0].save(out_dir / f"quality-{backend}.png")
        report[f"{backend}_backends"] = result.backends
        report[f"{backend}_seconds"] = round(result.inference_time, 2)
    report["psnr_db"] = round(image_psnr(images["auto"], images["torch"]), 2)
    report["passed"] = report["psnr_db"] >= QUALITY_GATE_DB
    return report


def run_bench(bundle: ModelBundle, resolution: Resolution, components: list[str], backends: list[str],
              target, artifacts_root: Path | None, steps: int, warmup: int, repeat: int, out_dir: Path,
              log: Callable[[str], None] = print, profile: bool = False, quality_steps: int = 0) -> dict:
    """Run every (component, backend) pair and write JSON, Markdown and a PNG chart into out_dir; with
    `quality_steps`, also the image quality gate (compiled artifacts against torch)."""
    runner = Runner(bundle, resolution, target, artifacts_root, warmup, repeat, log, profile)
    peak = matmul_peak_gflops()
    log(f"fp32 matmul peak: {peak:.1f} GFLOP/s")
    results, gflop, built = [], {}, {}
    for component in components:
        inputs = runner.job(component).example_inputs(bundle, runner.modules)
        gflop[component] = count_gflop(runner.modules[component], inputs)
        for backend in backends:
            log(f"{component} on {backend} ...")
            m = runner.measure(component, backend, built)
            if m.median_s:
                m.gflops_per_s = gflop[component] / m.median_s
                m.percent_of_peak = 100 * m.gflops_per_s / peak
                log(f"  median {m.median_s:.4f} s ({m.gflops_per_s:.1f} GFLOP/s)")
            else:
                log(f"  {m.status}")
            results.append(m)
    for component in components:
        done = [m for m in results if m.component == component and m.median_s]
        fastest = min((m.median_s for m in done), default=None)
        reference = runner.outputs.get((component, "torch"))
        for m in done:
            m.ratio_to_fastest = m.median_s / fastest
            if reference is not None and m.backend != "torch":
                m.rel_err_vs_torch = relative_error(runner.outputs[(component, m.backend)], reference)
    out_dir.mkdir(parents=True, exist_ok=True)
    quality = image_quality(bundle, resolution, artifacts_root, quality_steps, out_dir, log) if quality_steps \
        else None
    shutil.rmtree(runner.scratch, ignore_errors=True)
    report = {
        "model": bundle.spec.name, "weights": bundle.source, "resolution": resolution_key(resolution),
        "steps": steps, "warmup": warmup, "repeat": repeat, "target": target_key(target),
        "machine": machine_line(),
        "cpu_profile": cpu_profile(target).describe() if target.kind.name == "llvm" else None,
        "isa_limits": isa_limits(), "matmul_peak_gflops": round(peak, 1), "gflop_per_call": gflop,
        "end_to_end_s_per_image": end_to_end(results, components, steps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "results": [asdict(m) for m in results],
        "quality": quality,
    }
    write_outputs(report, out_dir)
    return report
