"""`sdaot bench` runs every backend on the same inputs and writes its three result files."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from sdaot.benchmarks.peers import default_backends
from sdaot.runtime import targets
from sdaot.runtime.cli import main


@pytest.mark.slow
def test_bench_reports_each_backend_with_ratios(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--model", "SD1.5", "--weights", "tiny", "--resolution", "64x64",
                                       "--components", "text_encoder,vae_decoder", "--backends",
                                       "tvm,tvm-untuned,onnxruntime,torch", "--repeat", "2", "--profile",
                                       "--out", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench-SD1.5-tiny-64x64.json").read_text())
    rows = {(r["component"], r["backend"]): r for r in report["results"]}
    assert "no fp32 artifact under --artifacts" in rows[("vae_decoder", "tvm")]["status"]
    for component in ("text_encoder", "vae_decoder"):
        timed = [rows[(component, b)] for b in ("tvm-untuned", "onnxruntime", "torch")]
        assert all(r["status"] == "ok" and len(r["runs"]) == 2 for r in timed)
        assert min(r["ratio_to_fastest"] for r in timed) == 1.0
        assert report["gflop_per_call"][component] > 0
    assert rows[("vae_decoder", "tvm-untuned")]["setup_s"] > 0
    assert report["matmul_peak_gflops"] > 0 and "TVM" in report["machine"]
    table = (tmp_path / "bench-SD1.5-tiny-64x64.md").read_text()
    assert "| vae_decoder | onnxruntime |" in table
    profile = rows[("vae_decoder", "tvm-untuned")]["profile"]
    assert any("conv2d" in row["function"] for row in profile) and all(row["seconds"] > 0 for row in profile)
    assert "Slowest functions of one tvm-untuned vae_decoder call" in table
    assert not rows[("vae_decoder", "torch")]["profile"]
    with Image.open(tmp_path / "bench-SD1.5-tiny-64x64.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > 100


def test_bench_rejects_an_unknown_backend(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--model", "SD1.5", "--weights", "tiny", "--backends", "tensorrt",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 2 and "error: backends: unknown backend 'tensorrt'" in result.output


def test_bench_onnxruntime_alone_needs_no_tvm_build(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--model", "SD1.5", "--weights", "tiny", "--resolution", "64x64",
                                       "--components", "text_encoder", "--backends", "onnxruntime,torch",
                                       "--repeat", "1", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "built TVM library" not in result.output
    report = json.loads((tmp_path / "bench-SD1.5-tiny-64x64.json").read_text())
    onnx_row = next(r for r in report["results"] if r["backend"] == "onnxruntime")
    assert onnx_row["status"] == "ok" and onnx_row["setup_s"] > 0 and report["peak_rss_mb"] > 100


def test_bench_runs_every_peer_as_its_users_run_it(tmp_path):
    """onnxruntime and OpenVINO on a plain export (weights as initializers), OpenVINO at its own precision and at
    f32, next to the runtime's onnxruntime backend and torch: each row timed, with its precision and its error."""
    backends = "onnxruntime,openvino,openvino-f32,onnxruntime-artifact,torch"
    result = CliRunner().invoke(main, ["bench", "--model", "SD1.5", "--weights", "tiny", "--resolution", "64x64",
                                       "--components", "vae_decoder", "--backends", backends, "--repeat", "1",
                                       "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench-SD1.5-tiny-64x64.json").read_text())
    rows = {r["backend"]: r for r in report["results"]}
    assert all(rows[b]["status"] == "ok" for b in backends.split(",")), [r["status"] for r in rows.values()]
    assert rows["openvino-f32"]["precision"] == "fp32" and rows["onnxruntime"]["precision"] == "fp32"
    assert rows["openvino"]["precision"] in ("fp32", "bf16", "fp16")
    assert rows["openvino-f32"]["rel_err_vs_torch"] < 1e-4 and rows["onnxruntime"]["rel_err_vs_torch"] < 1e-4
    assert rows["openvino"]["rel_err_vs_torch"] < 5e-2
    assert report["cpu_profile"] and "lanes" in report["cpu_profile"] and report["isa_limits"] == {}
    table = (tmp_path / "bench-SD1.5-tiny-64x64.md").read_text()
    assert f"| vae_decoder | openvino | {rows['openvino']['precision']} |" in table


