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


WEIGHT_TRANSFORMS = ("per-call", "once")


def build_library(model: onnx.ModelProto, target: Any, out_path: Path, tuning: TuningOptions | None = None,
                  log: Callable[[str], None] = print, conv_algorithm: str = "direct",
                  weight_transforms: str = "per-call", num_inputs: int = 0, precision: str = "fp32") -> BuildInfo:
    """Compile the graph for `target` into `out_path` (a .so), tuned with MetaSchedule when asked.

    Weights are graph inputs already (see export.py), so they stay function parameters of `main`; only
    small shape constants are left as initializers and get embedded. Because a weight is an input, the
    exporter's `Transpose(W)` before each linear layer cannot be folded away: it runs every call, as a
    tiled copy (kernels/transpose.py) feeding a row-major matmul. Fusing it into the matmul instead
    (`relax.transform.FuseTransposeMatmul`) was slower here: the fused kernels reached 34 GFLOP/s tuned.
    On CPUs each attention becomes one kernel (kernels/attention.py); transcendental functions use fast
    approximations (fast_math.py). On CPUs, attentions, convolutions and matmuls get their register-blocked
    schedule (kernels.RULES_BEFORE_TUNING, sized for the target's CPU) before tuning: they are neither tuned nor
    replaced by records, since that schedule runs at the machine's matmul peak. `conv_algorithm` other
    than `direct` computes 3x3 convolutions by Winograd (kernels/winograd.py; CPU targets only).

    With `weight_transforms="once"` everything computed from the weights alone (the linear layers'
    transposes, Winograd's weight transforms) moves into a second function, `main_transform_params`,
    that the runtime calls when it loads the artifact and again whenever a weight changes (LoRA); `main`
    then takes the transformed weights after its `num_inputs` inputs. It costs memory for the transformed
    copies and saves their computation on every call.

    With `precision="bf16"` (a CPU target with AVX-512 BF16), matmuls run in bf16 with fp32 sums
    (kernels/bf16_matmul.py): the linear layers, and every Winograd convolution's 36 products. On a target
    with AMX-BF16 the linear layers run on AMX tiles instead (kernels/amx_matmul.py).
    """
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = from_onnx(model, keep_params_in_input=False)
    mod, _ = relax.frontend.detach_params(mod)
    cpu = target.kind.name == "llvm"
    if weight_transforms not in WEIGHT_TRANSFORMS:
        raise ValueError(f"weight transforms must be one of {', '.join(WEIGHT_TRANSFORMS)}, not {weight_transforms!r}")
    if conv_algorithm != "direct" and not cpu:
        raise ValueError(f"conv algorithm {conv_algorithm!r} is implemented for CPU targets only")
    if precision != "fp32" and not (cpu and cpu_profile(target).avx512_bf16):
        raise ValueError(f"precision {precision!r} needs a CPU target with AVX-512 BF16")
    winograd_convolutions = 0
    if cpu:
        mod = fuse_attention(mod)
        mod, winograd_convolutions = use_winograd(mod, conv_algorithm, weight_transforms == "once")
    bf16 = AmxLegalization() if cpu and AmxLegalization.applies(cpu_profile(target)) else Bf16Legalization()
    mod = use_fast_math(mod, bf16.legalization_map() if precision == "bf16" else {})
    if weight_transforms == "once":
        mod["main"] = mod["main"].with_attr("num_input", num_inputs)
        mod = relax.transform.LiftTransformParams()(mod)
    report = None
    if tuning is not None:
        if cpu and "num-cores" not in target.attrs:
            target = tvm.target.Target({**json.loads(str(target)), "num-cores": os.cpu_count() or 1})
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
    executable = tvm.compile(mod, target=target)
    executable.export_library(str(out_path))
    return BuildInfo(report.scheduled_functions if report else 0, total, report, winograd_convolutions,
                     bf16.rewritten, bf16.tiled if isinstance(bf16, AmxLegalization) else 0)
