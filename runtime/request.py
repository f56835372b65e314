"""The generation request: every parameter of the reference API, validated once for CLI and HTTP alike."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .controlnet import get_controlnet_name
from .errors import InvalidRequestError
from .presets import get_preset
from .registry import get_model
from .samplers import get_sampler

Backend = Literal["auto", "tvm", "torch", "onnxruntime"]
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_SEED = 2**32 - 1
MAX_IMAGES = 4
MAX_STEPS = 150
MAX_DEEPCACHE_BRANCH = 11
"""DeepCache numbers 3 branches per UNet down block; the largest UNets here have 4 (the model's own limit is
checked against its weights)."""


class RequestFields(BaseModel):
    """The fields that the Python/CLI request and the HTTP body share, with their ranges."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model_name: str
    prompt: str = Field(max_length=10_000)
    prompt_2: str | None = Field(default=None, max_length=10_000)
    negative_prompt: str | None = Field(default=None, max_length=10_000)
    negative_prompt_2: str | None = Field(default=None, max_length=10_000)
    backend: Backend = "auto"
    strength: float = Field(default=0.8, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    cfg_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    sampler: str | None = None
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    style_preset: str | None = None
    enable_refiner: bool = False
    refiner_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES)
    controlnet_name: str | None = None
    controlnet_conditioning_scale: float = Field(default=1.0, ge=0.0, le=2.0)
    control_guidance_start: float = Field(default=0.0, ge=0.0, le=1.0)
    control_guidance_end: float = Field(default=1.0, ge=0.0, le=1.0)
    loras: dict[str, float] | None = None
    prompt_syntax: Literal["a1111", "plain"] = Field(
        default="a1111", description="a1111: AUTOMATIC1111's (word:1.3), [word], BREAK, <lora:name:weight> and "
        "prompts past 77 tokens in chunks; plain: the text as it is, cut at 77 tokens")
    vae: Literal["full", "tiny"] = Field(default="full", description="Decoder: the model's VAE, or the tiny "
                                         "TAESD/TAESDXL one (much faster, a little less detail)")
    deepcache_interval: int = Field(default=0, ge=0, le=MAX_STEPS, description="DeepCache: the full UNet runs every "
                                    "N-th step, a shallow UNet reusing its deep features the others (0: off)")
    deepcache_branch: int = Field(default=0, ge=0, le=MAX_DEEPCACHE_BRANCH, description="DeepCache's "
                                  "cache_branch_id: the skip connection the shallow UNet stops at (3 per down block; "
                                  "0 is the shallowest and fastest)")
    preview_every: int = Field(default=0, ge=0, le=MAX_STEPS, description="Live previews: a small WebP of the "
                               "first image's current state every N sampler steps, on the job's event stream and "
                               "in GET /v1/jobs/{id} (0: off)")


class GenerationRequest(RequestFields):
    """One image-generation request with decoded images. Unset optional fields take the model's defaults."""

    height: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE)
    width: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE)
    image: Any = Field(default=None, description="img2img start image (a PIL image)")
    controlnet_image: Any = Field(default=None, description="ControlNet input image (a PIL image)")

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (got {value})")
        return value


def parse_request(data: dict[str, Any]) -> GenerationRequest:
    """Validate raw values and names (model, sampler, preset) before any model is loaded; errors name the field."""
    try:
        req = GenerationRequest(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        message = err["msg"].removeprefix("Value error, ")
        raise InvalidRequestError(message, param=field) from exc
    get_model(req.model_name)
    if req.sampler is not None:
        get_sampler(req.sampler)
    if req.style_preset is not None:
        get_preset(req.style_preset)
    if req.controlnet_name is not None:
        get_controlnet_name(req.controlnet_name)
    if req.control_guidance_start >= req.control_guidance_end:
        raise InvalidRequestError("control_guidance_start must be below control_guidance_end",
                                  param="control_guidance_start")
    return req
