"""Live previews: a small picture of where a generation is going, every few sampler steps, so that a user
watching a 20-step image sees it take shape instead of a bar alone.

A preview shows the sampler's current estimate of the clean latents (its x0 prediction where the scheduler
gives one), decoded cheaply: by the tiny decoder (TAESD/TAESDXL) where the pipeline has one, otherwise by the
family's linear latent-to-RGB map (A1111's "Approx cheap": each latent channel adds a fixed colour). Only the
first image of a batch is shown, fitted into a PREVIEW_SIDE box.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

PREVIEW_SIDE = 256
"""The longest side of a preview, in pixels: enough to judge composition, small enough to send every step."""

PreviewSink = Callable[[int, Image.Image], None]
"""Receives (step, image) whenever a preview is due."""

LATENT_RGB: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sd1": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "sd2": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "sdxl": ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
             (-0.3730, -0.2499, -0.2088)),
}
"""Per model family, the RGB contribution of each of the 4 latent channels (A1111's `cheap_approximation`),
applied to latents in the UNet's (scaled) space; the result lies roughly in [-1, 1]."""


def is_due(every: int, step: int, steps: int) -> bool:
    """Whether step `step` (1-based) of `steps` gets a preview: every `every`-th one, never the last (the
    finished image follows at once)."""
    return every > 0 and step % every == 0 and step < steps


def clean_estimate(step_output: object, latents: torch.Tensor) -> torch.Tensor:
    """The scheduler's estimate of the clean latents after a step: `pred_original_sample` (Euler, DDIM, ...)
    or `denoised` (LCM) where it gives one, else the noisy latents themselves (multistep DPM solvers)."""
    for name in ("denoised", "pred_original_sample"):
        value = getattr(step_output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return latents


def linear_preview(latents: torch.Tensor, family: str) -> Image.Image:
    """The first latent image mapped to RGB by the family's linear approximation (latent resolution)."""
    factors = torch.tensor(LATENT_RGB[family], dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), factors)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def fitted(image: Image.Image, width: int, height: int) -> Image.Image:
    """The preview at the generated image's aspect, its longest side min(PREVIEW_SIDE, the image's)."""
    scale = min(PREVIEW_SIDE, max(width, height)) / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)
