"""AMX: the tile permission Linux must grant first, the tdpbf16ps matmul kernel and which artifacts run.

AMX instructions run only on CPUs with amx_tile/amx_bf16 (Sapphire Rapids and later) once Linux has granted
the process tile state. Tests that run AMX code skip, printing why, where that is not so (a Zen 3 or Zen 4
CI machine); the refusal path, the compilation to tdpbf16ps and the selection rules run everywhere.
"""

import json

import numpy as np
import pytest
import torch
import tvm
from click.testing import CliRunner
from conftest import matmul_graph
from tvm import relax

from sdaot.compiler.fast_math import use_fast_math
from sdaot.compiler.kernels import apply_fallback_rules, apply_rules_before_tuning, cpu_profile
from sdaot.compiler.kernels.amx_matmul import AmxLegalization, amx_rewritable
from sdaot.runtime import amx, selection, targets
from sdaot.runtime.amx import AmxUnavailableError, amx_refusal, host_has_amx, request_tile_permission
from sdaot.runtime.artifacts import Artifact, Manifest, artifact_dir
from sdaot.runtime.cli import main
from sdaot.runtime.errors import BackendUnavailableError
from sdaot.runtime.resolution import Resolution
from sdaot.runtime.selection import ComponentSelector, _best, runs_here, uses_amx, which_runs
from sdaot.runtime.targets import bf16_unit, host_has_avx512_bf16, precision_target, resolve_target

needs_amx = pytest.mark.skipif(not host_has_amx(), reason="this CPU reports no amx_tile/amx_bf16 in /proc/cpuinfo, "
                                                          "so AMX code cannot run here")


def test_cpu_flags_detect_amx(tmp_path):
    with_amx = tmp_path / "spr"
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n")
    without = tmp_path / "zen4"
    without.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert host_has_amx(with_amx)
    assert not host_has_amx(without)
    assert not host_has_amx(tmp_path / "missing")


@pytest.mark.skipif(host_has_amx(), reason="this CPU has AMX: the request is granted, not refused")
def test_refused_permission_gives_a_clear_error():
    with pytest.raises(AmxUnavailableError, match="Linux refused AMX tile state") as caught:
        request_tile_permission()
    assert "no amx_tile/amx_bf16" in caught.value.message
    assert caught.value.param == "backend"
    assert amx_refusal() == caught.value.message
    with pytest.raises(AmxUnavailableError):
        amx.require_amx()


def test_a_refusing_kernel_gives_the_clear_error(monkeypatch):
    class RefusingLibc:
        def syscall(self, *args):
            assert args == (158, 0x1023, 18)
            return -1

    monkeypatch.setattr(amx.ctypes, "CDLL", lambda *a, **k: RefusingLibc())
    monkeypatch.setattr(amx.ctypes, "get_errno", lambda: 22)
    with pytest.raises(AmxUnavailableError, match="Invalid argument"):
        request_tile_permission()


@needs_amx
def test_permission_is_granted_on_an_amx_cpu():
    request_tile_permission()
    assert amx_refusal() is None


def write_artifact(root, precision, target, batch=2, component="unet"):
    """An artifact folder with only its manifest: enough for the selection rules, which read no library."""
    target_text = json.dumps(target)
    key = f"llvm-{target['mcpu']}"
    folder = artifact_dir(root, "SD1.5", component, Resolution(64, 64), batch, key, precision)
    folder.mkdir(parents=True)
    Manifest(format_version=1, sdaot_version="0", tvm_version="0", model="SD1.5", family="sd15", component=component,
             resolution="64x64", batch=batch, inputs=[], outputs=[], weights=[], weights_signature="",
             weight_source="random", target=json.loads(target_text), target_key=key, onnx_sha256="",
             lib_sha256=None, precision=precision, created="now").write(folder)
    return Artifact(folder, Manifest.read(folder))


def host_target(*mattr):
    config = {"kind": "llvm", "mcpu": resolve_target("cpu").attrs["mcpu"]}
    return config | ({"mattr": list(mattr)} if mattr else {})


SPR_TARGET = {"kind": "llvm", "mcpu": "sapphirerapids"}


def test_bf16_unit_of_a_target():
    assert bf16_unit(tvm.target.Target(SPR_TARGET)) == "amx"
    assert bf16_unit(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})) == "avx512_bf16"
    assert bf16_unit(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})) is None
    assert precision_target(tvm.target.Target(SPR_TARGET), "bf16").attrs["mcpu"] == "sapphirerapids"


@pytest.mark.skipif(host_has_amx() or not host_has_avx512_bf16(),
                    reason="needs a CPU with AVX-512 BF16 and no AMX (a Zen 4), where bf16 runs through vdpbf16ps")
def test_fp32_twin_runs_where_bf16_is_vdpbf16ps(tmp_path):
    fp32 = write_artifact(tmp_path, "fp32", host_target())
    bf16 = write_artifact(tmp_path, "bf16", host_target("+avx512bf16"))
    assert runs_here(fp32) and runs_here(bf16) and not uses_amx(bf16)
    assert _best([fp32, bf16], "unet", "64x64", 2, torch.device("cpu")) is fp32
    assert _best([bf16], "unet", "64x64", 2, torch.device("cpu")) is bf16, "bf16 alone still serves"
    assert which_runs([fp32, bf16]) == {fp32.path: "yes", bf16.path: "no: fp32 is faster here"}
    rows = json.loads(CliRunner().invoke(main, ["artifacts", "--json", "--dir", str(tmp_path)]).output)
    assert {r["precision"]: r["runs"] for r in rows} == {"fp32": "yes", "bf16": "no: fp32 is faster here"}


