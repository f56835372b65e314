"""The HTTP request body of POST /v1/image/generation, as the reference API defines it (plus our extras)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .request import MAX_IMAGES, MAX_SEED, MAX_SIDE, MIN_SIDE, Backend


class ApiGenerationRequest(BaseModel):
    """Reference fields with the reference's defaults (1024x1024); unset steps/cfg/sampler use the model's."""

    model_config = ConfigDict(extra="forbid")

    model_name: str
    prompt: str = Field(max_length=10_000)
    prompt_2: str | None = Field(default=None, max_length=10_000)
    negative_prompt: str | None = Field(default=None, max_length=10_000)
    negative_prompt_2: str | None = Field(default=None, max_length=10_000)
    height: int = Field(default=1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)
    width: int = Field(default=1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)
    backend: Backend = "auto"
    image: str | None = Field(default=None, description="img2img start image, base64 or data URL")
    strength: float = Field(default=0.8, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    cfg_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    sampler: str | None = None
    steps: int | None = Field(default=None, ge=1, le=150)
    style_preset: str | None = None
    enable_refiner: bool = False
    refiner_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    controlnet_name: str | None = None
    controlnet_image: str | None = None
    controlnet_conditioning_scale: float = Field(default=1.0, ge=0.0, le=2.0)
    control_guidance_start: float = Field(default=0.0, ge=0.0, le=1.0)
    control_guidance_end: float = Field(default=1.0, ge=0.0, le=1.0)
    loras: dict[str, float] | None = None
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES)
    output_format: Literal["png", "jpeg", "webp"] = "png"
