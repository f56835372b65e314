"""Import an exported ONNX graph into TVM Relax and build a shared library for a target."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import onnx


def build_library(model: onnx.ModelProto, target: Any, out_path: Path) -> int:
    """Compile the graph for `target` into `out_path` (a .so); returns how many Relax functions it has.

    Weights are graph inputs already (see export.py), so they stay function parameters of `main`; only
    small shape constants are left as initializers and get embedded.
    """
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = from_onnx(model, keep_params_in_input=False)
    mod, _ = relax.frontend.detach_params(mod)
    with target:
        mod = relax.get_pipeline("zero")(mod)
        if target.kind.name == "cuda":
            from tvm.s_tir import dlight

            mod = dlight.ApplyDefaultSchedule(dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                                              dlight.gpu.GeneralReduction(), dlight.gpu.Fallback())(mod)
    executable = tvm.compile(mod, target=target)
    executable.export_library(str(out_path))
    return sum(1 for gv in mod.get_global_vars() if isinstance(mod[gv], tvm.tirx.PrimFunc))
