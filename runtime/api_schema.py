"""The HTTP request body of POST /v1/image/generation, as the reference API defines it (plus our extras)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from .request import MAX_SIDE, MIN_SIDE, RequestFields


class ApiGenerationRequest(RequestFields):
    """Reference fields with the reference's defaults (1024x1024); unset steps/cfg/sampler use the model's.

    Images arrive as base64 strings (raw or data URL) and are decoded by the server before validation of
    the full request.
    """

    model_config = ConfigDict(extra="forbid")

    height: int = Field(default=1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)
    width: int = Field(default=1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)
    image: str | None = Field(default=None, description="img2img start image, base64 or data URL")
    controlnet_image: str | None = Field(default=None, description="ControlNet image, base64 or data URL")
    output_format: Literal["png", "jpeg", "webp"] = "png"
