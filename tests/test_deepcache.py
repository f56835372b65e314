"""Feature caching (DeepCache): the same images as the `DeepCache` package's DeepCacheSDHelper on diffusers'
pipeline, request fields checked against the model, and the shallow UNet compiled like the UNet."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.request import parse_request
from sdaot.runtime.samplers import make_scheduler
from sdaot.runtime.weights import tiny_folder

PROMPT = "a red cube on a table"


def request(model, **kw):
    return parse_request(dict(model_name=model, prompt=PROMPT, height=64, width=64, steps=6, seed=3) | kw)


def deepcache_image(pipe, got, interval, branch):
    """diffusers' own pipeline on the same tiny weights, scheduler and seed, with DeepCacheSDHelper enabled."""
    from DeepCache import DeepCacheSDHelper

    cls = StableDiffusionXLPipeline if pipe.spec.is_sdxl else StableDiffusionPipeline
    ref = cls.from_pretrained(str(tiny_folder(pipe.spec)), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = make_scheduler(got.plan.sampler, pipe.spec.scheduler_config)
    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return ref(prompt=PROMPT, height=64, width=64, num_inference_steps=got.plan.steps,
               guidance_scale=got.plan.cfg_scale, generator=torch.Generator().manual_seed(3)).images[0]


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize(("model", "sampler", "interval", "branch"), [
    ("SD1.5", "Euler", 3, 0), pytest.param("SD1.5", "DDIM", 2, 2, marks=pytest.mark.slow),
    pytest.param("SD1.5", "Euler", 2, 4, marks=pytest.mark.slow),
    pytest.param("SDXL1.0-base", "Euler", 2, 0, marks=pytest.mark.slow),
])
def test_images_equal_deepcache_sd_helper(pipelines, model, sampler, interval, branch):
    pipe = pipelines(model)
    got = pipe.generate(request(model, sampler=sampler, deepcache_interval=interval, deepcache_branch=branch))
    assert {got.backends["unet_cached"], got.backends["unet_shallow"]} == {"torch"} and "unet" not in got.backends
    want = deepcache_image(pipe, got, interval, branch)
    assert np.asarray(want).std() > 1, "reference image is flat: the comparison would prove nothing"
    assert max_diff(got.images[0], want) <= 1
    plain = pipe.generate(request(model, sampler=sampler)).images[0]
    assert max_diff(plain, got.images[0]) >= 2, "the cached steps gave the uncached image: nothing was skipped"


def test_request_fields_are_checked_by_name(pipelines):
    for field, value in [("deepcache_interval", -1), ("deepcache_branch", 12)]:
        with pytest.raises(InvalidRequestError) as err:
            request("SD1.5", **{field: value})
        assert err.value.param == field
    pipe = pipelines("SD1.5")
    with pytest.raises(InvalidRequestError, match="branches 0 to 5") as err:
        pipe.plan(request("SD1.5", deepcache_interval=2, deepcache_branch=6))
    assert err.value.param == "deepcache_branch"
    with pytest.raises(InvalidRequestError, match="built for DeepCache branch 0") as err:
        pipe.plan(request("SD1.5", deepcache_interval=2, deepcache_branch=1, backend="tvm"))
    assert err.value.param == "deepcache_branch"
    assert request("SD1.5").deepcache_interval == 0


def test_cli_generate_with_deepcache(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from sdaot.runtime.cli import main

    out = tmp_path / "cached.png"
    result = CliRunner().invoke(main, ["generate", "--model", "SD1.5", "--prompt", "x", "--height", "64", "--width",
                                       "64", "--steps", "3", "--deepcache-interval", "2", "--deepcache-branch", "1",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "unet_shallow=torch" in result.output
    assert Image.open(out).size == (64, 64)


@pytest.mark.slow
def test_compiled_caching_unets_on_tvm_and_onnxruntime_equal_torch(tmp_path):
    from click.testing import CliRunner

    from sdaot.runtime.cli import main
    from sdaot.runtime.loader import load_pipeline
    from sdaot.runtime.resolution import Resolution

    result = CliRunner().invoke(main, ["compile", "--model", "SD1.5", "--weights", "tiny", "--resolution", "64x64",
                                       "--components", "unet_cached,unet_shallow", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=tmp_path)
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    timestep = torch.full((2,), 700.0)
    need = {"unet_cached": (Resolution(64, 64), 2), "unet_shallow": (Resolution(64, 64), 2)}
    outputs = {}
    for backend in ("torch", "tvm", "onnxruntime"):
        components = pipe.selector.select(backend, need)
        assert {c.backend for c in components.values()} == {backend}
        noise, feature = components["unet_cached"](sample, timestep, text)
        outputs[backend] = (noise, feature, components["unet_shallow"](sample * 0.9, timestep - 50, text, feature)[0])
    assert outputs["torch"][2].std() > 0.01
    for backend in ("tvm", "onnxruntime"):
        for got, want in zip(outputs[backend], outputs["torch"], strict=True):
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    got = pipe.generate(request("SD1.5", steps=3, deepcache_interval=2))
    assert got.backends["unet_cached"] == got.backends["unet_shallow"] == "tvm"
