"""The API's models: request bodies as the reference API defines them (plus our extras), answers, job states,
and the error shape with the HTTP status of each kind of error."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import SdaotError, without_paths
from ..request import MAX_SIDE, MIN_SIDE, RequestFields

OutputFormat = Literal["png", "jpeg", "webp"]
"""The image file formats an answer can carry."""
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable", 504: "timeout_error"}
STATUS_OF_KIND = {"invalid_request_error": 400, "not_found_error": 404, "weights_not_found": 503,
                  "service_unavailable": 503, "rate_limit_error": 429, "api_error": 500}


def status_of(error: SdaotError) -> int:
    """The HTTP status that answers an error of this kind."""
    return STATUS_OF_KIND.get(error.error_type, 400)


def error_content(status: int, message: str, param: str | None = None, kind: str | None = None) -> dict[str, object]:
    """The reference API's error shape: {object, message, type, param, code}; absolute paths in the message
    are cut to their last part."""
    return {"object": "error", "message": without_paths(message), "type": kind or ERROR_TYPES.get(status, "api_error"),
            "param": param, "code": status}


def error_shape(error: SdaotError) -> dict[str, object]:
    """An sdaot error in the API's error shape."""
    return error_content(status_of(error), error.message, error.param, error.error_type)


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
    output_format: OutputFormat = "png"


class ErrorBody(BaseModel):
    """The reference API's error shape, for every 4xx and 5xx answer."""

    object: Literal["error"] = "error"
    message: str = Field(description="What is wrong, naming the field where one is to blame")
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, ...")
    param: str | None = Field(description="The request field at fault, if any")
    code: int = Field(description="The HTTP status")


ERROR_DESCRIPTIONS = {
    400: "Invalid request: a field's value, an image, a LoRA or an unknown name; `param` names the field",
    401: "Missing or invalid API key (Authorization: Bearer <key>)",
    404: "Model not served here, or no such job for this API key (finished jobs expire)",
    413: "Request body over the size limit (counted on the bytes received, chunked or not)",
    422: "Body does not match the schema (type, range, unknown field); `param` is the field's path",
    429: "Every worker and queue slot is taken (for jobs: the most unfinished jobs); retry after `Retry-After` s",
    499: "The client closed the connection; the generation was cancelled",
    503: "Models are still loading, or could not be loaded (the message says why)",
    504: "The generation took longer than the server's time limit and was cancelled",
}


def error_responses(*codes: int, model: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error statuses, all with the error schema `model` (the reference
    API's unless a dialect's routes give theirs)."""
    return {code: {"model": model, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


class GeneratedImage(BaseModel):
    """One image of a generation answer."""

    image: str = Field(description="The image file (output_format), base64")
    index: int
    random_seed: int


class GenerationResponse(BaseModel):
    """The answer of POST /v1/image/generation: the reference's fields plus what ran where."""

    images: list[GeneratedImage]
    inference_time: float = Field(description="Seconds spent generating")
    backends: dict[str, str] = Field(description="The backend that ran each network")
    model_name: str
    width: int
    height: int
    steps: int
    sampler: str
    output_format: OutputFormat

    @property
    def nbytes(self) -> int:
        """The bytes of its encoded images: what a finished job that keeps this answer holds."""
        return sum(len(image.image) for image in self.images)


class JobRequest(ApiGenerationRequest):
    """POST /v1/jobs: the generation body, plus where to report the final state."""

    webhook_url: str | None = Field(default=None, description="http(s) URL that gets one POST with the final state")


JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
"""Where a job is: the generation queue's states, as the API reports them."""


class JobAccepted(BaseModel):
    """The answer of POST /v1/jobs (202)."""

    id: str
    status: JobStatus
    queue_position: int = Field(description="Jobs waiting ahead of this one")


class LivePreview(BaseModel):
    """A running job's latest live preview (request field `preview_every`): the first image as it stands."""

    step: int = Field(description="The sampler step it shows")
    image: str = Field(description="A WebP file, base64, its longest side at most 256 pixels")


class JobState(BaseModel):
    """GET /v1/jobs/{id}: where the job is; `result` once succeeded, `error` once failed.

    Only the fields set for the job's status are sent (routes answer with `response_model_exclude_unset`, the
    events and webhooks with `wire`): a queued job has no `step`, a running one has `eta` even while unknown."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    created: float = Field(description="Unix time the job was accepted")
    model_name: str
    queue_position: int | None = Field(default=None, description="While queued: jobs waiting ahead")
    step: int | None = Field(default=None, description="Sampler steps done")
    steps: int | None = Field(default=None, description="Sampler steps in all")
    elapsed: float | None = Field(default=None, description="Seconds since it started running")
    eta: float | None = Field(default=None, description="While running: seconds left, from the measured step time")
    preview: LivePreview | None = Field(default=None, description="Until it succeeds: the latest live preview, "
                                        "when the request asked for them (`preview_every`)")
    result: GenerationResponse | None = None
    error: ErrorBody | None = None

    def model_post_init(self, context: Any) -> None:
        """`object` is always sent, though it has a default."""
        self.model_fields_set.add("object")

    def wire(self, with_result: bool = True) -> dict[str, Any]:
        """The JSON object the API sends for this state (`result` left out unless `with_result`)."""
        return self.model_dump(mode="json", exclude_unset=True, exclude=None if with_result else {"result"})