@pytest.mark.skipif(host_has_amx(), reason="this CPU has AMX, so its AMX artifacts are not refused")
def test_amx_artifacts_are_refused_without_permission_and_auto_falls_back(tmp_path):
    amx_build = write_artifact(tmp_path, "bf16", SPR_TARGET)
    assert uses_amx(amx_build) and not runs_here(amx_build)
    assert which_runs([amx_build]) == {amx_build.path: "no: AMX refused"}
    fallback = object()
    selector = ComponentSelector("SD1.5", {"unet": fallback}, root=tmp_path)
    needs = {"unet": (Resolution(64, 64), 2)}
    assert selector.select("auto", needs) == {"unet": fallback}
    with pytest.raises(BackendUnavailableError, match="AMX artifacts were skipped: Linux refused AMX tile state"):
        selector.select("tvm", needs)


def test_amx_bf16_is_preferred_over_its_fp32_twin_where_amx_is_granted(tmp_path, monkeypatch):
    monkeypatch.setattr(selection, "amx_refusal", lambda: None)
    monkeypatch.setattr(targets, "runs_on_this_cpu", lambda key, target: True)
    monkeypatch.setattr(targets, "host_has_avx512_bf16", lambda: True)
    fp32 = write_artifact(tmp_path, "fp32", SPR_TARGET)
    amx_build = write_artifact(tmp_path, "bf16", SPR_TARGET)
    vnni = write_artifact(tmp_path, "bf16", {"kind": "llvm", "mcpu": "znver4"})
    assert _best([fp32, amx_build, vnni], "unet", "64x64", 2, torch.device("cpu")) is amx_build
    assert which_runs([fp32, amx_build, vnni]) == {fp32.path: "no: bf16 on AMX is faster",
                                                   amx_build.path: "yes (bf16 on AMX)",
                                                   vnni.path: "no: bf16 on AMX is faster"}


def amx_build(a_shape, b_shape, bias):
    """Compile `a @ b (+ c)` for a Sapphire Rapids target as `--precision bf16` would: (executable, assembly,
    matmuls on tiles, matmuls on vectors)."""
    target = tvm.target.Target(SPR_TARGET)
    legalization = AmxLegalization()
    graph = use_fast_math(matmul_graph(a_shape, b_shape, bias), legalization.legalization_map())
    with target:
        graph = relax.get_pipeline("zero")(graph)
    executable = tvm.compile(apply_fallback_rules(apply_rules_before_tuning(graph, target), target), target=target)
    assembly = "".join(m.inspect_source("asm") for m in executable.mod.imports) or \
        executable.mod.inspect_source("asm")
    return executable, assembly, legalization.tiled, legalization.vector.rewritten


AMX_SHAPES = [
    ((2, 77, 64), (64, 96), True, 1),    # 154 text-token rows: padded to 160, the bias as epilogue
    ((64, 128), (128, 64), False, 1),    # whole 32 x 32 blocks, four reduction steps
    ((4, 32), (32, 48), False, 0),       # 48 columns: no whole 2 x 2 tile blocks, vdpbf16ps instead
]


@pytest.mark.parametrize(("a_shape", "b_shape", "bias", "tiled"), AMX_SHAPES)
def test_amx_matmul_compiles_to_tdpbf16ps(a_shape, b_shape, bias, tiled):
    _, assembly, on_tiles, on_vectors = amx_build(a_shape, b_shape, bias)
    assert (on_tiles, on_vectors) == (tiled, 1 - tiled)
    assert ("tdpbf16ps" in assembly) == bool(tiled)
    if tiled:
        for instruction in ("ldtilecfg", "tilezero", "tileloadd", "tilestored", "tilerelease"):
            assert instruction in assembly
        assert "andq\t$-64" in assembly, "the tile configuration sits at a 64-byte aligned address"
    else:
        assert "vdpbf16ps" in assembly


def test_amx_is_chosen_from_the_target():
    assert AmxLegalization.applies(cpu_profile(tvm.target.Target(SPR_TARGET)))
    assert not AmxLegalization.applies(cpu_profile(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})))
    assert amx_rewritable((2, 4096, 320), (320, 1280))
    assert not amx_rewritable((2, 8, 16, 64), (2, 8, 64, 64)), "batched right-hand sides stay on vdpbf16ps"
    assert not amx_rewritable((4, 48), (48, 64)), "a reduction of 48 is no whole number of A tiles"


@needs_amx
@pytest.mark.parametrize(("a_shape", "b_shape", "bias", "tiled"), AMX_SHAPES[:2])
def test_amx_matmul_equals_torch_on_bf16_operands(a_shape, b_shape, bias, tiled):
    request_tile_permission()
    executable, _, _, _ = amx_build(a_shape, b_shape, bias)
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal(s, dtype=np.float32) for s in (a_shape, b_shape))
    c = rng.standard_normal(b_shape[-1], dtype=np.float32)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(x) for x in ([a, b, c] if bias else [a, b]))).numpy()
    rounded = (torch.from_numpy(a).bfloat16().float() @ torch.from_numpy(b).bfloat16().float()).numpy() \
        + (c if bias else 0)
    assert np.abs(out - rounded).max() / np.abs(rounded).max() < 1e-5
