"""Compiled backends: real ONNX exports and TVM builds of tiny models, checked against torch."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import AVX2_TARGET, FAMILIES, psnr
from PIL import Image

from sdaot.runtime.artifacts import list_artifacts
from sdaot.runtime.cli import main
from sdaot.runtime.errors import BackendUnavailableError
from sdaot.runtime.loader import load_pipeline
from sdaot.runtime.request import parse_request

pytestmark = pytest.mark.slow  # full compiles: `make test` runs them, `make test-quick` does not


def test_artifacts_are_listed_with_manifest_fields(compiled_root):
    rows = json.loads(CliRunner().invoke(main, ["artifacts", "--json", "--dir", str(compiled_root)]).output)
    sdxl = {r["component"] for r in rows if r["model"] == "SDXL1.0-base"}
    assert sdxl == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    encoders = [r for r in rows if r["component"] == "text_encoder"]
    assert all(r["resolution"] == "any" for r in encoders), "text encoders are built once, not per resolution"
    unet = next(a for a in list_artifacts(compiled_root) if a.component == "unet" and a.model == "SD1.5")
    manifest = unet.manifest
    assert manifest["batch"] == 2 and manifest["tuned"] is False
    assert {i["name"] for i in manifest["inputs"]} == {"sample", "timestep", "encoder_hidden_states"}
    assert manifest["inputs"][0]["shape"] == [2, 4, 8, 8]
    assert manifest["weights"] and all(w["name"].startswith("unet.") for w in manifest["weights"])
    for key in ("tvm_version", "sdaot_version", "target", "onnx_sha256", "build_seconds", "family"):
        assert key in manifest
    assert (unet.path / "model.onnx").stat().st_size < 1_000_000, "weights must not be baked into the graph"


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("img2img", [False, True])
def test_tvm_onnxruntime_and_torch_agree(compiled_root, model, img2img):
    pipe = load_pipeline(model, "tiny", artifacts_root=compiled_root)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    images, extra = {}, dict(image=init, strength=0.7) if img2img else {}
    for backend in ("torch", "tvm", "onnxruntime"):
        req = parse_request(dict(model_name=model, prompt="a red cube", height=64, width=64, steps=3, seed=9,
                                 backend=backend, **extra))
        result = pipe.generate(req)
        assert set(result.backends.values()) == {backend}, result.backends
        if img2img:
            assert result.backends["vae_encoder"] == backend
        images[backend] = result.images[0]
    assert np.asarray(images["torch"]).std() > 1
    assert psnr(images["tvm"], images["torch"]) >= 40
    assert psnr(images["onnxruntime"], images["torch"]) >= 40


def test_auto_uses_tvm_where_compiled_and_torch_elsewhere(compiled_root):
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=compiled_root)
    compiled = pipe.generate(parse_request(dict(model_name="SD1.5", prompt="x", height=64, width=64, steps=2)))
    assert compiled.backends == {"text_encoder": "tvm", "unet": "tvm", "vae_decoder": "tvm"}
    other = pipe.generate(parse_request(dict(model_name="SD1.5", prompt="x", height=72, width=64, steps=2)))
    assert other.backends["unet"] == "torch" and other.backends["text_encoder"] == "tvm"


def test_an_avx2_build_serves_this_machine_and_matches_torch(tmp_path):
    """A library built for AVX2 (Zen 3) is found and run here whatever this CPU is, as long as it has AVX2; a
    target whose instructions this CPU lacks is never offered."""
    avx2 = json.dumps({k: v for k, v in AVX2_TARGET.items() if k != "num-cores"})
    built = CliRunner().invoke(main, ["compile", "--model", "SD1.5", "--resolution", "64x64", "--components",
                                      "unet", "--target", avx2, "--out", str(tmp_path)], catch_exceptions=False)
    assert built.exit_code == 0, built.output
    assert "for llvm-znver3" in built.output
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=tmp_path)
    request = dict(model_name="SD1.5", prompt="a red cube", height=64, width=64, steps=3, seed=4)
    compiled = pipe.generate(parse_request(request | {"backend": "auto"}))
    assert compiled.backends == {"text_encoder": "torch", "unet": "tvm", "vae_decoder": "torch"}
    reference = pipe.generate(parse_request(request | {"backend": "torch"}))
    assert psnr(compiled.images[0], reference.images[0]) >= 40

    from sdaot.runtime.targets import runs_on_this_cpu

    arm = json.dumps({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1"})
    assert runs_on_this_cpu("llvm-znver3", avx2) and not runs_on_this_cpu("llvm-neoverse-v1", arm)
    assert not runs_on_this_cpu("llvm-future", json.dumps({"kind": "llvm", "mcpu": "znver3", "mattr": ["+amx-fp8"]}))
    assert not runs_on_this_cpu("cuda-sm_90", json.dumps({"kind": "cuda", "arch": "sm_90"}))


def test_tvm_at_an_uncompiled_resolution_lists_the_compiled_ones(compiled_root, tmp_path):
    result = CliRunner().invoke(main, ["generate", "--model", "SD1.5", "--prompt", "x", "--height", "72",
                                       "--width", "64", "--steps", "2", "--backend", "tvm", "--artifacts",
                                       str(compiled_root), "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 2
    assert "error: backend:" in result.output and "compiled resolutions for SD1.5: 64x64" in result.output
    ok = CliRunner().invoke(main, ["generate", "--model", "SD1.5", "--prompt", "x", "--height", "64", "--width",
                                   "64", "--steps", "2", "--backend", "tvm", "--artifacts", str(compiled_root),
                                   "-o", str(tmp_path / "t.png")])
    assert ok.exit_code == 0 and "unet=tvm" in ok.output


def test_truncated_library_is_reported_and_auto_falls_back(compiled_root, tmp_path, caplog):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(compiled_root / "SD1.5", root / "SD1.5")
    lib = next(root.glob("SD1.5/unet/*/lib.so"))
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=root)
    req = dict(model_name="SD1.5", prompt="x", height=64, width=64, steps=2)
    with pytest.raises(BackendUnavailableError, match="truncated"):
        pipe.generate(parse_request(req | {"backend": "tvm"}))
    result = pipe.generate(parse_request(req | {"backend": "auto"}))
    assert result.backends["unet"] == "torch" and result.backends["vae_decoder"] == "tvm"
    assert any("falling back to torch" in r.message for r in caplog.records)


def test_killed_compile_leaves_nothing_loadable(tmp_path):
    root = tmp_path / "art"
    cmd = [sys.executable, "-m", "sdaot.runtime.cli", "compile", "--model", "SD1.5", "--resolution", "64x64",
           "--components", "unet", "--out", str(root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(root.glob("*/*/.tmp-*/model.onnx")):
        time.sleep(0.2)
    assert list(root.glob("*/*/.tmp-*/model.onnx")), "compile never started writing"
    proc.kill()
    proc.wait()
    assert list_artifacts(root) == []
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=root)
    with pytest.raises(BackendUnavailableError):
        pipe.generate(parse_request(dict(model_name="SD1.5", prompt="x", height=64, width=64, steps=2,
                                         backend="tvm")))


def test_runtime_imports_without_compiler_or_onnx():
    code = ("import sys; sys.modules['onnx'] = None; sys.modules['sdaot.compiler'] = None; "
            "sys.modules['onnxslim'] = None; "
            "import sdaot.runtime.pipeline, sdaot.runtime.selection, sdaot.runtime.compiled, sdaot.runtime.cli")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_cuda_target_builds_without_a_gpu_and_cpu_runs_ignore_it(tmp_path):
    result = CliRunner().invoke(main, ["compile", "--model", "SD1.5", "--components", "text_encoder", "--target",
                                       "cuda", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (artifact,) = list_artifacts(tmp_path)
    assert artifact.target_key == "cuda-sm_90" and artifact.manifest["target"]["kind"] == "cuda"
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=tmp_path)
    used = pipe.generate(parse_request(dict(model_name="SD1.5", prompt="x", height=64, width=64, steps=1))).backends
    assert used["text_encoder"] == "torch"


def test_refiner_runs_on_its_own_compiled_artifacts(compiled_root, tmp_path):
    import shutil

    shutil.copytree(compiled_root / "SDXL1.0-base", tmp_path / "SDXL1.0-base")
    result = CliRunner().invoke(main, ["compile", "--model", "SDXL1.0-refiner", "--resolution", "64x64",
                                       "--components", "text_encoder_2,unet,vae_decoder", "--out", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pipe = load_pipeline("SDXL1.0-base", "tiny", with_refiner=True, artifacts_root=tmp_path)
    images = {}
    for backend in ("torch", "tvm"):
        req = parse_request(dict(model_name="SDXL1.0-base", prompt="a red cube", height=64, width=64, steps=10,
                                 seed=3, enable_refiner=True, backend=backend))
        out = pipe.generate(req)
        assert set(out.backends.values()) == {backend}
        assert {"refiner.unet", "refiner.text_encoder_2", "refiner.vae_decoder"} <= set(out.backends)
        images[backend] = out.images[0]
    assert psnr(images["tvm"], images["torch"]) >= 40
