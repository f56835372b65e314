"""POST /v1/image/generation: the reference API's synchronous call, answered when the images are ready."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..protocol import ApiGenerationRequest, GenerationResponse, error_responses
from ..serving import ServerDep, plan_request, wait_sync

router = APIRouter()


@router.post("/v1/image/generation", response_model=GenerationResponse,
             responses=error_responses(400, 401, 404, 413, 422, 429, 499, 503, 504))
async def generation(body: ApiGenerationRequest, request: Request,
                     server: ServerDep) -> GenerationResponse | JSONResponse:
    """Generate images: the reference API's request and response. For work that may outlast a proxy's
    timeout, POST /v1/jobs takes the same body and reports progress."""
    pipe, plan = await plan_request(server, body)
    job = server.queue.run_now(pipe, plan, server.owner(request), server.delivery(body.output_format))
    failed = await wait_sync(server, request, job)
    if failed is not None:
        return failed
    assert job is not None and isinstance(job.answer, GenerationResponse)
    return job.answer  # encoded on the worker thread, off the event loop
