"""Correctness anchor: our pipeline reproduces diffusers' own pipelines (same seed, scheduler, parameters)."""

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from sdaot.runtime.request import parse_request
from sdaot.runtime.samplers import SAMPLERS, get_sampler, make_scheduler
from sdaot.runtime.weights import tiny_folder

FAMILIES = ["SD1.5", "SD2", "SDXL1.0-base"]
FIVE_SAMPLERS = ["Euler", "Euler a", "DPM++ 2M Karras", "DDIM", "Heun"]


def reference_pipeline(spec, img2img: bool):
    if spec.is_sdxl:
        cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
    else:
        cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(tiny_folder(spec)), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_abs_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("model", FAMILIES)
def test_txt2img_matches_diffusers(pipelines, model):
    ours = pipelines(model)
    ref = reference_pipeline(ours.spec, img2img=False)
    for sampler in FIVE_SAMPLERS:
        req = parse_request(dict(model_name=model, prompt="a red cube on a table", negative_prompt="blurry",
                                 height=64, width=64, steps=3, seed=11, sampler=sampler))
        got = ours.generate(req)
        ref.scheduler = make_scheduler(get_sampler(sampler), ours.spec.scheduler_config)
        want = ref(prompt="a red cube on a table", negative_prompt="blurry", height=64, width=64,
                   num_inference_steps=3, guidance_scale=got.plan.cfg_scale,
                   generator=torch.Generator().manual_seed(11)).images[0]
        assert got.images[0].size == (64, 64)
        assert np.asarray(want).std() > 1, "reference image is flat: the comparison would prove nothing"
        assert max_abs_diff(got.images[0], want) <= 1, (model, sampler)


@pytest.mark.parametrize("model", FAMILIES)
def test_img2img_matches_diffusers(pipelines, model):
    ours = pipelines(model)
    ref = reference_pipeline(ours.spec, img2img=True)
    init = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 72, 3), dtype=np.uint8))
    for sampler in ["Euler", "DDIM"]:
        req = parse_request(dict(model_name=model, prompt="a blue sphere", image=init, strength=0.6, steps=4,
                                 seed=5, sampler=sampler))
        got = ours.generate(req)
        ref.scheduler = make_scheduler(get_sampler(sampler), ours.spec.scheduler_config)
        want = ref(prompt="a blue sphere", image=init, strength=0.6, num_inference_steps=4,
                   guidance_scale=got.plan.cfg_scale, generator=torch.Generator().manual_seed(5)).images[0]
        assert got.images[0].size == (72, 64)
        assert max_abs_diff(got.images[0], want) <= 1, (model, sampler)


def test_sdxl_without_negative_prompt_uses_zero_uncond_like_diffusers(pipelines):
    ours = pipelines("SDXL1.0-base")
    ref = reference_pipeline(ours.spec, img2img=False)
    got = ours.generate(parse_request(dict(model_name="SDXL1.0-base", prompt="x", height=64, width=64, steps=2,
                                           seed=1, sampler="Euler")))
    ref.scheduler = make_scheduler(get_sampler("Euler"), ours.spec.scheduler_config)
    want = ref(prompt="x", height=64, width=64, num_inference_steps=2, guidance_scale=got.plan.cfg_scale,
               generator=torch.Generator().manual_seed(1)).images[0]
    assert max_abs_diff(got.images[0], want) <= 1


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_name_uses_its_scheduler_and_matches_diffusers(pipelines, name):
    ours = pipelines("SD1.5")
    spec = get_sampler(name.upper().replace(" ", "_"))
    assert spec.name == name
    scheduler = make_scheduler(spec, ours.spec.scheduler_config, seed=7)
    assert type(scheduler).__name__ == spec.scheduler
    for key, value in spec.options.items():
        assert scheduler.config[key] == value
    got = ours.generate(parse_request(dict(model_name="SD1.5", prompt="a red cube", height=64, width=64, steps=4,
                                           seed=7, sampler=name)))
    assert np.isfinite(np.asarray(got.images[0])).all()
    ref = reference_pipeline(ours.spec, img2img=False)
    ref.scheduler = scheduler
    want = ref(prompt="a red cube", height=64, width=64, num_inference_steps=4, guidance_scale=got.plan.cfg_scale,
               generator=torch.Generator().manual_seed(7)).images[0]
    assert max_abs_diff(got.images[0], want) <= 1, name


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M Karras"])
def test_base_plus_refiner_matches_diffusers_ensemble_flow(pipelines, sampler):
    from sdaot.runtime.registry import get_model

    ours = pipelines("SDXL1.0-base", refiner=True)
    got = ours.generate(parse_request(dict(model_name="SDXL1.0-base", prompt="a red cube", prompt_2="cubes",
                                           negative_prompt="blur", height=64, width=64, steps=10, seed=3,
                                           sampler=sampler, enable_refiner=True, refiner_fraction=0.2)))
    assert got.backends["refiner.unet"] == "torch"
    base = reference_pipeline(ours.spec, img2img=False)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_folder(get_model("SDXL1.0-refiner"))),
                                                               local_files_only=True)
    refiner.set_progress_bar_config(disable=True)
    base.scheduler = make_scheduler(get_sampler(sampler), ours.spec.scheduler_config)
    refiner.scheduler = make_scheduler(get_sampler(sampler), ours.spec.scheduler_config)
    generator = torch.Generator().manual_seed(3)
    common = dict(prompt="a red cube", prompt_2="cubes", negative_prompt="blur", num_inference_steps=10,
                  guidance_scale=got.plan.cfg_scale, generator=generator)
    latents = base(height=64, width=64, denoising_end=0.8, output_type="latent", **common).images
    want = refiner(image=latents, denoising_start=0.8, **common).images[0]
    assert max_abs_diff(got.images[0], want) <= 1
