"""OpenAI's Images API as sdaot speaks it (`POST /v1/images/generations`): the request, the answer and the
error shape, so the official `openai` clients work unchanged. Only `b64_json` answers: nothing is stored to
be fetched by URL."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import without_paths
from ..request import MAX_IMAGES, MAX_SIDE, MIN_SIDE
from .protocol import ERROR_TYPES

OPENAI_PREFIX = "/v1/images/"


class ImageGenerationRequest(BaseModel):
    """The body of POST /v1/images/generations. `quality`, `style` and `user` are accepted and ignored (they
    name DALL-E options); any other unknown field is refused."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="A served model name; default: the first served")
    prompt: str = Field(max_length=10_000)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str = Field(default="1024x1024", description=f"WxH, each side a multiple of 8 in {MIN_SIDE}..{MAX_SIDE}")
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: str | None = None
    style: str | None = None
    user: str | None = None

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        width, _, height = value.lower().partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise ValueError(f"must be WxH, e.g. 512x512 (got {value!r})")
        for side in (int(width), int(height)):
            if side % 8 or not MIN_SIDE <= side <= MAX_SIDE:
                raise ValueError(f"each side must be a multiple of 8 in {MIN_SIDE}..{MAX_SIDE} (got {value!r})")
        return f"{int(width)}x{int(height)}"

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of the validated `size`."""
        width, _, height = self.size.partition("x")
        return int(width), int(height)


class ImageData(BaseModel):
    """One generated image: the PNG file, base64, and the prompt it was made from (never rewritten here)."""

    b64_json: str
    revised_prompt: str


class ImagesResponse(BaseModel):
    """The answer of POST /v1/images/generations."""

    created: int = Field(description="Unix time of the answer")
    data: list[ImageData]


class OpenAIError(BaseModel):
    """The inside of OpenAI's error shape."""

    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error shape, for every 4xx and 5xx answer of /v1/images/."""

    error: OpenAIError


def openai_error_content(status: int, message: str, param: str | None = None,
                         kind: str | None = None) -> dict[str, object]:
    """OpenAI's error shape: {"error": {message, type, param, code}}; `code` is null as in most of OpenAI's."""
    return {"error": {"message": without_paths(message), "type": kind or ERROR_TYPES.get(status, "api_error"),
                      "param": param, "code": None}}
