"""Compiled backends: real ONNX exports and TVM builds of tiny models, checked against torch."""

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import AVX2_TARGET, FAMILIES, psnr
from PIL import Image

from sdaot.runtime.artifacts import MANIFEST, file_sha256, list_artifacts
from sdaot.runtime.cli import main
from sdaot.runtime.compiled import release_tvm_pool
from sdaot.runtime.devices import pick_device
from sdaot.runtime.errors import BackendUnavailableError, InvalidRequestError
from sdaot.runtime.loader import load_pipeline
from sdaot.runtime.request import parse_request
from sdaot.runtime.selection import runs_here

pytestmark = pytest.mark.slow  # full compiles: `make test` runs them, `make test-quick` does not


def test_artifacts_are_listed_with_manifest_fields(compiled_root):
    rows = json.loads(CliRunner().invoke(main, ["artifacts", "--json", "--dir", str(compiled_root)]).output)
    sdxl = {r["component"] for r in rows if r["model"] == "SDXL1.0-base"}
    assert sdxl == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    encoders = [r for r in rows if r["component"] == "text_encoder"]
    assert all(r["resolution"] == "any" for r in encoders), "text encoders are built once, not per resolution"
    unet = next(a for a in list_artifacts(compiled_root) if a.component == "unet" and a.model == "SD1.5")
    manifest = unet.manifest
    assert manifest.batch == 2 and manifest.tuned is False
    assert {i["name"] for i in manifest.inputs} == {"sample", "timestep", "encoder_hidden_states"}
    assert manifest.inputs[0]["shape"] == [2, 4, 8, 8]
    assert manifest.weights and all(w["name"].startswith("unet.") for w in manifest.weights)
    assert manifest.onnx_sha256 == file_sha256(unet.path / "model.onnx")
    assert manifest.lib_sha256 == file_sha256(unet.path / "lib.so")
    assert manifest.tvm_version and manifest.sdaot_version and manifest.family == "sd1" and manifest.target
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


def test_freeing_tvms_buffer_pool_between_pipelines_leaves_the_next_one_the_same_image(compiled_root):
    # The benchmark frees the pool after dropping a pipeline; a VM made afterwards must still run, and right.
    request = parse_request(dict(model_name="SD1.5", prompt="x", height=64, width=64, steps=2, seed=3))
    first = load_pipeline("SD1.5", "tiny", artifacts_root=compiled_root).generate(request)
    release_tvm_pool()
    second = load_pipeline("SD1.5", "tiny", artifacts_root=compiled_root).generate(request)
    assert second.backends["unet"] == "tvm"
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))


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


def test_bad_manifests_are_skipped_with_a_warning_and_auto_falls_back(compiled_root, tmp_path, caplog):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(compiled_root / "SD1.5", root / "SD1.5")
    unet = next(root.glob(f"SD1.5/unet/*/{MANIFEST}"))
    unet.write_text(unet.read_text().replace('"weights_signature"', '"weights_signature_renamed"'))
    decoder = next(root.glob(f"SD1.5/vae_decoder/*/{MANIFEST}"))
    decoder.write_text(decoder.read_text()[:-20])
    assert {a.component for a in list_artifacts(root)} == {"text_encoder", "vae_encoder"}
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert any("weights_signature: Field required" in w and "unet" in w for w in warnings), warnings
    assert any("Invalid JSON" in w and "vae_decoder" in w for w in warnings), warnings
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=root)
    result = pipe.generate(parse_request(dict(model_name="SD1.5", prompt="x", height=64, width=64, steps=2)))
    assert result.backends == {"text_encoder": "tvm", "unet": "torch", "vae_decoder": "torch"}


