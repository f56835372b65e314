"""`--precision bf16`: matmuls round both operands to bf16 and sum in fp32 through `vdpbf16ps`, on CPUs with
AVX-512 BF16; elsewhere the flag is a clear error. The kernels run only where the CPU has the instructions
(Zen 4, Sapphire Rapids); the rounding and the refusals are tested on every CPU."""

import json

import numpy as np
import pytest
import torch
import tvm
from click.testing import CliRunner
from conftest import AVX2_TARGET, matmul_graph
from tvm import relax, te

from sdaot.compiler.fast_math import use_fast_math
from sdaot.compiler.kernels import apply_fallback_rules, apply_rules_before_tuning
from sdaot.compiler.kernels.bf16_matmul import Bf16Legalization, round_to_bf16
from sdaot.runtime.artifacts import Manifest
from sdaot.runtime.cli import main
from sdaot.runtime.targets import host_has_avx512_bf16, precision_target, resolve_target

needs_bf16 = pytest.mark.skipif(not host_has_avx512_bf16(),
                                reason="this CPU has no AVX-512 BF16, so bf16 kernels cannot run here")


def test_rounding_to_bf16_matches_torch_ties_to_even():
    values = np.array([1.0, -2.5, 3.14159, 1e-30, 65504.0, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3e38, 0.0],
                      dtype=np.float32)
    values = np.concatenate([values, np.random.default_rng(0).standard_normal(1000, dtype=np.float32) * 100])
    x = te.placeholder(values.shape, "float32", name="x")
    rounded = te.compute(values.shape, lambda i: round_to_bf16(x[i]), name="rounded")
    target = tvm.target.Target(AVX2_TARGET)
    library = tvm.compile(te.create_prim_func([x, rounded]), target=target)
    out = tvm.runtime.tensor(np.zeros(values.shape, dtype=np.uint32))
    library(tvm.runtime.tensor(values), out)
    expected = torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    np.testing.assert_array_equal(out.numpy(), expected)


def bf16_graph(a_shape, b_shape, bias, target):
    legalization = Bf16Legalization()
    graph = use_fast_math(matmul_graph(a_shape, b_shape, bias), legalization.legalization_map())
    with target:
        graph = relax.get_pipeline("zero")(graph)
    return graph, legalization.rewritten


@needs_bf16
@pytest.mark.parametrize(("a_shape", "b_shape", "bias", "rewritten"), [
    ((1, 77, 48), (48, 64), True, 1),            # a linear layer on 77 text tokens, with its bias as epilogue
    ((2, 3, 16, 8), (2, 3, 8, 48), False, 1),    # batched on both sides, as Winograd's 36 products are
    ((520, 40), (40, 96), True, 1),              # several row chunks, each packing three column panels
    ((4, 7), (7, 32), False, 0),                 # odd reduction: no bf16 pairs, stays fp32
    ((4, 8), (8, 24), False, 0),                 # 24 columns: no whole 16-lane vectors, stays fp32
])
def test_bf16_matmuls_sum_bf16_operands_in_fp32_with_vdpbf16ps(a_shape, b_shape, bias, rewritten):
    target = precision_target(resolve_target("cpu"), "bf16")
    graph, count = bf16_graph(a_shape, b_shape, bias, target)
    assert count == rewritten
    scheduled = apply_fallback_rules(apply_rules_before_tuning(graph, target), target)
    executable = tvm.compile(scheduled, target=target)
    assembly = "".join(m.inspect_source("asm") for m in executable.mod.imports) or \
        executable.mod.inspect_source("asm")
    assert ("vdpbf16ps" in assembly) == bool(rewritten)
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal(s, dtype=np.float32) for s in (a_shape, b_shape))
    c = rng.standard_normal(b_shape[-1], dtype=np.float32)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(x) for x in ([a, b, c] if bias else [a, b]))).numpy()
    exact = a @ b + (c if bias else 0)
    rounded = (torch.from_numpy(a).bfloat16().float() @ torch.from_numpy(b).bfloat16().float()).numpy() \
        + (c if bias else 0)
    scale = np.abs(exact).max()
    assert np.abs(out - (rounded if rewritten else exact)).max() / scale < 1e-5
    if rewritten:
        assert np.abs(out - exact).max() / scale > 1e-4, "bf16 operands differ from fp32 ones"


@pytest.mark.parametrize("target", [json.dumps(AVX2_TARGET), "cuda"])
def test_bf16_without_avx512_bf16_is_a_clear_error(tmp_path, target):
    result = CliRunner().invoke(main, ["compile", "--model", "SD1.5", "--resolution", "64x64", "--target", target,
                                       "--precision", "bf16", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "error: precision: bf16" in result.output and "AVX-512 BF16" in result.output
    assert not any(tmp_path.iterdir())


@needs_bf16
@pytest.mark.slow
def test_bf16_unet_passes_the_quality_gate_and_is_preferred(tmp_path):
    """The tiny UNet in bf16 (Winograd, so its 3x3 convolutions' products are bf16 too) beside an fp32 text
    encoder: per-call error of bf16's size, and a 20-step image within the 35 dB gate of torch's."""
    artifacts = tmp_path / "artifacts"
    compiled = CliRunner().invoke(main, ["compile", "--model", "SD1.5", "--resolution", "64x64", "--components",
                                         "unet", "--conv-algorithm", "winograd", "--precision", "bf16",
                                         "--out", str(artifacts)], catch_exceptions=False)
    assert compiled.exit_code == 0, compiled.output
    assert "matmuls in bf16" in compiled.output
    folder = next(artifacts.rglob("unet/*/manifest.json")).parent
    assert folder.name.endswith("-bf16") and Manifest.read(folder).precision == "bf16"
    listing = CliRunner().invoke(main, ["artifacts", "--json", "--dir", str(artifacts)], catch_exceptions=False)
    assert [row["precision"] for row in json.loads(listing.output)] == ["bf16"]
    result = CliRunner().invoke(main, ["bench", "--model", "SD1.5", "--weights", "tiny", "--resolution", "64x64",
                                       "--components", "unet", "--backends", "tvm-bf16,tvm,torch", "--repeat", "1",
                                       "--artifacts", str(artifacts), "--quality-steps", "20",
                                       "--out", str(tmp_path / "results")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "results" / "bench-SD1.5-tiny-64x64.json").read_text())
    rows = {r["backend"]: r for r in report["results"]}
    assert rows["tvm-bf16"]["status"] == "ok" and rows["tvm-bf16"]["precision"] == "bf16"
    assert 1e-4 < rows["tvm-bf16"]["rel_err_vs_torch"] < 3e-2
    assert "no fp32 artifact" in rows["tvm"]["status"]
    quality = report["quality"]
    assert quality["auto_backends"]["unet"] == "tvm", "the bf16 artifact serves backend auto"
    assert quality["passed"] and quality["psnr_db"] >= 35
