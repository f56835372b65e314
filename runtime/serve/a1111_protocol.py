"""AUTOMATIC1111's web UI API (`/sdapi/v1`), the part its clients use: txt2img and img2img bodies, their
answer, progress, and the error shape. A1111 clients send many fields this server has no use for (hires fix,
scripts, face restoration, ...): unknown fields are accepted and ignored, the ones used are validated."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import without_paths
from ..request import MAX_IMAGES, MAX_SEED, MAX_SIDE, MAX_STEPS, MIN_SIDE
from .protocol import ERROR_TYPES

A1111_PREFIX = "/sdapi/"
DEFAULT_PREVIEW_EVERY = 10
"""A1111's default `show_progress_every_n_steps`."""


class OverrideSettings(BaseModel):
    """`override_settings`: options for this request only; the model is the one read, others are ignored."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = None


class OptionsUpdate(BaseModel):
    """POST /sdapi/v1/options: the options read here (per API key); A1111's others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = Field(default=None, description="A served model's title")
    show_progress_every_n_steps: int | None = Field(default=None, ge=-1, le=MAX_STEPS,
                                                    description="Live preview period in steps (0 or -1: none)")


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img, with A1111's defaults. `sampler_name` wins over the older `sampler_index`;
    `scheduler` (A1111 1.9+) picks Karras sigmas; `seed` -1 is random; batch_size * n_iter images in all."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(default="", max_length=10_000)
    negative_prompt: str = Field(default="", max_length=10_000)
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    steps: int = Field(default=50, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(default=7.0, ge=0.0, le=30.0)
    width: int = Field(default=512, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)
    height: int = Field(default=512, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED)
    batch_size: int = Field(default=1, ge=1, le=MAX_IMAGES)
    n_iter: int = Field(default=1, ge=1, le=MAX_IMAGES)
    override_settings: OverrideSettings | None = None
    send_images: bool = True
    save_images: bool = False

    @model_validator(mode="after")
    def _bounded_total(self) -> Txt2ImgRequest:
        if self.batch_size * self.n_iter > MAX_IMAGES:
            raise ValueError(f"batch_size * n_iter must be at most {MAX_IMAGES} (got {self.batch_size} * "
                             f"{self.n_iter})")
        return self

    @property
    def images(self) -> int:
        """How many images the request makes."""
        return self.batch_size * self.n_iter


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: the first of `init_images` (base64) is the start image, resized to
    width x height; inpainting (`mask`) is not served."""

    init_images: list[str] = Field(min_length=1)
    denoising_strength: float = Field(default=0.75, ge=0.0, le=1.0)
    mask: str | None = None
    include_init_images: bool = False


class A1111Response(BaseModel):
    """A1111's generation answer: PNGs (base64), the request as understood, and `info`, a JSON string."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


class ProgressState(BaseModel):
    """The `state` of GET /sdapi/v1/progress."""

    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    """GET /sdapi/v1/progress: this API key's current A1111 generation (all zero when none runs);
    `current_image` is the latest live preview, a base64 WebP."""

    progress: float = Field(ge=0.0, le=1.0)
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class A1111ErrorBody(BaseModel):
    """A1111's error shape, for every 4xx and 5xx answer of /sdapi/."""

    error: str = Field(description="The kind of error")
    detail: str = Field(description="What is wrong, naming the field at fault first")
    body: str
    errors: str


def a1111_error_content(status: int, message: str, param: str | None = None,
                        kind: str | None = None) -> dict[str, object]:
    """A1111's error shape ({error, detail, body, errors}, as its API's exception handler answers), `detail`
    naming the field at fault first, as FastAPI's `{"detail": ...}` clients read it."""
    message = without_paths(message)
    detail = message if param is None or message.startswith(param) else f"{param}: {message}"
    return {"error": kind or ERROR_TYPES.get(status, "api_error"), "detail": detail, "body": "", "errors": detail}
