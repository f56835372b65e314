"""The runtimes `sdaot bench` holds tvm against, run the way their own users run them.

A peer gets the best chance it has on a CPU: a plain ONNX export of the component with its weights as
initializers (so onnxruntime can pre-pack them and apply its NCHWc layout transformer, and OpenVINO can
fold and re-layout them), onnxruntime at ORT_ENABLE_ALL, OpenVINO's CPU plugin at its default precision
(bf16 on CPUs with avx512_bf16 or AMX, f32 elsewhere) and, as a second row, held to f32; and eager torch
under `torch.autocast("cpu", dtype=torch.bfloat16)` (`torch-bf16`), the two lines its users add for bf16
(oneDNN then runs the matmuls and convolutions in bf16: on AMX where the CPU has it). Every peer uses
as many threads as torch. The peer libraries are an optional extra (`pip install sdaot[peers]`): a
missing one is reported in its row, never fatal.

To hold the peers to AVX2 on an AVX-512 machine, start the bench with `ISA_LIMIT_VARIABLES` set;
`isa_limits()` records which were set beside the results (torch's oneDNN, MKL and ATen honour theirs;
onnxruntime's MLAS reads the CPU itself and honours none).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from sdaot.compiler.export import OPSET

ISA_LIMIT_VARIABLES = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
PEERS = ("onnxruntime", "openvino", "openvino-f32", "torch-bf16")
DEFAULT_BACKENDS = ("tvm", "onnxruntime", "openvino", "openvino-f32", "torch")
OPENVINO_PRECISIONS = {"f32": "fp32", "f16": "fp16"}
"""OpenVINO's element type names, as the bench spells precisions (bf16 is the same in both)."""


def default_backends() -> list[str]:
    """`sdaot bench`'s backends when none are named: with `torch-bf16` beside `openvino` on CPUs with
    avx512_bf16, where OpenVINO's default is bf16 too, so both bf16 peers are held against tvm."""
    from sdaot.runtime.targets import host_has_avx512_bf16

    backends = list(DEFAULT_BACKENDS)
    if host_has_avx512_bf16():
        backends.insert(backends.index("openvino") + 1, "torch-bf16")
    return backends


def isa_limits() -> dict[str, str]:
    """The ISA-limiting environment variables this process was started with."""
    return {name: os.environ[name] for name in ISA_LIMIT_VARIABLES if name in os.environ}


def plain_onnx_export(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], folder: Path) -> Path:
    """The component exported as its users export it: weights as initializers (external files past 2 GB),
    constants folded. Returns the .onnx path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), input_names=list(module.input_names),
                          output_names=list(module.output_names), opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    return path


class _GraphPeer:
    """Feeds a component's inputs, given in the module's order, to an exported graph by name (an export drops
    the inputs it does not use) and returns its outputs as torch tensors."""

    precision = "fp32"

    def __init__(self, input_names: list[str], graph_inputs: dict[Any, str]) -> None:
        self.input_names, self.graph_inputs = input_names, graph_inputs

    def _run(self, feed: dict[Any, Any]) -> list[Any]:
        raise NotImplementedError

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = dict(zip(self.input_names, inputs, strict=True))
        outputs = self._run({key: given[name].numpy() for key, name in self.graph_inputs.items()})
        return tuple(torch.from_numpy(out.copy()) for out in outputs)


class OnnxRuntimePeer(_GraphPeer):
    """A component under onnxruntime with every graph optimization, weights pre-packed by onnxruntime."""

    def __init__(self, path: Path, input_names: list[str]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        super().__init__(input_names, {i.name: i.name for i in self.session.get_inputs()})

    def _run(self, feed: dict[Any, Any]) -> list[Any]:
        return self.session.run(None, feed)


class OpenVinoPeer(_GraphPeer):
    """A component under OpenVINO's CPU plugin, at its default precision or held to f32."""

    backend = "openvino"

    def __init__(self, model: Any, input_names: list[str], f32: bool, by_position: bool = False) -> None:
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "f32"} if f32 else {}
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        chosen = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.precision = OPENVINO_PRECISIONS.get(chosen, chosen)
        self.request = self.compiled.create_infer_request()
        if by_position:
            if len(self.compiled.inputs) != len(input_names):
                raise RuntimeError(f"OpenVINO model has {len(self.compiled.inputs)} inputs, the component "
                                   f"{len(input_names)} ({input_names})")
            super().__init__(input_names, dict(enumerate(input_names)))
            return
        ports = {}
        for index, port in enumerate(self.compiled.inputs):
            names = port.get_names() & set(input_names)
            if len(names) != 1:
                raise RuntimeError(f"OpenVINO input {index} ({sorted(port.get_names())}) matches no single input "
                                   f"of {input_names}")
            ports[index] = names.pop()
        super().__init__(input_names, ports)

    @classmethod
    def from_onnx(cls, path: Path, input_names: list[str], f32: bool) -> OpenVinoPeer:
        """The plain ONNX export, read by OpenVINO's ONNX frontend."""
        import openvino as ov

        return cls(ov.Core().read_model(str(path)), input_names, f32)

    @classmethod
    def from_torch(cls, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], f32: bool = False) -> OpenVinoPeer:
        """The torch module converted by OpenVINO's own PyTorch frontend, as optimum-intel (and so FastSD CPU's
        models) convert it. The converted graph shares torch's weight tensors instead of copying them to a file
        and back, so a peer of SDXL's 10 GB UNet fits beside torch's weights; the inputs keep the forward's
        order, not always its names."""
        import openvino as ov

        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            model = ov.convert_model(module, example_input=inputs, share_weights=True)
        return cls(model, list(module.input_names), f32, by_position=True)

    def _run(self, feed: dict[Any, Any]) -> list[Any]:
        results = self.request.infer(feed)
        return [results[port] for port in self.compiled.outputs]


class TorchBf16Peer:
    """A component in eager torch under bf16 autocast, as torch's users run bf16 on a CPU: matmuls and
    convolutions in bf16, the ops autocast keeps in fp32 (norms, softmax) in fp32; outputs returned as fp32."""

    precision = "bf16"

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = self.module(*inputs)
        return tuple(out.float() for out in ([outputs] if isinstance(outputs, torch.Tensor) else outputs))


def load_peer(backend: str, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], scratch: Path,
              exports: dict[int, Path]) -> _GraphPeer | TorchBf16Peer:
    """A callable running `module` on the peer `backend`; the plain export is made once per module (under
    `scratch`, kept in `exports`) and shared by the graph peers."""
    if backend == "torch-bf16":
        return TorchBf16Peer(module)
    if id(module) not in exports:
        exports[id(module)] = plain_onnx_export(module, inputs, Path(tempfile.mkdtemp(prefix="peer-", dir=scratch)))
    path, names = exports[id(module)], list(module.input_names)
    if backend == "onnxruntime":
        return OnnxRuntimePeer(path, names)
    return OpenVinoPeer.from_onnx(path, names, f32=backend == "openvino-f32")
