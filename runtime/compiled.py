"""Compiled backends of a Component: a TVM library or the exported ONNX graph under onnxruntime.

Both read their weights from the torch module's own parameter tensors, and take their inputs and give their
outputs as torch tensors, in place on the module's device (the CPU or a CUDA GPU): DLPack for TVM, bound
buffers (IOBinding) for onnxruntime. So the torch and compiled backends share one copy of the weights,
and nothing is copied between host and GPU. A compiled component built for batch b serves any batch that
is a multiple of b, chunk by chunk.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from .amx import require_amx
from .artifacts import Artifact, read_verified, uses_amx, weights_signature
from .errors import BackendUnavailableError
from .threads import use_all_cores

ALIGNMENT = 64


def aligned_weights(module: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """The named parameters of `module`, moved in place to 64-byte aligned memory where needed (TVM needs it)."""
    params = dict(module.named_parameters())
    out = []
    for name in names:
        param = params[name]
        if param.data_ptr() % ALIGNMENT or not param.is_contiguous():
            param.data = param.data.contiguous().clone()
        out.append(param.detach())
    return out


def check_artifact(artifact: Artifact, module: nn.Module, kind: str, target_key: str, runs_here: bool = False) -> None:
    """Refuse an artifact for the `kind` of backend (tvm or onnxruntime) that would run it when it was built
    for another architecture or altered, and for tvm also when built with another TVM version or for a
    target this device cannot run (`runs_here` says an instruction-set subset of this CPU's is fine).
    The hash of the file each backend runs is checked as it is loaded (`verified_bytes`)."""
    m = artifact.manifest
    problems = []
    if kind == "tvm":
        import tvm

        if m.tvm_version != tvm.__version__:
            problems.append(f"built with TVM {m.tvm_version}, running {tvm.__version__}")
        if m.target_key != target_key and not runs_here:
            problems.append(f"built for {m.target_key}, this device is {target_key}")
    params = dict(module.named_parameters())
    actual = [{"name": w["name"], "shape": list(params[w["name"]].shape), "dtype": str(params[w["name"]].dtype)[6:]}
              for w in m.weights if w["name"] in params]
    if len(actual) != len(m.weights) or weights_signature(actual) != m.weights_signature:
        problems.append("its weight shapes do not match the loaded model's (another architecture or size)")
    if problems:
        raise BackendUnavailableError(f"artifact {artifact.label} cannot be used: {'; '.join(problems)}",
                                      param="backend")


def verified_bytes(artifact: Artifact, kind: str) -> bytes:
    """The bytes of the file the `kind` of backend runs (tvm lib.so, onnxruntime model.onnx), read once and
    checked against the manifest's hash: the caller loads these bytes, not the file, so a file swapped after
    the check is never run."""
    checked, expected = ("lib.so", artifact.manifest.lib_sha256) if kind == "tvm" else \
        ("model.onnx", artifact.manifest.onnx_sha256)
    data = read_verified(artifact.path / checked, expected)
    if data is None:
        raise BackendUnavailableError(f"artifact {artifact.label} cannot be used: {checked} is missing, truncated "
                                      "or altered", param="backend")
    return data


def load_tvm_library(data: bytes) -> Any:
    """A TVM module loaded from a shared library's bytes: they are written to an anonymous in-memory file
    (memfd) that only this process holds and dlopen'ed from there, so no other writer can change them between
    the check and the load. TVM picks the loader by the file name's extension, so it is given a `lib.so`
    link to the memfd in a private temporary folder (removed at once; the mapping stays)."""
    import tvm_ffi

    fd = os.memfd_create("sdaot-lib.so", os.MFD_CLOEXEC)
    folder = tempfile.mkdtemp(prefix="sdaot-lib-")
    link = os.path.join(folder, "lib.so")
    try:
        os.write(fd, data)
        os.symlink(f"/proc/{os.getpid()}/fd/{fd}", link)
        return tvm_ffi.load_module(link)
    finally:
        if os.path.lexists(link):
            os.unlink(link)
        os.rmdir(folder)
        os.close(fd)


class _Chunked:
    """Runs a fixed-batch compiled function over any batch that is a multiple of its batch size."""

    name: str
    backend: str
    batch: int
    precision = "fp32"
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def __init__(self, name: str, artifact: Artifact, module: nn.Module) -> None:
        self.name, self.batch, self.artifact = name, artifact.batch, artifact
        self.input_names = tuple(module.input_names)
        self.output_names = tuple(module.output_names)
        self.weight_names = [w["name"] for w in artifact.manifest.weights]
        self.weight_tensors = aligned_weights(module, self.weight_names)
        self.device = next(module.parameters()).device

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        total = inputs[0].shape[0]
        if total == self.batch:
            return self._run(inputs)
        if total % self.batch:
            raise BackendUnavailableError(f"{self.name} is compiled for batch {self.batch}, got {total}",
                                          param="backend")
        parts = [self._run(tuple(x[i:i + self.batch] for x in inputs)) for i in range(0, total, self.batch)]
        return tuple(torch.cat(outs) for outs in zip(*parts, strict=True))

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


def release_tvm_pool() -> None:
    """Free the buffers TVM's virtual machines keep for reuse. The pool is the process's, shared by every VM and
    never shrunk: a server reuses it call after call, but a process that drops its compiled networks (the
    benchmark, between backends) would otherwise keep gigabytes of SD1.5's activations while torch or SDXL
    needs the memory. Call it only when no VM is running."""
    import tvm_ffi

    tvm_ffi.get_global_func("vm.builtin.memory_manager.clear")()


class TvmComponent(_Chunked):
    """A component run by a TVM Relax VM from an artifact's lib.so."""

    backend = "tvm"

    def __init__(self, name: str, artifact: Artifact, module: nn.Module) -> None:
        import tvm
        from tvm import relax

        if uses_amx(artifact):
            require_amx()
        use_all_cores()
        super().__init__(name, artifact, module)
        self.precision = artifact.precision
        data = verified_bytes(artifact, "tvm")
        try:
            lib = load_tvm_library(data)
            self.vm = relax.VirtualMachine(lib, tvm.device(self.device.type, self.device.index or 0))
        except Exception as exc:  # TVM reports load failures with its own error classes
            raise BackendUnavailableError(f"cannot load the TVM library of artifact {artifact.label}",
                                          param="backend", detail=f"{artifact.path / 'lib.so'}: {exc}") from exc
        self._weights = [tvm.runtime.from_dlpack(w) for w in self.weight_tensors]
        self._main = self.vm["main"]
        lifted = self.vm.module.implements_function("main_transform_params")
        self._transform = self.vm["main_transform_params"] if lifted else None
        self._params: list[Any] = self._weights
        self._versions: tuple[int, ...] | None = None
        self.transform_seconds = 0.0
        self._transform_weights()

    def _transform_weights(self) -> None:
        """For an artifact built with `--weight-transforms once`: (re)compute the transformed weights `main`
        takes when any weight tensor has changed in place since the last time (torch counts in-place
        writes: LoRA merges and restores)."""
        import time

        if self._transform is None:
            return
        versions = tuple(w._version for w in self.weight_tensors)
        if versions == self._versions:
            return
        start = time.perf_counter()
        self._params = list(self._transform(self._weights))
        self._versions = versions
        self.transform_seconds += time.perf_counter() - start

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        import tvm

        self._transform_weights()
        args = [tvm.runtime.from_dlpack(_aligned(x.to(self.device))) for x in inputs]
        out = self._main(*args, *self._params)
        outs = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
        return tuple(torch.from_dlpack(o).clone() for o in outs)


    def profile(self, *inputs: torch.Tensor) -> list[dict[str, Any]]:
        """Wall seconds per VM call (kernels and runtime builtins) of one run, slowest first: where time goes."""
        import time

        import tvm

        totals: dict[str, list[float]] = {}
        started: list[float] = []

        def instrument(func: Any, symbol: str, before_run: bool, ret_value: Any, *args: Any) -> int:
            if before_run:
                started.append(time.perf_counter())
            else:
                entry = totals.setdefault(symbol, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - started.pop()
            return 0

        self.vm.set_instrument(tvm.runtime.convert(instrument))
        try:
            self._run(tuple(x[:self.batch] for x in inputs))
        finally:
            self.vm.set_instrument(None)
        rows = [{"function": name, "calls": int(calls), "seconds": seconds}
                for name, (calls, seconds) in totals.items()]
        return sorted(rows, key=lambda r: -r["seconds"])


class OnnxRuntimeComponent(_Chunked):
    """A component run by onnxruntime from an artifact's model.onnx, on the module's device (the CUDA provider
    for a GPU)."""

    backend = "onnxruntime"

    def __init__(self, name: str, artifact: Artifact, module: nn.Module) -> None:
        import onnxruntime as ort

        super().__init__(name, artifact, module)
        provider = "CUDAExecutionProvider" if self.device.type == "cuda" else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise BackendUnavailableError(f"this onnxruntime has no {provider} for {self.device} (on a GPU: pip "
                                          "install onnxruntime-gpu)", param="backend")
        options = [{"device_id": self.device.index or 0}] if self.device.type == "cuda" else [{}]
        data = verified_bytes(artifact, "onnxruntime")
        try:
            self.session = ort.InferenceSession(data, providers=[provider], provider_options=options)
        except Exception as exc:  # onnxruntime raises its own error classes for unreadable graphs
            raise BackendUnavailableError(f"cannot load the ONNX graph of artifact {artifact.label}",
                                          param="backend", detail=f"{artifact.path / 'model.onnx'}: {exc}") from exc
        self._inputs = [i["name"] for i in artifact.manifest.inputs]
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._binding = self.session.io_binding()
        for name, weight in zip(self.weight_names, self.weight_tensors, strict=True):
            self._bind(name, weight)

    def _bind(self, name: str, tensor: torch.Tensor) -> None:
        """Hand the tensor's memory to the session as input `name` (no copy)."""
        self._binding.bind_input(name, self.device.type, self.device.index or 0, NUMPY_DTYPES[tensor.dtype],
                                 list(tensor.shape), tensor.data_ptr())

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        by_name = dict(zip(self.input_names, inputs, strict=True))
        kept = [by_name[name].to(self.device).contiguous() for name in self._inputs]
        for name, tensor in zip(self._inputs, kept, strict=True):
            self._bind(name, tensor)
        for name in self._outputs:
            self._binding.bind_output(name, self.device.type, self.device.index or 0)
        self.session.run_with_iobinding(self._binding)
        return tuple(torch.from_dlpack(o) for o in self._binding.get_outputs())


NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


def _aligned(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    return x if x.data_ptr() % ALIGNMENT == 0 else x.clone()
