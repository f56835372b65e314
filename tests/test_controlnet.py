"""ControlNet: diffusers parity, one compiled ControlNet for every name, tvm vs torch, bad input."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import psnr, run_compiles
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
from PIL import Image

from sdaot.runtime.cli import main
from sdaot.runtime.controlnet import load_controlnet, preprocess_control_image
from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.loader import load_pipeline
from sdaot.runtime.request import parse_request
from sdaot.runtime.samplers import get_sampler, make_scheduler

MODELS = ["SD1.5-ControlNet", "SDXL-ControlNet"]
CONTROL = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
PLAIN = Image.new("RGB", (64, 64), (255, 255, 255))


def request(model, **kw):
    base = dict(model_name=model, prompt="a red cube", height=64, width=64, steps=4, seed=3, sampler="Euler",
                controlnet_name="depth", controlnet_image=CONTROL)
    return parse_request(base | kw)


def diffusers_pipeline(ours, controlnet):
    b = ours.bundle
    scheduler = make_scheduler(get_sampler("Euler"), ours.spec.scheduler_config)
    if ours.spec.is_sdxl:
        pipe = StableDiffusionXLControlNetPipeline(
            vae=b.vae, text_encoder=b.text_encoders["text_encoder"], text_encoder_2=b.text_encoders["text_encoder_2"],
            tokenizer=b.tokenizers["tokenizer"], tokenizer_2=b.tokenizers["tokenizer_2"], unet=b.unet,
            controlnet=controlnet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionControlNetPipeline(
            vae=b.vae, text_encoder=b.text_encoders["text_encoder"], tokenizer=b.tokenizers["tokenizer"],
            unet=b.unet, controlnet=controlnet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("extra", [{}, {"controlnet_conditioning_scale": 0.5, "control_guidance_start": 0.2,
                                        "control_guidance_end": 0.8}])
def test_matches_diffusers_controlnet_pipelines(pipelines, model, extra):
    ours = pipelines(model)
    got = ours.generate(request(model, **extra))
    assert got.backends["controlnet"] == "torch" and "unet" not in got.backends
    ref = diffusers_pipeline(ours, load_controlnet(ours.bundle, "depth"))
    want = ref(prompt="a red cube", image=CONTROL, height=64, width=64, num_inference_steps=4,
               guidance_scale=got.plan.cfg_scale, generator=torch.Generator().manual_seed(3), **extra).images[0]
    diff = np.abs(np.asarray(got.images[0], dtype=np.int16) - np.asarray(want, dtype=np.int16)).max()
    assert diff <= 1


@pytest.mark.parametrize("model", MODELS)
def test_a_different_control_image_changes_the_output(pipelines, model):
    ours = pipelines(model)
    a = np.asarray(ours.generate(request(model)).images[0], dtype=np.float64)
    b = np.asarray(ours.generate(request(model, controlnet_image=PLAIN)).images[0], dtype=np.float64)
    assert np.abs(a - b).mean() > 1.0


def test_canny_preprocessor_makes_an_edge_map():
    square = Image.new("RGB", (64, 64))
    square.paste((255, 255, 255), (16, 16, 48, 48))
    edges = np.asarray(preprocess_control_image("canny", square))
    assert set(np.unique(edges)) == {0, 255}
    assert edges[14:18, 30].any() and not edges[32, 32].any()


@pytest.fixture(scope="module")
def controlnet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn-artifacts")
    commands = []
    for model in MODELS:
        encoders = "text_encoder,text_encoder_2" if "SDXL" in model else "text_encoder"
        commands.append(["--model", model, "--resolution", "64x64", "--controlnet", "canny", "--components",
                         f"{encoders},controlnet,unet_controlnet,vae_decoder", "--out", str(root)])
    run_compiles(commands, tmp_path_factory.mktemp("cn-compile-logs"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_tvm_controlnet_matches_torch_for_every_name_from_one_build(controlnet_root, model):
    pipe = load_pipeline(model, "tiny", artifacts_root=controlnet_root)
    for name in ("canny", "depth"):
        images = {}
        for backend in ("torch", "tvm"):
            result = pipe.generate(request(model, controlnet_name=name, backend=backend))
            assert set(result.backends.values()) == {backend}
            images[backend] = result.images[0]
        assert psnr(images["tvm"], images["torch"]) >= 40, name


@pytest.mark.parametrize(
    ("model", "patch", "param"),
    [("SD1.5-ControlNet", {"controlnet_name": "sketchy"}, "controlnet_name"),
     ("SD1.5", {}, "controlnet_name"),
     ("SD1.5-ControlNet", {"controlnet_image": None}, "controlnet_image"),
     ("SD1.5-ControlNet", {"control_guidance_start": 0.9, "control_guidance_end": 0.5}, "control_guidance_start")],
)
def test_bad_controlnet_input_is_a_clear_error(pipelines, model, patch, param):
    with pytest.raises(InvalidRequestError) as err:
        pipelines(model).generate(request(model, **patch))
    assert err.value.param == param


def test_cli_controlnet_flags(tmp_path):
    CONTROL.save(tmp_path / "control.png")
    base = ["generate", "--model", "SD1.5-ControlNet", "--prompt", "x", "--height", "64", "--width", "64", "--steps",
            "2", "-o", str(tmp_path / "o.png"), "--controlnet-image", str(tmp_path / "control.png")]
    ok = CliRunner().invoke(main, [*base, "--controlnet-name", "canny"])
    assert ok.exit_code == 0 and "controlnet=torch" in ok.output
    bad = CliRunner().invoke(main, [*base, "--controlnet-name", "sketchy"])
    assert bad.exit_code == 2 and "error: controlnet_name: unknown controlnet_name" in bad.output


def test_cli_controlnet_dir_serves_real_weight_folders(tmp_path):
    """With weights from a diffusers folder, ControlNets come from --controlnet-dir; without it, a clear error."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdaot.runtime.registry import get_model, read_data
    from sdaot.runtime.weights import tiny_folder

    model_folder = tiny_folder(get_model("SD1.5-ControlNet"))
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(str(model_folder / "unet")),
                                           conditioning_embedding_out_channels=tuple(
        read_data("controlnets.json")["conditioning_embedding_out_channels"]["tiny"]))
    controlnet.save_pretrained(tmp_path / "controlnets" / "canny")
    CONTROL.save(tmp_path / "control.png")
    base = ["generate", "--model", "SD1.5-ControlNet", "--weights", str(model_folder), "--prompt", "x",
            "--height", "64", "--width", "64", "--steps", "2", "-o", str(tmp_path / "o.png"),
            "--controlnet-image", str(tmp_path / "control.png")]
    missing = CliRunner().invoke(main, base)
    assert missing.exit_code != 0 and "--controlnet-dir" in missing.output
    ok = CliRunner().invoke(main, [*base, "--controlnet-dir", str(tmp_path / "controlnets")])
    assert ok.exit_code == 0, ok.output
    assert Image.open(tmp_path / "o.png").size == (64, 64)
