"""Import an exported ONNX graph into TVM Relax and build a shared library for a target."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from .fast_math import use_fast_math
from .kernels import apply_fallback_rules, apply_rules_before_tuning, cpu_profile
from .kernels.amx_matmul import AmxLegalization
from .kernels.attention import fuse_attention
from .kernels.bf16_matmul import Bf16Legalization
from .kernels.winograd import use_winograd
from .options import DEFAULT_BUILD, BuildOptions
from .tuning import TuningOptions, TuningReport, count_scheduled, tune_and_apply


@dataclass
class BuildInfo:
    """What a build produced: kernel counts and, when tuned, the tuning report."""

    scheduled_functions: int
    total_functions: int
    tuning: TuningReport | None
    winograd_convolutions: int = 0
    bf16_matmuls: int = 0
    amx_matmuls: int = 0

    def describe(self, options: BuildOptions) -> str:
        """One line for the compile log: kernels, and what the options made of them."""
        notes = [f"{self.total_functions} kernels"]
        if options.tuning:
            notes.append(f"{self.scheduled_functions} with tuned schedules")
        if options.winograd:
            notes.append(f"{self.winograd_convolutions} convolutions by Winograd")
        if options.bf16:
            notes.append(f"{self.bf16_matmuls} matmuls in bf16"
                         + (f" ({self.amx_matmuls} on AMX tiles)" if self.amx_matmuls else ""))
        return ", ".join(notes)


def build_library(model: onnx.ModelProto, target: Any, out_path: Path, options: BuildOptions = DEFAULT_BUILD,
                  log: Callable[[str], None] = print, num_inputs: int = 0) -> BuildInfo:
    """Compile the graph for `target` (which `options` were checked against) into `out_path` (a .so), tuned with
    MetaSchedule when `options.tuning` says so.

    1. Import: weights are graph inputs already (see export.py), so they stay function parameters of `main`;
       only small shape constants are left as initializers and get embedded. Because a weight is an input, the
       exporter's `Transpose(W)` before each linear layer cannot be folded away: it runs every call, as a tiled
       copy (kernels/transpose.py) feeding a row-major matmul.
    2. Graph rewrites (`rewrite_graph`): on CPUs each attention becomes one kernel (kernels/attention.py);
       `winograd` computes 3x3 convolutions by Winograd (kernels/winograd.py); transcendental functions use
       fast approximations (fast_math.py); `bf16` runs matmuls in bf16 with fp32 sums, on AMX tiles where the
       target has AMX-BF16 (kernels/amx_matmul.py), else through `vdpbf16ps` (kernels/bf16_matmul.py);
       `transforms_once` moves everything computed from the weights alone into `main_transform_params`, which
       the runtime calls at load and whenever a weight changes (LoRA): `main` then takes the transformed
       weights after its `num_inputs` inputs.
    3. Schedules (`schedule`): attentions, convolutions and matmuls get their register-blocked schedule
       (kernels.RULES_BEFORE_TUNING, sized for the target's CPU) before tuning, which therefore neither tunes
       nor replaces them; the rest is tuned when asked, then the fallback rules (CPU) or DLight (CUDA) cover
       what is left.
    4. Build and export the library.
    """
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = from_onnx(model, keep_params_in_input=False)
    mod, _ = relax.frontend.detach_params(mod)
    mod, winograd_convolutions, legalization = rewrite_graph(mod, target, options, num_inputs)
    if options.tuning is not None and target.kind.name == "llvm" and "num-cores" not in target.attrs:
        target = tvm.target.Target({**json.loads(str(target)), "num-cores": os.cpu_count() or 1})
    mod, report, total = schedule(mod, target, options.tuning, log)
    tvm.compile(mod, target=target).export_library(str(out_path))
    return BuildInfo(report.scheduled_functions if report else 0, total, report, winograd_convolutions,
                     legalization.rewritten, legalization.tiled if isinstance(legalization, AmxLegalization) else 0)


def rewrite_graph(mod: Any, target: Any, options: BuildOptions, num_inputs: int) -> tuple[Any, int, Any]:
    """Phase 2 of `build_library`: the graph rewrites the options and the target ask for. Returns the module,
    how many convolutions became Winograd's and the bf16 legalization used (its counts)."""
    from tvm import relax

    cpu = target.kind.name == "llvm"
    winograd_convolutions = 0
    if cpu:
        mod = fuse_attention(mod)
        mod, winograd_convolutions = use_winograd(mod, options.conv_algorithm, options.transforms_once)
    bf16 = AmxLegalization() if cpu and AmxLegalization.applies(cpu_profile(target)) else Bf16Legalization()
    mod = use_fast_math(mod, bf16.legalization_map() if options.bf16 else {})
    if options.transforms_once:
        mod["main"] = mod["main"].with_attr("num_input", num_inputs)
        mod = relax.transform.LiftTransformParams()(mod)
    return mod, winograd_convolutions, bf16


def schedule(mod: Any, target: Any, tuning: TuningOptions | None,
             log: Callable[[str], None]) -> tuple[Any, TuningReport | None, int]:
    """Phase 3 of `build_library`: every kernel scheduled. Returns the module, the tuning report (None untuned)
    and how many kernels there are."""
    import tvm
    from tvm import relax

    cpu = target.kind.name == "llvm"
    report = None
    if tuning is not None:
        with target:
            mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                            relax.transform.CanonicalizeBindings(),
                                            relax.get_pipeline("zero")])(mod)
    else:
        with target:
            mod = relax.get_pipeline("zero")(mod)
    if cpu:
        mod = apply_rules_before_tuning(mod, target)
    if tuning is not None:
        mod, report = tune_and_apply(mod, target, tuning.tunes_in, tuning.budget_s, tuning.trials_per_task,
                                     tuning.max_tasks, log)
    _, total = count_scheduled(mod)
    if target.kind.name == "cuda":
        from tvm.s_tir import dlight

        with target:
            mod = dlight.ApplyDefaultSchedule(dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                                              dlight.gpu.GeneralReduction(), dlight.gpu.Fallback())(mod)
    elif cpu:
        mod = apply_fallback_rules(mod, target)
    return mod, report, total