def test_each_compiled_backend_checks_the_file_it_runs(compiled_root, tmp_path):
    """onnxruntime runs model.onnx: a bad lib.so does not concern it, an altered model.onnx does."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(compiled_root / "SD1.5", root / "SD1.5")
    lib = next(root.glob("SD1.5/unet/*/lib.so"))
    lib.write_bytes(b"not a library")
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=root)
    req = dict(model_name="SD1.5", prompt="x", height=64, width=64, steps=2)
    assert pipe.generate(parse_request(req | {"backend": "onnxruntime"})).backends["unet"] == "onnxruntime"
    graph = next(root.glob("SD1.5/vae_decoder/*/model.onnx"))
    graph.write_bytes(graph.read_bytes() + b"\0")
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=root)
    with pytest.raises(BackendUnavailableError, match="model.onnx is missing, truncated or altered"):
        pipe.generate(parse_request(req | {"backend": "onnxruntime"}))


def test_killed_compiles_leave_nothing_half_written_and_a_live_compile_is_never_cleaned_away(tmp_path):
    """SIGKILL while a library is being built, then after the first artifact landed; a cleanup run meanwhile
    (what a second compile into the same root does first) must spare the live compile's folder."""
    from sdaot.compiler.compile import remove_stale_temporaries

    root = tmp_path / "art"
    cmd = [sys.executable, "-m", "sdaot.runtime.cli", "compile", "--model", "SD1.5", "--resolution", "64x64",
           "--components", "vae_decoder,text_encoder", "--out", str(root)]

    def run_until(condition) -> None:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not condition():
            time.sleep(0.1)
        assert proc.poll() is None and condition(), "the compile ended before the kill point"
        if condition is writing:
            leftover = next(root.glob("*/*/.tmp-*")).parent / f".tmp-{2**22 + 1}-0badc0de"  # above any pid
            leftover.mkdir()
            assert remove_stale_temporaries(root) == 1 and not leftover.exists()
            assert writing(), "the cleanup removed the folder of a compile that is still running"
        proc.kill()
        proc.wait()
        for artifact in list_artifacts(root):
            assert file_sha256(artifact.path / "lib.so") == artifact.manifest.lib_sha256

    def writing() -> bool:
        return bool(list(root.glob("*/*/.tmp-*/model.onnx")))

    def first_landed_second_writing() -> bool:
        return bool(list(root.glob(f"*/*/*-b*/{MANIFEST}"))) and writing()

    run_until(writing)
    assert list_artifacts(root) == []
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=root)
    with pytest.raises(BackendUnavailableError):
        pipe.generate(parse_request(dict(model_name="SD1.5", prompt="x", height=64, width=64, steps=2,
                                         backend="tvm")))
    run_until(first_landed_second_writing)
    assert len(list_artifacts(root)) == 1
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "removed temporary folders left by an interrupted compile" in done.stdout
    assert sorted(a.component for a in list_artifacts(root)) == ["text_encoder", "vae_decoder"]
    assert not list(root.glob("*/*/.tmp-*")) and not list(root.glob("*/*/.old-*"))


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
    assert artifact.target_key == "cuda-sm_90" and artifact.manifest.target["kind"] == "cuda"
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


def test_the_device_is_chosen_with_clear_errors_and_gpu_builds_are_refused_on_the_cpu(tmp_path):
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InvalidRequestError, match="device must be one of") as err:
        pick_device("gpu")
    assert err.value.param == "device"
    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequestError, match="torch sees no CUDA GPU"):
            pick_device("cuda")
        result = CliRunner().invoke(main, ["generate", "--model", "SD1.5", "--prompt", "x", "--device", "cuda",
                                           "-o", str(tmp_path / "x.png")])
        assert result.exit_code == 2 and result.output.startswith("error: device: cuda: torch sees no CUDA GPU")
        assert not (tmp_path / "x.png").exists()
    manifest = {"target": {"kind": "llvm", "mcpu": "x86-64"}, "precision": "fp32"}
    cpu_build = SimpleNamespace(target_key="llvm-x86-64", precision="fp32", manifest=SimpleNamespace(**manifest))
    gpu_build = SimpleNamespace(target_key="cuda-sm_90", precision="fp32",
                                manifest=SimpleNamespace(target={"kind": "cuda", "arch": "sm_90"}, precision="fp32"))
    assert not runs_here(gpu_build, torch.device("cpu"))
    assert not runs_here(cpu_build, torch.device("cuda")), "a CPU library cannot take a GPU pipeline's tensors"
