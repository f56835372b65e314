"""Winograd convolutions: rewritten only where they fit, scheduled, as exact as fp32 allows, and gated in
`sdaot bench` by the per-call error and the image PSNR against torch."""

import json

import numpy as np
import pytest
import torch
import tvm
from click.testing import CliRunner
from conftest import ISA_TARGETS, isa_target
from PIL import Image
from tvm import relax

from sdaot.compiler.kernels import apply_fallback_rules, apply_rules_before_tuning
from sdaot.compiler.kernels.winograd import use_winograd
from sdaot.runtime.artifacts import Manifest
from sdaot.runtime.cli import main


def convolution_graph(shape, out_channels, kernel, stride):
    n, c, h, w = shape
    out_shape = (n, out_channels, (h - 1) // stride + 1, (w - 1) // stride + 1)
    params = [relax.Var("x", relax.TensorType(shape, "float32")),
              relax.Var("weight", relax.TensorType((out_channels, c, kernel, kernel), "float32")),
              relax.Var("bias", relax.TensorType((1, out_channels, 1, 1), "float32")),
              relax.Var("residual", relax.TensorType(out_shape, "float32"))]
    builder = relax.BlockBuilder()
    with builder.function("main", params):
        with builder.dataflow():
            y = builder.emit(relax.op.nn.conv2d(params[0], params[1], strides=stride, padding=kernel // 2))
            y = builder.emit(relax.op.add(y, params[2]))
            out = builder.emit_output(relax.op.add(y, params[3]))
        builder.emit_func_output(out)
    return builder.get(), out_shape


@pytest.mark.parametrize("isa", ISA_TARGETS)
@pytest.mark.parametrize(("shape", "out_channels", "kernel", "stride", "algorithm", "rewritten"), [
    ((2, 16, 16, 16), 24, 3, 1, "winograd", 1),
    ((1, 8, 8, 16), 12, 3, 1, "winograd", 1),     # 2 x 4 tiles, not square
    ((1, 8, 8, 8), 8, 3, 1, "winograd", 0),       # 4 tiles: fewer than one 8-wide vector
    ((1, 8, 8, 16), 12, 3, 1, "auto", 0),         # 8 tiles: the weight transform would cost more than it saves
    ((2, 8, 16, 16), 8, 3, 1, "auto", 1),
    ((2, 8, 18, 16), 8, 3, 1, "winograd", 0),     # rows not a multiple of the 4x4 tile
    ((2, 8, 16, 16), 8, 3, 2, "winograd", 0),     # stride 2
    ((2, 8, 16, 16), 8, 1, 1, "winograd", 0),     # 1x1
    ((2, 16, 16, 16), 24, 3, 1, "direct", 0),
])
def test_winograd_rewrites_only_where_it_fits_and_matches_torch(shape, out_channels, kernel, stride, algorithm,
                                                                 rewritten, isa):
    target = isa_target(isa)
    graph, out_shape = convolution_graph(shape, out_channels, kernel, stride)
    graph, count = use_winograd(graph, algorithm)
    assert count == rewritten
    with target:
        graph = relax.get_pipeline("zero")(graph)
    scheduled = apply_rules_before_tuning(graph, target)
    kernels = {gv.name_hint: f for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert all(f.attrs is not None and f.attrs.get("tirx.is_scheduled") for f in kernels.values()), \
        "every convolution, transform and matmul kernel has its hand-written schedule"
    names = " ".join(kernels)
    if rewritten:
        assert "winograd_weight" in names and "winograd_input" in names and "matmul" in names
        assert "winograd_output_add_add" in names, "bias and residual adds are the output transform's epilogue"
    else:
        assert "winograd" not in names and "conv2d" in names
    vm = relax.VirtualMachine(tvm.compile(apply_fallback_rules(scheduled, target), target=target), tvm.cpu())
    rng = np.random.default_rng(3)
    n, c = shape[:2]
    x, weight, bias, residual = (rng.standard_normal(s, dtype=np.float32) for s in
                                 (shape, (out_channels, c, kernel, kernel), (1, out_channels, 1, 1), out_shape))
    weight /= np.sqrt(c * kernel * kernel)
    out = vm["main"](*(tvm.runtime.tensor(a) for a in (x, weight, bias, residual))).numpy()
    expected = (torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), stride=stride,
                                           padding=kernel // 2) + torch.from_numpy(bias)
                + torch.from_numpy(residual)).numpy()
    assert np.abs(out - expected).max() / np.abs(expected).max() < 2e-5


@pytest.mark.slow
def test_winograd_build_passes_the_bench_quality_gate(tmp_path):
    """Compile the tiny VAE decoder with Winograd, then bench it against torch with the 2-step image gate."""
    compiled = CliRunner().invoke(main, ["compile", "--model", "SD1.5", "--resolution", "64x64", "--components",
                                         "vae_decoder,text_encoder", "--conv-algorithm", "winograd",
                                         "--out", str(tmp_path / "artifacts")], catch_exceptions=False)
    assert compiled.exit_code == 0, compiled.output
    assert "convolutions by Winograd" in compiled.output
    manifest = Manifest.read(next((tmp_path / "artifacts").rglob("vae_decoder/*/manifest.json")).parent)
    assert manifest.conv_algorithm == "winograd" and manifest.winograd_convolutions > 0
    result = CliRunner().invoke(main, ["bench", "--model", "SD1.5", "--weights", "tiny", "--resolution", "64x64",
                                       "--components", "vae_decoder", "--backends", "tvm,torch", "--repeat", "1",
                                       "--artifacts", str(tmp_path / "artifacts"), "--quality-steps", "2",
                                       "--out", str(tmp_path / "results")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "results" / "bench-SD1.5-tiny-64x64.json").read_text())
    tvm_row = next(r for r in report["results"] if r["backend"] == "tvm")
    assert tvm_row["status"] == "ok" and tvm_row["conv_algorithm"] == "winograd"
    assert 0 < tvm_row["rel_err_vs_torch"] < 1e-4
    quality = report["quality"]
    assert quality["auto_backends"]["vae_decoder"] == "tvm" and quality["torch_backends"]["vae_decoder"] == "torch"
    assert quality["passed"] and quality["psnr_db"] >= 35
    for backend in ("auto", "torch"):
        with Image.open(tmp_path / "results" / f"quality-{backend}.png") as image:
            assert image.size == (64, 64) and np.asarray(image).std() > 1
    table = (tmp_path / "results" / "bench-SD1.5-tiny-64x64.md").read_text()
    assert "| vae_decoder | tvm (winograd conv, weights transformed per-call) |" in table
    assert "passes the 35.0 dB gate" in table


def test_winograd_on_a_gpu_target_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["compile", "--model", "SD1.5", "--resolution", "64x64", "--target", "cuda",
                                       "--conv-algorithm", "winograd", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "error: conv_algorithm: winograd is implemented for CPU targets only" \
        in result.output
    assert not any(tmp_path.iterdir())
