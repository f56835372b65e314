"""Export a component's torch module to ONNX with its weights as named graph inputs.

The weights become graph inputs named after the module's parameters, never initializers: so the graph
file stays small, shape folding (onnxslim) cannot fold a weight into a transformed copy, and at run time
every backend reads the very tensors the torch module holds (one copy of the weights, LoRA merges apply).
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxslim
import torch
from onnx import helper
from onnx.external_data_helper import load_external_data_for_model

OPSET = 17
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
           onnx.TensorProto.FLOAT16: "float16"}


@dataclass
class ExportedGraph:
    """An exported, checked and shape-folded ONNX graph with its input/output description."""

    model: onnx.ModelProto
    inputs: list[dict]
    weights: list[dict]
    outputs: list[str]
    sha256: str


def _tensor_info(value: onnx.ValueInfoProto) -> dict:
    dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
    return {"name": value.name, "shape": dims, "dtype": _DTYPES.get(value.type.tensor_type.elem_type, "unknown")}


def _weights_to_inputs(model: onnx.ModelProto, params: dict[str, torch.Tensor]) -> None:
    """Turn every initializer that is a module parameter into a graph input of the same name.

    The TorchScript exporter also de-duplicates parameters with equal values through Identity nodes;
    those parameters become inputs of their own too, so each weight is fed from its own tensor.
    """
    for init in list(model.graph.initializer):
        if init.name in params:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            model.graph.initializer.remove(init)
    for node in list(model.graph.node):
        if node.op_type == "Identity" and node.output[0] in params:
            param = params[node.output[0]]
            model.graph.input.append(
                helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, list(param.shape)))
            model.graph.node.remove(node)


def export_component(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> ExportedGraph:
    """Export `module` (a Component module with input_names/output_names) to a checked, slimmed ONNX graph.

    A module over 2 GB (the SDXL UNet) is written by torch with its tensors in external files; the weights
    among them are never read back (they become inputs), so the export holds one copy of them, torch's.
    """
    params = dict(module.named_parameters())
    with tempfile.TemporaryDirectory(prefix="sdaot-export-") as tmp:
        path = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example_inputs, str(path), input_names=list(module.input_names),
                              output_names=list(module.output_names), opset_version=OPSET, dynamo=False,
                              do_constant_folding=False)
        model = onnx.load(str(path), load_external_data=False)
        _weights_to_inputs(model, params)
        load_external_data_for_model(model, tmp)
    onnx.checker.check_model(model)
    model = onnxslim.slim(model)
    onnx.checker.check_model(model)
    data_names = set(module.input_names)
    infos = [_tensor_info(v) for v in model.graph.input]
    inputs = [i for i in infos if i["name"] in data_names]
    weights = [i for i in infos if i["name"] not in data_names]
    unknown = [w["name"] for w in weights if w["name"] not in params]
    if unknown:
        raise RuntimeError(f"exported graph has inputs that are neither data nor weights: {unknown[:5]}")
    digest = hashlib.sha256(model.SerializeToString()).hexdigest()
    return ExportedGraph(model, inputs, weights, [o.name for o in model.graph.output], digest)
