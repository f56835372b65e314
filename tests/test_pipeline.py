"""Pipeline behaviour beyond diffusers parity: seeds, presets, refiner, turbo, every sampler name."""

import numpy as np
import pytest

from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.request import parse_request


def gen(pipe, **kw):
    base = dict(model_name=pipe.spec.name, prompt="a red cube", height=64, width=64, steps=2)
    return pipe.generate(parse_request(base | kw))


def pixels(img):
    return np.asarray(img, dtype=np.int16)


def test_each_image_has_its_own_seed_and_reproduces_alone(pipelines):
    pipe = pipelines("SD1.5")
    batch = gen(pipe, seed=100, num_images=2, sampler="Euler")
    assert batch.seeds == [100, 101]
    alone = gen(pipe, seed=101, sampler="Euler")
    assert np.abs(pixels(batch.images[1]) - pixels(alone.images[0])).max() <= 1
    assert not np.array_equal(pixels(batch.images[0]), pixels(batch.images[1]))


def test_missing_seed_is_random_and_reported(pipelines):
    pipe = pipelines("SD1.5")
    a, b = gen(pipe), gen(pipe)
    assert a.seeds != b.seeds
    again = gen(pipe, seed=a.seeds[0])
    assert np.array_equal(pixels(a.images[0]), pixels(again.images[0]))


def test_style_preset_changes_the_prompt_and_base_keeps_it(pipelines):
    pipe = pipelines("SD1.5")
    plain = gen(pipe, seed=3)
    base = gen(pipe, seed=3, style_preset="BASE")
    anime = gen(pipe, seed=3, style_preset="anime")
    assert anime.plan.prompt.startswith("anime illustration of a red cube")
    assert np.array_equal(pixels(plain.images[0]), pixels(base.images[0]))
    assert not np.array_equal(pixels(plain.images[0]), pixels(anime.images[0]))


def test_turbo_runs_without_guidance(pipelines):
    pipe = pipelines("SDXL-turbo")
    result = gen(pipe, seed=1, steps=None)
    assert not result.plan.do_cfg and result.plan.steps == 1
    with pytest.raises(InvalidRequestError) as err:
        gen(pipe, steps=8)
    assert err.value.param == "steps"


def test_refiner_runs_after_base_on_sdxl(pipelines):
    pipe = pipelines("SDXL1.0-base", refiner=True)
    without = gen(pipe, seed=4, steps=5)
    refined = gen(pipe, seed=4, steps=5, enable_refiner=True)
    assert refined.backends["refiner.unet"] == "torch"
    assert "refiner.text_encoder_2" in refined.backends
    assert not np.array_equal(pixels(without.images[0]), pixels(refined.images[0]))


def test_refiner_on_a_non_sdxl_model_is_an_error(pipelines):
    with pytest.raises(InvalidRequestError) as err:
        gen(pipelines("SD1.5"), enable_refiner=True)
    assert err.value.param == "enable_refiner"


def test_strength_too_small_for_the_step_count_is_an_error(pipelines):
    from PIL import Image

    with pytest.raises(InvalidRequestError) as err:
        gen(pipelines("SD1.5"), image=Image.new("RGB", (64, 64)), strength=0.1, steps=2)
    assert err.value.param == "strength"
