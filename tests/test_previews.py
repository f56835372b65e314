"""Live previews in the pipeline: the linear latent-to-RGB map against a hand-computed case, previews at every
N-th step only, fitted to the preview box, and a generation that makes previews gives the same images."""

import numpy as np
import torch

from sdaot.runtime.previews import PREVIEW_SIDE, fitted, is_due, linear_preview
from sdaot.runtime.request import parse_request


def test_the_linear_map_gives_each_latent_channel_its_colour_around_grey():
    latents = torch.zeros(2, 4, 1, 3)
    latents[0, 0, 0, 1] = 1.0  # SD1's first channel: (0.298, 0.207, 0.208) -> (1 + c) * 127.5
    latents[0, 3, 0, 2] = -1.0  # minus the fourth: (0.184, 0.271, 0.473)
    latents[1] = 5.0  # the second image is never shown
    pixels = np.asarray(linear_preview(latents, "sd1"))
    assert pixels.shape == (1, 3, 3)
    assert pixels[0, 0].tolist() == [127, 127, 127]
    assert pixels[0, 1].tolist() == [165, 153, 154]
    assert pixels[0, 2].tolist() == [150, 162, 187]
    sdxl = np.asarray(linear_preview(latents, "sdxl"))
    assert sdxl[0, 1].tolist() == [171, 180, 183]


def test_previews_are_due_every_nth_step_but_never_on_the_last():
    assert [s for s in range(1, 11) if is_due(3, s, 10)] == [3, 6, 9]
    assert [s for s in range(1, 7) if is_due(3, s, 6)] == [3]
    assert not any(is_due(0, s, 10) for s in range(1, 11))


def test_a_preview_keeps_the_aspect_within_the_box():
    from PIL import Image

    assert fitted(Image.new("RGB", (96, 64)), 768, 512).size == (PREVIEW_SIDE, 171)
    assert fitted(Image.new("RGB", (8, 8)), 64, 64).size == (64, 64)


def test_previews_arrive_every_nth_step_and_leave_the_images_as_they_were(pipelines):
    pipe = pipelines("SD1.5")
    fields = dict(model_name="SD1.5", prompt="a red cube", height=64, width=96, steps=5, seed=3, sampler="Euler",
                  num_images=2)
    seen = []
    with_previews = pipe.generate(parse_request(fields | {"preview_every": 2}),
                                  preview=lambda step, image: seen.append((step, image)))
    plain = pipe.generate(parse_request(fields))
    assert [step for step, _ in seen] == [2, 4]
    assert all(image.size == (96, 64) and image.mode == "RGB" for _, image in seen)
    assert not np.array_equal(np.asarray(seen[0][1]), np.asarray(seen[1][1])), "the picture moves with the steps"
    for a, b in zip(with_previews.images, plain.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
