"""The tiny decoder (`vae: tiny`): diffusers' AutoencoderTiny (TAESD, TAESDXL for SDXL) as a component like the
others: the same image as diffusers' pipeline with that decoder swapped in, weights from --tiny-vae-dir, a clear
error where a model has none, and compiled per resolution on request."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline, StableDiffusionXLPipeline

from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.loader import load_pipeline
from sdaot.runtime.request import parse_request
from sdaot.runtime.samplers import make_scheduler
from sdaot.runtime.weights import tiny_folder

PROMPT = "a red cube on a table"


def request(model, **kw):
    return parse_request(dict(model_name=model, prompt=PROMPT, height=64, width=64, steps=3, seed=9, vae="tiny") | kw)


def diffusers_image(pipe, got, vae):
    cls = StableDiffusionXLPipeline if pipe.spec.is_sdxl else StableDiffusionPipeline
    ref = cls.from_pretrained(str(tiny_folder(pipe.spec)), vae=vae, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = make_scheduler(got.plan.sampler, pipe.spec.scheduler_config)
    return ref(prompt=PROMPT, height=64, width=64, num_inference_steps=3, guidance_scale=got.plan.cfg_scale,
               generator=torch.Generator().manual_seed(9)).images[0]


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("model", ["SD1.5", "SDXL1.0-base"])
def test_tiny_decoder_image_equals_diffusers_with_autoencoder_tiny(model):
    pipe = load_pipeline(model, "tiny")
    got = pipe.generate(request(model))
    assert got.backends["vae_decoder_tiny"] == "torch" and "vae_decoder" not in got.backends
    want = diffusers_image(pipe, got, pipe.bundle.tiny_vae)
    assert np.asarray(want).std() > 1, "reference image is flat: the comparison would prove nothing"
    assert max_diff(got.images[0], want) <= 1
    full = pipe.generate(request(model, vae="full")).images[0]
    assert max_diff(full, got.images[0]) > 10, "the full and the tiny decoder gave the same image"


def test_tiny_decoder_weights_come_from_the_folder_by_family(tmp_path):
    torch.manual_seed(1)
    saved = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                            num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    saved.save_pretrained(tmp_path / "sd1")
    pipe = load_pipeline("SD1.5", "tiny", tiny_vae_folder=tmp_path)
    assert pipe.bundle.tiny_vae.config.decoder_block_out_channels == [8, 8, 8, 8]
    assert all(torch.equal(a, b) for a, b in zip(pipe.bundle.tiny_vae.state_dict().values(),
                                                 saved.state_dict().values(), strict=True))
    got = pipe.generate(request("SD1.5"))
    assert max_diff(got.images[0], diffusers_image(pipe, got, saved)) <= 1


def test_a_model_without_a_tiny_decoder_refuses_vae_tiny_by_field(tmp_path):
    pipe = load_pipeline("SD1.5", str(tiny_folder(load_pipeline("SD1.5", "tiny").spec)))
    assert pipe.bundle.tiny_vae is None
    with pytest.raises(InvalidRequestError, match="no tiny decoder.*--tiny-vae-dir") as err:
        pipe.generate(request("SD1.5"))
    assert err.value.param == "vae"
    with pytest.raises(Exception, match="vae"):
        parse_request(dict(model_name="SD1.5", prompt="x", vae="small"))


def test_cli_generate_with_the_tiny_decoder(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from sdaot.runtime.cli import main

    out = tmp_path / "tiny.png"
    result = CliRunner().invoke(main, ["generate", "--model", "SD1.5", "--prompt", "x", "--height", "64", "--width",
                                       "64", "--steps", "2", "--vae", "tiny", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (64, 64)
    bad = CliRunner().invoke(main, ["generate", "--model", "SD1.5", "--prompt", "x", "--vae", "small"])
    assert bad.exit_code == 2 and "--vae" in bad.output


@pytest.mark.slow
def test_compiled_tiny_decoder_on_tvm_and_onnxruntime_equals_torch(tmp_path):
    from click.testing import CliRunner

    from sdaot.runtime.cli import main
    from sdaot.runtime.resolution import Resolution

    result = CliRunner().invoke(main, ["compile", "--model", "SD1.5", "--weights", "tiny", "--resolution", "64x64",
                                       "--components", "vae_decoder_tiny", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=tmp_path)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    need = {"vae_decoder_tiny": (Resolution(64, 64), 1)}
    outputs = {}
    for backend in ("torch", "tvm", "onnxruntime"):
        component = pipe.selector.select(backend, need)["vae_decoder_tiny"]
        assert component.backend == backend
        outputs[backend] = component(latents)[0]
    assert outputs["torch"].std() > 0.01
    torch.testing.assert_close(outputs["tvm"], outputs["torch"], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(outputs["onnxruntime"], outputs["torch"], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("model", ["SD1.5", "SDXL-turbo"])
def test_built_in_random_tiny_decoder_spreads_its_image(model):
    # A decoder that paints every latent near-black hides any backend's error; the built-in one must not.
    pipe = load_pipeline(model, "tiny")
    pixels = np.asarray(pipe.generate(request(model)).images[0], dtype=np.float32)
    assert 60 < pixels.mean() < 200 and pixels.std() > 20, (pixels.mean(), pixels.std())
