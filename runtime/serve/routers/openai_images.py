"""OpenAI's Images API: POST /v1/images/generations, mapped onto the same planner and queue as the reference
call (its errors in OpenAI's shape: `error_shapes`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...errors import InvalidRequestError
from ..openai_protocol import ImageData, ImageGenerationRequest, ImagesResponse, OpenAIErrorBody
from ..protocol import ApiGenerationRequest, GenerationResponse, error_responses
from ..serving import ServerDep, plan_request, served_pipeline, wait_sync

router = APIRouter(prefix="/v1/images")


@router.post("/generations", response_model=ImagesResponse,
             responses=error_responses(400, 401, 404, 413, 429, 499, 503, 504, model=OpenAIErrorBody))
async def generations(body: ImageGenerationRequest, request: Request,
                      server: ServerDep) -> ImagesResponse | JSONResponse:
    """Generate `n` PNG images of `size` with a served `model` (default: the first served), as OpenAI's
    Images API answers them (`b64_json` only)."""
    if body.response_format == "url":
        raise InvalidRequestError("response_format 'url' is not served: images are not stored here; ask for "
                                  "b64_json", param="response_format")
    pipe = served_pipeline(server, body.model or server.default_model, param="model")
    width, height = body.dimensions
    pipe, plan = await plan_request(server, ApiGenerationRequest(
        model_name=pipe.spec.name, prompt=body.prompt, num_images=body.n, width=width, height=height))
    job = server.queue.run_now(pipe, plan, server.owner(request), server.delivery("png"))
    failed = await wait_sync(server, request, job)
    if failed is not None:
        return failed
    assert job is not None and isinstance(job.answer, GenerationResponse)
    return ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=image.image, revised_prompt=body.prompt)
                                                          for image in job.answer.images])