def test_bench_runs_torch_under_bf16_autocast(tmp_path):
    """`torch-bf16`: eager torch under bf16 autocast, as its users run it; autocast runs on any CPU (slowly
    without bf16 instructions), so this runs everywhere."""
    result = CliRunner().invoke(main, ["bench", "--model", "SD1.5", "--weights", "tiny", "--resolution", "64x64",
                                       "--components", "vae_decoder", "--backends", "torch-bf16,torch",
                                       "--repeat", "1", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {r["backend"]: r for r in json.loads((tmp_path / "bench-SD1.5-tiny-64x64.json").read_text())["results"]}
    assert rows["torch-bf16"]["status"] == "ok" and rows["torch-bf16"]["precision"] == "bf16"
    assert 0 < rows["torch-bf16"]["rel_err_vs_torch"] < 5e-2, "bf16 matmuls differ from fp32 ones, a little"


def test_torch_bf16_is_a_default_backend_beside_openvino_on_bf16_cpus(monkeypatch):
    monkeypatch.setattr(targets, "host_has_avx512_bf16", lambda: True)
    assert default_backends() == ["tvm", "onnxruntime", "openvino", "torch-bf16", "openvino-f32", "torch"]
    monkeypatch.setattr(targets, "host_has_avx512_bf16", lambda: False)
    assert "torch-bf16" not in default_backends()


@pytest.mark.slow
def test_time_to_image_runs_each_recipe_whole_on_sdaot_openvino_and_torch(tmp_path, compiled_root):
    recipes = "sd15-euler-20-deepcache-3,sd15-lcm-4-tiny-vae,sdxl-turbo-1-tiny-vae"
    result = CliRunner().invoke(main, ["bench", "--recipes", recipes, "--weights", "tiny", "--resolution", "64x64",
                                       "--repeat", "1", "--artifacts", str(compiled_root), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "time-to-image-tiny.json").read_text())
    rows = {(r["recipe"], r["backend"]): r for r in report["rows"]}
    assert set(rows) == {(n, b) for n in recipes.split(",") for b in ("sdaot", "openvino", "torch")}
    assert all(r["status"] == "ok" and r["seconds_per_image"] > 0 and r["rss_mb"] > 0 for r in rows.values()), rows
    deepcache = rows[("sd15-euler-20-deepcache-3", "sdaot")]["networks"]
    assert deepcache["text_encoder"] == "tvm" and deepcache["vae_decoder"] == "tvm", deepcache
    assert set(rows[("sd15-lcm-4-tiny-vae", "openvino")]["networks"].values()) == {"openvino"}
    assert rows[("sd15-lcm-4-tiny-vae", "torch")]["networks"]["vae_decoder_tiny"] == "torch"
    for (recipe, backend), row in rows.items():
        assert backend == "torch" or row["psnr_db"] >= 20, row  # held against torch's image of the same seed
        with Image.open(tmp_path / f"{recipe}-{backend}.png") as image:
            assert image.size == (64, 64)
    assert rows[("sd15-lcm-4-tiny-vae", "sdaot")]["psnr_db"] >= 35
    table = (tmp_path / "time-to-image-tiny.md").read_text()
    assert "| sdxl-turbo-1-tiny-vae | openvino |" in table and report["machine"] in table


def test_time_to_image_names_an_unknown_recipe(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--recipes", "sd15-euler-20,fastest", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown recipe 'fastest'" in result.output and "sd15-lcm-4" in result.output
    result = CliRunner().invoke(main, ["bench", "--recipes", "--backends", "sdaot,tensorrt", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown recipe backend 'tensorrt'" in result.output
